"""The command line end to end, and every configuration error before any work."""

import json

import pandas as pd
import pytest

from creditscape.cli import main
from creditscape.config import ConfigError, load, resolve

TINY = """
name = "tiny"
seeds = 2
rules = ["bptt", {name = "eprop", form = "online"}]
[task]
name = "cue_recall"
n_train = 32
n_test = 32
delay = 3
[model]
n_rec = 8
[train]
steps = 20
eval_every = 10
batch_size = 8
[measure]
curvature_batch = 16
lanczos_steps = 8
"""


def test_tiny_experiment_end_to_end_and_resume(tmp_path, capsys):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY)
    out = tmp_path / "out"
    assert main(["run", "--config", str(cfg), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "bptt" in printed and "report.html" in printed
    for f in ("config.json", "environment.json", "final.parquet", "history.parquet", "report.md", "report.html",
              "figures/per_rule.png", "figures/per_rule.svg", "figures/curvature_vs_gap.png"):
        assert (out / f).is_file(), f
    final = pd.read_parquet(out / "final.parquet")
    assert len(final) == 4 and set(final.rule) == {"bptt", "eprop (online)"}
    assert "http" not in (out / "report.html").read_text().split("<body>")[1]
    assert json.loads((out / "config.json").read_text())["model"]["n_rec"] == 8
    # Rerunning the same command resumes: everything is already done and nothing changes.
    assert main(["run", "--config", str(cfg), "--out", str(out), "--quiet"]) == 0
    assert "already done" in capsys.readouterr().out
    pd.testing.assert_frame_equal(pd.read_parquet(out / "final.parquet"), final)
    # Curvature of the saved networks after the fact: full Krylov space on W_rec (8x8 minus the
    # diagonal = 64 coordinates), so the top eigenvalue is exact and bounds the probe's estimate.
    assert main(["curvature", str(out), "--steps", "64", "--top", "2", "--trace-probes", "12"]) == 0
    curv = pd.read_parquet(out / "curvature.parquet")
    assert len(curv) == 4 and {"eig1", "eig2", "trace", "trace_stderr"} <= set(curv.columns)
    merged = curv.merge(final, on=["rule", "seed"])
    assert (merged.eig1 >= merged.lambda_max - 1e-4 * merged.eig1.abs()).all()
    assert (merged.eig1 >= merged.eig2).all()
    # A different configuration in the same folder is refused.
    cfg.write_text(TINY.replace("n_rec = 8", "n_rec = 9"))
    with pytest.raises(ValueError, match="different configuration"):
        main(["run", "--config", str(cfg), "--out", str(out), "--quiet"])


@pytest.mark.parametrize(
    "edit,message",
    [
        (("n_rec = 8", "n_recc = 8"), "Unknown key 'n_recc' in \\[model\\]. Did you mean 'n_rec'"),
        (("steps = 20", "steps = \"many\""), "\\[train\\].steps: expected"),
        (("name = \"cue_recall\"", "name = \"cue_recal\""), "Unknown task 'cue_recal'"),
        (("\"bptt\",", "\"bptx\","), "Unknown rule 'bptx'"),
        (("form = \"online\"", "form = \"sideways\""), "no 'sideways' form"),
        (("seeds = 2", "seeds = -1"), "seeds: expected"),
        (("[model]", "colour = 1\n[model]"), "Unknown key 'colour' in \\[task\\]"),
        (("steps = 20", "steps = 25"), "multiple of train.eval_every"),
        (("n_rec = 8", "n_rec = 8\nalpha = 1.5"), "alpha"),
        (("n_rec = 8", ""), "missing required key\\(s\\) \\['n_rec'\\]"),
    ],
)
def test_config_errors(tmp_path, edit, message):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(TINY.replace(*edit))
    with pytest.raises(ConfigError, match=message):
        load(cfg)


def test_missing_mnist_fails_before_work(tmp_path, isolated_home, capsys):
    cfg = tmp_path / "m.toml"
    cfg.write_text('rules = ["bptt"]\n[task]\nname = "smnist"\n[model]\nn_rec = 8\n')
    code = main(["run", "--config", str(cfg), "--mnist-dir", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "MNIST files not found" in err and "--mnist-dir" in err
    assert not (tmp_path / "o").exists()


def test_unknown_preset_and_mnist_dir_misuse(tmp_path):
    with pytest.raises(ConfigError, match="Unknown preset 'fast'"):
        load(preset="fast")
    with pytest.raises(ConfigError, match="reads no MNIST"):
        resolve({"task": {"name": "cue_recall"}}, mnist_dir=str(tmp_path))


def test_quick_preset_resolves():
    exp = load()
    assert exp.name == "quick" and len(exp.rules) >= 5 and exp.task.name == "cue_recall"


def test_listing_commands(capsys):
    assert main(["rules"]) == 0
    out = capsys.readouterr().out
    for name in ("bptt", "rtrl", "tbptt", "eprop", "eprop_random", "rflo", "mdgl"):
        assert f"\n{name} " in "\n" + out
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert "cue_recall" in out and "delayed_match_sample" in out and "smnist" in out
