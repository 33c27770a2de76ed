"""Benchmark metrics: pure functions on numbers and DataFrames, no I/O.

Accuracies are top-1 in percentage points (0-100), masking ratios are fractions (0-1), epochs are
numbers of pre-training epochs completed. Every function states its formula and where it comes
from; ``[INTERP]`` marks a formula the sources name but do not define (PIMR, RAUC, epochs to
convergence: docs/strategies.md §9.5, §9.6), so the benchmark chose one.

Conventions used throughout:

* Seed statistics use the sample standard deviation (``n − 1`` in the denominator) and a two-sided
  95 % Student-t interval ``mean ± t_{0.975, n−1} · s / √n``; with ``n = 1`` the std and interval are
  NaN (one seed carries no information about noise).
* Comparisons with the ``random`` baseline are *paired by seed*: the run of strategy S with seed i
  is compared with the baseline run with seed i in the same cell (same init, data order and
  evaluation draws), and the t interval is taken over the per-seed differences.
* Power calculations use the normal approximation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy import stats

PER_TEN_POINTS = 0.1  # PIMR slopes are reported per +0.1 masking ratio ("points per +10 % masking")


# ------------------------------------------------------------------------------------- seeds


class SeedStats(NamedTuple):
    mean: float
    std: float
    n: int
    ci_low: float
    ci_high: float


def _finite(values: Iterable[float]) -> np.ndarray:
    x = np.asarray([float(v) for v in values if v is not None], dtype=float)
    return x[np.isfinite(x)]


def t_interval(values: Iterable[float], level: float = 0.95) -> SeedStats:
    """Mean, sample std, n and the two-sided Student-t confidence interval over seeds.

    ``mean = Σx/n``, ``s = sqrt(Σ(x − mean)² / (n − 1))``,
    ``CI = mean ± t_{(1+level)/2, n−1} · s / √n`` (t quantile from scipy). Non-finite values and
    ``None`` are dropped first. ``n = 0`` → all NaN; ``n = 1`` → std and CI NaN.
    Provenance: standard small-sample interval; chosen because benchmarks run 3-5 seeds, where the
    normal quantile (1.96) would understate the interval (t_{0.975,2} = 4.30).
    """
    x = _finite(values)
    n = len(x)
    if n == 0:
        return SeedStats(math.nan, math.nan, 0, math.nan, math.nan)
    mean = float(x.mean())
    if n == 1:
        return SeedStats(mean, math.nan, 1, math.nan, math.nan)
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return SeedStats(mean, sd, n, mean - half, mean + half)


def aggregate_seeds(df: pd.DataFrame, keys: Sequence[str], value: str = "top1") -> pd.DataFrame:
    """Per group of ``keys``: ``n``, ``mean``, ``std``, ``ci_low``, ``ci_high`` of ``value`` (see :func:`t_interval`).

    Groups keep NaN keys (e.g. the ratio of a random-init run). Rows whose value is missing do not
    count towards ``n``.
    """
    cols = list(keys) + ["n", "mean", "std", "ci_low", "ci_high"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for key, group in df.groupby(list(keys), dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        s = t_interval(group[value])
        rows.append((*key, s.n, s.mean, s.std, s.ci_low, s.ci_high))
    return pd.DataFrame(rows, columns=cols)


def paired_deltas(
    df: pd.DataFrame, keys: Sequence[str], baseline: str, by: str = "strategy", seed: str = "seed", value: str = "top1"
) -> pd.DataFrame:
    """Δ of every non-baseline ``by`` level against ``baseline``, paired by seed within each cell.

    For a cell (the ``keys``, e.g. suite, method, ratio, epochs, protocol) and a strategy S:
    ``Δ_i = A_S(seed i) − A_baseline(seed i)`` over the seeds both have;
    ``delta_mean``, ``delta_std``, ``delta_n`` (pairs) and the t interval of :func:`t_interval` on the
    ``Δ_i``; ``outside_noise = delta_n ≥ 2 and (ci_low > 0 or ci_high < 0)`` — the paired 95 %
    interval excludes 0, i.e. a paired t-test rejects "no difference" at the 5 % level.
    Provenance: benchmark choice — masking papers claim gains about as large as reproduction gaps, so
    rankings need intervals (docs/strategies.md §9.4); pairing by seed removes the shared
    init/data-order noise.
    """
    cols = list(keys) + [by, "delta_n", "delta_mean", "delta_std", "delta_ci_low", "delta_ci_high", "outside_noise"]
    base = df[df[by] == baseline]
    other = df[df[by] != baseline]
    if base.empty or other.empty:
        return pd.DataFrame(columns=cols)
    on = list(keys) + [seed]
    b = base[on + [value]].rename(columns={value: "_base"})
    merged = other[on + [by, value]].merge(b, on=on, how="inner")
    merged["_delta"] = merged[value] - merged["_base"]
    rows = []
    for key, group in merged.groupby(list(keys) + [by], dropna=False, sort=True):
        s = t_interval(group["_delta"])
        outside = bool(s.n >= 2 and (s.ci_low > 0 or s.ci_high < 0))
        rows.append((*key, s.n, s.mean, s.std, s.ci_low, s.ci_high, outside))
    return pd.DataFrame(rows, columns=cols)


def rank_descending(values: pd.Series) -> pd.Series:
    """Rank 1 = highest value; ties share the best rank (``method='min'``); NaN stays unranked (<NA>)."""
    return values.rank(ascending=False, method="min").astype("Int64")


# ------------------------------------------------------------------------------- noise floor


def pooled_std(groups: Iterable[Iterable[float]]) -> tuple[float, int]:
    """Pooled within-group standard deviation and its degrees of freedom.

    ``s_p = sqrt( Σ_g (n_g − 1) s_g² / Σ_g (n_g − 1) )`` over the groups with ``n_g ≥ 2``;
    ``dof = Σ_g (n_g − 1)``. Each group is one cell (same everything but the seed), so ``s_p`` is the
    seed-to-seed noise of a single run, pooled across cells under the assumption that the noise is
    the same in every cell. Returns ``(nan, 0)`` when no group has two values.
    """
    ss, dof = 0.0, 0
    for g in groups:
        x = _finite(g)
        if len(x) >= 2:
            ss += float(((x - x.mean()) ** 2).sum())
            dof += len(x) - 1
    return (math.sqrt(ss / dof), dof) if dof else (math.nan, 0)


def seeds_needed(delta: float, sd_diff: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Seeds (pairs) needed to detect a true paired difference ``delta`` (points), two-sided.

    ``n = ceil( ((z_{1−α/2} + z_{power}) · σ_d / δ)² )``, at least 2, with ``σ_d`` the std of the
    per-seed paired differences. Normal approximation (a t-based answer is up to ~2 seeds larger at
    these sizes); defaults α = 0.05, power 0.8 → ``z`` sum 2.8016. NaN when ``σ_d`` is unknown.
    """
    if not (math.isfinite(sd_diff) and delta > 0):
        return math.nan
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    return float(max(2, math.ceil((z * sd_diff / delta) ** 2 - 1e-9)))


