"""Reading MNIST from local files (never from the network).

Accepted layouts, in each candidate directory D:

* IDX files in D, gzipped or not, with dash or dot names (``train-images-idx3-ubyte[.gz]`` or
  ``train-images.idx3-ubyte[.gz]``, likewise ``train-labels``, ``t10k-images``, ``t10k-labels``);
* the torchvision layout ``D/MNIST/raw/`` holding such files;
* a Keras ``D/mnist.npz`` (keys x_train, y_train, x_test, y_test).

Candidate directories, in order: the ``directory`` argument (CLI ``--mnist-dir``), the
environment variable ``CREDITSCAPE_MNIST_DIR``, ``~/.cache/creditscape/mnist``, Keras'
``$KERAS_HOME/datasets`` (default ``~/.keras/datasets``), ``~/data``, ``./data``.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

ENV_VAR = "CREDITSCAPE_MNIST_DIR"
_PARTS = ("train-images", "train-labels", "t10k-images", "t10k-labels")
_MAGIC = {"images": 2051, "labels": 2049}

HOW_TO_PROVIDE = (
    "Provide the four MNIST files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
    "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte; gzipped or not) or a Keras mnist.npz, then "
    f"pass their folder with --mnist-dir DIR (or `mnist_dir` in the config), or set {ENV_VAR}=DIR, "
    "or copy them to ~/.cache/creditscape/mnist. creditscape never downloads data."
)


class MnistNotFoundError(FileNotFoundError):
    """No MNIST files in any of the places looked at."""


class MnistFormatError(ValueError):
    """An MNIST file exists but is not valid (wrong magic number, truncated, wrong shape)."""


class Mnist(NamedTuple):
    train_images: np.ndarray  # (60000, 28, 28) uint8
    train_labels: np.ndarray  # (60000,) uint8
    test_images: np.ndarray  # (10000, 28, 28) uint8
    test_labels: np.ndarray  # (10000,) uint8
    source: str


def candidate_dirs(directory: str | os.PathLike | None = None) -> list[Path]:
    """The directories searched, in order."""
    dirs = []
    if directory is not None:
        dirs.append(Path(directory).expanduser())
    if os.environ.get(ENV_VAR):
        dirs.append(Path(os.environ[ENV_VAR]).expanduser())
    home = Path.home()
    keras_home = Path(os.environ.get("KERAS_HOME", home / ".keras"))
    dirs += [home / ".cache" / "creditscape" / "mnist", keras_home / "datasets", home / "data", Path("data")]
    return dirs


def _idx_file(folder: Path, part: str) -> Path | None:
    kind = "idx3-ubyte" if part.endswith("images") else "idx1-ubyte"
    for name in (f"{part}-{kind}", f"{part}.{kind}"):
        for suffix in ("", ".gz"):
            path = folder / (name + suffix)
            if path.is_file():
                return path
    return None


def read_idx(path: Path, kind: str) -> np.ndarray:
    """Read one IDX file (``kind`` "images" or "labels"), checking magic number and length."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise MnistFormatError(f"{path}: corrupt gzip data ({err}). Replace the file. {HOW_TO_PROVIDE}") from None
    if len(raw) < 8:
        raise MnistFormatError(f"{path}: only {len(raw)} bytes, not an IDX file. {HOW_TO_PROVIDE}")
    magic = int.from_bytes(raw[:4], "big")
    if magic != _MAGIC[kind]:
        raise MnistFormatError(
            f"{path}: magic number {magic}, expected {_MAGIC[kind]} for an IDX {kind} file "
            f"(is this the right file?). {HOW_TO_PROVIDE}"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise MnistFormatError(
            f"{path}: header announces shape {shape} ({expected} bytes of data) but the file holds "
            f"{len(raw) - header}: truncated or corrupt. Replace the file. {HOW_TO_PROVIDE}"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def _from_idx(folder: Path) -> Mnist | None:
    paths = {p: _idx_file(folder, p) for p in _PARTS}
    if not any(paths.values()):
        return None
    missing = [p for p, path in paths.items() if path is None]
    if missing:
        raise MnistNotFoundError(f"{folder}: found some MNIST files but not {missing}. {HOW_TO_PROVIDE}")
    arrays = [read_idx(paths[p], p.split("-")[1]) for p in _PARTS]
    return Mnist(*arrays, source=str(folder))


def _from_npz(path: Path) -> Mnist:
    try:
        with np.load(path) as f:
            arrays = [np.asarray(f[k], np.uint8) for k in ("x_train", "y_train", "x_test", "y_test")]
    except (KeyError, ValueError, OSError) as err:
        raise MnistFormatError(f"{path}: not a Keras mnist.npz ({err}). {HOW_TO_PROVIDE}") from None
    return Mnist(*arrays, source=str(path))


def _check(m: Mnist) -> Mnist:
    for images, labels, split in ((m.train_images, m.train_labels, "train"), (m.test_images, m.test_labels, "test")):
        if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
            raise MnistFormatError(
                f"{m.source}: {split} images {images.shape} / labels {labels.shape}; expected (n, 28, 28) and (n,)."
            )
        if labels.size and labels.max() > 9:
            raise MnistFormatError(f"{m.source}: {split} labels go up to {labels.max()}; expected 0..9.")
    return m


def load_mnist(directory: str | os.PathLike | None = None) -> Mnist:
    """Find and read MNIST (see the module docstring for where and which layouts).

    Raises:
        MnistNotFoundError: no files anywhere; the message lists every place looked at.
        MnistFormatError: a file was found but is invalid; the message names it and the problem.
    """
    looked = []
    for d in candidate_dirs(directory):
        for folder in (d, d / "MNIST" / "raw"):
            looked.append(str(folder))
            found = _from_idx(folder) if folder.is_dir() else None
            if found is not None:
                return _check(found)
        npz = d / "mnist.npz"
        looked.append(str(npz))
        if npz.is_file():
            return _check(_from_npz(npz))
    raise MnistNotFoundError("MNIST files not found. Looked in:\n  " + "\n  ".join(looked) + "\n" + HOW_TO_PROVIDE)
