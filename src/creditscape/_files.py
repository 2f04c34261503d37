"""Atomic file writes: a reader (or a resumed run) never sees half a file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def atomic_write_bytes(path: Path, write) -> None:
    """Call ``write(f)`` on a temporary file in the same folder, then rename it onto ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_arrays(path: Path, arrays: dict) -> None:
    """``np.savez`` of ``arrays``, atomically."""
    atomic_write_bytes(path, lambda f: np.savez(f, **arrays))


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return dict(f)
