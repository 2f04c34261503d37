"""The report of a results folder: figures (PNG + SVG), a Markdown summary and a self-contained
HTML page (figures embedded, no network needed to view it).

Rows are compared by **condition** (a rule and its grid coordinates other than the task), task by
task. The report states the findings in words with their statistics, whichever way they come
out: each condition against BPTT at the same grid point, at the fixed iteration budget and at a
matched training loss; the correlation of curvature with the generalization gap across runs;
perturbed test sets; and every diverged run, with the iteration where it diverged. Diverged runs
are excluded from the statistics, and the report says how many.
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import stats  # noqa: E402

from creditscape.experiment import CONDITION_SEPARATOR as _SEP  # noqa: E402

REFERENCE_RULE = "bptt"
_NOISE = re.compile(r"^perturbed\[noise=([0-9.eE+-]+)\]_loss$")


def _perturbed_losses(df: pd.DataFrame) -> list[str]:
    """The perturbed-test loss columns, e.g. ``perturbed[noise=0.2]_loss``."""
    return [c for c in df.columns if c.startswith("perturbed[") and c.endswith("_loss")]


def _colors(conditions):
    cmap = plt.get_cmap("tab10" if len(conditions) <= 10 else "tab20")
    return {c: cmap(i % cmap.N) for i, c in enumerate(conditions)}


def _legend(fig, ax) -> None:
    """One legend for the figure, outside the panels on the right (there can be many conditions)."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False)


def _save(fig, folder: Path, name: str) -> str:
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    for ext in ("png", "svg"):
        fig.savefig(folder / f"{name}.{ext}", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f"figures/{name}.png"


def _ok(df: pd.DataFrame) -> pd.DataFrame:
    return df[df.diverged_at < 0]


def _strip(ax, final, column, colors, conditions):
    for i, c in enumerate(conditions):
        v = final.loc[final.condition == c, column].to_numpy(float)
        jitter = np.linspace(-0.15, 0.15, len(v)) if len(v) > 1 else np.zeros(len(v))
        ax.scatter(i + jitter, v, color=colors[c], s=16, alpha=0.8)
        if len(v):
            ax.hlines(np.nanmedian(v), i - 0.25, i + 0.25, color="k", lw=1.5)
    ax.set_xticks(range(len(conditions)), conditions, rotation=35, ha="right", fontsize=7)


def correlation(x: np.ndarray, y: np.ndarray, *, n_boot: int = 2000, seed: int = 0) -> dict:
    """Pearson and Spearman correlation with p-values and a 95% bootstrap interval of Spearman's ρ
    (resampling runs)."""
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 4 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"n": int(len(x))}
    pr, pp = stats.pearsonr(x, y)
    sr, sp = stats.spearmanr(x, y)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        i = rng.integers(len(x), size=len(x))
        if np.ptp(x[i]) > 0 and np.ptp(y[i]) > 0:
            boots.append(stats.spearmanr(x[i], y[i])[0])
    lo, hi = np.nanpercentile(boots, [2.5, 97.5])
    return {"n": int(len(x)), "pearson": float(pr), "pearson_p": float(pp), "spearman": float(sr),
            "spearman_p": float(sp), "spearman_ci": (float(lo), float(hi))}


SUMMARY_COLUMNS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "gap_loss", "lambda_max", "trace",
                   "rho", "sharpness_random", "alignment_recurrent")


def summary_table(final: pd.DataFrame) -> pd.DataFrame:
    """Per task and condition: mean ± sd [median] over non-diverged members of the final metrics
    and of every perturbed test loss, and the diverged count."""
    rows = []
    for (task, cond), g in final.groupby(["task", "condition"], sort=False):
        ok = _ok(g)
        row = {"task": task, "condition": cond, "runs": len(g), "diverged": int((g.diverged_at >= 0).sum())}
        perturbed = _perturbed_losses(final)
        for c in [c for c in SUMMARY_COLUMNS if c in final] + perturbed:
            v = ok[c].to_numpy(float)
            v = v[np.isfinite(v)]
            row[c] = f"{v.mean():.4g} ± {v.std():.2g} [{np.median(v):.4g}]" if len(v) else "—"
        rows.append(row)
    return pd.DataFrame(rows)


