"""Curvature estimators against the dense Hessian (float64), and vmapped == per-seed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cases import draw
from conftest import needs_mnist
from creditscape import model as M
from creditscape.curvature import (block_loss, dense_hessian, hvp, lanczos, lanczos_tridiagonal,
                                   top_eigenvalues, top_tridiagonal_eigenvalues)


@pytest.mark.parametrize("form", ["voltage", "rate"])
@pytest.mark.parametrize("block", ["all", "recurrent", "w_rec"])
def test_hvp_and_lanczos_match_dense(form, block):
    cfg = M.ModelConfig(3, 5, 2, form=form, alpha=0.3, activation="tanh")
    params, struct, batch, _ = draw(cfg, seed=1, mask="every")
    H = np.asarray(dense_hessian(cfg, params, struct, batch, block, l2=0.01))
    np.testing.assert_allclose(H, H.T, atol=1e-12)
    f, x0 = block_loss(cfg, params, struct, batch, block, l2=0.01)
    v = np.asarray(jax.random.normal(jax.random.PRNGKey(2), x0.shape))
    np.testing.assert_allclose(hvp(f, x0, jnp.asarray(v)), H @ v, rtol=1e-10, atol=1e-13)
    dense = np.sort(np.linalg.eigvalsh(H))[::-1]
    eig = lanczos(lambda u: hvp(f, x0, u), jax.random.normal(jax.random.PRNGKey(3), x0.shape), x0.shape[0], k=3)
    np.testing.assert_allclose(eig.values, dense[:3], rtol=1e-6)
    v1 = np.asarray(eig.vectors[0])
    np.testing.assert_allclose(H @ v1, dense[0] * v1, atol=1e-6 * abs(dense[0]))


@pytest.mark.parametrize("connectivity", [1.0, 0.6])
def test_l2_shifts_every_eigenvalue_of_the_existing_weights(connectivity):
    """Absent weights (here the diagonal, and a sparse mask) are directions of zero curvature,
    with or without L2; on the existing ones L2 shifts every eigenvalue by its coefficient."""
    cfg = M.ModelConfig(3, 4, 2, connectivity=connectivity)
    params, struct, batch, _ = draw(cfg, seed=4)
    existing = np.asarray(struct.rec_mask).ravel() == 1
    a = np.asarray(dense_hessian(cfg, params, struct, batch, "w_rec"))
    b = np.asarray(dense_hessian(cfg, params, struct, batch, "w_rec", l2=0.5))
    for h in (a, b):
        np.testing.assert_array_equal(h[~existing], 0.0)
        np.testing.assert_array_equal(h[:, ~existing], 0.0)
    sub = np.ix_(existing, existing)
    np.testing.assert_allclose(np.linalg.eigvalsh(b[sub]), np.linalg.eigvalsh(a[sub]) + 0.5, atol=1e-10)


def test_vmapped_over_seeds_equals_per_seed():
    cfg = M.ModelConfig(3, 5, 2, alpha=0.2)
    _, _, batch, _ = draw(cfg, seed=5)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    params, structs = jax.vmap(lambda k: M.init(cfg, k, jnp.float64))(keys)
    f = lambda p, s, k: top_eigenvalues(cfg, p, s, batch, key=k, steps=10, k=2).values
    stacked = jax.jit(jax.vmap(f))(params, structs, keys)
    for i in range(3):
        one = f(jax.tree.map(lambda a: a[i], params), jax.tree.map(lambda a: a[i], structs), keys[i])
        np.testing.assert_allclose(stacked[i], one, rtol=1e-10)


def _small_hessian(seed=6):
    cfg = M.ModelConfig(3, 5, 2, form="rate", alpha=0.5, activation="tanh")
    params, struct, batch, _ = draw(cfg, seed=seed, mask="every")
    f, x0 = block_loss(cfg, params, struct, batch, "recurrent", l2=0.0)
    H = np.asarray(dense_hessian(cfg, params, struct, batch, "recurrent"))
    return (lambda v: hvp(f, x0, v)), x0.shape[0], H


def test_power_iteration_signed_rayleigh_quotient():
    from creditscape.curvature import power_iteration

    matvec, dim, H = _small_hessian()
    vals = np.linalg.eigvalsh(H)
    dominant = vals[np.argmax(np.abs(vals))]
    res = power_iteration(matvec, jnp.ones(dim), rtol=1e-12, max_iter=5000)
    np.testing.assert_allclose(res.value, dominant, rtol=1e-6)
    # A matrix whose dominant eigenvalue is negative: the sign is kept.
    A = jnp.diag(jnp.array([-3.0, 1.0, 2.0]))
    np.testing.assert_allclose(power_iteration(lambda v: A @ v, jnp.ones(3), rtol=1e-14).value, -3.0, rtol=1e-8)


def test_trace_estimators_converge_within_reported_error():
    from creditscape.curvature import hutch_plus_plus, hutchinson

    _, dim, H = _small_hessian()
    matvec = jax.jit(lambda v: jnp.asarray(H) @ v)  # the estimator is under test here, not the HVP
    exact = np.trace(H)
    for estimator in (hutchinson, hutch_plus_plus):
        est = estimator(matvec, dim, 60, jax.random.PRNGKey(1))
        assert abs(est.value - exact) < 4 * est.stderr + 1e-10, (estimator.__name__, est, exact)
        big = estimator(matvec, dim, 600, jax.random.PRNGKey(2))
        assert big.stderr < est.stderr  # the reported error shrinks with the budget
    full = hutch_plus_plus(matvec, dim, 3 * dim, jax.random.PRNGKey(3))  # sketch spans everything
    np.testing.assert_allclose(full.value, exact, rtol=1e-8)


def test_slq_moments_match_dense():
    from creditscape.curvature import spectral_density

    _, dim, H = _small_hessian()
    matvec = jax.jit(lambda v: jnp.asarray(H) @ v)  # the estimator is under test here, not the HVP
    dens = spectral_density(matvec, dim, steps=dim, n_vectors=200, key=jax.random.PRNGKey(4))
    np.testing.assert_allclose(dens.weights.sum(axis=1), 1.0, rtol=1e-10)
    lam = np.linalg.eigvalsh(H)
    for p in (1, 2, 3):
        exact = np.mean(lam**p)
        scale = np.mean(np.abs(lam) ** p)
        assert abs(dens.moment(p) - exact) < 0.25 * scale, (p, dens.moment(p), exact)
    # With a full Krylov space each quadrature node set is the spectrum itself.
    np.testing.assert_allclose(np.sort(dens.nodes[0]), lam, rtol=1e-6, atol=1e-9)


def test_every_estimator_vmapped_over_seeds_equals_per_seed():
    from creditscape.curvature import hutch_plus_plus, hutchinson, power_iteration, spectral_density
    from creditscape.sharpness import filter_normalized_direction, loss_slice, random_sharpness, worst_case_sharpness

    cfg = M.ModelConfig(3, 5, 2, alpha=0.2, activation="tanh")
    _, _, batch, _ = draw(cfg, seed=7)
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    params, structs = jax.vmap(lambda k: M.init(cfg, k, jnp.float64))(keys)

    def estimates(p, s, k):
        f, x0 = block_loss(cfg, p, s, batch, "recurrent", l2=0.01)
        mv = lambda v: hvp(f, x0, v)
        d = filter_normalized_direction(p, s, k)
        return {
            "power": power_iteration(mv, jnp.ones_like(x0), rtol=1e-8, max_iter=200).value,
            "hutchinson": hutchinson(mv, x0.shape[0], 12, k).value,
            "hutch++": hutch_plus_plus(mv, x0.shape[0], 12, k).value,
            "slq": spectral_density(mv, x0.shape[0], 8, 3, k).nodes,
            "random_sharpness": random_sharpness(cfg, p, s, batch, 0.05, key=k, n_samples=4).value,
            "worst_case": worst_case_sharpness(cfg, p, s, batch, 0.05, steps=3),
            "slice": loss_slice(cfg, p, s, batch, (d,), jnp.linspace(-1, 1, 5)[:, None]),
        }

    stacked = jax.jit(jax.vmap(estimates))(params, structs, keys)
    per_seed = jax.jit(estimates)  # one seed's program, without vmap
    for i in range(3):
        one = per_seed(jax.tree.map(lambda a: a[i], params), jax.tree.map(lambda a: a[i], structs), keys[i])
        for name in one:
            np.testing.assert_allclose(stacked[name][i], one[name], rtol=1e-9, atol=1e-12, err_msg=name)


def test_lanczos_stops_at_an_exhausted_krylov_space():
    # Three distinct eigenvalues: the Krylov space of any start vector is 3-dimensional, and
    # asking for 8 steps must not invent Ritz values from rounding noise (float32 here).
    # Full-precision products: on a GPU, TF32's would move A's eigenvalues apart by 1e-3 and the
    # space would no longer be exhausted at 3 (seen on an H200).
    vals = jnp.array([5.0, 5.0, 5.0, 2.0, 2.0, -1.0, -1.0, -1.0], jnp.float32)
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(0), (8, 8), jnp.float32))
    with jax.default_matmul_precision("highest"):
        A = (q * vals) @ q.T
        for seed in range(5):
            eig = lanczos(lambda v: A @ v, jax.random.normal(jax.random.PRNGKey(seed), (8,), jnp.float32), 8, k=3)
            np.testing.assert_allclose(eig.values, [5.0, 2.0, -1.0], rtol=1e-4)


@pytest.mark.parametrize("case", ["random", "repeated", "decoupled"])
def test_sturm_bisection_gives_the_top_eigenvalues_of_every_leading_block(case):
    rng = np.random.default_rng(["random", "repeated", "decoupled"].index(case))
    n = 12
    a, b = rng.normal(size=n) * 5, rng.normal(size=n)
    if case == "repeated":  # equal diagonals, zero couplings in between: eigenvalues of multiplicity 3
        a, b = np.repeat([4.0, -1.0, 2.0, 4.0], 3), np.where(np.arange(n) % 3 == 2, 0.0, 1e-300)
    if case == "decoupled":
        b[[3, 7]] = 0.0
    for size in (1, 2, 5, n):
        T = np.diag(a[:size]) + np.diag(b[:size - 1], 1) + np.diag(b[:size - 1], -1)
        dense = np.sort(np.linalg.eigvalsh(T))[::-1][:3]
        got = np.asarray(top_tridiagonal_eigenvalues(jnp.asarray(a), jnp.asarray(b), size, 3))
        np.testing.assert_allclose(got[:size], dense, rtol=1e-12, atol=1e-12 * np.abs(a).max())
        assert np.all(np.isneginf(got[size:]))


def test_lanczos_with_a_tolerance_stops_once_the_top_values_settle_and_stays_a_lanczos_decomposition():
    rng = np.random.default_rng(3)
    dim = 300
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    lam = np.concatenate([[50.0, 40.0], rng.uniform(-10, 10, dim - 2)])
    A = jnp.asarray((q * lam) @ q.T)
    matvec = lambda v: A @ v  # noqa: E731
    near_top = jnp.asarray(q[:, 0] + 0.1 * rng.normal(size=dim) / np.sqrt(dim))  # a warm start
    random_start = jnp.asarray(rng.normal(size=dim))
    for v0, most in ((near_top, 12), (random_start, 40)):
        full = lanczos(matvec, v0, 60, 2)
        early = lanczos(matvec, v0, 60, 2, tol=1e-10)
        assert int(full.steps) == 60 and 2 <= int(early.steps) <= most, int(early.steps)
        np.testing.assert_allclose(early.values, [50.0, 40.0], rtol=1e-8)
        np.testing.assert_allclose(early.values, full.values, rtol=1e-8)
        # Stopped like an exhausted space: Q A Qᵀ = T on the live block, zeros after it.
        tri, basis = lanczos_tridiagonal(matvec, v0, 60, tol=1e-10, k=2)
        m = int(early.steps)
        Q = np.asarray(basis)
        np.testing.assert_allclose(Q[:m] @ np.asarray(A) @ Q[:m].T, np.asarray(tri)[:m, :m], atol=1e-10)
        assert not np.any(Q[m:]) and not np.any(np.asarray(tri)[m:])
    # vmapped over starts that stop at different steps: each as if alone.
    stacked = jax.vmap(lambda v: lanczos(matvec, v, 60, 2, tol=1e-10))(jnp.stack([near_top, random_start]))
    for i, v0 in enumerate((near_top, random_start)):
        alone = lanczos(matvec, v0, 60, 2, tol=1e-10)
        assert int(stacked.steps[i]) == int(alone.steps)
        np.testing.assert_allclose(stacked.values[i], alone.values, rtol=1e-12)
    with pytest.raises(ValueError, match="tol"):
        lanczos(matvec, v0, 60, 2, tol=1.5)


@needs_mnist
def test_twenty_lanczos_steps_find_the_top_eigenvalue_of_a_trained_smnist_network():
    """What runs measure (20 steps on the 16,384-dimensional W_rec block of the paper's network,
    from a random start, float32) against a converged top eigenvalue, on a network trained on real
    MNIST with the paper's optimizer (its top two eigenvalues are then ≈ 600 and 280)."""
    from conftest import MNIST_DIR

    from creditscape.rules import get_rule
    from creditscape.tasks import get_task, make_splits
    from creditscape.train import TrainConfig, train_ensemble

    task = get_task("smnist", mnist_dir=str(MNIST_DIR))
    splits = make_splits(task, 512, 16, seed=0)
    cfg = M.ModelConfig(task.n_in, 128, task.n_out, form="rate", bias=False, readout_steps=task.readout_steps)
    tcfg = TrainConfig(optimizer="sgd", learning_rate=0.01, batch_size=64, l2=0.01, steps=150, eval_every=150)
    res = train_ensemble(cfg, get_rule("bptt"), tcfg, [0], splits.train, progress=False)
    params, struct = jax.tree.map(lambda a: a[0], (res.params, res.structs))
    batch = jax.tree.map(lambda a: jnp.asarray(a[:256]), splits.train)
    f, x0 = block_loss(cfg, params, struct, batch, "w_rec", l2=0.01)
    assert x0.shape == (128 * 128,) and x0.dtype == jnp.float32
    matvec = jax.jit(lambda v: hvp(f, x0, v))
    start = lambda seed: jax.random.normal(jax.random.PRNGKey(seed), x0.shape, x0.dtype)
    converged = lanczos(matvec, start(1), 80).values[0]
    np.testing.assert_allclose(lanczos(matvec, start(2), 60).values[0], converged, rtol=1e-5)
    for seed in (10, 11):
        np.testing.assert_allclose(lanczos(matvec, start(seed), 20).values[0], converged, rtol=1e-3)
