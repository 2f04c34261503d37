"""Generalization measures against closed forms on quadratics and linear models, and against
dense Hessians (float64; statistical tolerances from each estimate's own standard error)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from jax.flatten_util import ravel_pytree

from cases import B, N_IN, N_OUT, N_REC, draw
from creditscape import model as M
from creditscape.curvature import existing_weights
from creditscape.generalization_measures import (
    MEASURES,
    distance_from_initialization,
    network_measures,
    fisher_rao_norm,
    hessian_diagonal,
    log_path_norm,
    normalized_sharpness,
    pac_bayes_flatness,
    relative_flatness,
    spectral_norm_product,
)
from creditscape.objective import exact_loss

jax.config.update("jax_enable_x64", True)


def _quadratic(seed, n=20):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    m = jax.random.normal(k1, (n, n))
    a = m @ m.T / n + 0.1 * jnp.eye(n)
    b = jax.random.normal(k2, (n,))
    theta = jax.random.normal(k3, (n,))
    return a, (lambda x: 0.5 * x @ a @ x + b @ x), theta


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("magnitude_aware", [False, True])
def test_pac_bayes_flatness_on_a_quadratic_is_the_closed_form(seed, magnitude_aware):
    """E[f(θ + σ s⊙ξ)] − f(θ) = ½σ² Σ_i A_ii s_i² exactly; the Monte Carlo σ must agree within the
    sampling error of the estimate it stopped at."""
    a, f, theta = _quadratic(seed)
    bound = 0.05
    res = pac_bayes_flatness(f, theta, jax.random.PRNGKey(100 + seed), bound=bound, draws=2048,
                             magnitude_aware=magnitude_aware, sigma_max=10.0)
    s2 = theta**2 if magnitude_aware else jnp.ones_like(theta)
    curvature = float(jnp.sum(jnp.diag(a) * s2))
    assert not res.capped and abs(float(res.increase) / bound - 1) < 1e-6  # bisection converged
    exact_at_sigma = 0.5 * float(res.sigma) ** 2 * curvature
    assert abs(exact_at_sigma - bound) < 4 * float(res.stderr), (exact_at_sigma, bound, float(res.stderr))
    sigma_exact = np.sqrt(2 * bound / curvature)
    # σ ∝ √Δ, so 4 standard errors of Δ are 2·stderr/bound of σ, relatively
    assert abs(float(res.sigma) / sigma_exact - 1) < 2 * float(res.stderr) / bound


def test_pac_bayes_flatness_caps_a_flat_loss_and_vmaps_over_members():
    flat = pac_bayes_flatness(lambda x: jnp.sum(0.0 * x), jnp.ones(5), jax.random.PRNGKey(0), bound=0.1,
                              sigma_max=2.0)
    assert bool(flat.capped) and float(flat.sigma) == 2.0
    a, f, _ = _quadratic(3, n=8)
    thetas = jax.random.normal(jax.random.PRNGKey(4), (3, 8))
    keys = jax.random.split(jax.random.PRNGKey(5), 3)
    together = jax.vmap(lambda t, k: pac_bayes_flatness(f, t, k, bound=0.02, draws=32))(thetas, keys)
    for i in range(3):
        alone = pac_bayes_flatness(f, thetas[i], keys[i], bound=0.02, draws=32)
        np.testing.assert_allclose(together.sigma[i], alone.sigma, rtol=1e-12)


def test_relative_flatness_is_the_weighted_dense_hessian_trace():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    x, y = jax.random.normal(k1, (32, 10)), jax.random.normal(k2, (32,))
    w = 0.5 * jax.random.normal(k3, (10,))

    def f(w):  # a one-layer tanh regression: a non-quadratic loss
        return jnp.mean((jnp.tanh(x @ w) - y) ** 2)

    kappa, stderr = relative_flatness(f, w, jax.random.PRNGKey(1), probes=30)
    dense = float(jnp.sum(w**2) * jnp.trace(jax.hessian(f)(w)))
    assert abs(float(kappa) - dense) <= 4 * float(stderr) + 1e-9 * abs(dense), (float(kappa), dense)
    # Invariant to rescaling the layer when the loss is: f(w) = g(λw) rescaled back.
    lam = 3.0
    kappa_scaled, _ = relative_flatness(lambda v: f(v / lam), lam * w, jax.random.PRNGKey(1), probes=30)
    np.testing.assert_allclose(kappa_scaled, kappa, rtol=1e-9)


def test_fisher_rao_norm_of_a_linear_model_is_the_closed_form():
    """ℓ_b(θ) = (x_bᵀθ − y_b)²: ⟨θ, ∇ℓ_b⟩ = 2 (x_bᵀθ − y_b) x_bᵀθ."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(7), 3)
    x, y, theta = jax.random.normal(k1, (50, 6)), jax.random.normal(k2, (50,)), jax.random.normal(k3, (6,))
    measured = fisher_rao_norm(lambda t: (x @ t - y) ** 2, theta)
    pred = x @ theta
    np.testing.assert_allclose(measured, jnp.sqrt(jnp.mean((2 * (pred - y) * pred) ** 2)), rtol=1e-12)


