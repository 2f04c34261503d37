"""Experiments on real Ray clusters (docs/scale.md): a local cluster started for the run, and a
two-node cluster on this machine (``ray.cluster_utils.Cluster``). Ray is in the test extra, so
these tests run wherever the suite does (CI included) and fail, not skip, without it."""

import dataclasses
import signal
import threading
import time
import tomllib

import numpy as np
import pandas as pd
import psutil
import pytest
from ray.cluster_utils import Cluster

from cases import SLOW_EXPERIMENT, x64_off
from creditscape.config import RuleSpec, resolve
from creditscape.distributed import RayCluster
from creditscape.errors import UnitsFailed
from creditscape.experiment import run_experiment
from creditscape.rules import BPTT

# JAX warns about any fork once it runs; Ray starts its processes with fork + exec, which is safe.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")

TINY_GRID = SLOW_EXPERIMENT.replace("steps = 400", "steps = 300")
TIMINGS = {"train_seconds", "measure_seconds", "eval_seconds"}


@pytest.fixture(scope="module")
def local_results(tmp_path_factory):
    """The tiny grid run here, one unit after another: what a Ray run must reproduce."""
    out = tmp_path_factory.mktemp("local")
    with x64_off():
        run_experiment(resolve(tomllib.loads(TINY_GRID)), out, progress=False, log=lambda line: None)
    return out


def _assert_same_run_files(a, b, names):
    for name in names:
        with np.load(a / "runs" / name) as x, np.load(b / "runs" / name) as y:
            assert set(x) == set(y)
            for k in set(x) - TIMINGS:
                np.testing.assert_array_equal(x[k], y[k], err_msg=f"{name}:{k}")


def _ray_processes_seen(until: threading.Event, seen: set, after_checkpoints: list, killed: list):
    """Until the run ends: note every process this one starts (Ray's), and once every unit has
    saved a checkpoint, SIGKILL the workers running units (their title is ``ray::_train_unit``)."""
    me = psutil.Process()
    while not until.is_set():
        children = me.children(recursive=True)
        seen.update(children)
        if not killed and all(p.exists() for p in after_checkpoints):
            for p in children:
                try:
                    if p.cmdline()[:1] == ["ray::_train_unit"]:
                        p.send_signal(signal.SIGKILL)
                        killed.append(p.pid)
                except psutil.Error:
                    pass
        time.sleep(0.05)


def test_a_local_cluster_survives_killed_workers_and_matches_a_local_run(tmp_path, local_results, monkeypatch):
    out = tmp_path / "ray"
    lines = []
    seen, killed, done = set(), [], threading.Event()
    checkpoints = [out / "runs" / f"c00-r0{i}-{r}.ckpt.npz" for i, r in enumerate(("eprop", "bptt"))]
    watcher = threading.Thread(target=_ray_processes_seen, args=(done, seen, checkpoints, killed))
    watcher.start()
    try:
        run_experiment(resolve(tomllib.loads(TINY_GRID)), out, progress=False, checkpoint_seconds=0,
                       ray=RayCluster(), log=lines.append)
    finally:
        done.set()
        watcher.join()
    assert len(killed) == 2, f"killed {killed}; log: {lines}"
    # Ray retried both units; each continued from the checkpoint its killed worker had saved.
    assert sum("resumed from its checkpoint" in line for line in lines) == 2, lines
    final = [pd.read_parquet(d / "final.parquet").drop(columns="train_seconds") for d in (out, local_results)]
    pd.testing.assert_frame_equal(*final, check_exact=True)
    for table in ("history.parquet", "slices.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(out / table), pd.read_parquet(local_results / table),
                                      check_exact=True)
    _assert_same_run_files(out, local_results, ["c00-r00-eprop.npz", "c00-r01-bptt.npz"])
    assert not list((out / "runs").glob("*.ckpt.npz")) and not list(out.rglob("*.tmp"))
    # The cluster started for the run is gone with it: no Ray process is left behind.
    deadline = time.monotonic() + 30
    while any(p.is_running() for p in seen) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert seen and not [p for p in seen if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_a_two_node_cluster_runs_the_grid_and_a_failing_unit_leaves_the_others(tmp_path, local_results,
                                                                                 monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class FailingRule(BPTT):  # (defined here, so that Ray sends the class itself, not its module's name)
        """A rule whose gradient cannot be formed: the stand-in for a unit with bad input."""

        name = "failing"

        def gradient(self, *args, **kwargs):
            raise ValueError("this rule cannot compute a gradient for this model")

    monkeypatch.setenv("RAY_worker_niceness", "0")
    exp = resolve(tomllib.loads(TINY_GRID))
    exp = dataclasses.replace(exp, rules=(*exp.rules, RuleSpec(FailingRule(), "offline", "failing")))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        with pytest.raises(UnitsFailed, match="1 of 3 units failed") as failed:
            run_experiment(exp, tmp_path, progress=False, ray=RayCluster(address=cluster.address),
                           log=lambda line: None)
    finally:
        cluster.shutdown()
    assert "[3/3] failing: ValueError: this rule cannot compute a gradient" in str(failed.value)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["c00-r00-eprop.npz", "c00-r01-bptt.npz"]
    _assert_same_run_files(tmp_path, local_results, ["c00-r00-eprop.npz", "c00-r01-bptt.npz"])
