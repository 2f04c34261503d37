"""Running an experiment: data, one compiled ensemble per rule, final measurements, results folder.

Results folder layout::

    config.json        the resolved experiment (every default explicit)
    environment.json   versions, device, platform, start time
    runs/NN-<rule>.npz one file per rule (all seeds): histories, final parameters, λ_max;
                       written atomically, so an interrupted experiment rerun with the same
                       command skips the rules already done and loses nothing finished
    final.parquet      one row per (rule, seed): final metrics
    history.parquet    one row per (rule, seed, evaluation step)
    report.md, report.html, figures/   written by :mod:`creditscape.report`
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import time
from datetime import datetime, timezone
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from creditscape import __version__
from creditscape.config import Experiment, RuleSpec, resolved_dict
from creditscape.curvature import block_loss, hutch_plus_plus, hvp, lanczos
from creditscape.model import Params, Structure
from creditscape.objective import Batch
from creditscape.tasks import make_splits
from creditscape.train import CurvatureProbe, to_device, train_ensemble


def environment() -> dict:
    import optax
    import scipy

    return {
        "creditscape": __version__,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
        "optax": optax.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "pandas": pd.__version__,
        "devices": [str(d) for d in jax.devices()],
        "platform": platform.platform(),
        "x64": bool(jax.config.jax_enable_x64),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _slug(i: int, spec: RuleSpec) -> str:
    return f"{i:02d}-" + re.sub(r"[^A-Za-z0-9=.]+", "_", spec.label).strip("_")


def atomic_write_bytes(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _run_rule(exp: Experiment, spec: RuleSpec, splits, eval_sets, progress) -> dict:
    start = time.perf_counter()
    tcfg = dataclasses.replace(exp.train, form=spec.form)
    m = exp.measure
    probe = CurvatureProbe(
        batch=to_device(Batch(*(a[: m.curvature_batch] for a in splits.train))),
        block=m.curvature_block, l2=exp.train.l2 if m.l2_in_curvature else 0.0, steps=m.lanczos_steps,
    )
    result = train_ensemble(exp.model, spec.rule, tcfg, exp.seeds, splits.train, eval_sets, probe=probe,
                            progress=f"{spec.label}" if progress else False)
    total = time.perf_counter() - start
    measure_time = float(result.eval_seconds.sum())
    out = {
        "diverged_at": result.diverged_at,
        "losses": result.losses,
        "eval_steps": result.eval_steps,
        "eval_seconds": result.eval_seconds,
        "train_seconds": np.float64(total - measure_time),
        "measure_seconds": np.float64(measure_time),
    }
    out.update({f"eval/{k}": v for k, v in result.evals.items()})
    for name, leaf in zip(result.params._fields, result.params):
        if leaf is not None:
            out[f"params/{name}"] = np.asarray(leaf)
    for name, leaf in zip(result.structs._fields, result.structs):
        out[f"struct/{name}"] = np.asarray(leaf)
    return out


def _tables(exp: Experiment, runs: dict[str, dict]):
    final_rows, history_rows = [], []
    for spec, (slug, r) in zip(exp.rules, runs.items()):
        for si, seed in enumerate(exp.seeds):
            row = {"rule": spec.label, "rule_name": spec.rule.name, "form": spec.form, "seed": seed,
                   "diverged_at": int(r["diverged_at"][si]),
                   "train_seconds": float(r["train_seconds"]) / len(exp.seeds)}
            for k in r:
                if k.startswith("eval/"):
                    row[k[5:]] = float(r[k][si, -1])
            row["gap_loss"] = row["test_loss"] - row["train_loss"]
            row["gap_accuracy"] = row["train_accuracy"] - row["test_accuracy"]
            final_rows.append(row)
            for j, step in enumerate(r["eval_steps"]):
                h = {"rule": spec.label, "seed": seed, "step": int(step)}
                h.update({k[5:]: float(r[k][si, j]) for k in r if k.startswith("eval/")})
                history_rows.append(h)
    return pd.DataFrame(final_rows), pd.DataFrame(history_rows)


def run_experiment(exp: Experiment, out: str | Path, *, progress: bool = True, log=print) -> pd.DataFrame:
    """Run (or resume) ``exp`` into folder ``out`` and return the table of final metrics."""
    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    config_path = out / "config.json"
    resolved = resolved_dict(exp)
    if config_path.exists():
        previous = json.loads(config_path.read_text())
        if previous != json.loads(json.dumps(resolved)):
            raise ValueError(
                f"{out} holds results of a different configuration (see {config_path}). "
                "Use another --out folder, or delete this one to start over."
            )
    atomic_write_bytes(config_path, lambda f: f.write(json.dumps(resolved, indent=2).encode()))
    atomic_write_bytes(out / "config.input.json", lambda f: f.write(json.dumps(exp.raw, indent=2).encode()))
    atomic_write_bytes(out / "environment.json", lambda f: f.write(json.dumps(environment(), indent=2).encode()))

    log(f"[creditscape] {exp.name}: task {exp.task.name}, {len(exp.rules)} rules x {len(exp.seeds)} seeds -> {out}")
    splits = make_splits(exp.task, exp.n_train, exp.n_test, exp.data_seed, exp.noise_levels)
    eval_sets = {"train": splits.train, "test": splits.test, **{f"perturbed[{k}]": v for k, v in splits.perturbed.items()}}
    runs = {}
    for i, spec in enumerate(exp.rules):
        slug = _slug(i, spec)
        path = out / "runs" / f"{slug}.npz"
        if path.exists():
            log(f"  {spec.label}: already done ({path.name}), skipped")
        else:
            r = _run_rule(exp, spec, splits, eval_sets, progress)
            atomic_write_bytes(path, lambda f: np.savez(f, **r))
            log(f"  {spec.label}: trained in {float(r['train_seconds']):.1f}s, measured in {float(r['measure_seconds']):.1f}s")
        with np.load(path) as f:
            runs[slug] = dict(f)
    final, history = _tables(exp, runs)
    atomic_write_bytes(out / "final.parquet", lambda f: final.to_parquet(f, index=False))
    atomic_write_bytes(out / "history.parquet", lambda f: history.to_parquet(f, index=False))
    return final


def _saved_network(run: dict):
    """Stacked (Params, Structure) of a rule's saved final networks."""
    params = Params(*(jnp.asarray(run[f"params/{f}"]) if f"params/{f}" in run else None for f in Params._fields))
    struct = Structure(*(jnp.asarray(run[f"struct/{f}"]) for f in Structure._fields))
    return params, struct


