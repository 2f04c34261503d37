"""Generators: deterministic per seed, disjoint splits, masks; the MNIST loader on real and broken files."""

import gzip
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import MNIST_DIR, needs_mnist

from creditscape.model import ModelConfig
from creditscape.objective import check_scored_steps
from creditscape.tasks import (
    MnistFormatError, MnistNotFoundError, get_task, load_mnist, make_splits, task_names,
)

MNIST = MNIST_DIR
GENERATED = [n for n in task_names() if n != "smnist"]


@pytest.mark.parametrize("name", GENERATED)
def test_generators_deterministic_disjoint_and_masked(name):
    task = get_task(name)
    a = make_splits(task, 24, 16, seed=3)
    b = make_splits(task, 24, 16, seed=3)
    c = make_splits(task, 24, 16, seed=4)
    for x, y in zip(a.train, b.train):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.train.x, c.train.x)
    train_rows = {row.tobytes() for row in a.train.x}
    assert not any(row.tobytes() in train_rows for row in a.test.x), "train and test share a trial"
    n, T, n_in = a.train.x.shape
    assert n_in == task.n_in and a.train.mask.shape == (n, T)
    assert np.all(a.train.mask.sum(1) > 0)
    if task.loss == "xent":
        assert a.train.target.max() < task.n_out
    assert a.perturbed and all(p.x.shape[-1] == task.n_in for p in a.perturbed.values())
    assert a.train.x.dtype == np.float32


@pytest.mark.parametrize("task", [get_task(n) for n in GENERATED] + [
    get_task("perceptual_decision", score_fixation=True), get_task("evidence_accumulation", score_last_only=True)],
    ids=lambda t: t.name)
def test_declared_readout_steps_hold_for_every_split_and_shift(task):
    """A task that declares K readout steps scores nothing before them, in any set an experiment
    draws (shifts included), and scores its first readout step (K is not larger than needed)."""
    cfg = ModelConfig(task.n_in, 4, task.n_out, loss=task.loss, readout_steps=task.readout_steps)
    s = make_splits(task, 24, 16, seed=5)
    for name, batch in {"train": s.train, "test": s.test, **s.perturbed}.items():
        check_scored_steps(cfg, batch, name)
    if task.readout_steps is not None:
        assert s.train.mask[:, -task.readout_steps].any()


def test_cognitive_task_conventions():
    t = get_task("perceptual_decision")
    s = make_splits(t, 50, 10, 0)
    assert s.train.x.shape[1] == 22  # (100 + 2000 + 100) ms at dt = 100 ms
    dec = s.train.mask[0] > 0
    assert np.all(s.train.x[:, dec, 0] == 0) and np.all(s.train.x[:, ~dec, 0] == 1)
    assert set(np.unique(s.train.target[:, dec])) <= {1, 2}
    dms = make_splits(get_task("delayed_match_sample"), 20, 5, 0)
    assert make_splits(get_task("delayed_match_sample"), 20, 5, 0).perturbed["long delay"].x.shape[1] > dms.train.x.shape[1]


@needs_mnist
def test_mnist_real_files():
    m = load_mnist(MNIST)
    assert m.train_images.shape == (60000, 28, 28) and m.test_images.shape == (10000, 28, 28)
    assert hashlib.md5(m.train_images.tobytes()).hexdigest() == hashlib.md5(
        gzip.decompress((MNIST / "train-images-idx3-ubyte.gz").read_bytes())[16:]).hexdigest()
    assert set(np.unique(m.test_labels)) == set(range(10))
    task = get_task("smnist", mnist_dir=str(MNIST))
    s = make_splits(task, 100, 50, 0)
    assert s.train.x.shape == (100, 28, 28) and 0 <= s.train.x.min() and s.train.x.max() <= 1
    noisy = s.perturbed["noise=0.2"].x
    assert noisy.min() >= 0 and noisy.max() <= 1 and not np.array_equal(noisy, s.test.x)
    pixel = make_splits(get_task("smnist", mnist_dir=str(MNIST), pixel=True), 4, 4, 0)
    assert pixel.train.x.shape == (4, 784, 1) and pixel.train.mask[:, -1].all()
    cfg = ModelConfig(task.n_in, 4, task.n_out, readout_steps=task.readout_steps)
    for name, batch in {"train": s.train, "pixel": pixel.train, **s.perturbed}.items():
        check_scored_steps(cfg, batch, name)  # one readout, at the last step


