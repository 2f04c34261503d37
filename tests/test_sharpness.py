"""Sharpness measures against the dense Hessian and against each other."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from cases import draw
from creditscape import model as M
from creditscape.curvature import dense_hessian
from creditscape.objective import exact_loss
from creditscape.sharpness import filter_normalized_direction, loss_slice, random_sharpness, worst_case_sharpness

CFG = M.ModelConfig(3, 5, 2, alpha=0.3, activation="tanh", connectivity=0.8)


def _setup():
    params, struct, batch, _ = draw(CFG, seed=21, mask="every")
    return params, struct, batch


def test_random_sharpness_matches_hessian_trace_at_small_scale():
    params, struct, batch = _setup()
    scale = 1e-3
    H = np.asarray(dense_hessian(CFG, params, struct, batch, "all"))
    mask = jax.tree.map(jnp.ones_like, params)._replace(w_rec=struct.rec_mask)
    var = jax.tree.map(lambda p, m: (scale * jnp.sqrt(jnp.mean(p**2))) ** 2 * m * jnp.ones_like(p), params, mask)
    expected = 0.5 * np.sum(np.asarray(ravel_pytree(var)[0]) * np.diag(H))
    est = random_sharpness(CFG, params, struct, batch, scale, key=jax.random.PRNGKey(0), n_samples=4000)
    assert abs(est.value - expected) < 4 * est.stderr + 1e-3 * abs(expected), (est, expected)


def test_worst_case_dominates_random_directions_and_grows_with_radius():
    params, struct, batch = _setup()
    base = exact_loss(CFG, params, struct, batch)
    small = worst_case_sharpness(CFG, params, struct, batch, 0.05)
    large = worst_case_sharpness(CFG, params, struct, batch, 0.2)
    assert 0 <= small <= large
    weight = jax.tree.map(jnp.abs, params)._replace(w_rec=jnp.abs(params.w_rec) * struct.rec_mask)
    for k in jax.random.split(jax.random.PRNGKey(1), 20):
        u = jax.tree.map(lambda p: jax.random.normal(k, p.shape), params)
        n = jnp.sqrt(sum(jnp.sum(a**2) for a in jax.tree.leaves(u)))
        p = jax.tree.map(lambda a, b, w: a + 0.05 * b / n * w, params, u, weight)
        assert exact_loss(CFG, p, struct, batch) - base <= small + 1e-12


def test_filter_normalized_slices():
    params, struct, batch = _setup()
    d = filter_normalized_direction(params, struct, jax.random.PRNGKey(2))
    for p, q in ((params.w_in, d.w_in), (params.w_rec, d.w_rec), (params.w_out, d.w_out)):
        np.testing.assert_allclose(jnp.linalg.norm(q, axis=1), jnp.linalg.norm(p, axis=1), rtol=1e-10)
    assert np.all(d.w_rec[struct.rec_mask == 0] == 0) and np.all(d.b == 0) and np.all(d.b_out == 0)
    h = 1e-4
    vals = loss_slice(CFG, params, struct, batch, (d,), jnp.array([[-h], [0.0], [h]]))
    np.testing.assert_allclose(vals[1], exact_loss(CFG, params, struct, batch), rtol=1e-14)
    flat_d = np.asarray(ravel_pytree(d)[0])
    curvature = flat_d @ np.asarray(dense_hessian(CFG, params, struct, batch, "all")) @ flat_d
    np.testing.assert_allclose((vals[0] - 2 * vals[1] + vals[2]) / h**2, curvature, rtol=1e-4)
    e = filter_normalized_direction(params, struct, jax.random.PRNGKey(3))
    grid = jnp.stack(jnp.meshgrid(jnp.linspace(-1, 1, 5), jnp.linspace(-1, 1, 5)), -1).reshape(-1, 2)
    surface = loss_slice(CFG, params, struct, batch, (d, e), grid)
    assert surface.shape == (25,) and np.all(np.isfinite(surface))
