"""Atomic file writes (a reader, or a resumed run, never sees half a file) and the lock that keeps
one run per results folder."""

from __future__ import annotations

import contextlib
import fcntl
import os
import zipfile
from pathlib import Path

import numpy as np

from creditscape.errors import DamagedFile, FolderInUse


def atomic_write_bytes(path: Path, write) -> None:
    """Call ``write(f)`` on a temporary file in the same folder, then rename it onto ``path``. The
    temporary's name holds the process id, so no two processes ever write the same one."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_arrays(path: Path, arrays: dict) -> None:
    """``np.savez`` of ``arrays``, atomically."""
    atomic_write_bytes(path, lambda f: np.savez(f, **arrays))


def load_arrays(path: Path, advice: str = "delete it and rerun the same command") -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file; a damaged file (truncated, not a zip, a bad array) raises
    :class:`DamagedFile` with ``advice``."""
    try:
        with open(path, "rb") as raw, np.load(raw, allow_pickle=False) as f:  # closed even when unreadable
            return dict(f)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DamagedFile(f"{path} cannot be read ({type(err).__name__}: {err}): {advice}.") from None


@contextlib.contextmanager
def exclusive(folder: Path, what: str = "creditscape run"):
    """Hold an OS lock (``flock``) on ``folder/.lock`` for the duration: a second process asking
    for it fails at once with :class:`FolderInUse` instead of racing the first over the same files.
    The OS releases the lock when the holder exits, however it exits (even on SIGKILL)."""
    path = Path(folder) / ".lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise FolderInUse(
                f"{folder} is in use by {holder}. Wait for it to finish, or use another --out folder."
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{what} (pid {os.getpid()})")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