def _copy_layout(dst: Path, dotted=False, gunzip=False):
    dst.mkdir(parents=True)
    for f in MNIST.glob("*.gz"):
        name = f.name[:-3]
        if dotted:
            name = name.replace("-idx", ".idx")
        if gunzip:
            (dst / name).write_bytes(gzip.decompress(f.read_bytes()))
        else:
            shutil.copy(f, dst / (name + ".gz"))


@needs_mnist
@pytest.mark.parametrize("layout", ["plain-gunzipped-dotted", "torchvision", "env", "keras-npz"])
def test_mnist_layouts(layout, tmp_path, isolated_home, monkeypatch):
    if layout == "plain-gunzipped-dotted":
        _copy_layout(tmp_path / "d", dotted=True, gunzip=True)
        m = load_mnist(tmp_path / "d")
    elif layout == "torchvision":
        _copy_layout(tmp_path / "root" / "MNIST" / "raw")
        m = load_mnist(tmp_path / "root")
    elif layout == "env":
        _copy_layout(tmp_path / "e")
        monkeypatch.setenv("CREDITSCAPE_MNIST_DIR", str(tmp_path / "e"))
        m = load_mnist()
    else:
        ref = load_mnist(MNIST)
        keras = isolated_home / ".keras" / "datasets"
        keras.mkdir(parents=True)
        np.savez(keras / "mnist.npz", x_train=ref.train_images[:10], y_train=ref.train_labels[:10],
                 x_test=ref.test_images[:5], y_test=ref.test_labels[:5])
        m = load_mnist()
        assert m.train_images.shape == (10, 28, 28)
        return
    assert m.train_images.shape == (60000, 28, 28)


def test_mnist_missing_lists_places(isolated_home, tmp_path):
    with pytest.raises(MnistNotFoundError) as info:
        load_mnist(tmp_path / "nowhere")
    msg = str(info.value)
    assert "nowhere" in msg and ".keras" in msg and "CREDITSCAPE_MNIST_DIR" in msg and "--mnist-dir" in msg


def _write_idx(path, magic, shape, payload_len):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in shape)
    path.write_bytes(header + bytes(payload_len))


@pytest.mark.parametrize("problem", ["truncated", "magic", "partial"])
def test_mnist_broken_files(problem, tmp_path, isolated_home):
    d = tmp_path / "bad"
    d.mkdir()
    for part, magic, shape in [("train-images-idx3-ubyte", 2051, (3, 28, 28)), ("train-labels-idx1-ubyte", 2049, (3,)),
                               ("t10k-images-idx3-ubyte", 2051, (2, 28, 28)), ("t10k-labels-idx1-ubyte", 2049, (2,))]:
        _write_idx(d / part, magic, shape, int(np.prod(shape)))
    if problem == "truncated":
        _write_idx(d / "train-images-idx3-ubyte", 2051, (3, 28, 28), 100)
        with pytest.raises(MnistFormatError, match="truncated"):
            load_mnist(d)
    elif problem == "magic":
        _write_idx(d / "train-labels-idx1-ubyte", 2051, (3,), 3)
        with pytest.raises(MnistFormatError, match="magic number 2051, expected 2049"):
            load_mnist(d)
    else:
        (d / "t10k-labels-idx1-ubyte").unlink()
        with pytest.raises(MnistNotFoundError, match="t10k-labels"):
            load_mnist(d)
