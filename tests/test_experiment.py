"""Experiments end to end: learning-rate grids in one program, resume after a real kill,
bit-identical reruns, and a forced divergence that the report shows."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from creditscape import model as M
from creditscape.cli import main
from creditscape.config import ConfigError, resolve
from creditscape.rules import get_rule
from creditscape.tasks import get_task, make_splits
from creditscape.train import TrainConfig, train_ensemble

TIMINGS = {"train_seconds", "measure_seconds", "eval_seconds"}

SLOW = """
name = "resumable"
seeds = 2
rules = ["eprop", "bptt"]
[task]
name = "cue_recall"
n_train = 64
n_test = 64
delay = 6
[model]
n_rec = 16
[train]
optimizer = "sgd"
learning_rate = 0.05
steps = 1000
eval_every = 20
batch_size = 16
[measure]
curvature_batch = 32
lanczos_steps = 8
trace_probes = 6
slice_points = 5
"""


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


def test_kill_resume_and_determinism(tmp_path):
    cfg = tmp_path / "slow.toml"
    cfg.write_text(SLOW)
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    command = [sys.executable, "-m", "creditscape.cli", "run", "--config", str(cfg), "--out", str(killed),
               "--quiet", "--checkpoint-seconds", "0"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
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
    assert 0 < done_at_kill < 50  # really mid-run

    (killed / "runs" / "c00-r01-bptt.ckpt.npz.tmp").write_bytes(b"half a file")  # as if killed mid-write
    assert main(["run", "--config", str(cfg), "--out", str(killed), "--quiet"]) == 0
    assert not ckpt.exists() and not list(killed.rglob("*.tmp"))
    assert main(["run", "--config", str(cfg), "--out", str(clean), "--quiet"]) == 0
    # Resumed == uninterrupted, bit for bit: nothing lost or duplicated, and (the two ran in
    # different processes) the same command gives the same results.
    _assert_same_results(killed, clean)
    env = json.loads((clean / "environment.json").read_text())
    assert {"jax", "devices", "platform", "xla_flags"} <= set(env)


def test_forced_divergence_is_recorded_and_reported(tmp_path, monkeypatch):
    cfg = tmp_path / "div.toml"
    cfg.write_text(SLOW.replace("steps = 1000", "steps = 40").replace("[measure]", '[grid]\n"train.learning_rate" = [0.05, 1e20]\n[measure]'))
    out = tmp_path / "out"
    monkeypatch.setenv("XLA_FLAGS", "")  # restored after the test; --deterministic appends to it
    assert main(["run", "--config", str(cfg), "--out", str(out), "--quiet", "--deterministic"]) == 0
    assert "--xla_gpu_deterministic_ops=true" in json.loads((out / "environment.json").read_text())["xla_flags"]
    final = pd.read_parquet(out / "final.parquet")
    assert len(final) == 8 and set(final.learning_rate) == {0.05, 1e20}
    blown = final[(final.rule == "bptt") & (final.learning_rate == 1e20)]
    assert (blown.diverged_at >= 1).all()  # every seed, at the iteration where it happened
    assert (final[final.learning_rate == 0.05].diverged_at == -1).all()
    report = (out / "report.md").read_text()
    for row in blown.itertuples():
        assert f"{row.condition} seed {row.seed} at iteration {row.diverged_at}" in report
    assert "runs diverged (NaN/inf) and are excluded from the statistics" in report
    summary = report.split("### Fit and generalization")[1]
    line = next(ln for ln in summary.splitlines() if ln.startswith(f"| {blown.condition.iloc[0]} |"))
    assert "| 2 | 2 | — |" in line  # two runs, two diverged, no statistic from them


def test_learning_rates_share_one_program_and_match_separate_runs():
    task = get_task("cue_recall", delay=3)
    s = make_splits(task, 64, 64, seed=0)
    cfg = M.ModelConfig(task.n_in, 8, task.n_out)
    tcfg = TrainConfig(optimizer="sgd", momentum=0.9, schedule="boost", learning_rate=0.02, steps=20, eval_every=10)
    together = train_ensemble(cfg, get_rule("eprop"), tcfg, [0, 0, 1], s.train, learning_rates=[0.02, 0.05, 0.05],
                              progress=False)
    for i, (seed, lr) in enumerate([(0, 0.02), (0, 0.05), (1, 0.05)]):
        alone = train_ensemble(cfg, get_rule("eprop"), TrainConfig(**{**tcfg.__dict__, "learning_rate": lr}), [seed],
                               s.train, progress=False)
        np.testing.assert_allclose(together.losses[i], alone.losses[0], rtol=1e-5)
        np.testing.assert_allclose(together.params.w_rec[i], alone.params.w_rec[0], rtol=1e-5, atol=1e-7)


def test_grid_expansion():
    raw = {"rules": ["bptt", "eprop"], "seeds": 3,
           "task": {"name": "perceptual_decision", "n_train": 8, "n_test": 8},
           "model": {"n_rec": 8}, "train": {"batch_size": 8}, "measure": {"curvature_batch": 8},
           "grid": {"task.name": ["perceptual_decision", "delayed_match_sample"], "model.alpha": [0.0, 0.9],
                    "train.learning_rate": [0.01, 0.02]}}
    exp = resolve(raw)
    assert len(exp.cells) == 4 and [c.task.name for c in exp.cells].count("delayed_match_sample") == 2
    assert {c.model.alpha for c in exp.cells} == {0.0, 0.9}
    assert exp.members(exp.cells[0], exp.rules[0]) == [(s, lr) for lr in (0.01, 0.02) for s in (0, 1, 2)]
    # A rule's own [train] settings; its learning rate replaces the grid's only if the grid has none.
    own = resolve({**raw, "rules": ["bptt", {"name": "eprop", "train": {"steps": 1000, "eval_every": 100}}]})
    assert own.rules[1].train_config(own.cells[0].train).steps == 1000 and own.rules[1].label.startswith("eprop steps=1000")
    lr = resolve({**raw, "grid": {}, "rules": [{"name": "eprop", "train": {"learning_rate": 0.5}}]})
    assert lr.members(lr.cells[0], lr.rules[0]) == [(0, 0.5), (1, 0.5), (2, 0.5)]
    for bad, message in [({"model.n_recc": [1]}, "Unknown key 'n_recc'"), ({"optim.lr": [1]}, "expected \"task.<key>\""),
                         ({"train.form": ["online"]}, "forms belong to rules"), ({"model.alpha": []}, "non-empty list"),
                         ({"train.learning_rate": [0.1, -1.0]}, "learning_rate"),
                         ({"task.n_train": [1, 2]}, "cannot vary")]:
        with pytest.raises(ConfigError, match=message):
            resolve({**raw, "grid": bad})
    for rule, message in [({"name": "eprop", "train": {"form": "online"}}, "rule's own `form`"),
                          ({"name": "eprop", "train": {"stepz": 5}}, "Unknown key 'stepz'"),
                          ({"name": "eprop", "train": {"learning_rate": 0.1}}, "both for the rule and in \\[grid\\]")]:
        with pytest.raises(ConfigError, match=message):
            resolve({**raw, "rules": [rule]})


def test_ctrl_c_is_acknowledged_at_once_and_ends_with_status_130(tmp_path):
    # One long compiled chunk (2,000 iterations): Python can act on Ctrl-C only when it returns,
    # but the acknowledgement comes at once, and the process ends with 130, not a crash.
    cfg = tmp_path / "slow.toml"
    cfg.write_text(SLOW.replace("steps = 1000", "steps = 4000").replace("eval_every = 20", "eval_every = 2000"))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "creditscape.cli", "run", "--config", str(cfg), "--out", str(out),
                             "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
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
    assert "interrupt received" in line and acknowledged < 5, (line, acknowledged)
    assert proc.returncode == 130 and "rerun the same command to resume" in rest
