"""Running an experiment: data, one compiled ensemble per (cell, rule), measurements, results folder.

Results folder layout::

    config.json          the resolved experiment (every default explicit)
    config.input.json    the config as given
    environment.json     versions, devices, platform, XLA flags, start time
    runs/cNN-rNN-<rule>.npz        one file per (grid cell, rule), all members (seeds × learning
                         rates): histories, final parameters and measurements, parameter trajectory
    runs/cNN-rNN-<rule>.ckpt.npz   progress of the run in flight (deleted when it is done)
    final.parquet        one row per member: final metrics
    history.parquet      one row per (member, evaluation step)
    report.md, report.html, figures/   written by :mod:`creditscape.report`

Every file is written atomically. An interrupted experiment rerun with the same command skips the
runs already done and continues the one in flight from its last checkpoint, with results
bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from creditscape import prng
from creditscape import __version__
from creditscape._files import atomic_write_bytes, exclusive, load_arrays, save_arrays
from creditscape.config import Cell, Experiment, MeasureConfig, RuleSpec, resolve, resolved_dict
from creditscape.curvature import block_loss, hutch_plus_plus, hvp, lanczos
from creditscape.devices import MemberSharding
from creditscape.errors import ConfigError, ResultsFolderError
from creditscape.generalization_measures import MEASURES as GENERALIZATION_MEASURES
from creditscape.generalization_measures import network_measures
from creditscape.theory import arnoldi, estimate_on_block, jacobian_vector_product, ritz_values
from creditscape.model import ModelConfig, Params, Structure
from creditscape.objective import Batch
from creditscape.sharpness import filter_normalized_direction, loss_slice, random_sharpness
from creditscape.tasks import make_splits
from creditscape.train import (EVAL_DRAWS, Checkpoint, CurvatureProbe, TrainConfig, full_precision, initial_network,
                               learning_rate_multiplier, to_device, train_ensemble)

if TYPE_CHECKING:
    from creditscape.distributed import RayCluster


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
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "compilation_cache": jax.config.jax_compilation_cache_dir,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _slug(cell: Cell, i: int, spec: RuleSpec) -> str:
    return f"c{cell.index:02d}-r{i:02d}-" + re.sub(r"[^A-Za-z0-9=.]+", "_", spec.label).strip("_")


def _splits(exp: Experiment, cell: Cell):
    return make_splits(cell.task, cell.n_train, cell.n_test, exp.data_seed, cell.noise_levels)


def data_fingerprint(splits) -> str:
    """SHA-256 of every array of a cell's data sets (shapes, types and values): what a results
    folder compares when a run resumes, so that the same data read from another path (another
    machine's MNIST folder) resume and other data do not."""
    digest = hashlib.sha256()
    for a in jax.tree.leaves(splits):
        a = np.ascontiguousarray(a)
        digest.update(f"{a.shape}{a.dtype}".encode())
        digest.update(a.data)
    return digest.hexdigest()


def _check_data(out: Path, cell: Cell, splits) -> None:
    """Record the fingerprint of ``cell``'s data in ``out/data.json``, or refuse data that differ
    from those its runs were computed on."""
    path = out / "data.json"
    seen = json.loads(path.read_text()) if path.exists() else {}
    key, fingerprint = f"cell {cell.index}", data_fingerprint(splits)
    if seen.get(key, fingerprint) != fingerprint and any((out / "runs").glob(f"c{cell.index:02d}-*.npz")):
        raise ResultsFolderError(
            f"The data of {key} ({cell.task.name}) differ from those the runs in {out} were computed on "
            f"(data fingerprint {fingerprint[:12]}… against {seen[key][:12]}… in {path}): other MNIST files, or "
            "another version of a task's generator. Point --mnist-dir at the files used before, use another "
            "--out folder, or delete this one to start over."
        )
    atomic_write_bytes(path, lambda f: f.write(json.dumps({**seen, key: fingerprint}, indent=2).encode()))


def _curvature_batch(exp: Experiment, splits) -> Batch:
    return to_device(Batch(*(a[: exp.measure.curvature_batch] for a in splits.train)))


def make_final_measurements(exp: Experiment, cell: Cell, batch: Batch):
    """Compiled, for all members of a run of ``cell`` at once: (params, structs, seeds) → per
    member, on the curvature batch, the Hutch++ trace (± standard error) of the Hessian block,
    λ_max of all parameters (Lanczos, with its residual), random-perturbation sharpness, and
    filter-normalized 1-D and 2-D loss slices. Built once per cell, it compiles once for all the
    cell's rules."""
    m = exp.measure
    l2 = cell.train.l2 if m.l2_in_curvature else 0.0
    c1 = jnp.linspace(-m.slice_radius, m.slice_radius, m.slice_points, dtype=batch.x.dtype)
    n2 = (m.slice_points + 1) // 2
    c2 = jnp.linspace(-m.slice_radius, m.slice_radius, n2, dtype=batch.x.dtype)
    grid2 = jnp.stack(jnp.meshgrid(c2, c2, indexing="ij"), -1).reshape(-1, 2)

    @jax.jit
    @jax.vmap
    def measure(params, struct, seed):
        k_trace, k_sharp, k_d1, k_d2 = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), 7), 4)
        f, x0 = block_loss(cell.model, params, struct, batch, m.curvature_block, l2)
        tr = hutch_plus_plus(lambda v: hvp(f, x0, v), x0.shape[0], m.trace_probes, k_trace, x0.dtype)
        f_all, x_all = block_loss(cell.model, params, struct, batch, "all", l2)
        top = lanczos(lambda v: hvp(f_all, x_all, v), prng.normal(k_trace, x_all.shape, x_all.dtype),
                      min(m.lanczos_steps, x_all.shape[0]))
        v1 = top.vectors[0] / jnp.linalg.norm(top.vectors[0])
        sharp = random_sharpness(cell.model, params, struct, batch, m.sharpness_scale, key=k_sharp)
        d1 = filter_normalized_direction(params, struct, k_d1)
        d2 = filter_normalized_direction(params, struct, k_d2)
        s1 = loss_slice(cell.model, params, struct, batch, (d1,), c1[:, None])
        s2 = loss_slice(cell.model, params, struct, batch, (d1, d2), grid2).reshape(n2, n2)
        out = {"trace": tr.value, "trace_stderr": tr.stderr, "sharpness_random": sharp.value,
               "lambda_max_all": top.values[0],
               "lambda_max_all_residual": jnp.linalg.norm(hvp(f_all, x_all, v1) - top.values[0] * v1),
               "slice1d": s1, "slice2d": s2}
        if m.generalization_measures:
            out.update(network_measures(cell.model, params, struct, batch, initial_network(cell.model, seed, x0.dtype)[0],
                                        jax.random.fold_in(k_sharp, 1), bound=m.pac_bayes_bound,
                                        draws=m.pac_bayes_draws, probes=m.trace_probes))
        return out

    def final_measurements(params: Params, structs: Structure, seeds) -> dict:
        out = jax.device_get(measure(params, structs, jnp.asarray(seeds)))
        return {**{f"final/{k}": v for k, v in out.items()}, "slice1d_coords": np.asarray(c1),
                "slice2d_coords": np.asarray(c2)}

    return final_measurements


