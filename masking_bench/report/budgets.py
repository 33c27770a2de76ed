"""What a longer pre-training budget changes: the trained-minus-untrained gap, the strategies' ranks at
each evaluated budget with their stability, and a verdict on each claim of the three papers.

A *budget* is an epoch at which a run was evaluated (``eval.every``): a point on the run's own
learning-rate schedule, not a separate shorter run (docs/report_columns.md, "Budgets and verdicts",
says why that is a fair proxy). Every column is defined there; the statistics are paired by seed:
the same seed gives the same initial weights and data order to every strategy of a setting.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from .. import metrics
from .columns import COLUMNS, ordered
from .records import BASELINE, CELL, FLOOR, SETTING, Records, in_setting, protocol_sort_key

EXACT_BOOTSTRAP_SEEDS = 6  # up to this many seeds every resample is enumerated (n^n), else a seeded draw
BOOTSTRAP_DRAWS = 4000
LOW_RATIO, HIGH_RATIO = 0.75, 0.9  # SBAM's robustness claim is read as the drop from 0.75 to 0.9


@dataclass(frozen=True)
class Claim:
    """One claim of a paper, measured as a paired Δ (strategy minus baseline) that it says is positive."""

    key: str
    paper: str
    text: str
    strategy: str
    measure: str  # final | flatness | curve
    protocol: str  # the headline protocol (verdicts.csv also holds every other protocol)


CLAIMS = (
    Claim("sbam_flatter", "SBAM", "flatter accuracy-vs-ratio curve than MAE", "sbam", "flatness", "probe"),
    Claim(
        "sbam_amr_flatter",
        "SBAM",
        "with AMR: flatter accuracy-vs-ratio curve than MAE",
        "sbam_amr",
        "flatness",
        "probe",
    ),
    Claim("sbam_faster", "SBAM", "faster convergence than MAE", "sbam", "curve", "probe_100shot"),
    Claim("mto_fewer_epochs", "MTO", "fewer epochs to the same accuracy", "mto", "curve", "probe_100shot"),
    Claim(
        "misalign_beats_masking",
        "Beyond Masking",
        "masking + spatial misalignment beats masking alone",
        "misalign",
        "final",
        "probe",
    ),
)
MEASURES = {
    "final": "final top-1 − baseline's, at ratio 0.75",
    "flatness": f"(top-1 at {HIGH_RATIO:g} − at {LOW_RATIO:g}) − the baseline's same drop",
    "curve": "mean over the evaluated epochs of top-1 − baseline's, at ratio 0.75 (area between the curves)",
}


def _verdict(low: float, high: float) -> str:
    if not (math.isfinite(low) and math.isfinite(high)):
        return "not measured"
    if low > 0:
        return "reproduced"
    if high < 0:
        return "not reproduced"
    return "inside the noise"


# ------------------------------------------------------------------------------- gap


def gap_table(curves: pd.DataFrame, baselines: dict[str, str]) -> pd.DataFrame:
    """Per cell, protocol and evaluated epoch: top-1 minus the untrained encoder of the same seed."""
    rows = []
    pretrained = curves[curves["strategy"] != FLOOR]
    for key, cell in pretrained.groupby(CELL + ["protocol"], sort=True, dropna=False):
        by_seed = cell.pivot_table(index="seed", columns="epoch", values="top1", aggfunc="mean")
        if 0.0 not in by_seed.columns:
            continue  # no untrained encoder of these seeds
        for epoch in sorted(c for c in by_seed.columns if c > 0):
            gap = metrics.t_interval((by_seed[epoch] - by_seed[0.0]).dropna().to_numpy(float))
            rows.append(
                {
                    **dict(zip(CELL + ["protocol"], key, strict=True)),
                    "epoch": float(epoch),
                    "seeds": gap.n,
                    "gap_mean": gap.mean,
                    "gap_ci_low": gap.ci_low,
                    "gap_ci_high": gap.ci_high,
                    "outside_noise": bool(gap.n >= 2 and (gap.ci_low > 0 or gap.ci_high < 0)),
                }
            )
    table = pd.DataFrame(rows, columns=COLUMNS["budget_gap"])
    table["seeds"] = table["seeds"].astype("Int64")
    return ordered(table.sort_values("epoch", kind="mergesort"), COLUMNS["budget_gap"], baselines)


# ------------------------------------------------------------------------------- ranks


def _resamples(n: int) -> np.ndarray:
    """Seed-index resamples with replacement: all n^n of them for small n (exact), else a seeded draw."""
    if n <= EXACT_BOOTSTRAP_SEEDS:
        return np.array(list(itertools.product(range(n), repeat=n)), dtype=int)
    return np.random.default_rng(0).integers(0, n, size=(BOOTSTRAP_DRAWS, n))


def _tau(a: np.ndarray, b: np.ndarray) -> float:
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan  # a constant ranking has no order to agree with
    return float(stats.kendalltau(a, b).statistic)


def _best(means: np.ndarray, names: list[str]) -> str:
    """The highest mean; ties go to the first name A–Z (names are sorted)."""
    return names[int(np.argmax(means))]


def ranking_tables(curves: pd.DataFrame, baselines: dict[str, str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(budget_ranks, ranking_stability): per setting, ratio, protocol and budget, the strategies' ranks,
    and Kendall's τ of that ranking against the last budget's with its bootstrap interval over seeds."""
    rank_rows, stability_rows = [], []
    pretrained = curves[(curves["strategy"] != FLOOR) & (curves["epoch"] > 0)]
    for key, group in pretrained.groupby(SETTING + ["ratio", "protocol"], sort=True, dropna=False):
        names = dict(zip(SETTING + ["ratio", "protocol"], key, strict=True))
        # strategy × epoch × seed, on the seeds and epochs every strategy has
        cube = group.pivot_table(index="seed", columns=["strategy", "epoch"], values="top1", aggfunc="mean")
        strategies = sorted(cube.columns.get_level_values(0).unique())
        epochs = sorted(cube.columns.get_level_values(1).unique())
        epochs = [e for e in epochs if all((s, e) in cube.columns for s in strategies)]
        if len(strategies) < 2 or len(epochs) < 2:
            continue  # one strategy has no ranking; one budget has no other budget to agree with
        cube = cube[[(s, e) for s in strategies for e in epochs]].dropna(axis=0, how="any")
        if cube.empty:
            continue
        values = cube.to_numpy(float).reshape(len(cube), len(strategies), len(epochs))  # seed, strategy, epoch
        means = values.mean(axis=0)
        last = len(epochs) - 1
        resampled = values[_resamples(len(cube))].mean(axis=1)  # draw, strategy, epoch
        for j, epoch in enumerate(epochs):
            ranks = metrics.rank_descending(pd.Series(means[:, j])).to_numpy()
            for i, strategy in enumerate(strategies):
                rank_rows.append(
                    {
                        **names,
                        "epoch": float(epoch),
                        "strategy": strategy,
                        "seeds": len(cube),
                        "top1_mean": means[i, j],
                        "rank": int(ranks[i]),
                    }
                )
            if j == last:
                continue  # the last budget agrees with itself
            taus = np.array([_tau(draw[:, j], draw[:, last]) for draw in resampled])
            taus = taus[np.isfinite(taus)]
            stays = [_best(draw[:, j], strategies) == _best(draw[:, last], strategies) for draw in resampled]
            stability_rows.append(
                {
                    **names,
                    "epoch": float(epoch),
                    "last_epoch": float(epochs[last]),
                    "strategies": len(strategies),
                    "seeds": len(cube),
                    "kendall_tau": _tau(means[:, j], means[:, last]),
                    "tau_ci_low": float(np.quantile(taus, 0.025)) if len(taus) else math.nan,
                    "tau_ci_high": float(np.quantile(taus, 0.975)) if len(taus) else math.nan,
                    "best": _best(means[:, j], strategies),
                    "best_at_last": _best(means[:, last], strategies),
                    "p_best_stays_best": float(np.mean(stays)),
                }
            )
    ranks = pd.DataFrame(rank_rows, columns=COLUMNS["budget_ranks"])
    stability = pd.DataFrame(stability_rows, columns=COLUMNS["ranking_stability"])
    for table in (ranks, stability):
        table["seeds"] = table["seeds"].astype("Int64")
    ranks["rank"] = ranks["rank"].astype("Int64")
    stability["strategies"] = stability["strategies"].astype("Int64")
    ranks = ordered(ranks.sort_values("epoch", kind="mergesort"), COLUMNS["budget_ranks"], baselines)
    stability = ordered(stability.sort_values("epoch", kind="mergesort"), COLUMNS["ranking_stability"], baselines)
    return ranks, stability


