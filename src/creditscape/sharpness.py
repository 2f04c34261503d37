"""Sharpness beyond λ_max: random-perturbation sharpness, adaptive worst-case sharpness, and
filter-normalized loss slices. All on the exact loss of a fixed batch, pure JAX (vmappable).

Perturbations respect the network's structure: W_rec moves only on existing connections.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from creditscape import prng
from creditscape.model import ModelConfig, Params, Structure
from creditscape.objective import Batch, exact_loss


def _mask_tree(params: Params, struct: Structure) -> Params:
    ones = jax.tree.map(jnp.ones_like, params)
    return ones._replace(w_rec=struct.rec_mask.astype(params.w_rec.dtype))


def _standard_normal_like(params: Params, key: jax.Array) -> Params:
    """Independent N(0, 1) entries shaped like ``params``, drawn as one vector: each separate draw
    is its own copy of the random-bit generator in a compiled program, and on a CPU each copy
    takes a quarter of a second or more to compile."""
    flat, unravel = ravel_pytree(params)
    return unravel(prng.normal(key, flat.shape, flat.dtype))


def _add(params, direction, scale):
    return jax.tree.map(lambda p, d: p + scale * d, params, direction)


class SharpnessEstimate(NamedTuple):
    value: jax.Array  # mean loss increase
    stderr: jax.Array


def random_sharpness(
    cfg: ModelConfig, params: Params, struct: Structure, batch: Batch, scale: float, *, key: jax.Array,
    n_samples: int = 32,
) -> SharpnessEstimate:
    """E_δ[L(θ + δ)] − L(θ) with δ = scale · rms(θ_a) · z for each parameter array a, z ~ N(0, I)
    (masked like W_rec). For small ``scale``, ≈ ½ Σ_a (scale·rms_a)² tr(H_aa).

    Samples come in antithetic pairs ±δ, whose mean ½[L(θ+δ) + L(θ−δ)] − L(θ) has the same
    expectation but no first-order (gradient) noise: away from a minimum the linear term would
    otherwise swamp the quadratic one at small scales.

    References: Keskar et al., "On large-batch training for deep learning: generalization gap
    and sharp minima", ICLR 2017; Jiang et al., "Fantastic generalization measures and where to
    find them", ICLR 2020.
    """
    mask = _mask_tree(params, struct)
    rms = jax.tree.map(lambda p: jnp.sqrt(jnp.mean(p**2)), params)
    base = exact_loss(cfg, params, struct, batch)

    def one(k):
        delta = jax.tree.map(lambda zz, s, m: zz * s * m, _standard_normal_like(params, k), rms, mask)
        plus = exact_loss(cfg, _add(params, delta, scale), struct, batch)
        minus = exact_loss(cfg, _add(params, delta, -scale), struct, batch)
        return 0.5 * (plus + minus) - base

    inc = jax.vmap(one)(jax.random.split(key, n_samples))
    return SharpnessEstimate(inc.mean(), inc.std(ddof=1) / jnp.sqrt(n_samples))


def worst_case_sharpness(
    cfg: ModelConfig, params: Params, struct: Structure, batch: Batch, radius: float, *, steps: int = 20,
    step_size: float | None = None,
) -> jax.Array:
    """Adaptive worst-case sharpness max_{‖δ/|θ|‖ ≤ radius} L(θ + δ) − L(θ), by projected
    gradient ascent on u = δ/|θ| (elementwise; normalized steps, projection onto the ball).
    A lower bound on the true maximum; starts from the normalized gradient direction.

    References: Kwon et al., "ASAM: adaptive sharpness-aware minimization for scale-invariant
    learning of deep neural networks", ICML 2021.
    """
    mask = _mask_tree(params, struct)
    weight = jax.tree.map(lambda p, m: jnp.abs(p) * m, params, mask)
    base = exact_loss(cfg, params, struct, batch)
    step_size = radius / 4 if step_size is None else step_size

    def loss_of(u):
        return exact_loss(cfg, _add(params, jax.tree.map(jnp.multiply, u, weight), 1.0), struct, batch)

    def norm(t):
        return jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(t)))

    def ascend(u, _):
        g = jax.grad(loss_of)(u)
        g = jax.tree.map(jnp.multiply, g, weight)  # ascent direction in u, scaled by |θ| (ASAM)
        u = jax.tree.map(lambda a, b: a + step_size * b / jnp.maximum(norm(g), 1e-30), u, g)
        n = norm(u)
        u = jax.tree.map(lambda a: a * jnp.minimum(1.0, radius / jnp.maximum(n, 1e-30)), u)
        return u, loss_of(u)

    u0 = jax.tree.map(jnp.zeros_like, params)
    _, losses = jax.lax.scan(ascend, u0, length=steps)
    return jnp.maximum(losses.max(), base) - base


def filter_normalized_direction(params: Params, struct: Structure, key: jax.Array) -> Params:
    """A random direction whose every row (a unit's incoming weights: a "filter") has the norm of
    that row of θ; biases and s0 get zero (Li et al. 2018). W_rec's absent connections stay 0.

    References: Li, Xu, Taylor, Studer & Goldstein, "Visualizing the loss landscape of neural
    nets", NeurIPS 2018.
    """
    def scaled(p, z, m):
        if p.ndim < 2:
            return jnp.zeros_like(p)
        d = z * m
        row = lambda a: jnp.linalg.norm(a, axis=1, keepdims=True)
        return d * row(p) / jnp.maximum(row(d), 1e-30)

    return jax.tree.map(scaled, params, _standard_normal_like(params, key), _mask_tree(params, struct))


def loss_slice(cfg, params, struct, batch, directions: tuple[Params, ...], coords: jax.Array) -> jax.Array:
    """L(θ + Σ_k c_k d_k) at each row c of ``coords`` (n, len(directions)): 1-D slices with one
    direction, 2-D surfaces with two (pass a flattened grid). Points are evaluated one after the
    other (``lax.map``): memory stays that of one loss evaluation."""

    def at(c):
        p = params
        for ck, d in zip(c, directions):
            p = _add(p, d, ck)
        return exact_loss(cfg, p, struct, batch)

    return jax.lax.map(at, coords)