TOP_MU = 3  # leading eigenvalues μ of ηĴ recorded per network


def update_map_eigenvalues(exp: Experiment, cell: Cell, spec: RuleSpec, batch: Batch, result, seeds, lrs) -> dict:
    """The leading eigenvalues μ of η(T)Ĵ of every final network (Arnoldi on the rule's update-map
    Jacobian, curvature block and batch; η(T) the member's learning rate at the end of its
    schedule), by decreasing modulus, and whether every one satisfies the stability condition of
    plain SGD, |1 − μ| < 1 (NaN under momentum or Adam, whose update maps are not I − ηĴ)."""
    m = exp.measure
    l2 = cell.train.l2 if m.l2_in_curvature else 0.0
    tcfg = spec.train_config(cell.train)

    @jax.jit
    @jax.vmap
    def hessenberg(params, struct, rule_state, seed):
        # A stochastic rule's Ĵ: of its update averaged over EVAL_DRAWS fixed draws (theory.py).
        draws = dict(key=jax.random.fold_in(jax.random.PRNGKey(seed), 12), draws=EVAL_DRAWS) if spec.rule.stochastic else {}
        g, x0 = estimate_on_block(spec.rule, cell.model, params, struct, rule_state, batch, m.curvature_block, l2,
                                  form=spec.form, **draws)
        start = prng.normal(jax.random.fold_in(jax.random.PRNGKey(seed), 11), x0.shape, x0.dtype)
        return arnoldi(lambda v: jacobian_vector_product(g, x0, v), start, min(m.arnoldi_steps, x0.shape[0]))

    hess = np.asarray(hessenberg(result.params, result.structs, result.rule_states, jnp.asarray(seeds)))
    eta_end = np.asarray(lrs, float) * float(learning_rate_multiplier(tcfg)(tcfg.steps - 1))
    mu = np.full((len(seeds), TOP_MU), np.nan, complex)
    for i, h in enumerate(hess):
        ritz = ritz_values(h)[:TOP_MU] if np.isfinite(h).all() else np.zeros(0)
        mu[i, :len(ritz)] = eta_end[i] * ritz
    plain_sgd = tcfg.optimizer == "sgd" and not tcfg.momentum
    stable = np.where(np.isnan(mu).all(1) | (not plain_sgd), np.nan,
                      np.all((np.abs(1 - mu) < 1) | np.isnan(mu), axis=1).astype(float))
    return {"final/mu_re": mu.real, "final/mu_im": mu.imag, "final/update_map_stable": stable,
            "final/eta_end": eta_end}