def min_detectable_delta(sd_diff: float, n: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest paired difference detectable with ``n`` pairs: ``(z_{1−α/2} + z_{power}) · σ_d / √n``.

    The inverse of :func:`seeds_needed` (same normal approximation). NaN if ``n < 1`` or ``σ_d`` unknown.
    """
    if not (math.isfinite(sd_diff) and n and n >= 1):
        return math.nan
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    return float(z * sd_diff / math.sqrt(n))


# -------------------------------------------------------------------------- ratio robustness


def _sorted_curve(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    order = np.argsort(x, kind="stable")
    return x[order], y[order]


def pimr_slopes(ratios: Sequence[float], acc: Sequence[float], per: float = PER_TEN_POINTS) -> np.ndarray:
    """PIMR, slope reading [INTERP, docs/strategies.md §9.5]: one value per step between consecutive ratios.

    With ratios sorted ``r_1 < … < r_K``: ``PIMR(r_k) = (A(r_k) − A(r_{k−1})) / (r_k − r_{k−1}) · per``
    for ``k = 2..K``; ``per = 0.1`` reads as "accuracy points per +10 % masking". Higher / less
    negative = more robust to raising the ratio. Empty for fewer than two ratios.
    """
    r, a = _sorted_curve(ratios, acc)
    if len(r) < 2:
        return np.zeros(0)
    return np.diff(a) / np.diff(r) * per


def global_pimr(ratios: Sequence[float], acc: Sequence[float], per: float = PER_TEN_POINTS) -> float:
    """Global PIMR, slope reading [INTERP, docs/strategies.md §9.5]: ``(1/(K−1)) Σ_{k=2..K} PIMR(r_k)``.

    Equals ``(A(r_K) − A(r_1)) / (r_K − r_1) · per`` when the ratios are equally spaced. NaN if K < 2.
    """
    s = pimr_slopes(ratios, acc, per)
    return float(s.mean()) if len(s) else math.nan


def pimr_reference(ratios: Sequence[float], acc: Sequence[float]) -> np.ndarray:
    """PIMR, reference reading [INTERP, docs/strategies.md §9.5]: ``A(r) − A(r_min)`` for every ratio (sorted).

    The first entry (``r_min`` itself) is 0 by construction.
    """
    r, a = _sorted_curve(ratios, acc)
    return a - a[0] if len(a) else np.zeros(0)


def global_pimr_reference(ratios: Sequence[float], acc: Sequence[float]) -> float:
    """Global reference PIMR [INTERP]: mean of ``A(r) − A(r_min)`` over the ratios ``r > r_min``.

    The reference ratio itself (always 0) is left out so the value does not shrink with K. NaN if K < 2.
    """
    ref = pimr_reference(ratios, acc)
    return float(ref[1:].mean()) if len(ref) >= 2 else math.nan


def ratio_auc(ratios: Sequence[float], acc: Sequence[float]) -> float:
    """Area under accuracy-vs-ratio, normalised by the ratio span (benchmark choice).

    ``Σ_k (r_k − r_{k−1}) (A_k + A_{k−1}) / 2 / (r_K − r_1)`` — the trapezoid area divided by the span,
    i.e. the mean accuracy over the swept ratio range, in accuracy points. NaN if K < 2.
    """
    r, a = _sorted_curve(ratios, acc)
    if len(r) < 2 or r[-1] <= r[0]:
        return math.nan
    return float(np.sum(np.diff(r) * (a[1:] + a[:-1]) / 2) / (r[-1] - r[0]))


def peak(ratios: Sequence[float], acc: Sequence[float]) -> tuple[float, float]:
    """``(r_peak, A_peak)``: the ratio with the highest accuracy (the smallest such ratio on ties)."""
    r, a = _sorted_curve(ratios, acc)
    if not len(r):
        return math.nan, math.nan
    k = int(np.argmax(a))
    return float(r[k]), float(a[k])


def worst_drop(acc: Sequence[float]) -> float:
    """Accuracy range over the swept ratios: ``max_r A(r) − min_r A(r)`` (benchmark choice).

    How much a user loses by picking the worst ratio of the sweep instead of the best; 0 = flat.
    """
    a = np.asarray(acc, dtype=float)
    return float(a.max() - a.min()) if len(a) else math.nan


def drop_after_peak(ratios: Sequence[float], acc: Sequence[float]) -> float:
    """Largest loss from masking more than the best ratio: ``A(r_peak) − min_{r ≥ r_peak} A(r)`` (benchmark choice).

    0 when the peak is at the highest ratio (accuracy never falls when raising the ratio past it).
    """
    r, a = _sorted_curve(ratios, acc)
    if not len(r):
        return math.nan
    k = int(np.argmax(a))
    return float(a[k] - a[k:].min())


# ------------------------------------------------------------------------------- convergence


def interpolate(epochs: Sequence[float], acc: Sequence[float], at: float) -> float:
    """Piecewise-linear value of the curve at ``at`` (NaN outside the evaluated range)."""
    e, a = _sorted_curve(epochs, acc)
    if not len(e) or at < e[0] or at > e[-1]:
        return math.nan
    return float(np.interp(at, e, a))


def curve_auc(epochs: Sequence[float], acc: Sequence[float], lo: float, hi: float) -> float:
    """Trapezoid area under the piecewise-linear curve between epochs ``lo`` and ``hi`` [docs/strategies.md §9.6].

    ``Σ_k (e_{k+1} − e_k)(A(e_k) + A(e_{k+1}))/2`` over the evaluation epochs inside ``[lo, hi]``
    plus the interpolated end points, so curves evaluated at different epochs integrate over the
    same range. NaN if ``[lo, hi]`` is empty or not covered by the curve.
    """
    e, a = _sorted_curve(epochs, acc)
    if not len(e) or hi <= lo or lo < e[0] or hi > e[-1]:
        return math.nan
    grid = np.unique(np.concatenate([[lo, hi], e[(e > lo) & (e < hi)]]))
    vals = np.interp(grid, e, a)
    return float(np.sum(np.diff(grid) * (vals[1:] + vals[:-1]) / 2))


def common_range(*curves_epochs: Sequence[float]) -> tuple[float, float]:
    """``[max of first epochs, min of last epochs]`` over the curves: the range every curve covers."""
    lo = max(float(np.min(e)) for e in curves_epochs)
    hi = min(float(np.max(e)) for e in curves_epochs)
    return lo, hi


def rauc(epochs_m: Sequence[float], acc_m: Sequence[float], epochs_b: Sequence[float], acc_b: Sequence[float]) -> float:
    """RAUC [INTERP, docs/strategies.md §9.6] = ``AUC(method) / AUC(baseline)`` over their common epoch range.

    AUC is :func:`curve_auc`. > 1 ⇒ the method is ahead of the baseline over the schedule on average.
    NaN if the curves share no range of positive length.
    """
    if not len(epochs_m) or not len(epochs_b):
        return math.nan
    lo, hi = common_range(epochs_m, epochs_b)
    num, den = curve_auc(epochs_m, acc_m, lo, hi), curve_auc(epochs_b, acc_b, lo, hi)
    return num / den if den and math.isfinite(den) else math.nan


def rauc_norm(
    epochs_m: Sequence[float], acc_m: Sequence[float], epochs_b: Sequence[float], acc_b: Sequence[float]
) -> float:
    """RAUC_norm [INTERP, docs/strategies.md §9.6] = ``AUC(method) / ((e_m − e_1) · A_baseline(e_m))``.

    ``[e_1, e_m]`` is the common epoch range; the value is the method's mean accuracy over it as a
    fraction of the baseline's accuracy at the end of that range (1 = as good as the baseline's
    final value during the whole range).
    """
    if not len(epochs_m) or not len(epochs_b):
        return math.nan
    lo, hi = common_range(epochs_m, epochs_b)
    end = interpolate(epochs_b, acc_b, hi)
    num = curve_auc(epochs_m, acc_m, lo, hi)
    return num / ((hi - lo) * end) if end and math.isfinite(num) else math.nan


def epochs_to_reach(epochs: Sequence[float], acc: Sequence[float], target: float) -> float:
    """First epoch at which the curve reaches ``target``, linearly interpolated between evaluations.

    ``E* = min{ e : A(e) ≥ target }`` on the piecewise-linear curve through the evaluation points
    [INTERP, docs/strategies.md §9.6]: if ``A(e_1) ≥ target`` → ``e_1``; else the first
    ``k`` with ``A(e_k) < target ≤ A(e_{k+1})`` gives ``e_k + (target − A(e_k)) / (A(e_{k+1}) − A(e_k))
    · (e_{k+1} − e_k)``. NaN = never reached within the evaluated epochs.
    """
    e, a = _sorted_curve(epochs, acc)
    if not len(e) or not math.isfinite(target):
        return math.nan
    if a[0] >= target:
        return float(e[0])
    for k in range(len(e) - 1):
        if a[k] < target <= a[k + 1]:
            return float(e[k] + (target - a[k]) / (a[k + 1] - a[k]) * (e[k + 1] - e[k]))
    return math.nan


def epoch_reduction(e_star: float, e_full: float) -> float:
    """``1 − E* / E_full`` [docs/strategies.md §9.6]: the share of the baseline's full schedule a method saves.

    MTO claims ≈ 0.5.
    """
    if not (math.isfinite(e_star) and e_full):
        return math.nan
    return 1.0 - e_star / e_full


def mean_curve(df: pd.DataFrame, epoch: str = "epoch", value: str = "top1", seed: str = "seed") -> pd.DataFrame:
    """Seed-mean curve on the epochs every seed was evaluated at: columns ``epoch``, ``top1``, ``n``.

    Restricting to the common epochs keeps the mean from mixing different seed sets along the curve.
    """
    if df.empty:
        return pd.DataFrame(columns=["epoch", "top1", "n"])
    n_seeds = df[seed].nunique()
    g = df.groupby(epoch, sort=True)[value].agg(["mean", "count"]).reset_index()
    g = g[g["count"] == n_seeds]
    return pd.DataFrame(
        {"epoch": g[epoch].to_numpy(float), "top1": g["mean"].to_numpy(float), "n": g["count"].to_numpy(int)}
    )


# ------------------------------------------------------------------------------------ compute


def aggregate_columns(df: pd.DataFrame, keys: Sequence[str], columns: Sequence[str]) -> pd.DataFrame:
    """Per group of ``keys``: ``n`` (runs) and ``<col>_mean`` / ``<col>_std`` (sample std) of each column.

    Missing values are skipped per column (a column absent from every run gives NaN).
    """
    out_cols = list(keys) + ["n"] + [f"{c}_{s}" for c in columns for s in ("mean", "std")]
    if df.empty:
        return pd.DataFrame(columns=out_cols)
    rows = []
    for key, group in df.groupby(list(keys), dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        vals = []
        for c in columns:
            x = _finite(group[c]) if c in group else np.zeros(0)
            vals += [float(x.mean()) if len(x) else math.nan, float(x.std(ddof=1)) if len(x) >= 2 else math.nan]
        rows.append((*key, len(group), *vals))
    return pd.DataFrame(rows, columns=out_cols)


def pareto_front(cost: Sequence[float], acc: Sequence[float]) -> np.ndarray:
    """Boolean mask of the points no other point dominates (cost ≤ and accuracy ≥, one strictly)."""
    c = np.asarray(cost, dtype=float)
    a = np.asarray(acc, dtype=float)
    keep = np.isfinite(c) & np.isfinite(a)
    out = np.zeros(len(c), dtype=bool)
    for i in np.flatnonzero(keep):
        dominated = keep & (c <= c[i]) & (a >= a[i]) & ((c < c[i]) | (a > a[i]))
        out[i] = not dominated.any()
    return out