# ------------------------------------------------------------------------------- verdicts


def _per_seed_final(scores: pd.DataFrame, strategy: str, ratio: float) -> pd.Series:
    rows = scores[(scores["strategy"] == strategy) & np.isclose(scores["ratio"], ratio)]
    return rows.groupby("seed")["top1"].mean()


def _per_seed_curve_mean(curves: pd.DataFrame, strategy: str, baseline: str, ratio: float) -> pd.Series:
    """Per seed: the mean over the epochs both curves have (epoch > 0) of strategy minus baseline."""
    at_ratio = curves[np.isclose(curves["ratio"], ratio) & (curves["epoch"] > 0)]
    mine = at_ratio[at_ratio["strategy"] == strategy].pivot_table(index="seed", columns="epoch", values="top1")
    base = at_ratio[at_ratio["strategy"] == baseline].pivot_table(index="seed", columns="epoch", values="top1")
    epochs = sorted(set(mine.columns) & set(base.columns))
    if len(epochs) < 2:
        return pd.Series(dtype=float)  # one point is no curve
    return (mine[epochs] - base[epochs]).dropna(axis=0, how="any").mean(axis=1)


def _claim_delta(claim: Claim, scores: pd.DataFrame, curves: pd.DataFrame, baseline: str) -> pd.Series:
    """Per seed Δ of one claim in one setting and protocol (empty when the setting cannot measure it)."""
    if claim.measure == "final":
        return (
            _per_seed_final(scores, claim.strategy, LOW_RATIO) - _per_seed_final(scores, baseline, LOW_RATIO)
        ).dropna()
    if claim.measure == "flatness":

        def drop(strategy: str) -> pd.Series:
            return _per_seed_final(scores, strategy, HIGH_RATIO) - _per_seed_final(scores, strategy, LOW_RATIO)

        return (drop(claim.strategy) - drop(baseline)).dropna()
    return _per_seed_curve_mean(curves, claim.strategy, baseline, LOW_RATIO)


