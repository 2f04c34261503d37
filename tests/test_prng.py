"""creditscape.prng returns jax.random's numbers bit for bit, in either of JAX's PRNG modes."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from creditscape import prng

SHAPES = [(7,), (13, 3), (3, 13), (4, 5, 2), (2, 1, 6, 3)]


@contextlib.contextmanager
def _threefry_partitionable(value: bool):
    before = jax.config.jax_threefry_partitionable
    jax.config.update("jax_threefry_partitionable", value)
    try:
        yield
    finally:
        jax.config.update("jax_threefry_partitionable", before)


@pytest.mark.parametrize("partitionable", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_every_draw_equals_jax_random_bit_for_bit(shape, partitionable):
    key = jax.random.PRNGKey(int(np.random.default_rng().integers(2**31)))  # fresh each run
    with _threefry_partitionable(partitionable):
        pairs = {
            "normal": (prng.normal(key, shape, jnp.float32), jax.random.normal(key, shape, jnp.float32)),
            "normal64": (prng.normal(key, shape, jnp.float64), jax.random.normal(key, shape, jnp.float64)),
            "uniform": (prng.uniform(key, shape, jnp.float32, -0.5, 2.0), jax.random.uniform(key, shape, jnp.float32, -0.5, 2.0)),
            "randint": (prng.randint(key, shape, 0, 7), jax.random.randint(key, shape, 0, 7)),
            "rademacher": (prng.rademacher(key, shape, jnp.float32), jax.random.rademacher(key, shape, jnp.float32)),
        }
    for name, (ours, theirs) in pairs.items():
        assert ours.shape == theirs.shape == shape and ours.dtype == theirs.dtype, name
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs), err_msg=name)


def test_draws_under_vmap_and_jit_equal_jax_random():
    keys = jax.random.split(jax.random.PRNGKey(5), 4)
    ours = jax.jit(jax.vmap(lambda k: prng.normal(k, (6, 3))))(keys)
    theirs = jax.vmap(lambda k: jax.random.normal(k, (6, 3)))(keys)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