@full_precision
def train_unit(exp: Experiment, cell: Cell, spec: RuleSpec, splits, checkpoint: Checkpoint | None, *,
               progress: bool = False, devices: int | None = None, final_measurements=None) -> dict:
    """Train and measure one unit of an experiment, the members of one rule in one grid cell, and
    return what its ``runs/`` file holds. ``checkpoint``: save progress there and continue from it
    if it exists. ``final_measurements``: the cell's program of :func:`make_final_measurements`
    (built here when not given; a cell's rules can share one)."""
    batch = _curvature_batch(exp, splits)
    if final_measurements is None:
        final_measurements = make_final_measurements(exp, cell, batch)
    start = time.perf_counter()
    tcfg = spec.train_config(cell.train)
    m = exp.measure
    probe = CurvatureProbe(batch=batch, block=m.curvature_block, l2=cell.train.l2 if m.l2_in_curvature else 0.0,
                           steps=m.lanczos_steps, tol=m.lanczos_tol or None)
    seeds, lrs = zip(*exp.members(cell, spec))
    eval_sets = {"train": splits.train, "test": splits.test,
                 **{f"perturbed[{k}]": v for k, v in splits.perturbed.items()}}
    result = train_ensemble(
        cell.model, spec.rule, tcfg, seeds, splits.train, eval_sets, learning_rates=lrs, probe=probe,
        keep_trajectory=m.save_trajectory, checkpoint=checkpoint,
        progress=spec.label if progress else False, history_sequences=m.history_sequences, devices=devices,
    )
    measure_start = time.perf_counter()
    # Often longer than the training bar's last evaluations: a bar of its own, one step per program.
    with tqdm(total=2, desc=f"{spec.label}: final measurements", disable=not progress, leave=False,
              unit="program") as bar:
        bar.set_postfix_str("Hessian trace, λ_max of all parameters, sharpness, slices")
        final = final_measurements(result.params, result.structs, seeds)
        bar.update()
        bar.set_postfix_str("eigenvalues of ηĴ")
        final.update(update_map_eigenvalues(exp, cell, spec, batch, result, seeds, lrs))
        bar.update()
    # (evaluations restored from a checkpoint took their time in an earlier process, not in this one)
    measure_time = float(result.eval_seconds[result.restored_evaluations:].sum()) + time.perf_counter() - measure_start
    out = {
        "seeds": np.asarray(seeds), "learning_rates": np.asarray(lrs),
        "diverged_at": result.diverged_at, "reached_at": result.reached_at, "losses": result.losses,
        "eval_steps": result.eval_steps, "eval_seconds": result.eval_seconds,
        "train_seconds": np.float64(time.perf_counter() - start - measure_time),
        "measure_seconds": np.float64(measure_time),
        **final,
    }
    out.update({f"eval/{k}": v for k, v in result.evals.items()})
    for prefix, tree in (("params", result.params), ("struct", result.structs), ("traj", result.trajectory)):
        for name, leaf in zip(tree._fields, tree) if tree is not None else ():
            if leaf is not None:
                out[f"{prefix}/{name}"] = np.asarray(leaf)
    return out


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


