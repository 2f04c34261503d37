"""The statistics of a comparison between rules: pure functions of arrays (numpy, scipy.stats).

* :func:`contrast` — two groups of runs (a rule against BPTT): the difference of medians with a
  bootstrap interval, and a two-sided permutation test of the difference of mean ranks (the
  Mann–Whitney statistic: a difference of medians ties across too many permutations of a few
  runs to be a powerful test statistic).
* :func:`spearman` — rank correlation of two measures across runs, optionally **stratified**:
  ranks are taken within each stratum (condition) and centered there, so that differences
  *between* conditions (e.g. one rule underfits and is flatter) cannot make a correlation that
  holds within none of them. Bootstrap and permutations stay within strata.
* :func:`interaction` — whether a setting changes the difference between two groups (a rule and
  BPTT): the difference of differences of medians, with a bootstrap interval and p-value.
* :func:`adjust` — Benjamini–Hochberg adjusted p-values over every test a report prints.
* :func:`kendall`, :func:`granulated_kendall` — how well a generalization measure ranks runs by
  their gap: Kendall's τ over all runs, and Jiang et al.'s granulated τ (one hyperparameter varied
  at a time, the others held fixed).

Non-finite values are dropped pairwise; groups too small for a statistic give NaN, never an error.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 9999


def finite(a) -> np.ndarray:
    a = np.asarray(a, float)
    return a[np.isfinite(a)]


def median_difference(a, b, axis=-1):
    """median(a) − median(b) (vectorized along ``axis``, as scipy's resampling functions need)."""
    return np.median(a, axis=axis) - np.median(b, axis=axis)


def mean_rank_difference(a, b, axis=-1):
    """Mean rank of a minus mean rank of b in the pooled sample (vectorized along ``axis``)."""
    ranks = stats.rankdata(np.concatenate([a, b], axis=axis), axis=axis)
    n_a = np.shape(a)[axis]
    return np.take(ranks, np.arange(n_a), axis=axis).mean(axis) - np.take(
        ranks, np.arange(n_a, ranks.shape[axis]), axis=axis).mean(axis)


class Contrast(NamedTuple):
    """Group a against group b."""

    n_a: int
    n_b: int
    effect: float  # median(a) − median(b)
    ci: tuple[float, float]  # percentile bootstrap interval of the effect (runs resampled per group)
    p: float  # two-sided permutation test of the mean-rank difference (exact when partitions are few)


def contrast(a, b, *, resamples: int = RESAMPLES, seed: int = 0) -> Contrast:
    """Difference of medians of a and b, its bootstrap interval, and the permutation p-value of a
    difference in location (mean ranks)."""
    a, b = finite(a), finite(b)
    if len(a) < 2 or len(b) < 2:
        return Contrast(len(a), len(b), float("nan"), (float("nan"), float("nan")), float("nan"))
    effect = float(median_difference(a, b))
    rng = np.random.default_rng(seed)
    if np.ptp(np.concatenate([a, b])) == 0:  # all equal: nothing to resample
        return Contrast(len(a), len(b), effect, (effect, effect), 1.0)
    boot = stats.bootstrap((a, b), median_difference, n_resamples=resamples, confidence_level=CONFIDENCE,
                           method="percentile", rng=rng)
    perm = stats.permutation_test((a, b), mean_rank_difference, permutation_type="independent",
                                  n_resamples=resamples, rng=rng)
    ci = boot.confidence_interval
    return Contrast(len(a), len(b), effect, (float(ci.low), float(ci.high)), float(perm.pvalue))


def difference_of_differences(a, a_ref, b, b_ref, axis=-1):
    """[median(a) − median(a_ref)] − [median(b) − median(b_ref)] (vectorized along ``axis``)."""
    return median_difference(a, a_ref, axis) - median_difference(b, b_ref, axis)


def interaction(a, a_ref, b, b_ref, *, resamples: int = RESAMPLES, seed: int = 0) -> Contrast:
    """How much a setting moves group a relative to its reference: groups (a, a_ref) with the
    setting, (b, b_ref) without (e.g. a rule and BPTT, each in a varied and in the base cell).
    The effect is :func:`difference_of_differences`; its interval a percentile bootstrap (runs
    resampled within each of the four groups); its p-value the bootstrap's two-sided test,
    2·min(#{Δ* ≤ 0} + 1, #{Δ* ≥ 0} + 1)/(R + 1) over the R resamples — approximate with few runs
    per group, like every bootstrap.
    ``n_a``/``n_b`` count the runs with and without the setting."""
    groups = [finite(g) for g in (a, a_ref, b, b_ref)]
    n_with, n_without = len(groups[0]) + len(groups[1]), len(groups[2]) + len(groups[3])
    if min(map(len, groups)) < 2:
        return Contrast(n_with, n_without, float("nan"), (float("nan"), float("nan")), float("nan"))
    effect = float(difference_of_differences(*groups))
    if np.ptp(np.concatenate(groups)) == 0:
        return Contrast(n_with, n_without, effect, (effect, effect), 1.0)
    boot = stats.bootstrap(groups, difference_of_differences, n_resamples=resamples, confidence_level=CONFIDENCE,
                           method="percentile", rng=np.random.default_rng(seed))
    dist = boot.bootstrap_distribution
    # (+1 on both sides: a test from R resamples cannot show p below about 2/(R + 1).)
    p = min(1.0, 2 * (min(np.sum(dist <= 0), np.sum(dist >= 0)) + 1) / (len(dist) + 1))
    ci = boot.confidence_interval
    return Contrast(n_with, n_without, effect, (float(ci.low), float(ci.high)), float(p))


def smallest_p(n_a: int, n_b: int) -> float:
    """The smallest two-sided p-value that a permutation test of ``n_a`` against ``n_b`` runs can
    give, 2 / C(n_a + n_b, n_a) (the two most extreme of all splits), at most 1. With 5 against 4
    runs it is 0.016: few seeds bound what any data can show."""
    return min(1.0, 2 / math.comb(n_a + n_b, n_a))


class Correlation(NamedTuple):
    n: int
    rho: float  # Spearman's ρ (within-stratum ranks when stratified)
    ci: tuple[float, float]  # percentile bootstrap interval (runs resampled within strata)
    p: float  # two-sided permutation test (y permuted within strata)
    strata: int


def _centered_ranks(values: np.ndarray, groups: list[np.ndarray]) -> np.ndarray:
    """Ranks within each group of columns, centered on the group's mean rank; rows are resamples."""
    out = np.empty_like(values, dtype=float)
    for cols in groups:
        r = stats.rankdata(values[..., cols], axis=-1)
        out[..., cols] = r - r.mean(axis=-1, keepdims=True)
    return out


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    num = (x * y).sum(-1)
    den = np.sqrt((x * x).sum(-1) * (y * y).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def spearman(x, y, strata=None, *, resamples: int = 4999, seed: int = 0) -> Correlation:
    """Spearman's ρ of x and y across runs; with ``strata`` (one label per run), the correlation
    of ranks taken and centered within each stratum. Strata with fewer than 3 runs are left out.
    Without strata it is the ordinary Spearman ρ."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    labels = np.zeros(len(x), int) if strata is None else np.asarray(strata)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y, labels = x[ok], y[ok], labels[ok]
    groups = [np.flatnonzero(labels == s) for s in dict.fromkeys(labels.tolist())]
    groups = [g for g in groups if len(g) >= 3]
    n = sum(len(g) for g in groups)
    nan = Correlation(n, float("nan"), (float("nan"), float("nan")), float("nan"), len(groups))
    if n < 4:
        return nan
    keep = np.concatenate(groups)
    x, y = x[keep], y[keep]
    starts = np.cumsum([0] + [len(g) for g in groups])
    groups = [np.arange(a, b) for a, b in zip(starts[:-1], starts[1:])]
    rho = float(_pearson_rows(_centered_ranks(x, groups), _centered_ranks(y, groups)))
    if not np.isfinite(rho):
        return nan
    rng = np.random.default_rng(seed)
    boot = np.concatenate([rng.choice(g, (resamples, len(g))) for g in groups], axis=1)
    rhos = _pearson_rows(_centered_ranks(x[boot], groups), _centered_ranks(y[boot], groups))
    lo, hi = np.nanpercentile(rhos, [50 * (1 - CONFIDENCE), 50 * (1 + CONFIDENCE)])
    perm = np.concatenate([rng.permuted(np.tile(g, (resamples, 1)), axis=1) for g in groups], axis=1)
    null = _pearson_rows(_centered_ranks(x, groups)[None], _centered_ranks(y[perm], groups))
    p = (1 + np.sum(np.abs(null) >= abs(rho) - 1e-12)) / (1 + resamples)
    return Correlation(n, rho, (float(lo), float(hi)), float(p), len(groups))


def adjust(pvalues) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (``scipy.stats.false_discovery_control``) over the
    finite entries; NaN stays NaN."""
    p = np.asarray(pvalues, float)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = stats.false_discovery_control(p[ok], method="bh")
    return out


class Kendall(NamedTuple):
    n: int  # runs with both values finite
    tau: float  # Kendall's τ_b
    ci: tuple[float, float]  # bootstrap percentile interval (runs resampled)
    p: float  # two-sided p of τ = 0 (scipy.stats.kendalltau)


def kendall(x, y, *, resamples: int = 1999, seed: int = 0) -> Kendall:
    """Kendall's τ_b of x and y across runs, with a bootstrap interval; NaN when fewer than 4 runs
    have both values."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 4:
        return Kendall(len(x), float("nan"), (float("nan"), float("nan")), float("nan"))
    result = stats.kendalltau(x, y)
    rng = np.random.default_rng(seed)
    boot = rng.integers(0, len(x), (resamples, len(x)))
    taus = _resampled_tau_b(x, y, boot)
    lo, hi = np.nanpercentile(taus, [50 * (1 - CONFIDENCE), 50 * (1 + CONFIDENCE)])
    return Kendall(len(x), float(result.statistic), (float(lo), float(hi)), float(result.pvalue))


def _resampled_tau_b(x, y, resamples) -> np.ndarray:
    """Kendall's τ_b of x[r] against y[r] for each row r of indices ``resamples`` (the statistic
    of ``scipy.stats.kendalltau`` on each resample), in a few matrix products instead of one
    scipy call per resample. With s_ij = sign(x_i − x_j), t_ij = sign(y_i − y_j) and c the counts
    of each run in a resample, its sums over pairs are quadratic forms in c:

        τ_b = cᵀ(s∘t)c / sqrt(cᵀ|s|c · cᵀ|t|c),

    i.e. (concordant − discordant) / sqrt((pairs untied in x)(pairs untied in y)) — copies of one
    run are tied in both and drop out, as in scipy. NaN where x or y is constant."""
    s, t = np.sign(x[:, None] - x[None]), np.sign(y[:, None] - y[None])
    counts = np.zeros(resamples.shape)
    np.add.at(counts, (np.arange(len(resamples))[:, None], resamples), 1.0)

    def form(m):
        return np.einsum("ri,ri->r", counts @ m, counts)

    with np.errstate(invalid="ignore", divide="ignore"):
        return form(s * t) / np.sqrt(form(np.abs(s)) * form(np.abs(t)))


def granulated_kendall(x, y, settings) -> tuple[float, dict[str, float]]:
    """Jiang et al. (ICLR 2020, eq. 4): for each hyperparameter (a column of ``settings``, one row
    per run), the mean over groups of runs that agree on every other hyperparameter of Kendall's τ
    of x and y within the group — how well x predicts y when only that hyperparameter varies —
    and Ψ, the mean of those over the hyperparameters. Groups where the hyperparameter takes one
    value only are left out, and a group where x or y is constant counts τ = 0; a hyperparameter
    with no group that varies it gets NaN (and is left out of Ψ)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    settings = settings.reset_index(drop=True)[ok]
    x, y = x[ok], y[ok]
    per = {}
    for name in settings.columns:
        others = [c for c in settings.columns if c != name]
        groups = settings.groupby(others, sort=False).indices.values() if others else [np.arange(len(x))]
        taus = [stats.kendalltau(x[g], y[g]).statistic for g in groups if settings[name].iloc[g].nunique() > 1]
        # (τ is undefined where x or y is constant in a group: no ranking predicted there, so 0)
        per[name] = float(np.mean(np.nan_to_num(taus, nan=0.0))) if taus else float("nan")
    finite = [t for t in per.values() if np.isfinite(t)]
    return (float(np.mean(finite)) if finite else float("nan")), per
