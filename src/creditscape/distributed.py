"""Training the units of an experiment as tasks on a Ray cluster (``creditscape run --ray``).

A unit is one rule in one grid cell: its members train in one compiled program, and units do not
depend on each other, so each is one Ray task. The driver (the ``creditscape run`` process) holds
the results folder's lock, sends each cell's data sets through Ray's object store (workers need
no data files), and writes the file of every finished unit itself: the results folder is the one
a local run writes, and so are the tables.

Faults. A worker that dies (killed, out of memory, its node lost) is retried by Ray, up to
``RayCluster.retries`` times; the retry continues from the unit's checkpoint when the results
folder is on storage the workers share (the same path on every node), and starts the unit over
when it is not. A unit that raises (bad input) is not retried: it fails with its message, the
other units finish and keep their files, and the run ends with :class:`UnitsFailed` naming each
failure; rerunning the command trains only what is missing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import socket
from pathlib import Path

from tqdm.auto import tqdm

from creditscape import stopping
from creditscape._files import save_arrays
from creditscape.devices import HOST_DEVICES_FLAG
from creditscape.errors import ConfigError, UnitsFailed
from creditscape.experiment import run_path, train_unit, unit_label, units_to_train
from creditscape.train import Checkpoint


@dataclasses.dataclass(frozen=True)
class RayCluster:
    """Where the units run and what each asks for.

    Attributes:
        address: an existing cluster (``"auto"``, ``"HOST:6379"``, ``"ray://HOST:10001"``), or
            None to start a local cluster on this machine for the run and stop it afterwards.
        cpus: CPUs per unit. On CPUs a unit splits them into one XLA host device each, and its
            members train spread over those devices (as ``creditscape run`` does with a machine).
        gpus: GPUs per unit (Ray makes only those visible to the unit; JAX uses them all).
        retries: how often Ray restarts a unit whose worker died.
    """

    address: str | None = None
    cpus: float = 1.0
    gpus: float = 0.0
    retries: int = 3

    def __post_init__(self):
        if not (self.cpus > 0 and self.gpus >= 0 and self.retries >= 0):
            raise ConfigError(f"Ray resources per unit must be cpus > 0, gpus >= 0 and retries >= 0 (got cpus="
                              f"{self.cpus}, gpus={self.gpus}, retries={self.retries}).")

    @property
    def where(self) -> str:
        return self.address or "a local cluster"

    def unit_environment(self) -> dict[str, str]:
        """The environment of a unit's worker: the driver's XLA flags, with one host device per
        CPU of the unit instead of the driver's count."""
        flags = re.sub(rf"{HOST_DEVICES_FLAG}=\S+", "", os.environ.get("XLA_FLAGS", "")).split()
        if not self.gpus:
            flags.append(f"{HOST_DEVICES_FLAG}={max(1, int(self.cpus))}")
        return {"XLA_FLAGS": " ".join(flags)}