def test_norm_measures_against_numpy():
    rng = np.random.default_rng(0)
    mats = [rng.normal(size=s) for s in [(8, 3), (8, 8), (2, 8)]]
    np.testing.assert_allclose(spectral_norm_product(*map(jnp.asarray, mats)),
                               np.prod([np.linalg.svd(m, compute_uv=False)[0] for m in mats]), rtol=1e-12)
    a, b = rng.normal(size=30), rng.normal(size=30)
    np.testing.assert_allclose(distance_from_initialization(jnp.asarray(a), jnp.asarray(b)),
                               np.sqrt(np.sum((a - b) ** 2)), rtol=1e-12)


def test_network_measures_vmap_over_members_and_agree_with_direct_computations():
    cfg = M.ModelConfig(N_IN, N_REC, N_OUT, alpha=0.3, activation="tanh", connectivity=0.7, dale_exc_fraction=0.6)
    members = [draw(cfg, seed, mask="every") for seed in (0, 1)]
    batch = members[0][2]
    params = jax.tree.map(lambda *a: jnp.stack(a), *(m[0] for m in members))
    structs = jax.tree.map(lambda *a: jnp.stack(a), *(m[1] for m in members))
    keys = jax.random.split(jax.random.PRNGKey(3), 2)

    @jax.jit
    def one(p, s, k, p0):
        return network_measures(cfg, p, s, batch, p0, k, bound=0.05, draws=16, probes=12)

    together = jax.vmap(one, in_axes=(0, 0, 0, None))(params, structs, keys, members[0][0])
    assert set(together) == set(MEASURES)
    for i, (p, s, _, _) in enumerate(members):
        alone = one(p, s, keys[i], members[0][0])
        for name in MEASURES:
            np.testing.assert_allclose(together[name][i], alone[name], rtol=1e-10, err_msg=name)
        w = existing_weights(p, s)
        np.testing.assert_allclose(alone["spectral_norm_product"], np.prod(
            [np.linalg.svd(np.asarray(a), compute_uv=False)[0] for a in (w.w_in, w.w_rec, w.w_out)]), rtol=1e-10)
        # The Fisher–Rao norm from the per-sequence gradients, one sequence at a time.
        theta, unravel = ravel_pytree(w)
        along = [theta @ jax.grad(lambda t, b=b: exact_loss(cfg, unravel(t), s, jax.tree.map(lambda a: a[b:b + 1], batch)))(theta)
                 for b in range(B)]
        np.testing.assert_allclose(alone["fisher_rao_norm"], np.sqrt(np.mean(np.square(along))), rtol=1e-10)
        # Normalized sharpness from the dense Hessian's diagonal, layer by layer.
        dense_diag = np.diagonal(jax.hessian(lambda t: exact_loss(cfg, unravel(t), s, batch))(theta))
        diag = unravel(jnp.asarray(dense_diag))
        np.testing.assert_allclose(alone["normalized_sharpness"], sum(
            normalized_sharpness(getattr(w, n), getattr(diag, n)) for n in ("w_in", "w_rec", "w_out")), rtol=1e-9)
        np.testing.assert_allclose(alone["log_path_norm"], log_path_norm(cfg, p, s, batch.x.shape[1]), rtol=1e-12)
    assert float(together["distance_from_init"][0]) == 0.0 and float(together["distance_from_init"][1]) > 0


def _positive_matrices(seed, shape):
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape), rng.uniform(0.1, 2.0, size=shape)


@pytest.mark.parametrize("seed", [0, 1])
def test_normalized_sharpness_is_the_minimum_over_row_and_column_scales(seed):
    """Against a generic minimizer of the same objective over (log σ, log σ'), written out."""
    w, h = _positive_matrices(seed, (4, 3))

    def objective(z):
        s2 = np.exp(z[:4])[:, None] * np.exp(z[4:])[None, :]  # (σ_i σ'_j)²
        return np.sum(h * s2 + w**2 / s2)

    direct = scipy.optimize.minimize(objective, np.zeros(7), method="BFGS", options={"gtol": 1e-12}).fun
    np.testing.assert_allclose(normalized_sharpness(jnp.asarray(w), jnp.asarray(h)), direct, rtol=1e-9)


