"""The report document: tables and findings in words, assembled as Markdown and self-contained
HTML (figures embedded, no network needed to view it)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np
import pandas as pd

from creditscape.report import analysis as A
from creditscape.report import figures as F
from creditscape.report import stats as S

SIGNIFICANCE = 0.05  # on Benjamini–Hochberg adjusted p-values
FIT_COLUMNS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "gap_loss", "perturbed_gap")
CURVATURE_COLUMNS = ("lambda_max", "lambda_residual", "lambda_gap", "lambda_max_all", "trace", "rho", "sharpness_random",
                     "alignment_recurrent", "relative_variance")


def number(x, digits: int = 3) -> str:
    """``digits`` significant digits, plain decimals between 1e-3 and 1e5, else scientific."""
    x = float(x)
    if not np.isfinite(x):
        return "—"
    if x == 0:
        return "0"
    if 1e-3 <= abs(x) < 1e5:
        return f"{x:.{max(digits - 1 - int(np.floor(np.log10(abs(x)))), 0)}f}"
    return f"{x:.{digits - 1}e}"


def _signed(x) -> str:
    return ("+" if float(x) > 0 else "") + number(x)


def _complex(re: float, im: float) -> str:
    return number(re) if im == 0 else f"{number(re)} {'+' if im > 0 else '−'} {number(abs(im))}i"


def spread(values) -> str:
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if not len(v):
        return "—"
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return f"{number(med)} [{number(q1)}, {number(q3)}]"


def summary_table(final: pd.DataFrame, columns=FIT_COLUMNS + CURVATURE_COLUMNS) -> pd.DataFrame:
    """Per task and condition: median [first quartile, third quartile] over the non-diverged runs
    of each column, and the numbers of runs and diverged runs."""
    final = A.with_gaps(final)
    rows = []
    for (task, cond), g in final.groupby(["task", "condition"], sort=False):
        row = {"task": task, "condition": cond, "runs": len(g), "diverged": int((g.diverged_at >= 0).sum())}
        row.update({c: spread(A.ok(g)[c]) for c in columns if c in final})
        rows.append(row)
    return pd.DataFrame(rows)


def _effect(row) -> str:
    """One metric of a contrast: the medians, the verdict, the effect with its interval, the
    adjusted p."""
    sig = row.p_adjusted < SIGNIFICANCE
    verdict = ("higher" if row.effect > 0 else "lower") if sig else "no difference shown"
    return (f"{A.LABELS[row.metric]} {number(row.median)} vs {number(row.reference_median)}, {verdict} "
            f"(difference {_signed(row.effect)}, 95% CI [{number(row.ci_low)}, {number(row.ci_high)}], "
            f"p = {number(row.p_adjusted, 2)})")


def _contrast_findings(contrasts: pd.DataFrame, matched: pd.DataFrame, level_text: str, tests: int) -> list:
    """One finding per condition, with one line per reading (matched loss, fixed budget).
    ``tests``: the number of p-values adjusted together in the report."""
    out = []
    for cond in dict.fromkeys(contrasts.condition):
        c = contrasts[contrasts.condition == cond]
        ref, n, n_ref = c.reference.iloc[0], c.n.max(), c.n_reference.max()
        head = (f"**{cond}** against {ref} (n = {n} vs {n_ref} runs; differences of medians with bootstrap "
                "intervals; permutation tests, p adjusted by Benjamini–Hochberg over the whole report):")
        floor = S.smallest_p(int(n), int(n_ref))
        if floor * tests > SIGNIFICANCE:
            head = head[:-1] + (f". With {n} and {n_ref} runs no permutation test can give p below {number(floor, 2)}, "
                                f"and a single such difference among the report's {tests} tests adjusts to "
                                f"{number(min(1.0, floor * tests), 2)}: only several strong differences together can "
                                "be shown; more seeds make each one testable:")
        lines = []
        m = c[(c.reading == "matched") & (c.metric != "train_loss")]
        if len(m):
            reached = matched[matched.condition.isin([cond, ref])].groupby("condition").reached.agg(["sum", "size"])
            counts = " and ".join(f"{int(reached.loc[k, 'sum'])}/{int(reached.loc[k, 'size'])}" for k in (cond, ref)
                                  if k in reached.index)
            coarse = matched[matched.condition.isin([cond, ref]) & matched.coarse.fillna(False).astype(bool)]
            lines.append(f"At matched training loss ({level_text}; reached by {counts} runs): "
                         + "; ".join(_effect(r) for r in m.itertuples()) + "."
                         + (f" {len(coarse)} of these runs crossed L* between evaluations whose training losses "
                            "differ more than twofold, so their reading is a coarse interpolation: evaluate more often "
                            "or train to the target (train.target_loss)." if len(coarse) else ""))
        f = c[c.reading == "fixed budget"]
        if len(f):
            text = "At the fixed budget: " + "; ".join(_effect(r) for r in f.itertuples()) + "."
            fit = f[f.metric == "train_loss"]
            if len(fit) and fit.p_adjusted.iloc[0] < SIGNIFICANCE and fit.effect.iloc[0] > 0:
                text += (" It fits the training set worse at the fixed budget, so its gaps there are not "
                         "like-for-like: read the matched comparison.")
            lines.append(text)
        out.append((head, lines))
    return out


def _verdict(contrasts: pd.DataFrame) -> str | None:
    """The paper's claim, checked: sharper minima and worse generalization than BPTT at matched
    training loss (the perturbed gap is the paper's measure; the clean gap when there is none)."""
    m = contrasts[contrasts.reading == "matched"]
    if not len(m):
        return None
    gap = "perturbed_gap" if (m.metric == "perturbed_gap").any() else "gap_loss"

    def which(metric):
        rows = m[(m.metric == metric) & (m.p_adjusted < SIGNIFICANCE) & (m.effect > 0)]
        return sorted(set(rows.condition))

    conditions = sorted(set(m.condition))
    sharper, worse = which("lambda_max"), which(gap)
    both = [c for c in sharper if c in worse]
    text = (f"The paper's claim at matched training loss — a bio-plausible rule finds sharper minima (higher λ_max) "
            f"and generalizes worse ({A.LABELS[gap]}) than BPTT — is supported for "
            f"{', '.join(both) if both else 'none'} of the {len(conditions)} conditions compared. ")
    text += f"Sharper: {', '.join(sharper) or 'none'}. Worse {A.LABELS[gap]}: {', '.join(worse) or 'none'}."
    unsupported = [c for c in conditions if c not in both]
    if unsupported:
        text += f" For {', '.join(unsupported)} these data do not support the claim (after correcting for multiple tests)."
    return text


def _correlation_findings(corr: pd.DataFrame) -> list[str]:
    out = []
    for (curv, gap), g in corr.groupby(["curvature", "gap"], sort=False):
        pooled = g[g.scope.str.startswith("all conditions")]
        within = g[~g.scope.str.startswith("all conditions")]
        text = f"{A.LABELS[curv]} and the {A.LABELS[gap]}"
        if len(pooled):
            r = pooled.iloc[0]
            sig = "significant" if r.p_adjusted < SIGNIFICANCE else "not significant"
            text += (f", within conditions pooled (condition as stratum, n = {r.n}): Spearman ρ = {number(r.rho, 2)} "
                     f"(95% CI [{number(r.ci_low, 2)}, {number(r.ci_high, 2)}]; stratified permutation test, "
                     f"Benjamini–Hochberg p = {number(r.p_adjusted, 2)}), {sig}")
        n_sig = int((within.p_adjusted < SIGNIFICANCE).sum())
        text += f"; significant within {n_sig} of {len(within)} conditions taken separately."
        out.append("Correlation of " + text)
    return out


def _contrast_table(contrasts: pd.DataFrame) -> pd.DataFrame:
    if not len(contrasts):
        return contrasts
    t = pd.DataFrame({
        "condition": contrasts.condition, "reading": contrasts.reading, "metric": contrasts.metric.map(A.LABELS),
        "median": contrasts["median"].map(number), "BPTT": contrasts.reference_median.map(number),
        "difference [95% CI]": [f"{_signed(r.effect)} [{number(r.ci_low)}, {number(r.ci_high)}]"
                                for r in contrasts.itertuples()],
        "n": [f"{r.n} vs {r.n_reference}" for r in contrasts.itertuples()],
        "p": contrasts.p.map(lambda v: number(v, 2)), "p (BH)": contrasts.p_adjusted.map(lambda v: number(v, 2)),
    })
    return t


def _correlation_table(corr: pd.DataFrame) -> pd.DataFrame:
    if not len(corr):
        return corr
    return pd.DataFrame({
        "curvature": corr.curvature.map(A.LABELS), "gap": corr.gap.map(A.LABELS), "scope": corr.scope, "n": corr.n,
        "Spearman ρ [95% CI]": [f"{number(r.rho, 2)} [{number(r.ci_low, 2)}, {number(r.ci_high, 2)}]"
                                for r in corr.itertuples()],
        "p": corr.p.map(lambda v: number(v, 2)), "p (BH)": corr.p_adjusted.map(lambda v: number(v, 2)),
    })


def _ranking_table(ranking: pd.DataFrame) -> pd.DataFrame:
    if not len(ranking):
        return ranking
    return pd.DataFrame({
        "measure": ranking.measure.map(A.LABELS), "expected": ranking.expected_sign.map({1: "+", -1: "−"}),
        "gap": ranking.gap.map(A.LABELS), "scope": ranking.scope, "n": ranking.n,
        "Kendall τ [95% CI]": [f"{number(r.tau, 2)} [{number(r.ci_low, 2)}, {number(r.ci_high, 2)}]"
                               for r in ranking.itertuples()],
        "Ψ": ranking.psi.map(lambda v: number(v, 2)),
        "p": ranking.p.map(lambda v: number(v, 2)), "p (BH)": ranking.p_adjusted.map(lambda v: number(v, 2)),
    })


def _ranking_findings(ranking: pd.DataFrame) -> list[str]:
    """Per gap and scope, the measure that ranks runs best in its expected direction."""
    out = []
    for (gap, scope), g in ranking.groupby(["gap", "scope"], sort=False):
        g = g.assign(signed=g.tau * g.expected_sign).sort_values("signed", ascending=False)
        best = g.iloc[0]
        held = "significant" if best.p_adjusted < 0.05 else "not significant"
        out.append(f"Best predictor of the {A.LABELS[gap]} ({scope}, n = {best.n}): {A.LABELS[best.measure]}, "
                   f"Kendall τ = {number(best.tau, 2)} (95% CI [{number(best.ci_low, 2)}, {number(best.ci_high, 2)}]; "
                   f"expected sign {'+' if best.expected_sign > 0 else '−'}; Benjamini–Hochberg p = "
                   f"{number(best.p_adjusted, 2)}, {held}); granulated Ψ = {number(best.psi, 2)}.")
    # Does a rule order the measures as BPTT does? Kendall's τ between the two rules' τ of each measure.
    for gap, g in ranking.groupby("gap", sort=False):
        signed = g.assign(signed=g.tau * g.expected_sign).pivot_table(index="measure", columns="scope", values="signed")
        if A.REFERENCE_RULE not in signed:
            continue
        for scope in (c for c in signed.columns if c not in (A.REFERENCE_RULE, "all runs")):
            both = signed[[A.REFERENCE_RULE, scope]].dropna()
            if len(both) < 4:
                continue
            agreement = both[A.REFERENCE_RULE].corr(both[scope], method="kendall")
            top = lambda col: A.LABELS[both[col].idxmax()]
            out.append(f"Do the measures rank {scope}'s {A.LABELS[gap]} as they rank BPTT's? Kendall's τ between "
                       f"the two rules' τ of the {len(both)} measures = {number(agreement, 2)}; the best measure is "
                       f"{top(scope)} for {scope} and {top(A.REFERENCE_RULE)} for BPTT.")
    return out


def _effects_table(effects: pd.DataFrame, kind: str) -> pd.DataFrame:
    e = effects[effects.kind == kind] if len(effects) else effects
    if not len(e):
        return pd.DataFrame()
    columns = {"setting": e.setting.str.partition(".")[2], "level": e.level, "rule": e.rule,
               "metric": e.metric.map(A.LABELS)}
    if kind == "effect":
        columns.update({"median": e["median"].map(number), "base": e.base_median.map(number),
                        "difference [95% CI]": [f"{_signed(r.effect)} [{number(r.ci_low)}, {number(r.ci_high)}]"
                                                for r in e.itertuples()],
                        "n": [f"{r.n} vs {r.n_base}" for r in e.itertuples()]})
    else:
        columns.update({"rule − BPTT": e["median"].map(_signed), "at the base": e.base_median.map(_signed)})
        columns["change of the difference from BPTT [95% CI]"] = [
            f"{_signed(r.effect)} [{number(r.ci_low)}, {number(r.ci_high)}]" for r in e.itertuples()]
    columns.update({"p (BH)": e.p_adjusted.map(lambda v: number(v, 2))})
    return pd.DataFrame(columns)


def _effects_findings(effects: pd.DataFrame, final: pd.DataFrame, target) -> list:
    """Per setting: what it moved, rule by rule, and whether it narrowed or widened the gap to BPTT
    (and, trained to a target, which rules' runs did not all reach it there)."""
    out = []
    for setting, g in effects.groupby("setting", sort=False):
        name = setting.partition(".")[2]
        sig = g[g.p_adjusted < SIGNIFICANCE]
        lines = []
        if target is not None:
            varied = A.ok(final[final.varied == setting])
            for (level, rule), runs in varied.groupby([name, "rule"], sort=False):
                if (runs.reached_at < 0).any():
                    lines.append(f"{rule}, {name} = {level}: {int((runs.reached_at >= 0).sum())} of {len(runs)} runs "
                                 f"reached the training loss {number(target)} (the others are left out).")
        for r in sig[sig.kind == "effect"].itertuples():
            lines.append(f"{r.rule}, {name} = {r.level}: {A.LABELS[r.metric]} {number(r.median)} vs {number(r.base_median)} "
                         f"at the base ({'higher' if r.effect > 0 else 'lower'}, difference {_signed(r.effect)}, "
                         f"95% CI [{number(r.ci_low)}, {number(r.ci_high)}], p = {number(r.p_adjusted, 2)}).")
        for r in sig[sig.kind == "interaction"].itertuples():
            way = "narrows" if abs(r.median) < abs(r.base_median) else "widens"
            lines.append(f"{r.rule}, {name} = {r.level}: its {A.LABELS[r.metric]} difference from BPTT {way}, from "
                         f"{_signed(r.base_median)} at the base to {_signed(r.median)} (change {_signed(r.effect)}, "
                         f"95% CI [{number(r.ci_low)}, {number(r.ci_high)}], p = {number(r.p_adjusted, 2)}).")
        tested = int(np.isfinite(g.p.to_numpy(float)).sum())
        significant = int((g.p_adjusted < SIGNIFICANCE).sum())
        head = (f"{name}: {significant} of {tested} comparisons with the base cell are significant"
                if significant else f"{name}: no comparison with the base cell is significant ({tested} tested); the "
                "data do not show that it moves these measures or the rules' differences from BPTT")
        out.append((head + ".", lines) if lines else head + ".")
    return out


def _matched_table(matched: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for cond, g in matched.groupby("condition", sort=False):
        hit = g[g.reached]
        row = {"condition": cond, "L*": number(g.level.iloc[0]), "reached": f"{len(hit)}/{len(g)}"}
        for c in ("step", "train_loss", "train_accuracy", "test_loss", "gap_loss", "perturbed_gap", "lambda_max"):
            row[c] = spread(hit[c]) if len(hit) and c in hit else "—"
        rows.append(row)
    return pd.DataFrame(rows)


def _adam_edge_columns(g: pd.DataFrame) -> dict:
    """Under Adam, the preconditioned sharpness λ₁(P⁻¹H) at the end against its edge
    (2 + 2β₁)/((1 − β₁)η(T)) = 38/η(T) (Cohen et al. 2022); nothing for other optimizers."""
    from creditscape.train import adam_edge

    if not (g.optimizer == "adam").all() or "preconditioned_sharpness" not in g:
        return {}
    measured = g.preconditioned_sharpness.to_numpy(float)
    edge = adam_edge(g.eta_end.to_numpy(float))
    return {"Adam: λ₁(P⁻¹H) (measured)": spread(measured), "Adam edge 38/η(T)": spread(edge),
            "λ₁(P⁻¹H) below 38/η(T)": f"{int(np.sum(measured < edge))}/{int(np.isfinite(measured).sum())}"}


def _theory_table(final: pd.DataFrame) -> pd.DataFrame:
    """Per condition, the stability theory of DESIGN.md §5 against what was measured at the end:
    the edge 2(1+β)/η(T) of the condition's optimizer at its final step size, the rule's predicted
    bound 2(1+β)/(η(T)ρ), the measured λ_max, the top eigenvalue μ₁ of η(T)Ĵ, and in how many runs
    every recorded μ satisfies |1 − μ| < 1 (plain SGD only); under Adam, the preconditioned
    sharpness against Adam's own edge."""
    if "eta_end" not in final:
        return pd.DataFrame()
    rows = []
    for cond, g in A.ok(final).groupby("condition", sort=False):
        sgd = (g.optimizer == "sgd").all()
        edge = 2 * (1 + g.momentum) / g.eta_end
        bound = np.where(g.rho > 0, edge / g.rho.where(g.rho > 0, 1.0), np.inf)
        below = int(np.sum(g.lambda_max.to_numpy(float) < bound))
        none = pd.Series(np.nan, index=g.index)  # columns that are NaN everywhere were dropped
        stable = g.get("update_map_stable", none).dropna()
        mu = g.get("mu1_re", none).to_numpy(float) + 1j * g.get("mu1_im", none).to_numpy(float)
        mu = mu[np.isfinite(mu)]
        rows.append({
            "condition": cond, "λ_max (measured)": spread(g.lambda_max),
            "edge 2(1+β)/η(T)": spread(edge) if sgd else "— (Adam)",
            "predicted bound 2(1+β)/(η(T)ρ)": spread(bound) if sgd else "— (Adam)",
            "λ_max below the bound": f"{below}/{len(g)}" if sgd else "—",
            "μ₁ of η(T)Ĵ (median)": _complex(np.median(mu.real), np.median(mu.imag)) if len(mu) and sgd else "—",
            "runs with abs(1 − μ) < 1 for the top μ": f"{int(stable.sum())}/{len(stable)}" if len(stable)
            else "— (not plain SGD)",
            **_adam_edge_columns(g),
        })
    return pd.DataFrame(rows)


def _analyse(final: pd.DataFrame, history: pd.DataFrame, target: float | None,
             hyperparameters: list[str] = ()) -> dict:
    """Everything one task's section needs, p-values not yet adjusted."""
    final, history = A.with_gaps(final), A.with_gaps(history)
    runs, dropped = A.counted(final)
    alive = A.ok(runs)
    levels = A.matched_level(runs, history[history.condition.isin(set(runs.condition))], target)
    if target is not None:  # trained to the target: the final networks are the matched ones
        matched = alive.assign(level=float(target), reached=alive.reached_at >= 0, step=alive.reached_at.astype(float),
                               coarse=False)
    else:
        matched = A.read_at_loss(history[history.condition.isin(set(alive.condition))].merge(
            alive[["condition", "seed", "learning_rate"]], on=["condition", "seed", "learning_rate"]), levels)
    reached = matched[matched.reached] if len(matched) else matched
    # Trained to a target, the final networks are the matched ones: one reading, not two.
    readings = [] if target is not None else [A.contrasts(alive, "fixed budget")]
    readings += [A.contrasts(reached, "matched")] if len(reached) else []
    contrasts = pd.concat(readings, ignore_index=True) if readings else pd.DataFrame()
    ranking = A.measure_ranking(alive, list(hyperparameters)) if "pac_bayes_sigma" in alive else pd.DataFrame()
    # One setting at a time: at the training target when there is one (the runs that reached it).
    effects = A.setting_effects(reached if target is not None else alive)
    return {"final": final, "history": history, "dropped": dropped, "levels": levels, "matched": matched,
            "contrasts": contrasts, "correlations": A.correlations(alive), "ranking": ranking, "effects": effects}


def _level_text(levels: pd.Series, target) -> str:
    values = ", ".join(number(v) for v in levels.dropna().unique())
    if target is not None:
        return f"L* = {values}, the training target: each run stopped when its smoothed training loss reached it"
    return f"L* = {values}, the lowest training loss every run reached"


def _findings(a: dict, target, tests: int) -> list:
    """The findings of one task: sentences, or (sentence, [lines under it])."""
    final = a["final"]
    out = []
    verdict = _verdict(a["contrasts"]) if len(a["contrasts"]) else None
    if verdict:
        out.append(verdict)
    if len(a["contrasts"]):
        out += _contrast_findings(a["contrasts"], a["matched"], _level_text(a["levels"], target), tests)
    if len(a["correlations"]):
        out += _correlation_findings(a["correlations"])
    if len(a["ranking"]):
        out += _ranking_findings(a["ranking"])
    if len(a["effects"]):
        out += _effects_findings(a["effects"], final, target)
    for left_out, kept in a["dropped"]:
        out.append(f"{left_out} is the same computation as {kept}: it was run as a check and is left out of every "
                   "statistic.")
    diverged = final[final.diverged_at >= 0]
    if len(diverged) == len(final):
        out.append(f"Every run diverged (NaN/inf; {len(final)} runs): there is nothing to compare. "
                   + "; ".join(f"{r.condition} seed {r.seed} at iteration {r.diverged_at}" for r in diverged.itertuples())
                   + ".")
    elif len(diverged):
        where = "; ".join(f"{r.condition} seed {r.seed} at iteration {r.diverged_at}" for r in diverged.itertuples())
        out.append(f"{len(diverged)} of {len(final)} runs diverged (NaN/inf) and are excluded from the statistics: {where}.")
    else:
        out.append(f"No run diverged ({len(final)} runs).")
    return out


def _setup(cell: dict, config: dict) -> str:
    tr, mo, m = cell["train"], cell["model"], config["measure"]
    dale = f", Dale's law ({mo['dale_exc_fraction']:.0%} excitatory)" if mo.get("dale_exc_fraction") else ""
    target = f", trained until the smoothed training loss reaches {tr['target_loss']:g}" if tr.get("target_loss") else ""
    return (f"Task `{cell['task']['name']}` (n_train = {cell['task']['n_train']}, n_test = {cell['task']['n_test']}); "
            f"{tr['optimizer']} η = {', '.join(f'{v:g}' for v in cell['learning_rates'])}, {tr['steps']} iterations"
            f"{target}, batch {tr['batch_size']}, L2 {tr['l2']}; model {mo['form']} form, N = {mo['n_rec']}, "
            f"α = {mo['alpha']}, {mo['activation']}{dale}. Curvature on the first "
            f"{min(m['curvature_batch'], cell['task']['n_train'])} of the {cell['task']['n_train']} training sequences.")


def _definitions(config: dict) -> str:
    m = config["measure"]
    return (
        "λ_max: top Hessian eigenvalue of the exact training loss" + (" (L2 included)" if m["l2_in_curvature"] else "")
        + f" w.r.t. `{m['curvature_block']}`, Lanczos with {m['lanczos_steps']} steps on the first "
        f"{m['curvature_batch']} training sequences; trace: Hutch++ with {m['trace_probes']} HVPs on the same block. "
        "Gap: test − train loss on fixed disjoint sets; perturbed gap: loss on the first perturbed test set − train "
        "loss. ρ = v₁ᵀĴv₁/λ₁: the rule's gain along the top Hessian eigenvector v₁ (Ĵ = ∂ĝ/∂θ on the same block); "
        "under SGD with step η(t) the rule can be stable up to λ_max ≈ 2(1+β)/(η(t)ρ) instead of 2(1+β)/η(t). "
        f"sharpness_random: mean loss increase under random weight perturbations of relative scale "
        f"{m['sharpness_scale']}. alignment_recurrent: cosine of the rule's estimate with the exact gradient over "
        "the recurrent layer; for a stochastic rule (UORO, KF-RTRL, …) the mean over 8 draws, its ρ that of the "
        "update averaged over them, and relative_variance = E‖ĝ − Eĝ‖²/‖∇L‖² over those draws. Tables give the median [first quartile, third quartile] over non-diverged runs. "
        "Statistics: a condition against BPTT at the same grid point by the difference of medians, with a "
        "percentile bootstrap 95% interval (runs resampled within each group) and a two-sided permutation test; "
        "correlations by Spearman's ρ within each condition and pooled with the condition as a stratum (ranks "
        "within conditions; bootstrap and permutations within conditions); every p-value of the report adjusted "
        f"together by Benjamini–Hochberg, significant when the adjusted p < {SIGNIFICANCE}. Matched training loss: "
        "each run read where its training-set loss first reaches L*, interpolated in log loss between the two "
        "evaluations around that point. Conditions that are one computation (e.g. the two forms of a rule) count once."
    )


def write_report(folder: str | Path) -> Path:
    """Write figures, ``report.md`` and ``report.html`` into a results folder; return the HTML path."""
    folder = Path(folder)
    final = pd.read_parquet(folder / "final.parquet")
    history = pd.read_parquet(folder / "history.parquet")
    slices_path = folder / "slices.parquet"
    slices = pd.read_parquet(slices_path) if slices_path.is_file() else pd.DataFrame()
    config = json.loads((folder / "config.json").read_text())
    figs = folder / "figures"
    figs.mkdir(exist_ok=True)
    tasks = list(dict.fromkeys(final.task))
    cells = {}
    for c in config["cells"]:  # each task's first cell: a sweep's base, described in its setup line
        cells.setdefault(c["task"]["name"], c)
    analyses = {}
    for task in tasks:  # perturbed sets are per task: drop the other tasks' (empty) columns
        f_t = final[final.task == task].dropna(axis=1, how="all")
        h_t = history[history.task == task].dropna(axis=1, how="all")
        hyperparameters = [k.partition(".")[2] for k in cells[task].get("values", {}) if k != "task.name"]
        hyperparameters += ["learning_rate"] if "learning_rate" not in hyperparameters else []
        analyses[task] = _analyse(f_t, h_t, cells[task]["train"].get("target_loss"), hyperparameters)
    tested = [t for a in analyses.values() for t in (a["contrasts"], a["correlations"], a["ranking"], a["effects"])]
    A.adjust_all(*tested)
    tests = sum(int(np.isfinite(t.p.to_numpy(float)).sum()) for t in tested if "p" in t)

    intro = (f"{len(config['cells'])} grid cell(s), {len(config['rules'])} rules, {len(config['seeds'])} seeds; "
             f"{len(final)} runs in all.")
    md = [f"# creditscape report: {config['name']}", "", intro]
    page = [f"<h1>creditscape report: {html.escape(config['name'])}</h1>", f"<p>{html.escape(intro)}</p>"]
    for t, task in enumerate(tasks):
        a, cell = analyses[task], cells[task]
        target = cell["train"].get("target_loss")
        conditions = list(dict.fromkeys(a["final"].condition))
        palette = F.colors(conditions)
        prefix = f"{t}-" if len(tasks) > 1 else ""
        block = config["measure"]["curvature_block"]
        level = float(a["levels"].iloc[0]) if len(a["levels"]) == 1 else None
        images = (F.loss_curves(a["final"], a["history"], figs, prefix, palette, conditions)
                  + F.against_training_loss(a["history"], figs, prefix, palette, conditions, level, block)
                  + F.sharpness_along_training(a["final"], a["history"], figs, prefix, palette, conditions, block)
                  + F.per_condition(a["final"], figs, prefix, palette, conditions, block)
                  + F.perturbed(a["final"], figs, prefix, palette, conditions)
                  + F.curvature_vs_gap(a["final"], figs, prefix, palette, conditions)
                  + F.measure_ranking(a["ranking"], figs, prefix)
                  + F.alignment(a["history"], figs, prefix, palette, conditions)
                  + F.slices(slices[slices.task == task] if len(slices) else slices, figs, prefix, palette, conditions)
                  + (F.setting_sweep(a["final"], figs, prefix) if "varied" in a["final"]
                     else F.across_grid(a["final"], figs, prefix)))
        summary = summary_table(a["final"]).drop(columns="task")
        fit = summary[[c for c in summary.columns if c not in CURVATURE_COLUMNS]]
        curvature = summary[["condition"] + [c for c in CURVATURE_COLUMNS if c in summary]]
        end = "end (each run stopped at the training target, or at the budget)" if target is not None else "fixed budget"
        tables = [
            (f"Fit and generalization at the {end}", fit),
            (f"Curvature at the {end}", curvature),
            (f"At matched training loss ({_level_text(a['levels'], target)})", _matched_table(a["matched"])
             if len(a["matched"]) else pd.DataFrame()),
            ("Each condition against BPTT", _contrast_table(a["contrasts"])),
            ("Curvature against the gaps", _correlation_table(a["correlations"])),
            ("Which measure ranks runs by their gap (Kendall's τ; Ψ: granulated, one hyperparameter varied at a time)",
             _ranking_table(a["ranking"])),
            ("Each setting against its base cell, rule by rule", _effects_table(a["effects"], "effect")),
            ("Does the setting narrow or widen each rule's difference from BPTT? (difference of differences of "
             "medians)", _effects_table(a["effects"], "interaction")),
            ("Stability theory at the end", _theory_table(A.counted(a["final"])[0])),
        ]
        findings = _findings(a, target, tests)
        setup = _setup(cell, config)
        md += ["", f"## {task}", "", setup, "", "### Findings", ""]
        page += [f"<h2>{html.escape(task)}</h2><p>{html.escape(setup)}</p>", "<h3>Findings</h3><ul>"]
        for f in findings:
            head, lines = f if isinstance(f, tuple) else (f, [])
            md += [f"- {head}"] + [f"    - {line}" for line in lines]
            sub = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
            page.append(f"<li>{_bold(html.escape(head))}" + (f"<ul>{sub}</ul>" if sub else "") + "</li>")
        page.append("</ul>")
        for title, table in tables:
            if len(table):
                md += ["", f"### {title}", "", _md_table(table)]
                page += [f"<h3>{html.escape(title)}</h3><div class='wide'>{table.to_html(index=False, border=0)}</div>"]
        md += ["", "### Figures", ""] + [f"![{title}]({p})" for title, p in images]
        page += [f"<h4>{html.escape(title)}</h4><img src='{_embed(folder, p)}' alt='{html.escape(title)}'>"
                 for title, p in images]
    definitions = _definitions(config)
    md += ["", "## Definitions", "", definitions]
    page += ["<h2>Definitions</h2>", f"<p>{html.escape(definitions)}</p>"]
    (folder / "report.md").write_text("\n".join(md) + "\n")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:auto;padding:0 1em;line-height:1.45}"
             "table{border-collapse:collapse;font-size:13px}td,th{padding:2px 8px;text-align:right;white-space:nowrap}"
             "td:first-child,th:first-child{text-align:left}tr:nth-child(even){background:#f4f4f4}"
             ".wide{overflow-x:auto}img{max-width:100%}li{margin-bottom:.5em}")
    (folder / "report.html").write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>creditscape report</title>"
        f"<style>{style}</style></head><body>" + "\n".join(page) + "</body></html>")
    return folder / "report.html"


def _bold(text: str) -> str:
    parts = text.split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def _md_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def _embed(folder: Path, png: str) -> str:
    return "data:image/png;base64," + base64.b64encode((folder / png).read_bytes()).decode()
