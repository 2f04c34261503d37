import os
import tempfile
from pathlib import Path

import jax
import pytest

jax.config.update("jax_enable_x64", True)

# One persistent compilation cache for the whole run, shared by the pytest-xdist workers and the
# `creditscape` processes the tests start (they inherit the environment): the experiment tests
# compile the same programs many times over, and compiling is most of their time on CPU.
_CACHE = Path(tempfile.gettempdir()) / f"creditscape-test-jax-cache-{os.getuid()}"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# XLA's backend optimizations make compiling slower than running these small programs; they do
# not change what a program computes (the references' tolerances and the bit-identity checks,
# both sides compiled alike, hold either way).
# One host device, set explicitly so that `creditscape` processes the tests start (which would
# otherwise take one per core) compute exactly what the in-process runs they are compared with do.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_backend_optimization_level=0 --xla_force_host_platform_device_count=1").strip()
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))

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
