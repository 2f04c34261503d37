from pathlib import Path

import jax
import pytest

jax.config.update("jax_enable_x64", True)

# The canonical MNIST copy beside the checkout (tests that need it skip without it).
MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


@pytest.fixture
def isolated_home(tmp_path, monkeypatch):
    """No MNIST in any standard place: HOME and the working directory are empty folders."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("CREDITSCAPE_MNIST_DIR", raising=False)
    monkeypatch.delenv("KERAS_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    return home