def matched_loss(final: pd.DataFrame, history: pd.DataFrame) -> pd.DataFrame:
    """Each member at the first evaluation where its training-set loss reaches L*: at each grid
    point, the highest of its conditions' median final training losses (a level that every rule
    there reaches, in the median). One row per non-diverged member: ``level``, ``reached``,
    ``step`` and the metrics at that step."""
    ok = _ok(final)
    medians = ok.groupby("condition").train_loss.median()
    levels = medians.groupby([_grid_point(c) for c in medians.index]).max()
    rows = []
    for (cond, seed, lr), h in history.groupby(["condition", "seed", "learning_rate"], sort=False):
        if not ((ok.condition == cond) & (ok.seed == seed) & (ok.learning_rate == lr)).any():
            continue
        level = float(levels[_grid_point(cond)])
        hit = h[h.train_loss <= level * (1 + 1e-9)].sort_values("step")
        row = {"condition": cond, "seed": seed, "learning_rate": lr, "level": level, "reached": len(hit) > 0}
        if len(hit):
            first = hit.iloc[0]
            row.update({k: first[k] for k in ("step", "train_loss", "train_accuracy", "test_loss", "test_accuracy",
                                              "lambda_max") if k in first})
            row["gap_loss"] = row["test_loss"] - row["train_loss"]
        rows.append(row)
    return pd.DataFrame(rows)


def _matched_table(level_rows: pd.DataFrame, conditions) -> pd.DataFrame:
    rows = []
    for cond in conditions:
        g = level_rows[level_rows.condition == cond]
        hit = g[g.reached]
        row = {"condition": cond, "L*": f"{g.level.iloc[0]:.4g}" if len(g) else "—", "reached": f"{len(hit)}/{len(g)}"}
        for c in ("step", "train_accuracy", "test_loss", "gap_loss", "lambda_max"):
            row[c] = f"{hit[c].median():.4g}" if len(hit) and c in hit else "—"
        rows.append(row)
    return pd.DataFrame(rows)


def _md_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def _grid_point(condition: str) -> str:
    return condition.partition(_SEP)[2]


def _reference(final: pd.DataFrame, cond: str) -> str | None:
    """BPTT at the same grid point as ``cond`` (same suffix after the rule), if it was run."""
    suffix = _grid_point(cond)
    ref = REFERENCE_RULE + (f"{_SEP}{suffix}" if suffix else "")
    return ref if ref != cond and ref in set(final.condition) else None


