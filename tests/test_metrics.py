"""metrics.py on hand-computed examples (the numbers in the comments are worked out by hand)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from masking_bench import metrics as M

NAN = math.nan


# ------------------------------------------------------------------------------- seeds


def test_t_interval_matches_hand_value_and_scipy():
    s = M.t_interval([1.0, 2.0, 3.0, 4.0])
    # mean 2.5, s = sqrt(5/3) = 1.290994, t(0.975, 3) = 3.182446, half = 3.182446 * 1.290994 / 2 = 2.054260
    assert s.n == 4 and s.mean == pytest.approx(2.5) and s.std == pytest.approx(1.290994, abs=1e-6)
    assert (s.ci_low, s.ci_high) == pytest.approx((2.5 - 2.054260, 2.5 + 2.054260), abs=1e-6)
    lo, hi = stats.t.interval(0.95, 3, loc=2.5, scale=stats.sem([1, 2, 3, 4]))
    assert (s.ci_low, s.ci_high) == pytest.approx((lo, hi))


def test_t_interval_small_and_missing():
    one = M.t_interval([83.6])
    assert one.mean == 83.6 and one.n == 1 and math.isnan(one.std) and math.isnan(one.ci_low)
    assert M.t_interval([]).n == 0 and math.isnan(M.t_interval([]).mean)
    assert M.t_interval([1.0, None, NAN, 3.0]).n == 2  # None / NaN dropped


def test_aggregate_seeds_keeps_floor_rows():
    df = pd.DataFrame(
        {"strategy": ["a", "a", "a", "init"], "ratio": [0.5, 0.5, 0.5, NAN], "top1": [70.0, 71.0, 72.0, 40.0]}
    )
    out = M.aggregate_seeds(df, ["strategy", "ratio"])
    a = out[out.strategy == "a"].iloc[0]
    assert a["n"] == 3 and a["mean"] == 71.0 and a["std"] == pytest.approx(1.0)
    assert a["ci_high"] - a["mean"] == pytest.approx(4.302653 / math.sqrt(3), abs=1e-6)
    floor = out[out.strategy == "init"].iloc[0]
    assert floor["n"] == 1 and math.isnan(floor["ratio"]) and math.isnan(floor["ci_low"])


def _pairs(block, random=(70.0, 71.0, 72.0), extra_seed=True):
    rows = [("random", i, v) for i, v in enumerate(random)] + [("block", i, v) for i, v in enumerate(block)]
    if extra_seed:  # a seed the baseline does not have: not paired, ignored
        rows.append(("block", 9, 99.0))
    df = pd.DataFrame(rows, columns=["strategy", "seed", "top1"])
    df["ratio"], df["protocol"] = 0.75, "probe"
    return M.paired_deltas(df, ["ratio", "protocol"], baseline="random").iloc[0]


def test_paired_delta_inside_noise():
    d = _pairs([71.0, 73.0, 73.0])  # diffs 1, 2, 1: mean 4/3, s 0.57735, half = 4.302653 * 0.57735 / √3 = 1.434218
    assert d["delta_n"] == 3 and d["delta_mean"] == pytest.approx(4 / 3)
    assert (d["delta_ci_low"], d["delta_ci_high"]) == pytest.approx((4 / 3 - 1.434218, 4 / 3 + 1.434218), abs=1e-5)
    assert not d["outside_noise"]


def test_paired_delta_outside_noise_and_single_pair():
    d = _pairs([71.0, 72.1, 72.9])  # diffs 1, 1.1, 0.9: mean 1, s 0.1, half 0.248418 -> [0.75, 1.25]
    assert d["delta_mean"] == pytest.approx(1.0) and d["delta_ci_low"] == pytest.approx(0.751582, abs=1e-5)
    assert d["outside_noise"]
    neg = _pairs([68.0, 69.1, 69.9])  # diffs -2, -1.9, -2.1: CI below 0 is also outside the noise
    assert neg["delta_mean"] == pytest.approx(-2.0) and neg["outside_noise"]
    one = _pairs([75.0], random=(70.0,), extra_seed=False)
    assert one["delta_n"] == 1 and one["delta_mean"] == 5.0 and not one["outside_noise"]


def test_rank_descending():
    r = M.rank_descending(pd.Series([70.0, 72.0, 72.0, 60.0, NAN]))
    assert list(r[:4]) == [3, 1, 1, 4] and r.isna().iloc[4]


# ------------------------------------------------------------------------------- noise floor


def test_pooled_std():
    # [1,2,3]: var 1, dof 2; [10,14]: var 8, dof 1; [5]: no dof -> sqrt((2*1 + 1*8)/3) = sqrt(10/3)
    sd, dof = M.pooled_std([[1, 2, 3], [10, 14], [5]])
    assert dof == 3 and sd == pytest.approx(math.sqrt(10 / 3))
    assert M.pooled_std([[1.0], []])[1] == 0 and math.isnan(M.pooled_std([[1.0]])[0])


def test_seeds_needed_and_detectable_delta():
    z = 1.959964 + 0.841621  # z(0.975) + z(0.80) = 2.801585
    assert M.seeds_needed(0.5, 1.0) == math.ceil((z * 1.0 / 0.5) ** 2) == 32  # 31.40 -> 32
    assert M.seeds_needed(0.2, 0.08) == 2  # (2.8016 * 0.4)^2 = 1.26 -> at least 2
    assert M.seeds_needed(1.0, 0.5) == 2  # 1.96 -> 2
    assert M.seeds_needed(0.3, 0.3) == 8  # 7.85 -> 8
    assert math.isnan(M.seeds_needed(0.5, NAN))
    assert M.min_detectable_delta(1.0, 4) == pytest.approx(z / 2, abs=1e-5)
    n = M.seeds_needed(0.5, 1.0)
    assert M.min_detectable_delta(1.0, n) <= 0.5 < M.min_detectable_delta(1.0, n - 1)


# -------------------------------------------------------------------------- ratio robustness

RATIOS = [0.6, 0.7, 0.9]
ACC = [80.0, 82.0, 79.0]


def test_pimr_slope_reading():
    # (82-80)/0.1*0.1 = 2.0 points per +10 %; (79-82)/0.2*0.1 = -1.5
    assert M.pimr_slopes(RATIOS, ACC) == pytest.approx([2.0, -1.5])
    assert M.global_pimr(RATIOS, ACC) == pytest.approx(0.25)
    assert M.pimr_slopes([0.9, 0.6, 0.7], [79.0, 80.0, 82.0]) == pytest.approx([2.0, -1.5])  # order-free
    # equally spaced: Global = (A_K - A_1)/(r_K - r_1) * 0.1
    assert M.global_pimr([0.5, 0.6, 0.7], [70.0, 73.0, 71.0]) == pytest.approx((71 - 70) / 0.2 * 0.1)
    assert math.isnan(M.global_pimr([0.75], [80.0])) and len(M.pimr_slopes([0.75], [80.0])) == 0


def test_pimr_reference_reading():
    assert M.pimr_reference(RATIOS, ACC) == pytest.approx([0.0, 2.0, -1.0])
    assert M.global_pimr_reference(RATIOS, ACC) == pytest.approx(0.5)  # mean(2, -1), r_min left out
    assert math.isnan(M.global_pimr_reference([0.75], [80.0]))


def test_ratio_auc_peak_and_drops():
    # trapezoids 0.1*(80+82)/2 = 8.1 and 0.2*(82+79)/2 = 16.1 -> 24.2 / span 0.3 = 80.6667
    assert M.ratio_auc(RATIOS, ACC) == pytest.approx(24.2 / 0.3)
    assert M.ratio_auc([0.5, 0.9], [70.0, 70.0]) == pytest.approx(70.0)  # flat curve: its value
    assert math.isnan(M.ratio_auc([0.75], [80.0]))
    assert M.peak(RATIOS, ACC) == (0.7, 82.0)
    assert M.worst_drop(ACC) == pytest.approx(3.0)
    assert M.drop_after_peak(RATIOS, ACC) == pytest.approx(3.0)
    rising = [78.0, 80.0, 81.0]
    assert M.peak(RATIOS, rising) == (0.9, 81.0) and M.drop_after_peak(RATIOS, rising) == 0.0
    assert M.worst_drop(rising) == pytest.approx(3.0)
    valley = [80.0, 76.0, 79.0]  # peak at the lowest ratio, the worst point in the middle
    assert M.drop_after_peak(RATIOS, valley) == pytest.approx(4.0) and M.worst_drop(valley) == pytest.approx(4.0)


# ------------------------------------------------------------------------------- convergence


def test_epochs_to_reach_interpolates():
    e, a = [0, 2, 4], [40.0, 60.0, 70.0]
    assert M.epochs_to_reach(e, a, 65.0) == pytest.approx(3.0)  # 2 + (65-60)/(70-60) * 2
    assert M.epochs_to_reach(e, a, 50.0) == pytest.approx(1.0)
    assert M.epochs_to_reach(e, a, 40.0) == 0.0  # already there at the first evaluation
    assert M.epochs_to_reach(e, a, 70.0) == 4.0
    assert math.isnan(M.epochs_to_reach(e, a, 70.5))  # not reached
    # not monotone: the first crossing counts, 0 + (65-40)/(70-40) * 2 = 1.6667
    assert M.epochs_to_reach([0, 2, 4, 6], [40.0, 70.0, 60.0, 75.0], 65.0) == pytest.approx(5 / 3)
    assert M.epoch_reduction(2.0, 4) == 0.5 and math.isnan(M.epoch_reduction(NAN, 4))


def test_curve_auc_and_rauc():
    em, am = [0, 2, 4], [40.0, 60.0, 70.0]
    eb, ab = [0, 4], [40.0, 70.0]
    # AUC(method) = 2*(40+60)/2 + 2*(60+70)/2 = 230; AUC(baseline) = 4*(40+70)/2 = 220
    assert M.curve_auc(em, am, 0, 4) == pytest.approx(230.0)
    assert M.curve_auc(eb, ab, 0, 4) == pytest.approx(220.0)
    assert M.rauc(em, am, eb, ab) == pytest.approx(230 / 220)
    assert M.rauc_norm(em, am, eb, ab) == pytest.approx(230 / (4 * 70))
    assert M.rauc(eb, ab, eb, ab) == pytest.approx(1.0)
    # common range only: baseline evaluated at 0, 1, 3 -> range [0, 3]; method at 3 = 65 (interpolated)
    # AUC_m = 2*(40+60)/2 + 1*(60+65)/2 = 162.5; AUC_b = 1*(40+50)/2 + 2*(50+70)/2 = 165
    assert M.rauc(em, am, [0, 1, 3], [40.0, 50.0, 70.0]) == pytest.approx(162.5 / 165)
    assert M.rauc_norm(em, am, [0, 1, 3], [40.0, 50.0, 70.0]) == pytest.approx(162.5 / (3 * 70))
    assert math.isnan(M.curve_auc(em, am, 0, 5)) and math.isnan(M.rauc([4], [70.0], eb, ab))


def test_mean_curve_uses_common_epochs():
    df = pd.DataFrame({"seed": [0, 0, 0, 1, 1], "epoch": [0, 2, 4, 0, 4], "top1": [40, 60, 70, 42, 72.0]})
    mc = M.mean_curve(df)
    assert list(mc["epoch"]) == [0.0, 4.0] and list(mc["top1"]) == [41.0, 71.0] and list(mc["n"]) == [2, 2]


# ------------------------------------------------------------------------------------ compute


def test_aggregate_columns_and_pareto():
    df = pd.DataFrame({"strategy": ["a", "a", "b"], "sec": [2.0, 4.0, 3.0], "mem": [NAN, NAN, 5.0]})
    out = M.aggregate_columns(df, ["strategy"], ["sec", "mem", "absent"]).set_index("strategy")
    assert out.loc["a", "n"] == 2 and out.loc["a", "sec_mean"] == 3.0
    assert out.loc["a", "sec_std"] == pytest.approx(math.sqrt(2))
    assert math.isnan(out.loc["a", "mem_mean"]) and math.isnan(out.loc["b", "sec_std"])
    assert math.isnan(out.loc["b", "absent_mean"])
    front = M.pareto_front([1, 2, 3, 2, NAN], [70, 75, 74, 75, 99])
    assert list(front) == [True, True, False, True, False]
    assert np.array_equal(M.pareto_front([], []), np.zeros(0, dtype=bool))
