"""The command line end to end, and every configuration error before any work."""

import json
import sys
import tomllib

import numpy as np
import pandas as pd
import pytest
from cases import shortened_preset
from conftest import MNIST_DIR, REQUIRE_MNIST

from creditscape._files import exclusive, load_arrays
from creditscape.cli import main
from creditscape.config import ConfigError, load, resolve
from creditscape.rules import check_network

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
    # A folder left by a run that stopped before any result (e.g. refused as too large) takes a
    # corrected configuration.
    (out / "runs").mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"seeds": [0, 1, 2], "note": "another configuration"}))
    assert main(["run", "--config", str(cfg), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "bptt" in printed and "report.html" in printed and "s left" in printed  # an overall ETA after the first run
    for f in ("config.json", "environment.json", "final.parquet", "history.parquet", "slices.parquet", "report.md",
              "report.html", "figures/per_condition.png", "figures/per_condition.svg", "figures/curvature_vs_gap.png",
              "figures/perturbed.png", "figures/slices_1d.png", "figures/slices_2d.svg",
              "figures/sharpness_along_training.png"):
        assert (out / f).is_file(), f
    final = pd.read_parquet(out / "final.parquet")
    assert len(final) == 4 and set(final.rule) == {"bptt", "eprop (online)"}
    assert (final.trace_stderr > 0).all() and final.trace.notna().all()
    report = (out / "report.md").read_text()
    assert "eprop (online)** against bptt" in report and "matched training loss" in report and "No run diverged" in report
    assert "Benjamini–Hochberg" in report and "95% CI" in report
    assert "http" not in (out / "report.html").read_text().split("<body>")[1]
    assert json.loads((out / "config.json").read_text())["cells"][0]["model"]["n_rec"] == 8
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
    # ... and of the parameters saved at every evaluation (steps 0, 10, 20): the last ones are the final ones.
    assert main(["curvature", str(out), "--steps", "64", "--top", "1", "--trace-probes", "12", "--along-training"]) == 0
    along = pd.read_parquet(out / "curvature_along_training.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(out / "curvature.parquet"), curv)  # not overwritten
    assert (along.lanczos_steps == 64).all() and (along.l2 == 0.0).all()
    assert (along.eig1_residual < 1e-3 * along.eig1.abs().max()).all()
    assert len(along) == 12 and sorted(set(along.step)) == [0, 10, 20]
    last = along[along.step == 20].merge(curv, on=["rule", "seed"], suffixes=("", "_final"))
    assert (abs(last.eig1 - last.eig1_final) <= 1e-4 * abs(last.eig1_final)).all()
    # ... and on the whole training set (32 sequences, two chunks of the 16-sequence curvature
    # batch), against the dense Hessian of the loss on all 32.
    assert main(["curvature", str(out), "--steps", "64", "--top", "1", "--trace-probes", "12", "--sequences", "0"]) == 0
    whole = pd.read_parquet(out / "curvature.parquet")
    assert (whole.sequences == 32).all() and (curv.sequences == 16).all()
    _check_whole_set_eigenvalue(load(cfg), out, whole)
    # A damaged finished run or checkpoint stops the rerun with what to do; doing it recovers.
    runs = sorted((out / "runs").glob("*.npz"))
    before = load_arrays(runs[-1])
    good = runs[-1].read_bytes()
    runs[-1].write_bytes(good[: len(good) // 2])
    capsys.readouterr()
    assert main(["run", "--config", str(cfg), "--out", str(out), "--quiet"]) == 2
    assert "cannot be read" in (err := capsys.readouterr().err) and "delete it and rerun" in err
    runs[-1].unlink()
    runs[-1].with_suffix(".ckpt.npz").write_bytes(b"not a checkpoint")
    assert main(["run", "--config", str(cfg), "--out", str(out), "--quiet"]) == 2
    assert "delete it to start this run again" in capsys.readouterr().err
    runs[-1].with_suffix(".ckpt.npz").unlink()
    assert main(["run", "--config", str(cfg), "--out", str(out), "--quiet"]) == 0
    after = load_arrays(runs[-1])  # recomputed, bit for bit (wall times aside)
    assert set(after) == set(before)
    for key in set(before) - {"train_seconds", "measure_seconds", "eval_seconds"}:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    # A different configuration in the same folder is refused, naming what changed.
    cfg.write_text(TINY.replace("n_rec = 8", "n_rec = 9"))
    capsys.readouterr()
    assert main(["run", "--config", str(cfg), "--out", str(out), "--quiet"]) == 2
    assert "different configuration" in (err := capsys.readouterr().err) and "cells.0.model.n_rec: 8 -> 9" in err
    # A folder written before a setting existed resumes when the setting is at its default (which
    # does what its absence did), and not otherwise.
    cfg.write_text(TINY)
    recorded = json.loads((out / "config.json").read_text())
    del recorded["cells"][0]["train"]["update_noise"], recorded["cells"][0]["model"]["rec_noise"]
    (out / "config.json").write_text(json.dumps(recorded))
    assert main(["run", "--config", str(cfg), "--out", str(out), "--quiet"]) == 0
    (out / "config.json").write_text(json.dumps(recorded))
    cfg.write_text(TINY.replace("[train]", "[train]\nupdate_noise = 0.1"))
    assert main(["run", "--config", str(cfg), "--out", str(out), "--quiet"]) == 2
    assert "cells.0.train.update_noise: None -> 0.1" in capsys.readouterr().err
    # Other data under the same configuration (other MNIST files, say) are refused, by content.
    cfg.write_text(TINY)
    fingerprints = json.loads((out / "data.json").read_text())
    (out / "data.json").write_text(json.dumps({**fingerprints, "cell 0": "0" * 64}))
    assert main(["run", "--config", str(cfg), "--out", str(out), "--quiet"]) == 2
    assert "The data of cell 0 (cue_recall) differ" in capsys.readouterr().err
    (out / "data.json").write_text(json.dumps(fingerprints))
    # A folder another run holds is refused at once (the OS lock of `exclusive`).
    with exclusive(out, "a test"):
        assert main(["run", "--config", str(cfg), "--out", str(out), "--quiet"]) == 2
    assert "is in use by a test" in capsys.readouterr().err
    # A results folder that cannot be made is a message, not a traceback.
    assert main(["run", "--config", str(cfg), "--out", str(out / "report.md" / "x"), "--quiet"]) == 2
    assert "Cannot create the results folder" in capsys.readouterr().err
    # Rules appended to the list keep the runs already there (not retrained) and run only the new
    # one; a rule taken out is a different configuration.
    before = {p.name: p.read_bytes() for p in (out / "runs").glob("*.npz")}
    cfg.write_text(TINY.replace('{name = "eprop", form = "online"}]', '{name = "eprop", form = "online"}, "uoro"]'))
    assert main(["run", "--config", str(cfg), "--out", str(out), "--quiet"]) == 0
    now = {p.name: p.read_bytes() for p in (out / "runs").glob("*.npz")}
    assert set(now) - set(before) == {"c00-r02-uoro.npz"} and all(now[k] == v for k, v in before.items())
    cfg.write_text(TINY.replace('rules = ["bptt", ', 'rules = ['))
    capsys.readouterr()
    assert main(["run", "--config", str(cfg), "--out", str(out), "--quiet"]) == 2
    assert "different configuration" in capsys.readouterr().err


def _check_whole_set_eigenvalue(exp, out, table):
    import jax

    from creditscape.curvature import dense_hessian
    from creditscape.experiment import _splits
    from creditscape.model import Params, Structure
    from creditscape.objective import Batch

    cell = exp.cells[0]
    train = Batch(*(jax.numpy.asarray(a) for a in _splits(exp, cell).train))
    run = load_arrays(out / "runs" / "c00-r00-bptt.npz")
    params = Params(*(run[f"params/{f}"][0] if f"params/{f}" in run else None for f in Params._fields))
    struct = Structure(*(run[f"struct/{f}"][0] if f"struct/{f}" in run else None for f in Structure._fields))
    top = np.linalg.eigvalsh(np.asarray(dense_hessian(cell.model, params, struct, train, "w_rec")))[-1]
    measured = table[(table.rule == "bptt") & (table.seed == int(run["seeds"][0]))].eig1.item()
    np.testing.assert_allclose(measured, top, rtol=1e-4)


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
        (("n_rec = 8", "n_rec = 8\nreadout_steps = 2"), "readout_steps comes from the task \\(here 1\\)"),
        (("\"bptt\",", "\"mdgl\","), "rules\\[0\\] \\(mdgl\\): mdgl: this network has a single cell type"),
        # Not-a-number and infinity are refused where they are written, before any work.
        (("batch_size = 8", "batch_size = 8\nlearning_rate = nan"), "\\[train\\].learning_rate: expected a finite"),
        (("batch_size = 8", "batch_size = 8\nlearning_rate = inf"), "\\[train\\].learning_rate: expected a finite"),
        (("batch_size = 8", "batch_size = 8\nl2 = nan"), "\\[train\\].l2: expected a finite"),
        (("batch_size = 8", "batch_size = 8\nboost_at = 1.5"), "boost_at: must be a fraction"),
        (("lanczos_steps = 8", "lanczos_steps = 8\nslice_radius = nan"), "slice_radius: expected a finite"),
        (("delay = 3", "delay = 3\nnoise_levels = [inf]"), "noise_levels: expected a list of non-negative"),
        (("n_rec = 8", "n_rec = 8\ninput_noise = -inf"), "input_noise: expected a finite"),
        (('name = "tiny"', 'name = "../../elsewhere"'), "name: expected a plain name"),
        (("curvature_batch = 16", "curvature_batch = 33"), "curvature_batch = 33 is larger than the training set"),
        (("batch_size = 8", "batch_size = 64"), "batch_size = 64 is larger than the training set"),
        # A [sweep] varies one setting at a time from the base: nothing twice, nothing the base has.
        (("[measure]", '[sweep]\n"model.n_rec" = [8, 16]\n[measure]'), "8 is the base value \\(\\[model\\] n_rec = 8\\)"),
        (("[measure]", '[sweep]\n"model.rec_noise" = [0.0, 0.1]\n[measure]'), "0.0 is the base value"),
        (("[measure]", '[sweep]\n"train.learning_rate" = [0.1]\n[measure]'), "vary it in rules' own train tables or \\[grid\\]"),
        (("[measure]", '[sweep]\n"model.alpha" = 0.5\n[measure]'), "expected a non-empty list of distinct values"),
        (("[measure]", '[sweep]\n"model.tau" = [5]\n[measure]'), "Unknown key 'tau' in \\[model\\] \\(grid point model.tau=5\\)"),
    ],
)
def test_config_errors(tmp_path, edit, message):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(TINY.replace(*edit))
    with pytest.raises(ConfigError, match=message):
        load(cfg)


def test_a_sweep_varies_one_setting_at_a_time_from_the_base(tmp_path):
    cfg = tmp_path / "sweep.toml"
    cfg.write_text(TINY.replace("[measure]", '[grid]\n"model.alpha" = [0.0, 0.5]\n[sweep]\n"model.n_rec" = [4, 12]\n'
                                              '"train.batch_size" = [4]\n[measure]'))
    exp = load(cfg)
    assert [c.values for c in exp.cells] == [
        (("model.alpha", a),) + extra for a in (0.0, 0.5)
        for extra in ((), (("model.n_rec", 4),), (("model.n_rec", 12),), (("train.batch_size", 4),))]
    assert [(c.model.n_rec, c.train.batch_size) for c in exp.cells[:4]] == [(8, 8), (4, 8), (12, 8), (8, 4)]
    with pytest.raises(ConfigError, match="also in \\[grid\\]"):
        resolve({**tomllib.loads(cfg.read_text()), "sweep": {"model.alpha": [0.9]}})


def test_missing_mnist_fails_before_work(tmp_path, isolated_home, capsys):
    cfg = tmp_path / "m.toml"
    cfg.write_text('rules = ["bptt"]\n[task]\nname = "smnist"\n[model]\nn_rec = 8\n')
    code = main(["run", "--config", str(cfg), "--mnist-dir", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "MNIST files not found" in err and "--mnist-dir" in err
    assert not (tmp_path / "o").exists()


def test_more_devices_than_the_machine_has_stop_before_work(tmp_path, capsys):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY)
    assert main(["run", "--config", str(cfg), "--out", str(tmp_path / "o"), "--devices", "64"]) == 2
    assert "devices = 64, but this machine has 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra, message", [
    (["--ray-cpus", "2"], "--ray-cpus and --ray-gpus set what each unit asks of a Ray cluster: add --ray."),
    (["--ray", "--devices", "2"], "on Ray each unit uses the devices it asks for: give --ray-cpus"),
    (["--ray"], "--ray needs Ray, an optional extra: pip install 'creditscape[ray]'"),
])
def test_ray_options_misused_or_ray_missing_stop_before_work(tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed (import fails)
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY)
    assert main(["run", "--config", str(cfg), "--out", str(tmp_path / "o"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_unknown_preset_and_mnist_dir_misuse(tmp_path):
    with pytest.raises(ConfigError, match="Unknown preset 'fast'"):
        load(preset="fast")
    with pytest.raises(ConfigError, match="no task of this experiment reads MNIST"):
        resolve({"task": {"name": "cue_recall"}}, mnist_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="--mnist-dir is empty"):
        resolve({"task": {"name": "smnist"}}, mnist_dir="")


def test_quick_preset_resolves():
    exp = load()
    assert exp.name == "quick" and len(exp.rules) >= 5 and exp.cells[0].task.name == "cue_recall"
    keys = [s.rule.computation(exp.cells[0].model) for s in exp.rules]
    assert len(set(keys)) == len(keys) and exp.cells[0].model.dale_exc_fraction == 0.8


@pytest.mark.parametrize("name", ["paper-neuro", "paper-neuro-matched", "remedies", "paper-smnist", "paper-smnist-rules",
                                  "paper-smnist-leaky", "paper-smnist-matched", "measures", "noise", "ingredients",
                                  "rule-zoo", "spiking"])
def test_every_preset_resolves(name, isolated_home, tmp_path):
    if "smnist" in name:
        with pytest.raises(ConfigError, match="MNIST files not found"):
            load(preset=name, mnist_dir=str(tmp_path))
        if not MNIST_DIR.is_dir() and not REQUIRE_MNIST:
            pytest.skip("../shared/data/mnist is not beside the checkout")
    exp = load(preset=name, mnist_dir=str(MNIST_DIR) if "smnist" in name else None)
    assert len(exp.seeds) >= 5 and any(s.rule.name == "bptt" for s in exp.rules)
    if name == "paper-smnist":
        train = exp.cells[0].train
        assert (train.optimizer, train.learning_rate, train.batch_size, train.l2) == ("sgd", 0.01, 256, 0.01)
        assert [s.train_config(train).steps for s in exp.rules] == [10000, 16000]
        assert [s.train_config(train).steps // s.train_config(train).eval_every for s in exp.rules] == [40, 40]
        assert exp.cells[0].noise_levels == (0.2,) and exp.measure.curvature_block == "w_rec"
    for spec in exp.rules:  # MDGL has cell types to average over; no computation runs twice
        check_network(spec.rule, exp.cells[0].model)
    keys = [s.rule.computation(exp.cells[0].model) for s in exp.rules]
    assert len(set(keys)) == len(keys)
    if name.endswith("-matched"):
        assert exp.cells[0].train.target_loss is not None
    if name == "paper-neuro":
        assert {c.task.name for c in exp.cells} == {"perceptual_decision", "delayed_match_sample", "context_decision"}
    if name == "remedies":
        assert len(exp.cells[0].learning_rates) == 3 and {c.train.schedule for c in exp.cells} == {"constant", "boost"}


def test_an_interrupted_curvature_command_says_to_rerun_it(tmp_path, capsys, monkeypatch):
    # (test_faults interrupts `run` with a real SIGINT; `curvature` has nothing to resume.)
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("creditscape.experiment.measure_saved", interrupted)
    assert main(["curvature", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert "interrupted; rerun the same command to complete it" in err and "checkpoint" not in err


def test_listing_commands(capsys):
    assert main(["rules"]) == 0
    out = capsys.readouterr().out
    for name in ("bptt", "rtrl", "tbptt", "eprop", "eprop_random", "rflo", "mdgl"):
        assert f"\n{name} " in "\n" + out
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert "cue_recall" in out and "delayed_match_sample" in out and "smnist" in out


def test_two_iterations_of_smnist_through_the_command_line(tmp_path):
    """Real MNIST files, the paper's network shape, every stage of a run (CI has the files)."""
    if not MNIST_DIR.is_dir() and not REQUIRE_MNIST:
        pytest.skip("../shared/data/mnist is not beside the checkout")
    cfg = tmp_path / "smnist.toml"
    cfg.write_text('name = "smnist-two"\nseeds = 2\nrules = ["bptt", {name = "eprop", form = "online"}]\n'
                   '[task]\nname = "smnist"\nn_train = 64\nn_test = 32\nnoise_levels = [0.2]\n'
                   '[model]\nn_rec = 16\nform = "rate"\nbias = false\n'
                   '[train]\noptimizer = "sgd"\nlearning_rate = 0.01\nbatch_size = 16\nsteps = 2\neval_every = 1\n'
                   '[measure]\ncurvature_batch = 16\nlanczos_steps = 4\ntrace_probes = 3\nslice_points = 3\n')
    out = tmp_path / "out"
    assert main(["run", "--config", str(cfg), "--out", str(out), "--mnist-dir", str(MNIST_DIR), "--quiet"]) == 0
    final = pd.read_parquet(out / "final.parquet")
    assert len(final) == 4 and (final.diverged_at == -1).all() and final.task.eq("smnist").all()
    assert {"perturbed[noise=0.2]_loss", "lambda_max", "trace"} <= set(final.columns)
    assert sorted(pd.read_parquet(out / "history.parquet").step.unique()) == [0, 1, 2]
    assert (out / "report.html").is_file()


@pytest.mark.parametrize("argv", [["run", "--checkpoint-seconds", "nan"], ["run", "--checkpoint-seconds", "-5"],
                                  ["curvature", "somewhere", "--sequences", "-1"], ["run", "--devices", "0"],
                                  ["run", "--ray", "--ray-cpus", "-1"], ["run", "--ray", "--ray-gpus", "inf"]])
def test_bad_numbers_on_the_command_line_stop_at_once(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and "expected a" in capsys.readouterr().err


def test_the_command_line_starts_without_jax():
    # `creditscape --help`, argument errors and `creditscape rules` answer at once: JAX is imported
    # only for work.
    import subprocess
    import sys

    code = ("import sys\nfrom creditscape.cli import build_parser, main\nbuild_parser().format_help()\n"
            "assert main(['rules']) == 0\nassert 'jax' not in sys.modules and 'scipy' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.DEVNULL)


def test_the_rule_listing_read_from_source_is_the_registry():
    import dataclasses

    from creditscape.rule_catalogue import builtin_rules
    from creditscape.rules import rule_class, rule_names

    listed = builtin_rules()
    assert [r.name for r in listed] == rule_names()
    for entry in listed:
        cls = rule_class(entry.name)
        assert (entry.formula, entry.forms) == (cls.formula, cls.forms)
        assert entry.options == {f.name: f.default for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("name, rules", [("noise", '["bptt"]'), ("ingredients", '["bptt", "eprop"]')])
def test_sweep_presets_run_end_to_end_in_a_shortened_form(name, rules, tmp_path, capsys):
    """The open questions' one-setting-at-a-time presets (docs/questions.md), shortened
    (tests/cases.py; BPTT, and e-prop for the interaction): each runs, prints its summary and
    writes its report with the comparisons of the varied cell with the base cell. (The `measures`
    preset runs shortened in tests/test_experiment.py.)"""
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(shortened_preset(name, rules=rules))
    assert main(["run", "--config", str(cfg), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "condition" in printed and "report.html" in printed
    report = (tmp_path / "out" / "report.md").read_text()
    assert "### Each setting against its base cell, rule by rule" in report
    assert ("### Does the setting narrow or widen" in report) == ("eprop" in rules)
    assert sum(ln.startswith("- ") and "with the base cell" in ln for ln in report.splitlines()) == 1
    assert (tmp_path / "out" / "figures" / "sweep.png").is_file()
