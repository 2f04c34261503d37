"""Faults met by real processes, as a user meets them: a run killed (SIGKILL) or interrupted
(Ctrl-C), two runs on one results folder, damaged results files. Each test starts
``python -m creditscape.cli run`` in its own process. docs/experiments.md lists the guarantees
("What survives which fault") that these tests hold the code to."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cases import SLOW_EXPERIMENT, x64_off
from creditscape.cli import main

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
TIMINGS = {"train_seconds", "measure_seconds", "eval_seconds"}


def _run_command(cfg: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "creditscape.cli", "run", "--config", str(cfg), "--out", str(out), "--quiet", *extra]


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.exists(), proc.communicate()[1] if proc.poll() is not None else f"{path} did not appear"


def _assert_same_results(a: Path, b: Path):
    fa, fb = (pd.read_parquet(d / "final.parquet").drop(columns="train_seconds") for d in (a, b))
    pd.testing.assert_frame_equal(fa, fb, check_exact=True)
    pd.testing.assert_frame_equal(pd.read_parquet(a / "history.parquet"), pd.read_parquet(b / "history.parquet"),
                                  check_exact=True)
    runs = sorted(p.name for p in (a / "runs").iterdir())
    assert runs == sorted(p.name for p in (b / "runs").iterdir())
    for name in runs:
        with np.load(a / "runs" / name) as x, np.load(b / "runs" / name) as y:
            assert set(x) == set(y)
            for k in set(x) - TIMINGS:
                np.testing.assert_array_equal(x[k], y[k], err_msg=f"{name}:{k}")


def test_killed_run_resumes_bit_identically_and_damaged_files_are_named(tmp_path):
    cfg = tmp_path / "slow.toml"
    cfg.write_text(SLOW_EXPERIMENT)
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    command = [sys.executable, "-m", "creditscape.cli", "run", "--config", str(cfg), "--out", str(killed),
               "--quiet", "--checkpoint-seconds", "0"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    # Kill it with SIGKILL (no cleanup at all) once the second rule is part-way through.
    ckpt = killed / "runs" / "c00-r01-bptt.ckpt.npz"
    deadline = time.monotonic() + 240
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ckpt.exists(), proc.stderr.read().decode() if proc.poll() is not None else "timed out"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not (killed / "final.parquet").exists() and (killed / "runs" / "c00-r00-eprop.npz").exists()
    with np.load(ckpt) as f:
        done_at_kill = f["seconds"].shape[0] - 1
    assert 0 < done_at_kill < 20  # really mid-run

    (killed / "runs" / "c00-r01-bptt.ckpt.npz.123.tmp").write_bytes(b"half a file")  # as if killed mid-write
    with x64_off():
        assert main(["run", "--config", str(cfg), "--out", str(killed), "--quiet"]) == 0
        assert not ckpt.exists() and not list(killed.rglob("*.tmp"))
        assert main(["run", "--config", str(cfg), "--out", str(clean), "--quiet"]) == 0
    # Resumed == uninterrupted, bit for bit: nothing lost or duplicated, and (the two ran in
    # different processes) the same command gives the same results.
    _assert_same_results(killed, clean)
    # The resumed run's time is what its second process spent (not less than nothing).
    assert (pd.read_parquet(killed / "final.parquet").train_seconds > 0).all()
    env = json.loads((clean / "environment.json").read_text())
    assert {"jax", "devices", "platform", "xla_flags"} <= set(env)
    assert env["compilation_cache"] == os.environ["JAX_COMPILATION_CACHE_DIR"]  # compiled programs kept (conftest's)
    # A damaged finished run stops the rerun before any work, naming the file and what to do.
    # (Deleting it and rerunning recomputes it bit for bit: test_tiny_experiment_end_to_end_and_resume.)
    damaged = killed / "runs" / "c00-r00-eprop.npz"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    rerun = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=240)
    assert rerun.returncode == 2 and str(damaged) in rerun.stderr and "delete it and rerun" in rerun.stderr, rerun
    assert "Traceback" not in rerun.stderr


def test_a_second_run_on_a_held_folder_stops_at_once_and_a_dead_holder_does_not_block(tmp_path):
    cfg = tmp_path / "long.toml"
    cfg.write_text(SLOW_EXPERIMENT.replace("steps = 400", "steps = 40000"))
    out = tmp_path / "out"
    command = _run_command(cfg, out, "--checkpoint-seconds", "0")
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    ckpt = out / "runs" / "c00-r00-eprop.ckpt.npz"
    _wait_for(ckpt, first)
    second = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=120)
    assert second.returncode == 2, second
    assert f"{out} is in use by creditscape run (pid {first.pid})" in second.stderr and "Traceback" not in second.stderr
    assert first.poll() is None  # the holder goes on, untouched
    first.kill()  # SIGKILL: no cleanup; the OS releases the lock with the process
    first.communicate()
    with np.load(ckpt) as f:
        evaluations_at_kill = f["seconds"].shape[0]
    third = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 240
    while third.poll() is None and time.monotonic() < deadline:  # until it checkpoints progress of its own
        try:
            with np.load(ckpt) as f:
                if f["seconds"].shape[0] > evaluations_at_kill:
                    break
        except (OSError, ValueError):  # replaced while being read
            pass
        time.sleep(0.1)
    assert third.poll() is None, third.communicate()[1]
    third.send_signal(signal.SIGINT)
    err = third.communicate(timeout=120)[1]
    assert third.returncode == 130, err
    assert json.loads((out / "config.json").read_text())["name"] == "resumable"


def test_ctrl_c_is_acknowledged_at_once_and_acted_on_within_seconds(tmp_path):
    # One long chunk (20,000 iterations between evaluations): training runs it in pieces of about a
    # second, so Ctrl-C stops the run soon, with status 130, not at the chunk's end or in a crash.
    # Started as a user starts it, without the tests' device count: one host device per core.
    cfg = tmp_path / "slow.toml"
    cfg.write_text(SLOW_EXPERIMENT.replace("steps = 400", "steps = 40000").replace("eval_every = 20", "eval_every = 20000"))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "creditscape.cli", "run", "--config", str(cfg), "--out", str(out),
                             "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**ENV, "XLA_FLAGS": re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                                                            ENV["XLA_FLAGS"])})
    deadline = time.monotonic() + 240
    while not (out / "config.json").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(3)
    assert proc.poll() is None, proc.stderr.read()
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    seen = []  # the acknowledgement and Python's own message may come in either order
    while "interrupt received" not in (line := proc.stderr.readline()) and line:
        seen.append(line)
    acknowledged = time.monotonic() - sent
    rest = "".join(seen) + proc.communicate(timeout=300)[1]
    ended = time.monotonic() - sent
    assert "interrupt received" in line and acknowledged < 5, (line, acknowledged)
    assert proc.returncode == 130 and "rerun the same command to resume" in rest, (proc.returncode, rest)
    assert ended < 20, ended  # about a second of training, then the interpreter's exit
    cores = len(os.sched_getaffinity(0))
    assert json.loads((out / "environment.json").read_text())["member_devices"] == cores
