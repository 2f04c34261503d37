"""Experiments end to end: learning-rate grids in one program, the grid's expansion, and a
forced divergence that the report shows (faults of real processes: tests/test_faults.py)."""

import json

import numpy as np
import pandas as pd
import pytest

from cases import shortened_preset
from creditscape import model as M
from creditscape.cli import main
from creditscape.config import ConfigError, resolve
from creditscape.rules import get_rule
from creditscape.tasks import get_task, make_splits
from creditscape.train import TrainConfig, train_ensemble


def test_forced_divergence_is_recorded_and_reported(tmp_path, monkeypatch):
    """The `measures` preset, shortened (tests/cases.py), with a learning rate that diverges."""
    cfg = tmp_path / "div.toml"
    cfg.write_text(shortened_preset("measures", rules='["bptt", "eprop"]').replace(
        '"model.n_rec" = [16]', '"model.n_rec" = [8]\n"train.learning_rate" = [0.003, 1e20]'))
    out = tmp_path / "out"
    monkeypatch.setenv("XLA_FLAGS", "")  # restored after the test; --deterministic appends to it
    assert main(["run", "--config", str(cfg), "--out", str(out), "--quiet", "--deterministic"]) == 0
    assert "--xla_gpu_deterministic_ops=true" in json.loads((out / "environment.json").read_text())["xla_flags"]
    final = pd.read_parquet(out / "final.parquet")
    assert len(final) == 8 and set(final.learning_rate) == {0.003, 1e20}
    blown = final[(final.rule == "bptt") & (final.learning_rate == 1e20)]
    assert (blown.diverged_at >= 1).all()  # every seed, at the iteration where it happened
    assert (final[final.learning_rate == 0.003].diverged_at == -1).all()
    trained = final[final.learning_rate == 0.003]  # the generalization measures the preset asks for
    assert (trained[["pac_bayes_sigma", "pac_bayes_sigma_magnitude", "relative_flatness", "normalized_sharpness",
                     "fisher_rao_norm", "spectral_norm_product", "distance_from_init"]] > 0).all().all()
    assert trained.log_path_norm.notna().all()
    report = (out / "report.md").read_text()
    for row in blown.itertuples():
        assert f"{row.condition} seed {row.seed} at iteration {row.diverged_at}" in report
    assert "runs diverged (NaN/inf) and are excluded from the statistics" in report
    assert "### Which measure ranks runs by their gap" in report and "PAC-Bayes σ (magnitude-aware)" in report
    assert (out / "figures" / "measure_ranking.png").is_file()
    assert "Best predictor of the perturbed gap (all runs, n = 4)" in report
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
