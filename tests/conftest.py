import os
from pathlib import Path

import jax
import pytest

jax.config.update("jax_enable_x64", True)

# The canonical MNIST copy beside the checkout. Tests that need it skip without it on a user's
# machine; CI sets CREDITSCAPE_REQUIRE_MNIST=1 (.ci/run), and there they fail instead.
MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
REQUIRE_MNIST = os.environ.get("CREDITSCAPE_REQUIRE_MNIST") == "1"


def needs_mnist(test):
    """Mark a test that reads ../shared/data/mnist: skipped without it, failed without it in CI."""
    if MNIST_DIR.is_dir() or REQUIRE_MNIST:
        return test
    return pytest.mark.skip(reason=f"the canonical MNIST copy is not at {MNIST_DIR}")(test)


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
