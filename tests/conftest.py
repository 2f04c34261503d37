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
# XLA's backend optimizations and its MLIR fusion emitters make compiling slower than running
# these small programs: with the legacy emitters the suite takes 9 min 15 s instead of 14 min 04 s
# from an empty cache (docs/performance.md). Neither setting changes what a program computes beyond
# float rounding: the references' tolerances hold either way. Bit-identity checks compare processes
# set up alike: with the legacy emitters a float32 program traced with x64 on (this process) and
# off (a `creditscape` command, a Ray worker) can differ in the last bit, so a test that compares
# its own run with theirs makes it inside `cases.x64_off()`. (The flag is known to jaxlib 0.7-0.10.2;
# XLA stops at once on a flag it does not know.)
# One host device, set explicitly so that `creditscape` processes the tests start (which would
# otherwise take one per core) compute exactly what the in-process runs they are compared with do.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
                           " --xla_force_host_platform_device_count=1").strip()
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