CONDITION_SEPARATOR = " · "  # between a rule's label and its grid coordinates in a condition's name


def _cell_columns(exp: Experiment, cell: Cell) -> dict:
    """Table columns naming a cell: the task, and each grid coordinate by its field name."""
    cols = {"cell": cell.index, "task": cell.task.name}
    cols.update({k.partition(".")[2]: v for k, v in cell.values if k != "task.name"})
    return cols


def _point(exp: Experiment, values, lr: float) -> str:
    """The name of a grid point: its coordinates other than the task (and its η when η varies)."""
    parts = [f"{k.partition('.')[2]}={v}" for k, v in values if k != "task.name"]
    if "train.learning_rate" in exp.raw.get("grid", {}):
        parts.append(f"η={lr:g}")
    return ", ".join(parts)


def _condition(exp: Experiment, cell: Cell, spec: RuleSpec, lr: float) -> str:
    """What a row is compared by within a task: the rule and the grid coordinates other than the task."""
    point = _point(exp, cell.values, lr)
    return spec.label + (CONDITION_SEPARATOR + point if point else "")


def _sweep_columns(exp: Experiment, cell: Cell, lr: float) -> dict:
    """With a [sweep]: the setting a cell varies (``varied``, "" for a base cell), the point of
    its base cell (``base_point``), which the report compares it with, and the cell's value of
    every swept setting (the base's where it varies another)."""
    swept = exp.raw.get("sweep", {})
    if not swept:
        return {}
    varied = next((k for k, _ in cell.values if k in swept), "")
    sections = {"task": cell.task, "model": cell.model, "train": cell.train}
    levels = {k.partition(".")[2]: getattr(sections[k.partition(".")[0]], k.partition(".")[2]) for k in swept}
    return {"varied": varied, "base_point": _point(exp, [(k, v) for k, v in cell.values if k != varied], lr), **levels}


def _member_columns(exp: Experiment, cell: Cell, spec: RuleSpec, seed: int, lr: float) -> dict:
    """The columns that name one trained network in every table: its cell and grid coordinates,
    its condition, rule, seed and η, the grid ``point`` its condition is compared at (the
    condition without its rule), and the ``computation`` it runs (equal for rules that compute
    the same estimate, :meth:`Rule.computation`)."""
    condition = _condition(exp, cell, spec, lr)
    return {**_cell_columns(exp, cell), "condition": condition, "rule": spec.label,
            "point": condition.partition(CONDITION_SEPARATOR)[2], **_sweep_columns(exp, cell, lr),
            "computation": repr(spec.rule.computation(cell.model)), "seed": seed, "learning_rate": lr}


def _training_columns(cell: Cell, spec: RuleSpec) -> dict:
    """How a condition was trained (its own optimizer and schedule: the report's stability edge)."""
    t = spec.train_config(cell.train)
    return {"optimizer": t.optimizer, "momentum": t.momentum, "schedule": t.schedule, "boost_at": t.boost_at,
            "boost_factor": t.boost_factor, "steps": t.steps}


