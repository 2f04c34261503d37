"""The report of a results folder: figures (PNG + SVG), a Markdown summary and a self-contained
HTML page (figures embedded, no network needed to view it).

It states the findings in words with their statistics, whichever way they come out: per-rule
final metrics (mean ± sd over non-diverged seeds, with the count of diverged runs), and the
rank and linear correlation of λ_max with the generalization gap across runs.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import stats  # noqa: E402


def _colors(rules):
    cmap = plt.get_cmap("tab10")
    return {r: cmap(i % 10) for i, r in enumerate(rules)}


def _save(fig, folder: Path, name: str) -> str:
    fig.tight_layout()
    for ext in ("png", "svg"):
        fig.savefig(folder / f"{name}.{ext}", dpi=120)
    plt.close(fig)
    return f"figures/{name}.png"


def _strip(ax, final, column, colors, rules):
    for i, rule in enumerate(rules):
        v = final.loc[final.rule == rule, column].to_numpy()
        jitter = np.linspace(-0.15, 0.15, len(v)) if len(v) > 1 else np.zeros(1)
        ax.scatter(i + jitter, v, color=colors[rule], s=18, alpha=0.8)
        if len(v):
            ax.hlines(np.nanmean(v), i - 0.25, i + 0.25, color="k", lw=1.5)
    ax.set_xticks(range(len(rules)), rules, rotation=30, ha="right")


def correlation(x: np.ndarray, y: np.ndarray, *, n_boot: int = 2000, seed: int = 0) -> dict:
    """Pearson and Spearman correlation with p-values and a 95% bootstrap interval (over runs)."""
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


def summary_table(final: pd.DataFrame) -> pd.DataFrame:
    """Per rule: mean ± sd over non-diverged seeds of the key metrics, and the diverged count."""
    columns = [c for c in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "gap_loss",
                           "lambda_max", "rho", "alignment_recurrent") if c in final]
    rows = []
    for rule, g in final.groupby("rule", sort=False):
        ok = g[g.diverged_at < 0]
        row = {"rule": rule, "seeds": len(g), "diverged": int((g.diverged_at >= 0).sum())}
        for c in columns:
            v = ok[c].to_numpy(float)
            row[c] = f"{np.nanmean(v):.4g} ± {np.nanstd(v):.2g}" if len(v) else "—"
        rows.append(row)
    return pd.DataFrame(rows)


def _md_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def _findings(final: pd.DataFrame, corr: dict, reference: str | None) -> list[str]:
    ok = final[final.diverged_at < 0]
    means = ok.groupby("rule", sort=False)[["test_loss", "gap_loss", "lambda_max", "train_loss"]].mean()
    out = []
    if reference in means.index and len(means) > 1:
        ref = means.loc[reference]
        for rule, m in means.drop(index=reference).iterrows():
            a = ok.loc[ok.rule == rule, "gap_loss"].to_numpy()
            b = ok.loc[ok.rule == reference, "gap_loss"].to_numpy()
            p = stats.mannwhitneyu(a, b).pvalue if len(a) > 1 and len(b) > 1 else float("nan")
            out.append(
                f"**{rule}** vs {reference}: generalization gap {m.gap_loss:.4g} vs {ref.gap_loss:.4g} "
                f"(Mann–Whitney p = {p:.3g}); λ_max {m.lambda_max:.4g} vs {ref.lambda_max:.4g}; "
                f"final training loss {m.train_loss:.4g} vs {ref.train_loss:.4g}"
                + (" — it fits the training set worse, so its gap is not a like-for-like comparison."
                   if m.train_loss > 1.5 * ref.train_loss + 1e-3 else ".")
            )
    if "spearman" in corr:
        lo, hi = corr["spearman_ci"]
        verdict = "significant" if corr["spearman_p"] < 0.05 else "not significant"
        out.append(
            f"Across {corr['n']} runs, λ_max and the loss gap correlate with Spearman ρ = {corr['spearman']:.3f} "
            f"(p = {corr['spearman_p']:.3g}, 95% bootstrap CI [{lo:.3f}, {hi:.3f}]) and Pearson r = "
            f"{corr['pearson']:.3f} (p = {corr['pearson_p']:.3g}): {verdict} at the 5% level."
        )
    for col in [c for c in ok.columns if c.startswith("perturbed[") and c.endswith("_loss")]:
        per_rule = ok.groupby("rule", sort=False)[col].mean()
        out.append(
            f"Perturbed test set {col[10:-6]}: lowest mean loss {per_rule.min():.4g} ({per_rule.idxmin()}), "
            f"highest {per_rule.max():.4g} ({per_rule.idxmax()})."
        )
    n_div = int((final.diverged_at >= 0).sum())
    out.append(f"{n_div} of {len(final)} runs diverged (NaN/inf) and are excluded from the statistics above."
               if n_div else "No run diverged.")
    return out


def write_report(folder: str | Path) -> Path:
    """Write figures, ``report.md`` and ``report.html`` into a results folder; return the HTML path."""
    folder = Path(folder)
    final = pd.read_parquet(folder / "final.parquet")
    history = pd.read_parquet(folder / "history.parquet")
    config = json.loads((folder / "config.json").read_text())
    figs = folder / "figures"
    figs.mkdir(exist_ok=True)
    rules = list(dict.fromkeys(final.rule))
    colors = _colors(rules)
    train = config["train"]
    reference = next((r for r in rules if r == "bptt"), None)
    images = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for rule in rules:
        h = history[history.rule == rule].pivot(index="step", columns="seed", values="train_loss")
        ax.plot(h.index, h.median(axis=1), color=colors[rule], label=rule)
        ax.fill_between(h.index, h.min(axis=1), h.max(axis=1), color=colors[rule], alpha=0.15)
    ax.set(xlabel="iteration", ylabel="training-set loss", yscale="log", title="Training loss (median, min–max over seeds)")
    ax.legend(fontsize=8)
    images.append(("Training loss", _save(fig, figs, "training_loss")))

    if "lambda_max" in history:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for rule in rules:
            h = history[history.rule == rule]
            lam = h.pivot(index="step", columns="seed", values="lambda_max").median(axis=1)
            rho = h.pivot(index="step", columns="seed", values="rho").median(axis=1)
            axes[0].plot(lam.index, lam, color=colors[rule], label=rule)
            axes[1].plot(rho.index, rho, color=colors[rule], label=rule)
            if train["optimizer"] == "sgd" and rho.iloc[-1] > 0:
                axes[0].axhline(2 / (train["learning_rate"] * rho.iloc[-1]), color=colors[rule], ls=":", lw=1)
        if train["optimizer"] == "sgd":
            axes[0].axhline(2 / train["learning_rate"], color="gray", ls="--", label="2/η (dotted: 2/(ηρ) per rule)")
        axes[0].set(xlabel="iteration", ylabel="λ_max (median over seeds)", yscale="symlog", title="Sharpness along training")
        axes[1].set(xlabel="iteration", ylabel="ρ = v₁ᵀĴv₁ / λ₁ (median)", title="Rule gain along the top eigenvector")
        axes[0].legend(fontsize=7)
        images.append(("Sharpness and gain along training", _save(fig, figs, "sharpness_along_training")))

    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    for ax, (col, title) in zip(axes, [("test_accuracy", "test accuracy"), ("gap_loss", "gap (test − train loss)"),
                                       ("lambda_max", f"λ_max ({config['measure']['curvature_block']})")]):
        _strip(ax, final[final.diverged_at < 0], col, colors, rules)
        ax.set_title(title)
    axes[2].set_yscale("symlog", linthresh=1e-2)  # rules differ by orders of magnitude
    if train["optimizer"] == "sgd":
        axes[2].axhline(2 / train["learning_rate"], color="gray", ls="--", label="2/η")
        axes[2].legend(fontsize=8)
    images.append(("Generalization and curvature per rule", _save(fig, figs, "per_rule")))

    pert = [c for c in final.columns if c.startswith("perturbed[") and c.endswith("_loss")]
    if pert:
        fig, ax = plt.subplots(figsize=(7, 4))
        for i, rule in enumerate(rules):
            ok = final[(final.rule == rule) & (final.diverged_at < 0)]
            vals = [ok[c].mean() for c in ["test_loss"] + pert]
            ax.plot(range(len(vals)), vals, "o-", color=colors[rule], label=rule)
        ax.set_xticks(range(len(pert) + 1), ["test"] + [c[10:-6] for c in pert], rotation=20, ha="right")
        ax.set(ylabel="loss (mean over seeds)", title="Perturbed test sets", yscale="log")
        ax.legend(fontsize=8)
        images.append(("Perturbed test loss", _save(fig, figs, "perturbed")))

    ok = final[final.diverged_at < 0]
    corr = correlation(ok.lambda_max.to_numpy(float), ok.gap_loss.to_numpy(float))
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for rule in rules:
        g = ok[ok.rule == rule]
        ax.scatter(g.lambda_max, g.gap_loss, color=colors[rule], label=rule, s=20)
    title = "λ_max vs generalization gap"
    if "spearman" in corr:
        title += f"\nSpearman ρ={corr['spearman']:.2f} (p={corr['spearman_p']:.2g}), n={corr['n']}"
    ax.set(xlabel="λ_max", ylabel="test − train loss", title=title)
    ax.set_xscale("symlog", linthresh=1e-2)
    ax.legend(fontsize=8)
    images.append(("Curvature vs gap", _save(fig, figs, "curvature_vs_gap")))

    fig, ax = plt.subplots(figsize=(6, 4))
    for rule in rules:
        h = history[history.rule == rule].pivot(index="step", columns="seed", values="alignment_recurrent")
        ax.plot(h.index, h.mean(axis=1), color=colors[rule], label=rule)
    ax.set(xlabel="iteration", ylabel="cos(ĝ, ∇L), recurrent layer", title="Gradient alignment along training", ylim=(-0.1, 1.05))
    ax.legend(fontsize=8)
    images.append(("Gradient alignment", _save(fig, figs, "alignment")))

    table = summary_table(final)
    findings = _findings(final, corr, reference)
    md = [f"# creditscape report: {config['name']}", "",
          f"Task `{config['task']['name']}` (n_train = {config['task']['n_train']}, n_test = {config['task']['n_test']}); "
          f"{len(rules)} rules × {len(config['seeds'])} seeds; {train['optimizer']} η = {train['learning_rate']}, "
          f"{train['steps']} iterations, batch {train['batch_size']}, L2 {train['l2']}; "
          f"model {config['model']['form']} form, N = {config['model']['n_rec']}, α = {config['model']['alpha']}, "
          f"{config['model']['activation']}.", "",
          "## Findings", ""] + [f"- {f}" for f in findings] + [
          "", "## Final metrics (mean ± sd over non-diverged seeds)", "", _md_table(table), "",
          "λ_max: top Hessian eigenvalue of the exact training loss"
          + (" (L2 included)" if config["measure"]["l2_in_curvature"] else "")
          + f" w.r.t. `{config['measure']['curvature_block']}`, Lanczos with {config['measure']['lanczos_steps']} steps "
          f"on the first {config['measure']['curvature_batch']} training sequences. Gap: test − train loss on fixed sets. "
          "ρ = v₁ᵀĴv₁/λ₁: the rule's gain along the top Hessian eigenvector v₁ (Ĵ = ∂ĝ/∂θ on the same block); "
          "under SGD with step η the rule can be stable up to λ_max ≈ 2/(ηρ) instead of 2/η.",
          "", "## Figures", ""] + [f"![{t}]({p})" for t, p in images]
    (folder / "report.md").write_text("\n".join(md) + "\n")

    def embed(p):
        return "data:image/png;base64," + base64.b64encode((folder / p).read_bytes()).decode()

    body = [f"<h1>creditscape report: {html.escape(config['name'])}</h1>", "<h2>Findings</h2><ul>"]
    body += [f"<li>{html.escape(f).replace('**', '')}</li>" for f in findings] + ["</ul>"]
    body += ["<h2>Final metrics (mean ± sd over non-diverged seeds)</h2>", table.to_html(index=False, border=0)]
    body += [f"<h3>{html.escape(t)}</h3><img src='{embed(p)}' style='max-width:100%'>" for t, p in images]
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>creditscape report</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}td,th{padding:2px 8px}</style>"
            "</head><body>" + "\n".join(body) + "</body></html>")
    (folder / "report.html").write_text(page)
    return folder / "report.html"
