"""The figures of a report, one function each: (tables of one task, figures folder) → the figures'
titles and PNG paths (an SVG is written beside every PNG)."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from creditscape.report.analysis import ok, perturbed_losses  # noqa: E402

_NOISE = re.compile(r"^perturbed\[noise=([0-9.eE+-]+)\]_loss$")


def colors(conditions) -> dict:
    cmap = plt.get_cmap("tab10" if len(conditions) <= 10 else "tab20")
    return {c: cmap(i % cmap.N) for i, c in enumerate(conditions)}


def _legend(fig, ax) -> None:
    """One legend for the figure, outside the panels on the right (there can be many conditions)."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False)


def _save(fig, folder: Path, name: str) -> str:
    """Write the figure as PNG and SVG, cropped to what it draws. The layout and the cropping box
    are computed once for both files (``bbox_inches="tight"`` would lay out and draw each file
    twice: a third of a report's time)."""
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.set_dpi(110)  # the box is measured at the PNG's resolution
    if fig.get_layout_engine() is not None:
        fig.draw_without_rendering()  # runs the figure's own (constrained) layout
        fig.set_layout_engine(None)  # and keeps the positions it computed
    box = fig.get_tightbbox().padded(plt.rcParams["savefig.pad_inches"])
    for ext in ("png", "svg"):
        fig.savefig(folder / f"{name}.{ext}", dpi=110, bbox_inches=box)
    plt.close(fig)
    return f"figures/{name}.png"


def _strip(ax, runs, column, palette, conditions):
    for i, c in enumerate(conditions):
        v = runs.loc[runs.condition == c, column].to_numpy(float)
        jitter = np.linspace(-0.15, 0.15, len(v)) if len(v) > 1 else np.zeros(len(v))
        ax.scatter(i + jitter, v, color=palette[c], s=16, alpha=0.8)
        if len(v):
            ax.hlines(np.nanmedian(v), i - 0.25, i + 0.25, color="k", lw=1.5)
    ax.set_xticks(range(len(conditions)), conditions, rotation=35, ha="right", fontsize=7)