def import_ray():
    """The ``ray`` module, or a :class:`ConfigError` that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs Ray, an optional extra: pip install 'creditscape[ray]' (in a checkout: "
                          "pip install -e '.[ray]').") from None
    return ray


def _train_unit(exp, cell_index: int, rule_index: int, splits, checkpoint_path: str, checkpoint_seconds: float):
    """The body of a unit's Ray task: train and measure, and return (the unit's arrays, whether it
    continued from a checkpoint, this node's name)."""
    cell, spec = exp.cells[cell_index], exp.rules[rule_index]
    path = Path(checkpoint_path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        checkpoint = Checkpoint(path, checkpoint_seconds)
    except OSError:  # the results folder's path cannot exist on this node: train without checkpoints
        checkpoint = None
    resumed = checkpoint is not None and path.exists()
    result = train_unit(exp, cell, spec, splits, checkpoint)
    if checkpoint is not None:  # on a node that does not share the folder, no stale checkpoint is left behind
        path.unlink(missing_ok=True)
    return result, resumed, socket.gethostname()


def _failure(ray, err: Exception) -> str:
    """What went wrong in a unit, in one line: the unit's own exception when it raised one."""
    cause = getattr(err, "cause", None) if isinstance(err, ray.exceptions.RayTaskError) else None
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"


def train_on_ray(exp, out: Path, cluster: RayCluster, *, checkpoint_seconds: float, progress: bool, log) -> None:
    """Train every unit of ``exp`` whose file is not in ``out/runs`` as a task on ``cluster``,
    writing each file as its unit finishes; raise :class:`UnitsFailed` if any unit failed."""
    ray, units = None, {}
    for cell, splits, todo in units_to_train(exp, out, log):
        if not todo:
            continue
        ray = ray or import_ray()
        data = ray.put(splits)  # one copy of a cell's data in the object store, for all its units
        for ri, _ in todo:
            units[cell.index, ri] = data
    if units:
        _run_units(ray, exp, out, cluster, units, checkpoint_seconds, progress, log)


@contextlib.contextmanager
def connected(cluster: RayCluster):
    """Connect this process to ``cluster`` for the duration (starting a local cluster when it has
    no address, and stopping it afterwards). Enter it before JAX starts: starting Ray's processes
    from a process where JAX runs makes JAX warn about fork."""
    ray = import_ray()
    if ray.is_initialized():
        yield
        return
    if cluster.address is None:
        # Ray starts workers at niceness 15, below every other process: on a busy machine a unit
        # then waits for CPU behind anything else that runs. A local cluster's workers are this
        # run's only computation, so they run at the driver's priority.
        os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(address=cluster.address, num_cpus=None if cluster.address else len(os.sched_getaffinity(0)),
             include_dashboard=False, logging_level="WARNING")
    try:
        yield
    finally:
        ray.shutdown()


def _run_units(ray, exp, out: Path, cluster: RayCluster, todo: dict, checkpoint_seconds, progress, log) -> None:
    """Submit every unit (cell index, rule index) of ``todo`` with its cell's data (an object
    reference) and write each unit's file as it finishes."""
    task = ray.remote(_train_unit).options(
        num_cpus=cluster.cpus, num_gpus=cluster.gpus, max_retries=cluster.retries, retry_exceptions=False,
        runtime_env={"env_vars": cluster.unit_environment()},
    )
    units = {}
    for (ci, ri), data in todo.items():
        cell, spec = exp.cells[ci], exp.rules[ri]
        checkpoint = run_path(out, cell, ri, spec).with_suffix(".ckpt.npz").resolve()
        units[task.remote(exp, cell.index, ri, data, str(checkpoint), checkpoint_seconds)] = (cell, ri, spec)

    resources = ray.cluster_resources()
    at_once = min(int(resources.get("CPU", 0) // cluster.cpus),
                  int(resources.get("GPU", 0) // cluster.gpus) if cluster.gpus else len(units))
    failures, pending = [], list(units)
    with tqdm(total=len(units), desc=f"{exp.name} on Ray", unit="unit", disable=not progress) as bar:
        try:
            while pending:
                bar.set_postfix_str(f"running {min(len(pending), at_once)}, waiting {max(0, len(pending) - at_once)}, "
                                    f"failed {len(failures)}")
                stopping.raise_if_requested()
                ready, pending = ray.wait(pending, num_returns=1, timeout=0.5)
                for ref in ready:
                    cell, ri, spec = units[ref]
                    label, path = unit_label(exp, cell, ri, spec), run_path(out, cell, ri, spec)
                    try:
                        result, resumed, node = ray.get(ref)
                    except ray.exceptions.RayError as err:
                        failures.append(f"{label}: {_failure(ray, err)}")
                        log(f"  {failures[-1]}")
                    else:
                        save_arrays(path, result)
                        path.with_suffix(".ckpt.npz").unlink(missing_ok=True)
                        log(f"  {label}: {'resumed from its checkpoint, ' if resumed else ''}trained in "
                            f"{float(result['train_seconds']):.1f}s, measured in "
                            f"{float(result['measure_seconds']):.1f}s on {node}")
                    bar.update()
        except KeyboardInterrupt:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
    for stale in (out / "runs").glob("*.tmp"):
        stale.unlink()  # a killed worker's half-written checkpoint (no unit is running now)
    if failures:
        raise UnitsFailed(f"{len(failures)} of {len(units)} units failed (the others' results are in {out / 'runs'}; "
                          "fix the cause and rerun the same command to train only what is missing):\n  "
                          + "\n  ".join(failures))