def test_normalized_sharpness_closed_form_and_invariance():
    w, h = _positive_matrices(2, (5, 1))
    # One column: each row has its own scale, so the minimum is Σ_i 2|w_i|√h_i.
    np.testing.assert_allclose(normalized_sharpness(jnp.asarray(w), jnp.asarray(h)),
                               2 * np.sum(np.abs(w) * np.sqrt(h)), rtol=1e-12)
    # Scaling rows by λ and columns by μ, with the curvature scaled to match, changes nothing.
    w, h = _positive_matrices(3, (4, 6))
    lam, mu = np.exp(np.random.default_rng(4).normal(size=(2, 10)))
    scale = lam[:4, None] * mu[None, :6]
    np.testing.assert_allclose(normalized_sharpness(jnp.asarray(w * scale), jnp.asarray(h / scale**2)),
                               normalized_sharpness(jnp.asarray(w), jnp.asarray(h)), rtol=1e-9)
    # A row without curvature costs nothing (its scale goes to infinity), and stays finite.
    h[0] = 0.0
    value = float(normalized_sharpness(jnp.asarray(w), jnp.asarray(h)))
    assert np.isfinite(value) and value < float(normalized_sharpness(jnp.asarray(w), jnp.asarray(h + 1e-3)))


def test_hessian_diagonal_is_the_dense_one():
    x = jax.random.normal(jax.random.PRNGKey(0), (11,))
    f = lambda v: jnp.sum(jnp.tanh(v) ** 3) + jnp.sum(jnp.outer(v, v) ** 2)
    np.testing.assert_allclose(hessian_diagonal(f, x, chunk=4), jnp.diagonal(jax.hessian(f)(x)), rtol=1e-12)


def _brute_force_path_sum(cfg, p, n_steps):
    """Σ over paths of Π c², by recursion over (unit, step) written from the definition."""
    a, w_in, w_rec, w_out = cfg.alpha, *(np.asarray(m) for m in (p.w_in, p.w_rec, p.w_out))
    b = None if p.b is None else np.asarray(p.b)

    def into(i, t):  # paths ending in unit i at step t (t = 0: the initial state)
        if t == 0:
            return 0.0 if p.s0 is None else float(p.s0[i]) ** 2
        total = a**2 * into(i, t - 1)  # the leak
        total += (1 - a) ** 2 * sum(w_rec[i, j] ** 2 * into(j, t - 1) for j in range(cfg.n_rec))
        total += (1 - a) ** 2 * (np.sum(w_in[i] ** 2) + (0.0 if b is None else b[i] ** 2))
        return total

    first = n_steps - (cfg.readout_steps or n_steps)
    return sum(np.sum(w_out[k] ** 2 * np.array([into(i, t) for i in range(cfg.n_rec)])) + float(p.b_out[k]) ** 2
               for t in range(first + 1, n_steps + 1) for k in range(cfg.n_out))


@pytest.mark.parametrize("case", ["leak-s0-readout", "dense"])
def test_log_path_norm_is_the_path_sum(case):
    if case == "dense":
        cfg = M.ModelConfig(N_IN, 3, N_OUT, activation="relu")
    else:
        cfg = M.ModelConfig(N_IN, 3, N_OUT, alpha=0.4, learn_init_state=True, readout_steps=2,
                            connectivity=0.7, self_connections=True)
    params, struct, _, _ = draw(cfg, 5)
    p = existing_weights(params, struct)
    np.testing.assert_allclose(log_path_norm(cfg, params, struct, 4), 0.5 * np.log(_brute_force_path_sum(cfg, p, 4)),
                               rtol=1e-12)
    if case == "dense":  # Jiang et al.'s recipe: the ReLU network with squared parameters on ones
        squared = jax.tree.map(jnp.square, p)
        y = M.outputs(cfg, squared, struct, jnp.ones((1, 4, N_IN)))
        np.testing.assert_allclose(log_path_norm(cfg, params, struct, 4), 0.5 * np.log(np.sum(y)), rtol=1e-12)
    # Long sequences stay finite where the plain sum overflows.
    assert np.isfinite(float(log_path_norm(cfg, jax.tree.map(lambda a: 30 * a, params), struct, 2000)))