def _symlog(ax, values, axis="y"):
    """A log scale when every value is positive, else symlog (λ_max can be negative early on)."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    scale = "log" if len(v) and v.min() > 0 else "symlog"
    kwargs = {} if scale == "log" else {"linthresh": 1e-2}
    (ax.set_yscale if axis == "y" else ax.set_xscale)(scale, **kwargs)


def _has(df: pd.DataFrame, column: str) -> bool:
    """Whether ``df`` has some finite value in ``column`` (all-diverged runs may have none)."""
    return column in df and np.isfinite(df[column].to_numpy(float)).any()


def _per_condition(ax, history, column, palette, conditions, *, x="step", band=True, reduce="median"):
    if not _has(history, column):
        return
    for c in conditions:
        h = history[history.condition == c].pivot_table(index=x, columns=["seed", "learning_rate"], values=column)
        if not len(h):
            continue
        ax.plot(h.index, getattr(h, reduce)(axis=1), color=palette[c], label=c)
        if band:
            ax.fill_between(h.index, h.min(axis=1), h.max(axis=1), color=palette[c], alpha=0.12)


def loss_curves(final, history, figs, prefix, palette, conditions):
    if not _has(history, "train_loss"):
        return []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    _per_condition(axes[0], history, "train_loss", palette, conditions)
    _per_condition(axes[1], history, "test_loss", palette, conditions)
    axes[0].set(xlabel="iteration", ylabel="training-set loss", yscale="log", title="Training loss (median, min–max)")
    axes[1].set(xlabel="iteration", ylabel="test-set loss", yscale="log", title="Test loss (median, min–max)")
    _legend(fig, axes[0])
    return [("Training and test loss", _save(fig, figs, f"{prefix}loss"))]


def edge_of_stability(final: pd.DataFrame, cond: str, steps: np.ndarray) -> tuple[np.ndarray, str, str]:
    """The stability edge of a condition's own optimizer and schedule along ``steps``: (values, its
    name, the quantity it bounds). SGD with momentum β: λ_max < 2(1 + β)/η(t). Adam: the
    preconditioned sharpness λ₁(P⁻¹H) < (2 + 2β₁)/((1 − β₁)η(t)) = 38/η(t) (Cohen et al. 2022)."""
    from creditscape.train import TrainConfig, adam_edge, learning_rate_multiplier

    row = final[final.condition == cond].iloc[0]
    tcfg = TrainConfig(optimizer=row.optimizer, schedule=row.schedule, boost_at=float(row.boost_at),
                       boost_factor=float(row.boost_factor), steps=int(row.steps), eval_every=int(row.steps))
    eta = float(row.learning_rate) * np.asarray([float(learning_rate_multiplier(tcfg)(int(s))) for s in steps])
    if row.optimizer == "adam":
        return adam_edge(eta), "38/η(t)", "preconditioned_sharpness"
    beta = float(row.momentum)
    return 2 * (1 + beta) / eta, ("2(1+β)/η(t)" if beta else "2/η(t)"), "lambda_max"


def sharpness_along_training(final, history, figs, prefix, palette, conditions, block):
    if not _has(history, "lambda_max"):
        return []
    quantities = ["lambda_max"] + (["preconditioned_sharpness"] if _has(history, "preconditioned_sharpness") else [])
    fig, axes = plt.subplots(1, len(quantities) + 1, figsize=(5.5 * (len(quantities) + 1), 4))
    panel = dict(zip(quantities, axes))
    for q, ax in panel.items():
        _per_condition(ax, history, q, palette, conditions, band=False)
    _per_condition(axes[-1], history, "rho", palette, conditions, band=False)
    drawn = set()
    for c in conditions:
        steps = np.sort(history.loc[history.condition == c, "step"].unique())
        if not len(steps):
            continue
        values, name, quantity = edge_of_stability(final, c, steps)
        if quantity not in panel:
            continue
        if (name, tuple(values)) not in drawn:  # the optimizer's own edge at its step size η(t)
            panel[quantity].step(steps, values, where="post", color="gray", ls="--", lw=1)
            panel[quantity].annotate(name, (steps[-1], values[-1]), fontsize=7, ha="right", va="bottom")
            drawn.add((name, tuple(values)))
        rho = ok(final[final.condition == c]).rho.median() if "rho" in final else np.nan
        if quantity == "lambda_max" and np.isfinite(rho) and rho > 0:  # the rule's predicted bound
            panel[quantity].step(steps, values / rho, where="post", color=palette[c], ls=":", lw=1)
    for q, ax in panel.items():
        _symlog(ax, history[q])
    title = "λ_max along training (dashed: 2(1+β)/η(t); dotted: ÷ρ per rule)"
    if (final.optimizer == "adam").any() and len(quantities) == 1:
        title = "λ_max along training (Adam: no edge applies to λ_max)"
    if len(quantities) > 1:
        title = "λ_max along training (Adam has no edge for it)"
        panel["preconditioned_sharpness"].set(xlabel="iteration", ylabel="λ₁(P⁻¹H), Adam's P (median)",
                                              title="Preconditioned sharpness (dashed: 38/η(t))")
    panel["lambda_max"].set(xlabel="iteration", ylabel=f"λ_max of {block} (median)", title=title)
    axes[-1].set(xlabel="iteration", ylabel="ρ = v₁ᵀĴv₁ / λ₁ (median)", title="Rule gain along the top eigenvector")
    _legend(fig, axes[0])
    return [("Sharpness and gain along training", _save(fig, figs, f"{prefix}sharpness_along_training"))]


def against_training_loss(history, figs, prefix, palette, conditions, level, block):
    """λ_max and the gaps of every run against its own training loss (one line per run): the
    comparison at equal training loss, read at any loss, not at one checkpoint."""
    h = ok(history) if "diverged_at" in history else history
    panels = [("lambda_max", f"λ_max of {block}"), ("gap_loss", "gap (test − train loss)"),
              ("perturbed_gap", "perturbed gap")]
    panels = [p for p in panels if _has(h, p[0])]
    if not panels:
        return []
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4), squeeze=False)
    for ax, (col, label) in zip(axes[0], panels):
        for c in conditions:
            for i, (_, run) in enumerate(h[h.condition == c].groupby(["seed", "learning_rate"])):
                run = run.sort_values("step")
                ax.plot(run.train_loss, run[col], color=palette[c], lw=0.8, alpha=0.6, label=c if i == 0 else None)
        if level is not None and np.isfinite(level):
            ax.axvline(level, color="k", ls="--", lw=1)
        ax.set_xscale("log")
        ax.invert_xaxis()  # training moves to the right
        ax.set(xlabel="training-set loss (training moves right →)", ylabel=label)
        if col != "gap_loss":  # λ_max and the perturbed gap span orders of magnitude
            _symlog(ax, h[col])
    axes[0][0].set_title("Against training loss (one line per run; dashed: L*)", fontsize=9)
    _legend(fig, axes[0][0])
    return [("Curvature and gaps against training loss", _save(fig, figs, f"{prefix}against_training_loss"))]


def per_condition(final, figs, prefix, palette, conditions, block):
    runs = ok(final)
    panels = [("train_accuracy", "training accuracy"), ("test_accuracy", "test accuracy"),
              ("gap_loss", "gap (test − train loss)"), ("perturbed_gap", "perturbed gap"),
              ("lambda_max", f"λ_max ({block})"), ("trace", f"trace ({block})")]
    panels = [p for p in panels if _has(runs, p[0])]
    if not panels:
        return []
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 4.2), squeeze=False)
    for ax, (col, title) in zip(axes[0], panels):
        _strip(ax, runs, col, palette, conditions)
        ax.set_title(title, fontsize=9)
        if col in ("lambda_max", "trace"):
            _symlog(ax, runs[col])  # rules differ by orders of magnitude
    return [("Generalization and curvature per condition at the end (bars: medians)",
             _save(fig, figs, f"{prefix}per_condition"))]


def perturbed(final, figs, prefix, palette, conditions):
    noise = sorted((float(m.group(1)), c) for c in final.columns if (m := _NOISE.match(c)))
    shifts = [c for c in perturbed_losses(final) if not _NOISE.match(c)]
    runs = ok(final)
    if (not noise and not shifts) or not len(runs):
        return []
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for c in conditions:
        g = runs[runs.condition == c]
        xs = [0.0] + [s for s, _ in noise]
        axes[0].plot(xs, [g.test_loss.median()] + [g[col].median() for _, col in noise], "o-", color=palette[c], label=c)
        accuracy = [g.get(col.replace("_loss", "_accuracy"), pd.Series(dtype=float)).median() for _, col in noise]
        axes[1].plot(xs, [g.test_accuracy.median()] + accuracy, "o-", color=palette[c])
    axes[0].set(xlabel="input noise σ", ylabel="test loss (median)", yscale="log", title="Loss over noise levels")
    axes[1].set(xlabel="input noise σ", ylabel="test accuracy (median)", title="Accuracy over noise levels")
    _legend(fig, axes[0])
    if shifts:
        for c in conditions:
            g = runs[runs.condition == c]
            axes[2].plot(range(len(shifts) + 1), [g.test_loss.median()] + [g[s].median() for s in shifts], "o",
                         color=palette[c], alpha=0.85)
        axes[2].set_xticks(range(len(shifts) + 1), ["test"] + [s[10:-6] for s in shifts], rotation=20, ha="right")
        axes[2].set(ylabel="loss (median)", yscale="log", title="Task shifts")
    else:
        axes[2].axis("off")
    return [("Perturbed test sets", _save(fig, figs, f"{prefix}perturbed"))]


def curvature_vs_gap(final, figs, prefix, palette, conditions):
    runs = ok(final)
    gaps = [g for g in ("gap_loss", "perturbed_gap") if _has(runs, g)]
    if not gaps or not _has(runs, "lambda_max"):
        return []
    fig, axes = plt.subplots(1, len(gaps), figsize=(5.5 * len(gaps), 4.2), squeeze=False)
    for ax, gap in zip(axes[0], gaps):
        for c in conditions:
            g = runs[runs.condition == c]
            ax.scatter(g.lambda_max, g[gap], color=palette[c], label=c, s=18)
        ax.set(xlabel="λ_max", ylabel="test − train loss" if gap == "gap_loss" else "perturbed-test − train loss")
        _symlog(ax, runs.lambda_max, axis="x")
    _legend(fig, axes[0][0])
    return [("Curvature vs gap (correlations: the findings and the correlation table)",
             _save(fig, figs, f"{prefix}curvature_vs_gap"))]


def alignment(history, figs, prefix, palette, conditions):
    if not _has(history, "alignment_recurrent"):
        return []
    fig, ax = plt.subplots(figsize=(6, 4))
    _per_condition(ax, history, "alignment_recurrent", palette, conditions, band=False, reduce="mean")
    ax.set(xlabel="iteration", ylabel="cos(ĝ, ∇L), recurrent layer", title="Gradient alignment along training",
           ylim=(-0.1, 1.05))
    _legend(fig, ax)
    return [("Gradient alignment", _save(fig, figs, f"{prefix}alignment"))]


def slices(slice_table, figs, prefix, palette, conditions):
    if not len(slice_table):
        return []
    s_ok = slice_table[slice_table.diverged_at < 0]
    images = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1.3, 1]})
    for c in conditions:
        one = s_ok[(s_ok.condition == c) & (s_ok.kind == "1d")].groupby("a").loss.median()
        axes[0].plot(one.index, one.to_numpy(), color=palette[c], label=c)
    axes[0].set(xlabel="step along a filter-normalized direction", ylabel="training loss (median)", yscale="log",
                title="1-D loss slices")
    _legend(fig, axes[0])
    widths = []
    for c in conditions:  # flatness: the smallest |step| where the loss rises by max(L₀, 0.1)
        for _, one in s_ok[(s_ok.condition == c) & (s_ok.kind == "1d")].groupby(["seed"]):
            base = one.loc[one.a.abs().idxmin(), "loss"]
            out = one[one.loss > base + max(base, 0.1)]
            widths.append((c, out.a.abs().min() if len(out) else one.a.abs().max()))
    _strip(axes[1], pd.DataFrame(widths, columns=["condition", "width"]), "width", palette, conditions)
    axes[1].set_title("flatness: smallest |step| where the loss rises by max(L₀, 0.1)", fontsize=9)
    axes[1].set_ylabel("|step|")
    images.append(("Filter-normalized 1-D loss slices", _save(fig, figs, f"{prefix}slices_1d")))

    shown = conditions[:8]
    two = s_ok[s_ok.kind == "2d"]
    if not len(two):
        return images
    log_loss = np.log10(np.maximum(two.loss.to_numpy(float), 1e-12))
    levels = np.linspace(np.nanmin(log_loss), np.nanmax(log_loss), 21)
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.6), squeeze=False, layout="constrained")
    im = None
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
        ax.set(xlabel="direction 1 (filter-normalized)", ylabel="direction 2")
    if im is not None:
        fig.colorbar(im, ax=axes[0].tolist(), label="log10 training loss", shrink=0.8)
    images.append(("Filter-normalized 2-D loss surfaces (log10 loss, first seed, one colour scale)",
                   _save(fig, figs, f"{prefix}slices_2d")))
    return images


def across_grid(final, figs, prefix):
    """Each rule across the grid points (e.g. learning-rate scaling and late boosts)."""
    runs = ok(final)
    points = list(dict.fromkeys(final.point))
    if len(points) < 2 or not len(runs):
        return []
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for rule in dict.fromkeys(final.rule):
        for ax, col in zip(axes, ("test_loss", "gap_loss", "lambda_max")):
            ys = [runs.loc[(runs.rule == rule) & (runs.point == p), col].median() for p in points]
            ax.plot(range(len(points)), ys, "o-", label=rule)
    for ax, col in zip(axes, ("test loss", "gap", "λ_max")):
        ax.set_xticks(range(len(points)), points, rotation=30, ha="right", fontsize=7)
        ax.set(xlabel="grid point", ylabel=f"{col} (median)")
    axes[0].set_yscale("log")
    _symlog(axes[2], runs.lambda_max)
    _legend(fig, axes[0])
    return [("Across the grid (e.g. learning-rate scaling and late boosts)", _save(fig, figs, f"{prefix}grid"))]


def setting_sweep(final, figs, prefix):
    """[sweep]: each metric against each varied setting's level, a line per rule (medians and
    quartiles over runs), the base cell at the setting's base level."""
    runs = ok(final)
    if "varied" not in runs or not (runs.varied != "").any():
        return []
    settings = list(dict.fromkeys(runs.varied[runs.varied != ""]))
    metrics = [(m, label) for m, label in (("lambda_max", "λ_max"), ("rho", "ρ"), ("gap_loss", "gap"),
                                             ("perturbed_gap", "perturbed gap")) if _has(runs, m)]
    fig, axes = plt.subplots(len(metrics), len(settings), figsize=(3.2 * len(settings) + 1, 2.6 * len(metrics)),
                             squeeze=False)
    base = runs[runs.varied == ""]
    for j, setting in enumerate(settings):
        field = setting.partition(".")[2]
        levels = runs.loc[runs.varied == setting, field].astype(float)
        base_level = float(base[field].iloc[0])
        for rule in dict.fromkeys(runs.rule):
            points = [(base_level, base[base.rule == rule])] + [
                (lv, runs[(runs.varied == setting) & (runs.rule == rule) & (levels == lv)])
                for lv in sorted(set(levels))]
            for i, (metric, label) in enumerate(metrics):
                xs = [x for x, g in points if len(g)]
                qs = np.array([np.nanpercentile(g[metric].to_numpy(float), [25, 50, 75]) for _, g in points if len(g)])
                if not len(xs):
                    continue
                ax = axes[i, j]
                ax.errorbar(xs, qs[:, 1], yerr=[qs[:, 1] - qs[:, 0], qs[:, 2] - qs[:, 1]], fmt="o-", capsize=2,
                            label=rule)
                ax.set(xlabel=field if i == len(metrics) - 1 else None, ylabel=label if j == 0 else None)
        axes[0, j].set_title(field, fontsize=9)
    _legend(fig, axes[0, 0])
    return [("One setting at a time: each metric against the setting's level (medians, quartiles)",
             _save(fig, figs, f"{prefix}sweep"))]


