"""Budgets and verdicts (masking_bench/report/budgets.py): the trained-minus-untrained gap, the ranking
stability across evaluated epochs and the verdict on each paper's claim, checked against values
computed here by hand, plus the per-strategy ratios that shape the ladder suite."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from test_report import _suite, write_records

from masking_bench.config import expand, parse_suite
from masking_bench.errors import BenchError
from masking_bench.report import write_report
from masking_bench.report.budgets import gap_table, ranking_tables, verdict_table
from masking_bench.report.records import Records

SETTING = {"suite": "s", "variant": "", "method": "mae", "model": "cpu-tiny", "epochs": 3}
BASELINES = {"s": "random"}


def _curve_rows(values: dict[tuple[str, float], list[float]], protocol: str = "probe", ratio: float = 0.75):
    """values: (strategy, epoch) -> top-1 per seed; epoch 0 rows are the untrained encoder of that seed."""
    rows = []
    for (strategy, epoch), per_seed in values.items():
        for seed, top1 in enumerate(per_seed):
            rows.append(
                {**SETTING, "strategy": strategy, "ratio": ratio, "seed": seed, "protocol": protocol}
                | {"epoch": float(epoch), "top1": top1, "kind": "pretrain", "floor_key": "f"}
            )
    return pd.DataFrame(rows)


def t_ci(values):
    values = np.asarray(values, float)
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return values.mean() - half, values.mean() + half


def test_gap_is_paired_with_the_untrained_encoder_of_the_same_seed():
    floor = [70.0, 72.0, 71.0]
    trained = [74.0, 77.5, 74.2]
    curves = _curve_rows({("random", 0): floor, ("random", 1): [71, 72, 72], ("random", 2): trained})
    gap = gap_table(curves, BASELINES)
    assert list(gap["epoch"]) == [1.0, 2.0]
    last = gap[gap["epoch"] == 2.0].iloc[0]
    differences = np.subtract(trained, floor)
    assert last["gap_mean"] == pytest.approx(differences.mean())
    assert (last["gap_ci_low"], last["gap_ci_high"]) == pytest.approx(t_ci(differences))
    assert bool(last["outside_noise"])
    first = gap[gap["epoch"] == 1.0].iloc[0]  # +1, 0, +1: its interval contains 0
    assert first["gap_mean"] == pytest.approx(2 / 3) and not bool(first["outside_noise"])


def test_no_gap_without_an_untrained_encoder():
    curves = _curve_rows({("random", 1): [71, 72, 72], ("random", 2): [74, 75, 76]})
    assert gap_table(curves, BASELINES).empty


def test_a_reversed_ranking_has_tau_minus_one_and_the_best_never_stays():
    curves = _curve_rows(
        {
            ("a", 1): [80, 81, 80.5],
            ("b", 1): [70, 71, 70.5],
            ("c", 1): [60, 61, 60.5],
            ("a", 3): [60, 61, 60.5],
            ("b", 3): [70, 71, 70.5],
            ("c", 3): [80, 81, 80.5],
        }
    )
    ranks, stability = ranking_tables(curves, BASELINES)
    assert len(stability) == 1  # epoch 1 against epoch 3; the last budget is not compared with itself
    row = stability.iloc[0]
    assert row["kendall_tau"] == pytest.approx(-1.0)
    assert (row["tau_ci_low"], row["tau_ci_high"]) == pytest.approx((-1.0, -1.0))
    assert row["best"] == "a" and row["best_at_last"] == "c" and row["p_best_stays_best"] == 0.0
    at_one = ranks[ranks["epoch"] == 1.0].set_index("strategy")["rank"]
    assert at_one.to_dict() == {"a": 1, "b": 2, "c": 3}


def test_tau_matches_scipy_and_the_bootstrap_enumerates_every_resample():
    early = {"a": [75.0, 70.0, 72.0], "b": [74.0, 73.0, 71.0], "c": [70.0, 69.0, 74.0], "d": [60.0, 61.0, 62.0]}
    late = {"a": [80.0, 78.0, 79.0], "b": [79.0, 80.0, 78.5], "c": [77.0, 76.0, 78.0], "d": [70.0, 71.0, 69.0]}
    values = {(s, 1): v for s, v in early.items()} | {(s, 2): v for s, v in late.items()}
    _, stability = ranking_tables(_curve_rows(values), BASELINES)
    row = stability.iloc[0]
    means_early = [np.mean(early[s]) for s in "abcd"]
    means_late = [np.mean(late[s]) for s in "abcd"]
    assert row["kendall_tau"] == pytest.approx(stats.kendalltau(means_early, means_late).statistic)
    # 3 seeds: all 27 ordered resamples are enumerated, so the probability is a multiple of 1/27
    assert (row["p_best_stays_best"] * 27) == pytest.approx(round(row["p_best_stays_best"] * 27))
    assert 0 < row["p_best_stays_best"] < 1
    assert row["tau_ci_low"] <= row["kendall_tau"] <= row["tau_ci_high"]


def test_one_budget_or_one_strategy_has_no_stability_row():
    one_budget = _curve_rows({("a", 3): [1, 2, 3], ("b", 3): [2, 3, 4]})
    one_strategy = _curve_rows({("a", 1): [1, 2, 3], ("a", 3): [2, 3, 4]})
    for curves in (one_budget, one_strategy):
        ranks, stability = ranking_tables(curves, BASELINES)
        assert ranks.empty and stability.empty


def _records(scores: pd.DataFrame) -> Records:
    runs = scores.drop_duplicates(["strategy", "ratio", "seed"]).assign(images_seen=180_000.0)
    return Records(runs, scores, pd.DataFrame(), sorted(scores["protocol"].unique()), baselines=BASELINES)


def _scores(values: dict[tuple[str, float], list[float]], protocol: str = "probe") -> pd.DataFrame:
    rows = [
        {**SETTING, "kind": "pretrain", "strategy": s, "ratio": r, "seed": seed, "protocol": protocol, "top1": v}
        for (s, r), per_seed in values.items()
        for seed, v in enumerate(per_seed)
    ]
    return pd.DataFrame(rows)


@pytest.mark.parametrize(
    ("misalign", "verdict"),
    [
        ([72.0, 73.1, 72.4], "reproduced"),
        ([68.0, 69.2, 68.5], "not reproduced"),
        ([71.0, 69.0, 70.4], "inside the noise"),
    ],
)
def test_final_accuracy_claim_verdicts(misalign, verdict):
    random = [70.0, 71.0, 70.2]
    scores = _scores({("random", 0.75): random, ("misalign", 0.75): misalign})
    table = verdict_table(
        _records(scores), pd.DataFrame(columns=scores.columns.tolist() + ["epoch"]), [tuple(SETTING.values())]
    )
    row = table[table["claim"] == "misalign_beats_masking"].iloc[0]
    deltas = np.subtract(misalign, random)
    assert row["delta_mean"] == pytest.approx(deltas.mean())
    assert (row["delta_ci_low"], row["delta_ci_high"]) == pytest.approx(t_ci(deltas))
    assert row["verdict"] == verdict and bool(row["headline"]) and row["images_seen"] == 180_000


def test_flatness_claim_compares_the_drop_from_075_to_09():
    scores = _scores(
        {
            ("random", 0.75): [70.0, 71.0, 70.5],
            ("random", 0.9): [66.0, 67.2, 66.1],  # drops ~4.1
            ("sbam", 0.75): [69.0, 70.0, 69.6],
            ("sbam", 0.9): [68.0, 69.1, 68.4],  # drops ~1.0: flatter
        }
    )
    table = verdict_table(
        _records(scores), pd.DataFrame(columns=scores.columns.tolist() + ["epoch"]), [tuple(SETTING.values())]
    )
    row = table[table["claim"] == "sbam_flatter"].iloc[0]
    expected = (np.array([68.0, 69.1, 68.4]) - [69.0, 70.0, 69.6]) - (np.array([66.0, 67.2, 66.1]) - [70.0, 71.0, 70.5])
    assert row["delta_mean"] == pytest.approx(expected.mean()) and row["verdict"] == "reproduced"
    assert "sbam_amr_flatter" not in set(table["claim"])  # no sbam_amr runs: not measured, no row


def test_convergence_claim_is_the_mean_gap_between_the_curves():
    curves = _curve_rows(
        {
            ("random", 1): [60, 61, 60],
            ("random", 2): [65, 66, 66],
            ("mto", 1): [58, 59, 59],
            ("mto", 2): [64, 64, 65],
        },
        protocol="probe_100shot",
    )
    scores = _scores({("random", 0.75): [65, 66, 66], ("mto", 0.75): [64, 64, 65]}, protocol="probe_100shot")
    table = verdict_table(_records(scores), curves, [tuple(SETTING.values())])
    row = table[table["claim"] == "mto_fewer_epochs"].iloc[0]
    per_seed = np.mean([[58 - 60, 64 - 65], [59 - 61, 64 - 66], [59 - 60, 65 - 66]], axis=1)
    assert row["delta_mean"] == pytest.approx(per_seed.mean()) and row["verdict"] == "not reproduced"
    assert bool(row["headline"])


def test_the_report_shows_gap_stability_and_verdicts(tmp_path):
    write_records(tmp_path, _suite(strategies=("random", "block", "sbam"), ratios=(0.75, 0.9)))
    report = write_report(tmp_path).read_text()
    for path in ("budget_gap", "budget_ranks", "ranking_stability", "verdicts"):
        assert (tmp_path / "leaderboards" / f"{path}.csv").is_file()
    verdicts = pd.read_csv(tmp_path / "leaderboards" / "verdicts.csv")
    assert set(verdicts["claim"]) == {"sbam_flatter", "sbam_faster"}  # the claims these strategies can measure
    assert "## Verdicts on the papers' claims" in report and "| SBAM | `sbam`: flatter" in report
    assert "## Ranking stability across budgets" in report  # knn after epochs 2 and 4


def test_strategy_ratios_shape_the_grid_without_touching_identity():
    raw = {"name": "l", "data": {"name": "synthetic"}, "ratios": [0.75, 0.9], "seeds": [0]}
    shaped = expand(parse_suite({**raw, "strategies": ["random", {"name": "block", "ratios": [0.75]}]}))
    cells = sorted((s.label, s.ratio) for s in shaped if s.kind == "pretrain")
    assert cells == [("block", 0.75), ("random", 0.75), ("random", 0.9)]
    plain = {s.run_hash for s in expand(parse_suite({**raw, "strategies": ["random", "block"]}))}
    assert {s.run_hash for s in shaped} <= plain  # the same runs, by the same hashes
    with pytest.raises(BenchError, match="asks for ratio 0.6, which is not in the suite's ratios"):
        parse_suite({**raw, "strategies": [{"name": "block", "ratios": [0.6]}]})