def verdict_table(records: Records, curves: pd.DataFrame, settings: list[tuple]) -> pd.DataFrame:
    """Per claim, setting and protocol: the paired Δ with its 95 % t-interval over seeds and the verdict."""
    pretrained_scores = records.scores[records.scores["kind"] == "pretrain"]
    pretrained_runs = records.runs[records.runs["kind"] == "pretrain"]
    rows = []
    for setting in settings:
        names = dict(zip(SETTING, setting, strict=True))
        baseline = records.baselines.get(names["suite"], BASELINE)
        scores = in_setting(pretrained_scores, setting)
        setting_curves = in_setting(curves, setting)
        runs = in_setting(pretrained_runs, setting)
        images = runs["images_seen"].median() if len(runs) else math.nan
        for claim in CLAIMS:
            for protocol in sorted(scores["protocol"].unique()):
                delta = _claim_delta(
                    claim,
                    scores[scores["protocol"] == protocol],
                    setting_curves[setting_curves["protocol"] == protocol],
                    baseline,
                )
                if not len(delta):
                    continue
                interval = metrics.t_interval(delta.to_numpy(float))
                rows.append(
                    {
                        "claim": claim.key,
                        "paper": claim.paper,
                        "statement": claim.text,
                        **names,
                        "strategy": claim.strategy,
                        "baseline": baseline,
                        "protocol": protocol,
                        "headline": protocol == claim.protocol,
                        "measure": MEASURES[claim.measure],
                        "images_seen": images,
                        "seeds": interval.n,
                        "delta_mean": interval.mean,
                        "delta_ci_low": interval.ci_low,
                        "delta_ci_high": interval.ci_high,
                        "verdict": _verdict(interval.ci_low, interval.ci_high) if interval.n >= 2 else "too few seeds",
                    }
                )
    table = pd.DataFrame(rows, columns=COLUMNS["verdicts"])
    table["seeds"] = table["seeds"].astype("Int64")
    order = {claim.key: i for i, claim in enumerate(CLAIMS)}
    table["_claim"] = table["claim"].map(order)
    table["_protocol"] = [protocol_sort_key(protocol) for protocol in table["protocol"]]
    table = table.sort_values(["_claim", *SETTING, "_protocol"], kind="mergesort")
    return table[COLUMNS["verdicts"]].reset_index(drop=True)