def _mw(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    return float(stats.mannwhitneyu(a, b).pvalue) if len(a) > 1 and len(b) > 1 else float("nan")


def _findings(final: pd.DataFrame, matched: pd.DataFrame, corr: dict, corr_trace: dict) -> list[str]:
    ok = _ok(final)
    out = []
    for cond in dict.fromkeys(ok.condition):
        ref = _reference(ok, cond)
        if ref is None:
            continue
        a, b = ok[ok.condition == cond], ok[ok.condition == ref]
        text = (f"**{cond}** vs {ref} (median over runs, at the fixed budget): gap {a.gap_loss.median():.4g} vs "
                f"{b.gap_loss.median():.4g} (Mann–Whitney p = {_mw(a.gap_loss, b.gap_loss):.3g}); test loss "
                f"{a.test_loss.median():.4g} vs {b.test_loss.median():.4g}; λ_max {a.lambda_max.median():.4g} vs "
                f"{b.lambda_max.median():.4g} (p = {_mw(a.lambda_max, b.lambda_max):.3g}); training loss "
                f"{a.train_loss.median():.4g} vs {b.train_loss.median():.4g}, training accuracy "
                f"{a.train_accuracy.median():.3g} vs {b.train_accuracy.median():.3g}")
        if a.train_loss.median() > 1.5 * b.train_loss.median() + 1e-3:
            text += " — it fits the training set worse, so the gap at the fixed budget is not like-for-like"
        ma, mb = matched[(matched.condition == cond) & matched.reached], matched[(matched.condition == ref) & matched.reached]
        level = matched.loc[matched.condition == cond, "level"]
        level = f"{level.iloc[0]:.3g}" if len(level) else "—"
        if len(ma) and len(mb):
            text += (f". At matched training loss {level}: gap {ma.gap_loss.median():.4g} vs {mb.gap_loss.median():.4g}"
                     f" (p = {_mw(ma.gap_loss, mb.gap_loss):.3g}), λ_max {ma.lambda_max.median():.4g} vs "
                     f"{mb.lambda_max.median():.4g}.")
        else:
            text += f". At matched training loss {level}: not reached by both."
        out.append(text)
    for name, c in (("λ_max", corr), ("the Hessian trace", corr_trace)):
        if "spearman" in c:
            lo, hi = c["spearman_ci"]
            verdict = "significant" if c["spearman_p"] < 0.05 else "not significant"
            out.append(
                f"Across {c['n']} runs, {name} and the loss gap correlate with Spearman ρ = {c['spearman']:.3f} "
                f"(p = {c['spearman_p']:.3g}, 95% bootstrap CI [{lo:.3f}, {hi:.3f}]) and Pearson r = "
                f"{c['pearson']:.3f} (p = {c['pearson_p']:.3g}): {verdict} at the 5% level."
            )
    for col in _perturbed_losses(ok):
        per = ok.groupby("condition", sort=False)[col].median()
        out.append(f"Perturbed test set {col[10:-6]}: lowest median loss {per.min():.4g} ({per.idxmin()}), "
                   f"highest {per.max():.4g} ({per.idxmax()}).")
    diverged = final[final.diverged_at >= 0]
    if len(diverged):
        where = "; ".join(f"{r.condition} seed {r.seed} at iteration {r.diverged_at}" for r in diverged.itertuples())
        out.append(f"{len(diverged)} of {len(final)} runs diverged (NaN/inf) and are excluded from the statistics: {where}.")
    else:
        out.append(f"No run diverged ({len(final)} runs).")
    return out


def _task_figures(final, history, slices, config, figs: Path, prefix: str) -> list[tuple[str, str]]:
    conditions = list(dict.fromkeys(final.condition))
    colors = _colors(conditions)
    ok = _ok(final)
    sgd = config["cells"][0]["train"]["optimizer"] == "sgd"
    momentum = config["cells"][0]["train"]["momentum"]
    edge, edge_name = 2 * (1 + momentum), ("2(1+β)/η" if momentum else "2/η")
    block = config["measure"]["curvature_block"]
    images = []

    def per_condition(values: str, ax, reduce="median", band=True):
        for c in conditions:
            h = history[history.condition == c].pivot_table(index="step", columns=["seed", "learning_rate"],
                                                              values=values)
            ax.plot(h.index, getattr(h, reduce)(axis=1), color=colors[c], label=c)
            if band:
                ax.fill_between(h.index, h.min(axis=1), h.max(axis=1), color=colors[c], alpha=0.12)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    per_condition("train_loss", axes[0])
    per_condition("test_loss", axes[1])
    axes[0].set(xlabel="iteration", ylabel="training-set loss", yscale="log", title="Training loss (median, min–max)")
    axes[1].set(xlabel="iteration", ylabel="test-set loss", yscale="log", title="Test loss (median, min–max)")
    _legend(fig, axes[0])
    images.append(("Training and test loss", _save(fig, figs, f"{prefix}loss")))

    if "lambda_max" in history:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        per_condition("lambda_max", axes[0], band=False)
        per_condition("rho", axes[1], band=False)
        if sgd:  # linear stability of SGD with heavy-ball momentum β: λ_max < 2(1 + β)/η
            for lr in sorted(set(final.learning_rate)):
                axes[0].axhline(edge / lr, color="gray", ls="--", lw=1)
                axes[0].annotate(f"{edge_name}, η={lr:g}", (history.step.max(), edge / lr), fontsize=7, ha="right",
                                 va="bottom")
            for c in conditions:  # the rule's predicted stability bound, with its final ρ
                g = ok[ok.condition == c]
                rho, lr = g.rho.median(), g.learning_rate.median()
                if len(g) and rho > 0:
                    axes[0].axhline(edge / (lr * rho), color=colors[c], ls=":", lw=1)
        lam = history.lambda_max.to_numpy(float)
        lam = lam[np.isfinite(lam)]
        if len(lam) and lam.min() > 0:
            axes[0].set_yscale("log")
        else:  # signed: λ_max can be negative away from a minimum
            axes[0].set_yscale("symlog", linthresh=1e-2)
        axes[0].set(xlabel="iteration", ylabel=f"λ_max of {block} (median)",
                    title="Sharpness along training" + (f" (dashed {edge_name}, dotted ÷ρ per rule)" if sgd else ""))
        axes[1].set(xlabel="iteration", ylabel="ρ = v₁ᵀĴv₁ / λ₁ (median)", title="Rule gain along the top eigenvector")
        _legend(fig, axes[0])
        images.append(("Sharpness and gain along training", _save(fig, figs, f"{prefix}sharpness_along_training")))

    panels = [("train_accuracy", "training accuracy"), ("test_accuracy", "test accuracy"),
              ("gap_loss", "gap (test − train loss)"), ("lambda_max", f"λ_max ({block})"), ("trace", f"trace ({block})")]
    panels = [p for p in panels if p[0] in final]
    first_perturbed = next(iter(_perturbed_losses(final)), None)
    if first_perturbed:  # the distribution of one perturbed-test loss (all of them: the perturbed figure)
        panels.insert(3, (first_perturbed, f"loss on {first_perturbed[10:-6]}"))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 4.2))
    for ax, (col, title) in zip(axes, panels):
        _strip(ax, ok, col, colors, conditions)
        ax.set_title(title, fontsize=9)
        if col in ("lambda_max", "trace") or col == first_perturbed:
            ax.set_yscale("symlog", linthresh=1e-2)  # rules differ by orders of magnitude
            values = ok[col].to_numpy(float)
            if len(values) and np.nanmin(values) >= 0:
                ax.set_ylim(0, 2 * np.nanmax(values) + 1e-2)
    images.append(("Generalization and curvature per condition (bars: medians)", _save(fig, figs, f"{prefix}per_condition")))

    noise = sorted((float(m.group(1)), c) for c in final.columns if (m := _NOISE.match(c)))
    shifts = [c for c in _perturbed_losses(final) if not _NOISE.match(c)]
    if noise or shifts:
        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        for c in conditions:
            g = ok[ok.condition == c]
            xs = [0.0] + [s for s, _ in noise]
            axes[0].plot(xs, [g.test_loss.median()] + [g[col].median() for _, col in noise], "o-", color=colors[c], label=c)
            axes[1].plot(xs, [g.test_accuracy.median()] + [g[col.replace("_loss", "_accuracy")].median() for _, col in noise],
                         "o-", color=colors[c])
        axes[0].set(xlabel="input noise σ", ylabel="test loss (median)", yscale="log", title="Loss over noise levels")
        axes[1].set(xlabel="input noise σ", ylabel="test accuracy (median)", title="Accuracy over noise levels")
        _legend(fig, axes[0])
        if shifts:
            for i, c in enumerate(conditions):
                g = ok[ok.condition == c]
                axes[2].plot(range(len(shifts) + 1), [g.test_loss.median()] + [g[s].median() for s in shifts], "o",
                             color=colors[c], alpha=0.85)
            axes[2].set_xticks(range(len(shifts) + 1), ["test"] + [s[10:-6] for s in shifts], rotation=20, ha="right")
            axes[2].set(ylabel="loss (median)", yscale="log", title="Task shifts")
        else:
            axes[2].axis("off")
        images.append(("Perturbed test sets", _save(fig, figs, f"{prefix}perturbed")))

    corr = correlation(ok.lambda_max.to_numpy(float), ok.gap_loss.to_numpy(float))
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for c in conditions:
        g = ok[ok.condition == c]
        ax.scatter(g.lambda_max, g.gap_loss, color=colors[c], label=c, s=18)
    title = "λ_max vs generalization gap"
    if "spearman" in corr:
        title += f"\nSpearman ρ={corr['spearman']:.2f} (p={corr['spearman_p']:.2g}), n={corr['n']}"
    ax.set(xlabel="λ_max", ylabel="test − train loss", title=title)
    ax.set_xscale("symlog", linthresh=1e-2)
    _legend(fig, ax)
    images.append(("Curvature vs gap", _save(fig, figs, f"{prefix}curvature_vs_gap")))

    fig, ax = plt.subplots(figsize=(6, 4))
    per_condition("alignment_recurrent", ax, reduce="mean", band=False)
    ax.set(xlabel="iteration", ylabel="cos(ĝ, ∇L), recurrent layer", title="Gradient alignment along training",
           ylim=(-0.1, 1.05))
    _legend(fig, ax)
    images.append(("Gradient alignment", _save(fig, figs, f"{prefix}alignment")))

    if len(slices):
        s_ok = slices[slices.diverged_at < 0]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1.3, 1]})
        for c in conditions:
            one = s_ok[(s_ok.condition == c) & (s_ok.kind == "1d")].groupby("a").loss.median()
            axes[0].plot(one.index, one.to_numpy(), color=colors[c], label=c)
        axes[0].set(xlabel="step along a filter-normalized direction", ylabel="training loss (median)", yscale="log",
                    title="1-D loss slices")
        _legend(fig, axes[0])
        widths = []
        for c in conditions:  # flatness: the smallest |step| where the loss rises by max(L₀, 0.1)
            for _, one in s_ok[(s_ok.condition == c) & (s_ok.kind == "1d")].groupby(["seed"]):
                base = one.loc[one.a.abs().idxmin(), "loss"]
                out = one[one.loss > base + max(base, 0.1)]
                widths.append((c, out.a.abs().min() if len(out) else one.a.abs().max()))
        w = pd.DataFrame(widths, columns=["condition", "width"])
        _strip(axes[1], w, "width", colors, conditions)
        axes[1].set_title("flatness: smallest |step| where the loss rises by max(L₀, 0.1)", fontsize=9)
        images.append(("Filter-normalized 1-D loss slices", _save(fig, figs, f"{prefix}slices_1d")))

        shown = conditions[:8]
        two = s_ok[s_ok.kind == "2d"]
        log_loss = np.log10(np.maximum(two.loss.to_numpy(float), 1e-12))
        levels = np.linspace(np.nanmin(log_loss), np.nanmax(log_loss), 21) if len(two) else 20
        fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.4), squeeze=False, layout="constrained")
        for ax, c in zip(axes[0], shown):
            g = two[two.condition == c]
            if not len(g):
                ax.axis("off")
                continue
            g = g[g.seed == g.seed.min()].pivot(index="b", columns="a", values="loss")
            im = ax.contourf(g.columns, g.index, np.log10(np.maximum(g.to_numpy(), 1e-12)), levels=levels,
                             cmap="viridis", extend="both")
            ax.plot(0, 0, "r+")
            ax.set_title(c, fontsize=8)
        if len(two):
            fig.colorbar(im, ax=axes[0].tolist(), label="log10 training loss", shrink=0.8)
        images.append(("Filter-normalized 2-D loss surfaces (log10 loss, first seed, one colour scale)", _save(fig, figs, f"{prefix}slices_2d")))

    grid_conditions = [c for c in conditions if _grid_point(c)]
    if grid_conditions:  # remedies and other grids: each rule across the grid points
        points = list(dict.fromkeys(_grid_point(c) for c in grid_conditions))
        rules = list(dict.fromkeys(c.partition(_SEP)[0] for c in grid_conditions))
        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        for rule in rules:
            for ax, col in zip(axes, ("test_loss", "gap_loss", "lambda_max")):
                ys = [ok.loc[ok.condition == f"{rule}{_SEP}{p}", col].median() for p in points]
                ax.plot(range(len(points)), ys, "o-", label=rule)
        for ax, col in zip(axes, ("test loss", "gap", "λ_max")):
            ax.set_xticks(range(len(points)), points, rotation=30, ha="right", fontsize=7)
            ax.set_ylabel(f"{col} (median)")
        axes[0].set_yscale("log")
        axes[2].set_yscale("symlog", linthresh=1e-2)
        _legend(fig, axes[0])
        images.append(("Across the grid (e.g. learning-rate scaling and late boosts)", _save(fig, figs, f"{prefix}grid")))
    return images


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
    m = config["measure"]
    tasks = list(dict.fromkeys(final.task))
    md = [f"# creditscape report: {config['name']}", "",
          f"{len(config['cells'])} grid cell(s), {len(config['rules'])} rules, {len(config['seeds'])} seeds; "
          f"{len(final)} runs in all."]
    html_parts = [f"<h1>creditscape report: {html.escape(config['name'])}</h1>",
                  f"<p>{html.escape(md[-1])}</p>"]
    for t, task in enumerate(tasks):
        # Perturbed sets are per task: drop the other tasks' (empty) columns.
        f_t = final[final.task == task].dropna(axis=1, how="all")
        h_t = history[history.task == task].dropna(axis=1, how="all")
        s_t = slices[slices.task == task] if len(slices) else slices
        cell = next(c for c in config["cells"] if c["task"]["name"] == task)
        tr, mo = cell["train"], cell["model"]
        ok = _ok(f_t)
        corr = correlation(ok.lambda_max.to_numpy(float), ok.gap_loss.to_numpy(float))
        corr_trace = correlation(ok.trace.to_numpy(float), ok.gap_loss.to_numpy(float)) if "trace" in ok else {}
        matched = matched_loss(f_t, h_t)
        findings = _findings(f_t, matched, corr, corr_trace)
        table = summary_table(f_t).drop(columns="task")
        conditions = list(dict.fromkeys(f_t.condition))
        mtable = _matched_table(matched, conditions)
        images = _task_figures(f_t, h_t, s_t, config, figs, f"{t}-" if len(tasks) > 1 else "")
        setup = (f"Task `{task}` (n_train = {cell['task']['n_train']}, n_test = {cell['task']['n_test']}); "
                 f"{tr['optimizer']} η = {', '.join(f'{v:g}' for v in cell['learning_rates'])}, {tr['steps']} iterations, "
                 f"batch {tr['batch_size']}, L2 {tr['l2']}; model {mo['form']} form, N = {mo['n_rec']}, "
                 f"α = {mo['alpha']}, {mo['activation']}.")
        md += ["", f"## {task}", "", setup, "", "### Findings", ""] + [f"- {f}" for f in findings] + [
            "", "### Final metrics at the fixed budget: mean ± sd [median] over non-diverged runs", "",
            _md_table(table), "", "### At matched training loss L* (medians over the runs that reach it)",
            "", _md_table(mtable), "", "### Figures", ""] + [f"![{title}]({p})" for title, p in images]
        html_parts += [f"<h2>{html.escape(task)}</h2><p>{html.escape(setup)}</p>", "<h3>Findings</h3><ul>"]
        html_parts += [f"<li>{html.escape(f).replace('**', '')}</li>" for f in findings] + ["</ul>"]
        html_parts += ["<h3>Final metrics at the fixed budget (mean ± sd [median])</h3>", table.to_html(index=False, border=0)]
        html_parts += ["<h3>At matched training loss L*</h3>", mtable.to_html(index=False, border=0)]
        html_parts += [f"<h4>{html.escape(title)}</h4><img src='{_embed(folder, p)}' style='max-width:100%'>"
                       for title, p in images]
    definitions = (
        "λ_max: top Hessian eigenvalue of the exact training loss" + (" (L2 included)" if m["l2_in_curvature"] else "")
        + f" w.r.t. `{m['curvature_block']}`, Lanczos with {m['lanczos_steps']} steps on the first "
        f"{m['curvature_batch']} training sequences; trace: Hutch++ with {m['trace_probes']} HVPs on the same block. "
        "Gap: test − train loss on fixed disjoint sets. ρ = v₁ᵀĴv₁/λ₁: the rule's gain along the top Hessian "
        "eigenvector v₁ (Ĵ = ∂ĝ/∂θ on the same block); under SGD with step η the rule can be stable up to "
        "λ_max ≈ 2/(ηρ) instead of 2/η (with momentum β: 2(1+β)/(ηρ) and 2(1+β)/η). sharpness_random: mean loss increase under random weight perturbations of "
        f"relative scale {m['sharpness_scale']}. Matched training loss L*: the highest of the conditions' median "
        "final training losses at the same grid point; each run is read at its first evaluation at or below it."
    )
    md += ["", "## Definitions", "", definitions]
    html_parts += ["<h2>Definitions</h2>", f"<p>{html.escape(definitions)}</p>"]
    (folder / "report.md").write_text("\n".join(md) + "\n")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>creditscape report</title>"
            "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}td,th{padding:2px 8px}</style>"
            "</head><body>" + "\n".join(html_parts) + "</body></html>")
    (folder / "report.html").write_text(page)
    return folder / "report.html"


def _embed(folder: Path, png: str) -> str:
    return "data:image/png;base64," + base64.b64encode((folder / png).read_bytes()).decode()