def _tables(exp: Experiment, runs: dict[tuple[int, int], dict]):
    final_rows, history_rows = [], []
    for (ci, ri), r in runs.items():
        cell, spec = exp.cells[ci], exp.rules[ri]
        for mi, (seed, lr) in enumerate(zip(r["seeds"].tolist(), r["learning_rates"].tolist())):
            key = {**_member_columns(exp, cell, spec, seed, lr), "rule_name": spec.rule.name, "form": spec.form}
            row = {**key, **_training_columns(cell, spec), "diverged_at": int(r["diverged_at"][mi]),
                   "reached_at": int(r["reached_at"][mi]),
                   "train_seconds": float(r["train_seconds"]) / len(r["seeds"])}
            row.update({k[5:]: float(r[k][mi, -1]) for k in r if k.startswith("eval/")})
            row.update({k[6:]: float(r[k][mi]) for k in ("final/trace", "final/trace_stderr", "final/sharpness_random",
                                                         "final/lambda_max_all", "final/lambda_max_all_residual",
                                                         "final/update_map_stable", "final/eta_end",
                                                         *(f"final/{name}" for name in GENERALIZATION_MEASURES))
                        if k in r})
            for j in range(TOP_MU):
                row[f"mu{j + 1}_re"], row[f"mu{j + 1}_im"] = float(r["final/mu_re"][mi, j]), float(r["final/mu_im"][mi, j])
            row["gap_loss"] = row["test_loss"] - row["train_loss"]
            row["gap_accuracy"] = row["train_accuracy"] - row["test_accuracy"]
            final_rows.append(row)
            for j, step in enumerate(r["eval_steps"]):
                h = {**key, "step": int(step), "diverged_at": int(r["diverged_at"][mi])}
                h.update({k[5:]: float(r[k][mi, j]) for k in r if k.startswith("eval/")})
                history_rows.append(h)
    return pd.DataFrame(final_rows), pd.DataFrame(history_rows)


def _slices(exp: Experiment, runs: dict[tuple[int, int], dict]) -> pd.DataFrame:
    rows = []
    for (ci, ri), r in runs.items():
        cell, spec = exp.cells[ci], exp.rules[ri]
        for mi, (seed, lr) in enumerate(zip(r["seeds"].tolist(), r["learning_rates"].tolist())):
            key = {"task": cell.task.name, "condition": _condition(exp, cell, spec, lr), "seed": seed,
                   "diverged_at": int(r["diverged_at"][mi])}
            for c, loss in zip(r["slice1d_coords"], r["final/slice1d"][mi]):
                rows.append({**key, "kind": "1d", "a": float(c), "b": 0.0, "loss": float(loss)})
            c2 = r["slice2d_coords"]
            for i, j in np.ndindex(len(c2), len(c2)):
                rows.append({**key, "kind": "2d", "a": float(c2[i]), "b": float(c2[j]),
                             "loss": float(r["final/slice2d"][mi, i, j])})
    return pd.DataFrame(rows)


def run_experiment(exp: Experiment, out: str | Path, *, progress: bool = True, checkpoint_seconds: float = 30.0,
                   devices: int | None = None, ray: RayCluster | None = None, log=print) -> pd.DataFrame:
    """Run (or resume) ``exp`` into folder ``out`` and return the table of final metrics.

    ``checkpoint_seconds``: the run in flight saves its progress at most this often (and at every
    evaluation when 0); results do not depend on it. ``devices``: train each run's members spread
    over at most this many local devices (default: all, but no more than the members); results
    agree with one device's to rounding. ``ray``: train the units (cell, rule) as tasks on a Ray
    cluster instead of one after another here (:mod:`creditscape.distributed`); the results
    folder is the same.
    """
    most = None  # (on Ray, each unit has the devices it asks for)
    if ray is None:
        try:
            most = MemberSharding(devices).count
        except ValueError as err:
            raise ConfigError(str(err)) from None
    out = Path(out)
    try:
        (out / "runs").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ResultsFolderError(f"Cannot create the results folder {out} ({err.strerror}). "
                                 "Give a writable folder with --out.") from None
    with exclusive(out), _cluster_connection(ray):
        return _run_experiment(exp, out, progress, checkpoint_seconds, devices, most, ray, log)


def _cluster_connection(cluster: RayCluster | None):
    if cluster is None:
        return contextlib.nullcontext()
    from creditscape.distributed import connected

    return connected(cluster)


