"""Random arrays with exactly ``jax.random``'s values, drawn so that they compile fast.

Each function here takes ``jax.random``'s arguments and returns the same numbers, bit for bit
(tests/test_prng.py), by drawing ``shape``'s numbers as one flat vector and reshaping it: JAX's
random bits depend only on an element's position in the flattened array. Why: XLA's CPU compiler
spends up to 5–10× longer on a draw of a multi-dimensional shape, worst with a short last axis,
than on the same draw of a flat one — under ``vmap`` over 8 keys, 3.3 s against 0.45 s for a
(1024, 10) normal draw and 2.2 s against 0.4 s for a (256, 30, 3) one (docs/performance.md,
"Compiling"). Every random array of the package is drawn through these.
"""

from __future__ import annotations

import math

import jax


def _flat(shape) -> tuple[int]:
    return (math.prod(shape),)


def normal(key: jax.Array, shape, dtype=float) -> jax.Array:
    """``jax.random.normal(key, shape, dtype)``."""
    return jax.random.normal(key, _flat(shape), dtype).reshape(shape)


def uniform(key: jax.Array, shape, dtype=float, minval=0.0, maxval=1.0) -> jax.Array:
    """``jax.random.uniform(key, shape, dtype, minval, maxval)``, for scalar bounds."""
    return jax.random.uniform(key, _flat(shape), dtype, minval, maxval).reshape(shape)


def randint(key: jax.Array, shape, minval, maxval, dtype=int) -> jax.Array:
    """``jax.random.randint(key, shape, minval, maxval, dtype)``, for scalar bounds."""
    return jax.random.randint(key, _flat(shape), minval, maxval, dtype).reshape(shape)


def rademacher(key: jax.Array, shape, dtype=int) -> jax.Array:
    """``jax.random.rademacher(key, shape, dtype)``: ±1 with equal probability."""
    return jax.random.rademacher(key, _flat(shape), dtype).reshape(shape)
