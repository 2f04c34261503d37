"""From the result tables of an experiment to the comparisons its report states.

Rows are compared by **condition** (a rule and its grid coordinates other than the task) within
a task; the reference of a condition is BPTT at the same **point** of the grid (the ``point``
column the runner writes). What is compared:

* every run once: conditions that are one computation (the ``computation`` column, from the rule
  registry: e.g. ``rflo`` and ``eprop_random``, or the two forms of a rule) count once, the first
  listed; the others are kept as checks and named (:func:`counted`);
* at the fixed iteration budget (the final networks) and at a **matched training loss** L*:
  each run is read where its training-set loss first reaches L*, interpolated between the two
  evaluations around that point (:func:`read_at_loss`);
* each condition against BPTT (:func:`contrasts`) and curvature against the clean and the
  perturbed-test gap, within each condition and pooled with the condition as a stratum
  (:func:`correlations`); every p-value of a report is adjusted together (Benjamini–Hochberg).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from creditscape.report import stats

REFERENCE_RULE = "bptt"
# Compared against BPTT, and correlated with curvature, for every condition.
CONTRASTED = ("train_loss", "gap_loss", "perturbed_gap", "lambda_max")
CURVATURES = ("lambda_max", "trace")
GAPS = ("gap_loss", "perturbed_gap")
LABELS = {"train_loss": "training loss", "test_loss": "test loss", "gap_loss": "gap (test − train loss)",
          "perturbed_gap": "perturbed gap", "lambda_max": "λ_max", "trace": "Hessian trace", "rho": "ρ"}


def ok(df: pd.DataFrame) -> pd.DataFrame:
    """The runs that did not diverge."""
    return df[df.diverged_at < 0]


def perturbed_losses(df: pd.DataFrame) -> list[str]:
    """The perturbed-test loss columns, e.g. ``perturbed[noise=0.2]_loss``, in their order."""
    return [c for c in df.columns if c.startswith("perturbed[") and c.endswith("_loss")]


def with_gaps(df: pd.DataFrame) -> pd.DataFrame:
    """Add ``gap_loss`` and ``perturbed_gap`` (the first perturbed set's loss − training loss: the
    paper's generalization measure is the loss on noisy test images)."""
    df = df.copy()
    df["gap_loss"] = df.test_loss - df.train_loss
    first = next(iter(perturbed_losses(df)), None)
    df["perturbed_gap"] = df[first] - df.train_loss if first else np.nan
    return df


def perturbed_name(df: pd.DataFrame) -> str | None:
    """The perturbed set behind ``perturbed_gap`` (e.g. ``noise=0.2``)."""
    first = next(iter(perturbed_losses(df)), None)
    return first[10:-6] if first else None


def counted(final: pd.DataFrame) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """The rows of conditions counted in statistics, and (left out, same computation as) pairs:
    at each task and grid point, of the conditions that are one computation only the first
    listed is counted."""
    dropped = []
    for _, g in final.groupby(["task", "point"], sort=False):
        first: dict[str, str] = {}
        for cond, comp in g[["condition", "computation"]].drop_duplicates().itertuples(index=False):
            if comp in first and first[comp] != cond:
                dropped.append((cond, first[comp]))
            first.setdefault(comp, cond)
    left_out = {d for d, _ in dropped}
    return final[~final.condition.isin(left_out)], dropped


def reference(final: pd.DataFrame, condition: str) -> str | None:
    """The BPTT condition at the grid point of ``condition`` (None if not run, or if it is BPTT)."""
    point = final.loc[final.condition == condition, "point"].iloc[0]
    ref = final[(final.point == point) & (final.rule == REFERENCE_RULE)].condition
    return ref.iloc[0] if len(ref) and ref.iloc[0] != condition else None


# ----------------------------------------------------------------------------------------------
# Matched training loss


def matched_level(final: pd.DataFrame, history: pd.DataFrame, target: float | None) -> pd.Series:
    """L* per grid point: the training target when the runs trained to one; otherwise the lowest
    training-set loss that every non-diverged run at that point reached at some evaluation (the
    largest of the runs' minima), so that every run is read, none extrapolated."""
    points = final.groupby("point", sort=False).size().index
    if target is not None:
        return pd.Series(float(target), index=points)
    alive = ok(final)[["condition", "seed", "learning_rate"]]
    h = history.merge(alive, on=["condition", "seed", "learning_rate"])
    lowest = h.groupby(["point", "condition", "seed", "learning_rate"]).train_loss.min()
    return lowest.groupby(level="point").max().reindex(points)


def read_at_loss(history: pd.DataFrame, levels: pd.Series) -> pd.DataFrame:
    """Each run where its training-set loss first reaches the level of its grid point: every
    numeric column interpolated linearly in log(training loss) between the evaluation before and
    the evaluation at that point. One row per run; ``reached`` is False (other values NaN) for a
    run that never reaches it; ``coarse`` marks a reading between two evaluations whose training
    losses differ more than twofold (an interpolation across much of training)."""
    numeric = [c for c in history.columns if c not in ("seed", "learning_rate", "step", "cell", "diverged_at")
               and pd.api.types.is_float_dtype(history[c])]
    rows = []
    for (cond, seed, lr), h in history.groupby(["condition", "seed", "learning_rate"], sort=False):
        h = h.sort_values("step")
        level = float(levels[h.point.iloc[0]])
        row = {"task": h.task.iloc[0], "point": h.point.iloc[0], "condition": cond, "rule": h.rule.iloc[0],
               "seed": seed, "learning_rate": lr, "level": level}
        loss = h.train_loss.to_numpy(float)
        below = np.flatnonzero(loss <= level * (1 + 1e-9))
        if not len(below):
            rows.append({**row, "reached": False})
            continue
        j = below[0]
        if j == 0:
            w = 0.0
        else:
            hi, lo = np.log(loss[j - 1]), np.log(max(loss[j], 1e-300))
            w = float(np.clip((hi - np.log(level)) / (hi - lo), 0.0, 1.0)) if hi > lo else 1.0
        i = max(j - 1, 0)
        values = {c: (1 - w) * h[c].iloc[i] + w * h[c].iloc[j] for c in numeric}
        values["train_loss"] = float(np.exp((1 - w) * np.log(loss[i]) + w * np.log(max(loss[j], 1e-300))))
        steps = h.step.to_numpy(float)
        rows.append({**row, "reached": True, **values, "step": (1 - w) * steps[i] + w * steps[j],
                     "coarse": bool(loss[i] > 2 * loss[j])})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# Contrasts and correlations


def contrasts(runs: pd.DataFrame, reading: str) -> pd.DataFrame:
    """Each counted condition against BPTT at its grid point, per metric of :data:`CONTRASTED`:
    medians, difference of medians with its bootstrap interval, permutation p (unadjusted)."""
    rows = []
    for cond in dict.fromkeys(runs.condition):
        ref = reference(runs, cond)
        if ref is None:
            continue
        a, b = runs[runs.condition == cond], runs[runs.condition == ref]
        for metric in CONTRASTED:
            if metric not in runs or not np.isfinite(runs[metric].to_numpy(float)).any():
                continue
            c = stats.contrast(a[metric], b[metric])
            rows.append({"task": runs.task.iloc[0], "reading": reading, "condition": cond, "reference": ref,
                         "metric": metric, "median": np.nanmedian(a[metric].to_numpy(float)),
                         "reference_median": np.nanmedian(b[metric].to_numpy(float)), "n": c.n_a,
                         "n_reference": c.n_b, "effect": c.effect, "ci_low": c.ci[0], "ci_high": c.ci[1], "p": c.p})
    return pd.DataFrame(rows)


def correlations(runs: pd.DataFrame) -> pd.DataFrame:
    """Spearman ρ of each curvature measure with each gap: within each condition, and pooled over
    conditions with the condition as a stratum (never pooled raw: differences between rules in
    training loss would make a correlation that holds within no rule)."""
    rows = []
    for curvature in CURVATURES:
        for gap in GAPS:
            if curvature not in runs or gap not in runs or not np.isfinite(runs[gap].to_numpy(float)).any():
                continue
            scopes = [(c, runs[runs.condition == c], None) for c in dict.fromkeys(runs.condition)]
            scopes.append(("all conditions (condition as stratum)", runs, runs.condition.to_numpy()))
            for scope, g, strata in scopes:
                r = stats.spearman(g[curvature], g[gap], strata)
                if np.isfinite(r.rho):
                    rows.append({"task": runs.task.iloc[0], "curvature": curvature, "gap": gap, "scope": scope,
                                 "n": r.n, "rho": r.rho, "ci_low": r.ci[0], "ci_high": r.ci[1], "p": r.p})
    return pd.DataFrame(rows)


# Ranked against the gaps when the final networks carry them (measure.generalization_measures);
# the sign a measure's τ should have if it predicts as its literature says: sharper → larger gap.
RANKED = {"lambda_max": +1, "trace": +1, "sharpness_random": +1, "pac_bayes_sigma": -1,
          "pac_bayes_sigma_magnitude": -1, "relative_flatness": +1, "normalized_sharpness": +1, "fisher_rao_norm": +1,
          "log_path_norm": +1, "spectral_norm_product": +1, "distance_from_init": +1}
LABELS.update({"sharpness_random": "random sharpness", "pac_bayes_sigma": "PAC-Bayes σ",
               "pac_bayes_sigma_magnitude": "PAC-Bayes σ (magnitude-aware)", "relative_flatness": "relative flatness",
               "normalized_sharpness": "normalized sharpness", "log_path_norm": "log path norm",
               "fisher_rao_norm": "Fisher–Rao norm", "spectral_norm_product": "∏ spectral norms",
               "distance_from_init": "distance from initialization"})


def measure_ranking(runs: pd.DataFrame, hyperparameters: list[str]) -> pd.DataFrame:
    """How well each measure ranks runs by each gap (Jiang et al. 2020): Kendall's τ with a
    bootstrap interval and granulated Ψ (one hyperparameter varied at a time) over all runs — the
    rule counted as a hyperparameter — and within each rule. ``hyperparameters``: the grid's
    columns (and ``learning_rate``); those that do not vary in a scope are left out there."""
    rows = []
    for measure in (m for m in RANKED if m in runs and np.isfinite(runs[m].to_numpy(float)).any()):
        for gap in GAPS:
            if gap not in runs:
                continue
            scopes = [("all runs", runs, [*hyperparameters, "rule"])]
            scopes += [(rule, runs[runs.rule == rule], hyperparameters) for rule in dict.fromkeys(runs.rule)]
            for scope, g, names in scopes:
                varied = [h for h in names if h in g and g[h].nunique() > 1]
                k = stats.kendall(g[measure], g[gap])
                psi = stats.granulated_kendall(g[measure], g[gap], g[varied])[0] if varied else float("nan")
                if np.isfinite(k.tau):
                    rows.append({"task": runs.task.iloc[0], "measure": measure, "gap": gap, "scope": scope, "n": k.n,
                                 "tau": k.tau, "ci_low": k.ci[0], "ci_high": k.ci[1], "p": k.p, "psi": psi,
                                 "expected_sign": RANKED[measure]})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# One setting at a time ([sweep])

SWEPT = ("lambda_max", "rho", "gap_loss", "perturbed_gap", "train_loss")  # what a setting may move


def setting_effects(runs: pd.DataFrame) -> pd.DataFrame:
    """Each varied cell against its base cell ([sweep]), rule by rule, per metric of
    :data:`SWEPT`: the difference of medians with its interval and permutation p (``kind`` =
    "effect"); and for every rule but BPTT, whether the setting narrows or widens its difference
    from BPTT (``kind`` = "interaction", :func:`stats.interaction`)."""
    rows = []
    if "varied" not in runs:
        return pd.DataFrame(rows)
    varied = runs[runs.varied != ""]
    for (setting, point, base), g in varied.groupby(["varied", "point", "base_point"], sort=False):
        level = g[setting.partition(".")[2]].iloc[0]
        here = lambda rows_, rule: rows_[rows_.rule == rule]
        base_runs = runs[(runs.point == base) & (runs.varied == "")]
        for rule in dict.fromkeys(g.rule):
            for metric in (m for m in SWEPT if m in runs and np.isfinite(runs[m].to_numpy(float)).any()):
                a, b = here(g, rule)[metric], here(base_runs, rule)[metric]
                c = stats.contrast(a, b)
                common = {"task": runs.task.iloc[0], "setting": setting, "level": level, "point": point, "rule": rule,
                          "metric": metric}
                rows.append({**common, "kind": "effect", "median": np.nanmedian(a.to_numpy(float)) if len(a) else np.nan,
                             "base_median": np.nanmedian(b.to_numpy(float)) if len(b) else np.nan, "n": c.n_a,
                             "n_base": c.n_b, "effect": c.effect, "ci_low": c.ci[0], "ci_high": c.ci[1], "p": c.p})
                if rule == REFERENCE_RULE or REFERENCE_RULE not in set(g.rule):
                    continue
                a_ref, b_ref = here(g, REFERENCE_RULE)[metric], here(base_runs, REFERENCE_RULE)[metric]
                i = stats.interaction(a, a_ref, b, b_ref)
                # "median" and "base_median" of an interaction: the rule's difference from BPTT
                # (of medians) with the setting and at the base.
                rows.append({**common, "kind": "interaction", "median": stats.median_difference(*map(stats.finite, (a, a_ref))),
                             "base_median": stats.median_difference(*map(stats.finite, (b, b_ref))), "n": i.n_a,
                             "n_base": i.n_b, "effect": i.effect, "ci_low": i.ci[0], "ci_high": i.ci[1], "p": i.p})
    return pd.DataFrame(rows)


def adjust_all(*tables: pd.DataFrame) -> None:
    """Benjamini–Hochberg over every p-value of the given tables together (``p_adjusted``, in place)."""
    ps = np.concatenate([t.p.to_numpy(float) if "p" in t else np.zeros(0) for t in tables])
    adjusted = stats.adjust(ps)
    start = 0
    for t in tables:
        if "p" in t:
            t["p_adjusted"] = adjusted[start:start + len(t)]
            start += len(t)