def measure_saved(run_dir: str | Path, *, block: str = "w_rec", steps: int = 30, top: int = 3,
                  trace_probes: int = 30, mnist_dir: str | None = None) -> pd.DataFrame:
    """Curvature of the saved final networks of a results folder, after the fact: top-``top``
    signed Hessian eigenvalues (Lanczos, ``steps`` HVPs) and the Hutch++ trace with its standard
    error (``trace_probes`` HVPs), on the block and evaluation batch of the experiment's config,
    every seed of a rule in one compiled call. Writes ``curvature.parquet`` and returns it."""
    from creditscape.config import resolve

    run_dir = Path(run_dir)
    raw_path = run_dir / "config.input.json"
    if not raw_path.is_file():
        raise FileNotFoundError(f"{raw_path} not found: is {run_dir} a creditscape results folder?")
    exp = resolve(json.loads(raw_path.read_text()), mnist_dir=mnist_dir)
    splits = make_splits(exp.task, exp.n_train, exp.n_test, exp.data_seed, exp.noise_levels)
    batch = to_device(Batch(*(a[: exp.measure.curvature_batch] for a in splits.train)))
    l2 = exp.train.l2 if exp.measure.l2_in_curvature else 0.0

    @jax.jit
    @jax.vmap
    def measure(params, struct, key):
        f, x0 = block_loss(exp.model, params, struct, batch, block, l2)
        k1, k2 = jax.random.split(key)
        n = min(steps, x0.shape[0])
        eig = lanczos(lambda v: hvp(f, x0, v), jax.random.normal(k1, x0.shape, x0.dtype), n, min(top, n))
        tr = hutch_plus_plus(lambda v: hvp(f, x0, v), x0.shape[0], trace_probes, k2, x0.dtype)
        return eig.values, tr.value, tr.stderr

    rows = []
    for i, spec in enumerate(exp.rules):
        path = run_dir / "runs" / f"{_slug(i, spec)}.npz"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: rerun `creditscape run` on {run_dir} to finish it first.")
        with np.load(path) as f:
            run = dict(f)
        params, struct = _saved_network(run)
        keys = jax.random.split(jax.random.PRNGKey(exp.data_seed), len(exp.seeds))
        vals, trace, err = (np.asarray(a) for a in measure(params, struct, keys))
        for si, seed in enumerate(exp.seeds):
            row = {"rule": spec.label, "seed": seed, "block": block, "trace": float(trace[si]),
                   "trace_stderr": float(err[si]), "diverged_at": int(run["diverged_at"][si])}
            row.update({f"eig{j + 1}": float(v) for j, v in enumerate(vals[si])})
            rows.append(row)
    table = pd.DataFrame(rows)
    atomic_write_bytes(run_dir / "curvature.parquet", lambda f: table.to_parquet(f, index=False))
    return table
