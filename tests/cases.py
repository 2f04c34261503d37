"""Small model configurations shared by the rule and curvature tests (cases as data), and the
small experiment the fault tests run."""

import contextlib
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from creditscape import model as M
from creditscape.objective import Batch, Noise

N_IN, N_REC, N_OUT, T, B = 3, 5, 2, 6, 3


def model_cases():
    """(id, ModelConfig) over form × α × activation × (Dale, sparse, learned s0) × loss."""
    out = []
    for form, alpha, act in itertools.product(("voltage", "rate"), (0.0, 0.3, 0.9), ("relu", "tanh")):
        out.append((f"{form}-a{alpha}-{act}", M.ModelConfig(N_IN, N_REC, N_OUT, form=form, alpha=alpha, activation=act)))
    out.append(("voltage-dale-sparse-s0", M.ModelConfig(N_IN, N_REC, N_OUT, alpha=0.3, activation="tanh",
                                                       dale_exc_fraction=0.6, connectivity=0.7, learn_init_state=True)))
    out.append(("rate-dale-types-s0-mse", M.ModelConfig(N_IN, N_REC, N_OUT, form="rate", alpha=0.3, activation="softplus",
                                                       dale_exc_fraction=0.6, learn_init_state=True, loss="mse")))
    out.append(("voltage-celltypes-selfconn-nobias", M.ModelConfig(N_IN, N_REC, N_OUT, alpha=0.5, activation="softplus",
                                                                  cell_types=2, self_connections=True, bias=False)))
    out.append(("voltage-heterotau-s0", M.ModelConfig(N_IN, N_REC, N_OUT, alpha=0.6, leak_spread=0.8, activation="tanh",
                                                     learn_init_state=True)))
    out.append(("rate-heterotau-s0", M.ModelConfig(N_IN, N_REC, N_OUT, form="rate", alpha=0.6, leak_spread=0.8,
                                                  activation="softplus", learn_init_state=True)))
    return out


MASKS = ("last", "every", "random")


def draw(cfg, seed, mask="random", noise=False):
    """Fresh random parameters (non-zero biases and s0), batch and optional recurrent noise (float64)."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 8)
    params, struct = M.init(cfg, keys[0], jnp.float64)
    if params.b is not None:
        params = params._replace(b=0.2 * jax.random.normal(keys[1], (cfg.n_rec,)))
    if params.s0 is not None:
        params = params._replace(s0=0.5 * jax.random.normal(keys[2], (cfg.n_rec,)))
    params = params._replace(b_out=0.1 * jax.random.normal(keys[3], (cfg.n_out,)))
    x = jax.random.normal(keys[4], (B, T, cfg.n_in))
    if cfg.loss == "xent":
        target = jax.random.randint(keys[5], (B, T), 0, cfg.n_out)
    else:
        target = jax.random.normal(keys[5], (B, T, cfg.n_out))
    if mask == "last":
        m = jnp.zeros((B, T)).at[:, -1].set(1.0)
    elif mask == "every":
        m = jnp.ones((B, T))
    else:
        m = (jax.random.uniform(keys[6], (B, T)) > 0.4).astype(jnp.float64).at[:, -1].set(1.0)
    xi = 0.1 * jax.random.normal(keys[7], (B, T, cfg.n_rec)) if noise else None
    return params, struct, Batch(x, target, m), Noise(x, xi)


def light_or_heavy(values, light):
    """pytest parameters over ``values``, those not in ``light`` marked heavy (``pytest -m heavy``)."""
    return [pytest.param(*(v if isinstance(v, tuple) else (v,)), marks=() if v in light else pytest.mark.heavy)
            for v in values]


@contextlib.contextmanager
def x64_off():
    """Trace as a `creditscape` command or a Ray worker does, with x64 off (the suite turns it on):
    for a run compared bit for bit with theirs (tests/conftest.py says why it matters)."""
    jax.config.update("jax_enable_x64", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", True)


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(a)) for a in jax.tree.leaves(tree)])


def assert_close(a, b, rtol=1e-10):
    a, b = flat(a), flat(b)
    scale = max(np.abs(b).max(), 1e-300)
    err = np.abs(a - b).max() / scale
    assert err < rtol, f"relative error {err:.3g} > {rtol}"


# Two rules, two seeds, 1,000 iterations: about ten seconds, long enough to be interrupted.
SLOW_EXPERIMENT = """
name = "resumable"
seeds = 2
rules = ["eprop", "bptt"]
[task]
name = "cue_recall"
n_train = 64
n_test = 64
delay = 6
[model]
n_rec = 16
[train]
optimizer = "sgd"
learning_rate = 0.05
steps = 400
eval_every = 20
batch_size = 16
[measure]
curvature_batch = 32
lanczos_steps = 8
trace_probes = 6
slice_points = 5
"""


# A preset's settings shortened for the suite: 2 seeds of a small network, 40 iterations, a
# training target every run reaches at once, and the first value of the first key of a [grid] or
# [sweep] (with the base cell, two cells); the task and the measurements are the preset's.
_SHORT = {"seeds": "2", "n_train": "64", "n_test": "64", "n_rec": "8", "steps": "40", "eval_every": "20",
          "curvature_batch": "32", "lanczos_steps": "8", "batch_size": "16", "target_loss": "0.9", "pac_bayes_draws": "4"}


def shortened_preset(name: str, rules: str | None = None) -> str:
    """The preset ``name`` shortened (above); ``rules``: a TOML list that replaces its rules."""
    from creditscape.config import PRESET_DIR

    out, table, kept = [], None, 0
    for line in (PRESET_DIR / f"{name}.toml").read_text().splitlines():
        if line.startswith("["):
            table, kept = line, 0
        m = re.match(r'^("?[\w.]+"?) = (.*)$', line)
        if m and table in ("[sweep]", "[grid]"):
            kept += 1
            line = f"{m.group(1)} = [{m.group(2).strip('[]').split(',')[0]}]" if kept == 1 else ""
        elif m and m.group(1) in _SHORT:
            line = f"{m.group(1)} = {_SHORT[m.group(1)]}"
        elif m and m.group(1) == "rules" and rules is not None:
            line = f"rules = {rules}"
        out.append(line)
    return "\n".join(out) + "\n"