def _differences(old, new, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two resolved configs (where the MNIST files
    were read from is not a difference: the same data at another path resumes; nor is a setting
    that the folder's creditscape version did not have yet, at the default that does what its
    absence did)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new))
                if k != "mnist_dir" and not (k not in old and _added_at_its_default(f"{prefix}{k}", new[k]))
                for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in _differences(a, b, f"{prefix}{i}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


_SECTIONS = {"train": TrainConfig, "model": ModelConfig, "measure": MeasureConfig}


def _added_at_its_default(key: str, value) -> bool:
    """Whether ``value`` of the dotted ``key`` (``cells.0.train.update_noise``) is its field's default."""
    section, _, name = key.rpartition(".")
    cls = _SECTIONS.get(section.rpartition(".")[2])
    defaults = {f.name: f.default for f in dataclasses.fields(cls)} if cls else {}
    return name in defaults and defaults[name] == value


def run_path(out: Path, cell: Cell, ri: int, spec: RuleSpec) -> Path:
    """The file of a finished unit (rule ``ri`` of ``cell``); its checkpoint is ``.ckpt.npz``."""
    return out / "runs" / f"{_slug(cell, ri, spec)}.npz"


def unit_label(exp: Experiment, cell: Cell, ri: int, spec: RuleSpec) -> str:
    """How the progress lines name a unit: its place in the experiment, rule and grid coordinates."""
    place = cell.index * len(exp.rules) + ri + 1
    return f"[{place}/{len(exp.cells) * len(exp.rules)}] {spec.label}" + "".join(f" {k}={v}" for k, v in cell.values)


def cell_data(exp: Experiment, out: Path, cell: Cell):
    """The data sets of ``cell``, checked against those its finished runs were computed on."""
    splits = _splits(exp, cell)
    _check_data(out, cell, splits)
    return splits


def units_to_train(exp: Experiment, out: Path, log):
    """For each cell: (cell, its data sets checked against the folder's, the (rule index, rule)
    units whose file is not in ``out/runs`` yet); the units already done are logged as skipped."""
    for cell in exp.cells:
        splits = cell_data(exp, out, cell)
        todo = []
        for ri, spec in enumerate(exp.rules):
            path = run_path(out, cell, ri, spec)
            if path.exists():
                log(f"  {unit_label(exp, cell, ri, spec)}: already done ({path.name}), skipped")
            else:
                todo.append((ri, spec))
        yield cell, splits, todo


def _train_here(exp: Experiment, out: Path, progress: bool, checkpoint_seconds: float, devices: int | None,
                log) -> None:
    """Train every unit not yet done, one after another in this process."""
    # The overall ETA: seconds per training iteration of the runs done in this process, times the
    # iterations of the runs still to do (rules with more iterations take longer; under a target
    # loss, their budgets: an upper bound).
    left = {(c.index, ri): spec.train_config(c.train).steps for c in exp.cells for ri, spec in enumerate(exp.rules)
            if not run_path(out, c, ri, spec).exists()}
    spent, done_iterations = 0.0, 0
    for cell, splits, todo in units_to_train(exp, out, log):
        final_measurements = make_final_measurements(exp, cell, _curvature_batch(exp, splits)) if todo else None
        for ri, spec in todo:
            path, label = run_path(out, cell, ri, spec), unit_label(exp, cell, ri, spec)
            checkpoint = Checkpoint(path.with_suffix(".ckpt.npz"), checkpoint_seconds)
            resumed = checkpoint.path.exists()
            start = time.perf_counter()
            r = train_unit(exp, cell, spec, splits, checkpoint, progress=progress, devices=devices,
                           final_measurements=final_measurements)
            save_arrays(path, r)
            checkpoint.path.unlink(missing_ok=True)
            spent += time.perf_counter() - start
            budget = left.pop((cell.index, ri))
            # (a run whose members all stopped at a target loss trained only up to the last stop)
            done_iterations += int(r["reached_at"].max()) if (r["reached_at"] > 0).all() else budget
            eta = f"; about {_duration(spent / done_iterations * sum(left.values()))} left" if left else ""
            log(f"  {label}: {'resumed from its checkpoint, ' if resumed else ''}trained in "
                f"{float(r['train_seconds']):.1f}s, measured in {float(r['measure_seconds']):.1f}s{eta}")


def _run_experiment(exp: Experiment, out: Path, progress: bool, checkpoint_seconds: float, devices: int | None,
                    most_devices: int | None, cluster, log) -> pd.DataFrame:
    for stale in [*out.glob("*.tmp"), *(out / "runs").glob("*.tmp")]:
        stale.unlink()  # half-written temporaries of an interrupted write (the real files are intact)
    config_path = out / "config.json"
    resolved = resolved_dict(exp)
    holds_results = any((out / "runs").glob("*.npz"))  # finished runs or checkpoints
    if config_path.exists() and holds_results:  # (a folder without any is free to take a new config)
        old, new = json.loads(config_path.read_text()), json.loads(json.dumps(resolved))
        if len(new["rules"]) > len(old["rules"]) and new["rules"][:len(old["rules"])] == old["rules"]:
            # Rules appended: a run's file is named by its rule's place, so the runs there stay valid.
            log(f"[creditscape] {len(new['rules']) - len(old['rules'])} rule(s) added to {out}; "
                "the runs already there are kept.")
            old = {**old, "rules": new["rules"]}
        changed = _differences(old, new)
        if changed:
            raise ResultsFolderError(
                f"{out} holds results of a different configuration (see {config_path}); changed: "
                + "; ".join(changed[:8]) + (f"; and {len(changed) - 8} more" if len(changed) > 8 else "")
                + ". Use another --out folder, or delete this one to start over."
            )
    atomic_write_bytes(config_path, lambda f: f.write(json.dumps(resolved, indent=2).encode()))
    atomic_write_bytes(out / "config.input.json", lambda f: f.write(json.dumps(exp.raw, indent=2).encode()))
    atomic_write_bytes(out / "environment.json",
                       lambda f: f.write(json.dumps({**environment(), "member_devices": most_devices,
                                                     "ray": dataclasses.asdict(cluster) if cluster else None},
                                                    indent=2).encode()))

    members = len(exp.members(exp.cells[0], exp.rules[0]))
    log(f"[creditscape] {exp.name}: {len(exp.cells)} cell(s) x {len(exp.rules)} rules x {members} members "
        f"(seeds x learning rates) -> {out}" + (f" on Ray ({cluster.where})" if cluster else ""))
    if cluster is None:
        _train_here(exp, out, progress, checkpoint_seconds, devices, log)
    else:
        from creditscape.distributed import train_on_ray

        train_on_ray(exp, out, cluster, checkpoint_seconds=checkpoint_seconds, progress=progress, log=log)
    runs = {(cell.index, ri): load_arrays(run_path(out, cell, ri, spec))
            for cell in exp.cells for ri, spec in enumerate(exp.rules)}
    final, history = _tables(exp, runs)
    atomic_write_bytes(out / "final.parquet", lambda f: final.to_parquet(f, index=False))
    atomic_write_bytes(out / "history.parquet", lambda f: history.to_parquet(f, index=False))
    slices = _slices(exp, runs)
    atomic_write_bytes(out / "slices.parquet", lambda f: slices.to_parquet(f, index=False))
    return final


def _stacked(run: dict, prefix: str, cls):
    return cls(*(jnp.asarray(run[f"{prefix}/{f}"]) if f"{prefix}/{f}" in run else None for f in cls._fields))


def _sequence_chunks(exp: Experiment, splits, sequences: int | None) -> Batch:
    """The first ``sequences`` training sequences (default: the curvature batch; 0: the whole
    training set) as (chunks, chunk size, ...) arrays, chunks of ``measure.curvature_batch``
    sequences. The loss weighs every sequence equally (1/B), so the Hessian of the set is the mean
    of its chunks' Hessians; a set larger than one chunk is cut to a whole number of chunks."""
    n_train, chunk = splits.train.x.shape[0], exp.measure.curvature_batch
    n = n_train if sequences == 0 else min(sequences or chunk, n_train)
    if n > chunk:
        n -= n % chunk
    else:
        chunk = n
    return to_device(Batch(*(a[:n].reshape(n // chunk, chunk, *a.shape[1:]) for a in splits.train)))


@full_precision
def measure_saved(run_dir: str | Path, *, block: str = "w_rec", steps: int = 30, top: int = 3,
                  trace_probes: int = 30, along_training: bool = False, sequences: int | None = None,
                  mnist_dir: str | None = None) -> pd.DataFrame:
    """Curvature of saved networks, after the fact: top-``top`` signed Hessian eigenvalues
    (Lanczos, ``steps`` HVPs) and the Hutch++ trace with its standard error (``trace_probes``
    HVPs), on the block of the experiment's config, all members of a run in one compiled call.
    The Hessian is taken on the first ``sequences`` training sequences (default: the experiment's
    curvature batch; 0: the whole training set, cut to a whole number of curvature batches), to
    measure what the choice of that subset does. The final networks, or with ``along_training``
    the parameters saved at every evaluation (``measure.save_trajectory``). Each row records the
    number of sequences, the Lanczos steps and the L2 coefficient used and the residual
    ‖Hv₁ − λ₁v₁‖ of the top pair. Writes ``curvature.parquet`` (``curvature_along_training.parquet``
    with ``along_training``) and returns it."""
    run_dir = Path(run_dir)
    raw_path = run_dir / "config.input.json"
    if not raw_path.is_file():
        raise FileNotFoundError(f"{raw_path} not found: is {run_dir} a creditscape results folder?")
    exp = resolve(json.loads(raw_path.read_text()), mnist_dir=mnist_dir)
    rows = []
    for cell in exp.cells:
        chunks = _sequence_chunks(exp, _splits(exp, cell), sequences)
        n_sequences = chunks.x.shape[0] * chunks.x.shape[1]
        l2 = cell.train.l2 if exp.measure.l2_in_curvature else 0.0

        @jax.jit
        @jax.vmap
        def measure(params, struct, key):
            x0 = block_loss(cell.model, params, struct, jax.tree.map(lambda a: a[0], chunks), block, l2)[1]

            def matvec(v):  # the mean of the chunks' HVPs, one chunk in memory at a time
                def one(chunk):
                    return hvp(block_loss(cell.model, params, struct, chunk, block, l2)[0], x0, v)

                return jnp.mean(jax.lax.map(one, chunks), axis=0)

            k1, k2 = jax.random.split(key)
            n = min(steps, x0.shape[0])
            eig = lanczos(matvec, prng.normal(k1, x0.shape, x0.dtype), n, min(top, n))
            v1 = eig.vectors[0] / jnp.linalg.norm(eig.vectors[0])
            residual = jnp.linalg.norm(matvec(v1) - eig.values[0] * v1)
            tr = hutch_plus_plus(matvec, x0.shape[0], trace_probes, k2, x0.dtype)
            return eig.values, residual, tr.value, tr.stderr

        for ri, spec in enumerate(exp.rules):
            path = run_dir / "runs" / f"{_slug(cell, ri, spec)}.npz"
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: rerun `creditscape run` on {run_dir} to finish it first.")
            run = load_arrays(path)
            struct = _stacked(run, "struct", Structure)
            keys = jax.random.split(jax.random.PRNGKey(exp.data_seed), len(run["seeds"]))
            if along_training:
                if "traj/w_rec" not in run:
                    raise FileNotFoundError(f"{path} holds no parameter trajectory (measure.save_trajectory = false).")
                trajectory = _stacked(run, "traj", Params)
                # One compiled call per evaluation step, for all members: memory of one ensemble.
                networks = [(int(step), jax.tree.map(lambda a, j=j: a[:, j], trajectory))
                            for j, step in enumerate(run["eval_steps"])]
            else:
                networks = [(int(run["eval_steps"][-1]), _stacked(run, "params", Params))]
            for step, params in tqdm(networks, desc=spec.label, leave=False, disable=len(networks) == 1):
                vals, residual, trace, err = (np.asarray(a) for a in measure(params, struct, keys))
                for mi, seed in enumerate(run["seeds"].tolist()):
                    lr = float(run["learning_rates"][mi])
                    row = {**_member_columns(exp, cell, spec, seed, lr), "step": step, "block": block,
                           "sequences": n_sequences, "lanczos_steps": steps, "l2": l2, "eig1_residual": float(residual[mi]),
                           "trace": float(trace[mi]), "trace_stderr": float(err[mi]),
                           "diverged_at": int(run["diverged_at"][mi])}
                    row.update({f"eig{j + 1}": float(v) for j, v in enumerate(vals[mi])})
                    rows.append(row)
    table = pd.DataFrame(rows)
    atomic_write_bytes(run_dir / curvature_table_name(along_training), lambda f: table.to_parquet(f, index=False))
    return table


def curvature_table_name(along_training: bool) -> str:
    """Where :func:`measure_saved` writes: the final networks and the trajectory have their own tables."""
    return "curvature_along_training.parquet" if along_training else "curvature.parquet"