def measure_ranking(ranking, figs, prefix):
    """Kendall's τ of every generalization measure with each gap, over all runs and per rule,
    signed so that a measure predicting as its literature expects points right (with the
    bootstrap interval)."""
    scopes = list(dict.fromkeys(ranking.scope)) if len(ranking) else []
    if not scopes:
        return []
    gaps = list(dict.fromkeys(ranking.gap))
    measures = list(dict.fromkeys(ranking.measure))
    fig, axes = plt.subplots(1, len(gaps), figsize=(5.2 * len(gaps), 0.42 * len(measures) * len(scopes) / 2 + 1.5),
                             squeeze=False, sharey=True)
    height = 0.8 / len(scopes)
    for ax, gap in zip(axes[0], gaps):
        for k, scope in enumerate(scopes):
            g = ranking[(ranking.gap == gap) & (ranking.scope == scope)].set_index("measure").reindex(measures)
            sign = g.expected_sign.to_numpy(float)
            tau, lo, hi = (g[c].to_numpy(float) * sign for c in ("tau", "ci_low", "ci_high"))
            y = np.arange(len(measures)) + (k - (len(scopes) - 1) / 2) * height
            ax.barh(y, tau, height, label=scope)
            ax.errorbar(tau, y, xerr=[np.abs(tau - np.minimum(lo, hi)), np.abs(np.maximum(lo, hi) - tau)], fmt="none",
                        ecolor="k", elinewidth=0.8, capsize=1.5)
        ax.axvline(0, color="k", lw=0.8)
        ax.set(title={"gap_loss": "gap (test − train loss)"}.get(gap, gap.replace("_", " ")), xlabel="Kendall τ × expected sign (> 0: predicts as expected)",
               yticks=range(len(measures)), yticklabels=[m.replace("_", " ") for m in measures])
    _legend(fig, axes[0][0])
    return [("Which measure ranks each rule's runs by their gap (Kendall τ, 95% bootstrap intervals)",
             _save(fig, figs, f"{prefix}measure_ranking"))]
