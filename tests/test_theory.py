"""Update-map Jacobian Ĵ of a rule: equals H for BPTT; Arnoldi vs dense eigenvalues; the gain ρ."""

import jax
import numpy as np
import pytest

from cases import draw
from creditscape import model as M
from creditscape.curvature import dense_hessian, top_eigenvalues
from creditscape.rules import get_rule
from creditscape.theory import (
    dense_update_jacobian, estimate_on_block, jacobian_vector_product, leading_eigenvalues, stability_check,
)


@pytest.mark.parametrize("form", ["voltage", "rate"])
def test_bptt_update_jacobian_is_the_hessian(form):
    cfg = M.ModelConfig(3, 4, 2, form=form, alpha=0.3, activation="tanh")
    params, struct, batch, _ = draw(cfg, seed=1)
    for block in ("w_rec", "recurrent"):
        g, x0 = estimate_on_block(get_rule("bptt"), cfg, params, struct, (), batch, block, l2=0.01)
        J = np.asarray(dense_update_jacobian(g, x0))
        H = np.asarray(dense_hessian(cfg, params, struct, batch, block, l2=0.01))
        np.testing.assert_allclose(J, H, rtol=1e-9, atol=1e-12)


def test_arnoldi_matches_dense_eigenvalues_of_eprop_jacobian():
    cfg = M.ModelConfig(3, 5, 2, alpha=0.5, activation="tanh")
    params, struct, batch, _ = draw(cfg, seed=2, mask="every")
    g, x0 = estimate_on_block(get_rule("eprop"), cfg, params, struct, (), batch, "w_rec")
    J = np.asarray(dense_update_jacobian(g, x0))
    assert not np.allclose(J, J.T)  # non-symmetric
    dense = np.linalg.eigvals(J)
    dense = dense[np.argsort(-dense.real)][:4]
    arnoldi = leading_eigenvalues(lambda v: jacobian_vector_product(g, x0, v), x0.shape[0], k=4)
    np.testing.assert_allclose(np.sort_complex(arnoldi), np.sort_complex(dense), rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("name", ["eprop", "mdgl", "tbptt"])
def test_update_jacobian_matches_finite_differences_of_the_estimate(name):
    """Ĵv by forward mode equals central differences of ĝ (computed with the offline form)."""
    cfg = M.ModelConfig(3, 5, 2, form="rate", alpha=0.4, activation="tanh", cell_types=2)
    params, struct, batch, _ = draw(cfg, seed=4, mask="every")
    rule = get_rule(name)
    g_off, x0 = estimate_on_block(rule, cfg, params, struct, (), batch, "recurrent", form="offline")
    g_on, _ = estimate_on_block(rule, cfg, params, struct, (), batch, "recurrent", form="online")
    v = jax.random.normal(jax.random.PRNGKey(5), x0.shape)
    eps = 1e-5
    fd = (g_off(x0 + eps * v) - g_off(x0 - eps * v)) / (2 * eps)
    for g in (g_off, g_on):
        np.testing.assert_allclose(jacobian_vector_product(g, x0, v), fd, rtol=1e-6, atol=1e-9)


def test_gain_is_one_for_bptt_and_bounds():
    cfg = M.ModelConfig(3, 5, 2, alpha=0.2)
    params, struct, batch, _ = draw(cfg, seed=3)
    eig = top_eigenvalues(cfg, params, struct, batch, key=jax.random.PRNGKey(0), block="w_rec", steps=20)
    g, x0 = estimate_on_block(get_rule("bptt"), cfg, params, struct, (), batch, "w_rec")
    check = stability_check(lambda v: jacobian_vector_product(g, x0, v), eig.values[0], eig.vectors[0], 0.01)
    np.testing.assert_allclose(check.rho, 1.0, rtol=1e-6)
    np.testing.assert_allclose([check.bound_gd, check.bound_rule], [200.0, 200.0], rtol=1e-6)
    g_e, _ = estimate_on_block(get_rule("eprop"), cfg, params, struct, (), batch, "w_rec")
    rho_e = stability_check(lambda v: jacobian_vector_product(g_e, x0, v), eig.values[0], eig.vectors[0], 0.01).rho
    assert np.isfinite(rho_e) and not np.isclose(rho_e, 1.0)


@pytest.mark.parametrize("name", ["eprop", "mdgl"])
def test_jax_arnoldi_over_the_whole_space_gives_every_eigenvalue_of_the_dense_jacobian(name):
    import jax.numpy as jnp

    from creditscape.theory import arnoldi, ritz_values

    cfg = M.ModelConfig(3, 5, 2, alpha=0.5, activation="tanh", self_connections=True, dale_exc_fraction=0.6)
    params, struct, batch, _ = draw(cfg, seed=6, mask="every")
    g, x0 = estimate_on_block(get_rule(name), cfg, params, struct, (), batch, "w_rec", l2=0.01)
    dense = np.linalg.eigvals(np.asarray(dense_update_jacobian(g, x0)))
    start = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
    hess = jax.jit(lambda v: arnoldi(lambda u: jacobian_vector_product(g, x0, u), v, x0.shape[0]))(start)
    ritz = ritz_values(hess)
    assert len(ritz) == len(dense) and np.all(np.abs(ritz[:-1]) >= np.abs(ritz[1:]))
    np.testing.assert_allclose(np.sort_complex(ritz), np.sort_complex(dense), rtol=1e-7, atol=1e-9)
    # Vmapped over a stack of start vectors: the same matrices as one at a time.
    starts = jnp.stack([start, 2.0 * start + 1.0])
    stacked = jax.vmap(lambda v: arnoldi(lambda u: jacobian_vector_product(g, x0, u), v, 6))(starts)
    for i in range(2):
        one = arnoldi(lambda u: jacobian_vector_product(g, x0, u), starts[i], 6)
        np.testing.assert_allclose(stacked[i], one, rtol=1e-10, atol=1e-12)


def test_arnoldi_stops_at_an_invariant_subspace():
    import jax.numpy as jnp

    from creditscape.theory import arnoldi, ritz_values

    a = jnp.diag(jnp.array([3.0, -2.0, 0.5, 0.0, 0.0, 0.0]))
    start = jnp.array([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])  # lives in a 3-dimensional invariant subspace
    ritz = ritz_values(arnoldi(lambda v: a @ v, start, 6))
    np.testing.assert_allclose(ritz, [3.0, -2.0, 0.5], atol=1e-12)
