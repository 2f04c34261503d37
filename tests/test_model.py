"""The forward pass against a plain numpy transcription of DESIGN.md §2; init; constraints."""

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from creditscape import model as M

NP_PHI = {"relu": lambda z: np.maximum(z, 0), "tanh": np.tanh, "softplus": lambda z: np.log1p(np.exp(z))}


def numpy_run(cfg, params, mask, x, xi, leaks=None):
    """DESIGN.md §2 transcribed with loops (one sequence at a time); ``leaks``: per-unit α."""
    p = {k: (None if v is None else np.asarray(v)) for k, v in params._asdict().items()}
    phi, a = NP_PHI[cfg.activation], (cfg.alpha if leaks is None else np.asarray(leaks))
    W = p["w_rec"] * np.asarray(mask)
    out = np.zeros(x.shape[:2] + (cfg.n_rec,))
    for b in range(x.shape[0]):
        s = np.zeros(cfg.n_rec) if p["s0"] is None else p["s0"].copy()
        r = phi(s) if cfg.form == "voltage" else s
        for t in range(x.shape[1]):
            u = W @ r + p["w_in"] @ x[b, t] + (0 if p["b"] is None else p["b"]) + (0 if xi is None else xi[b, t])
            if cfg.form == "voltage":
                s = a * s + (1 - a) * u
                r = phi(s)
            else:
                r = a * r + (1 - a) * phi(u)
            out[b, t] = r
    return out


@pytest.mark.parametrize("form", ["voltage", "rate"])
@pytest.mark.parametrize("activation", ["relu", "tanh", "softplus"])
@pytest.mark.parametrize("alpha", [0.0, 0.6])
@pytest.mark.parametrize("extras", [{}, {"dale_exc_fraction": 0.75, "connectivity": 0.5, "learn_init_state": True}])
def test_forward_matches_numpy_transcription(form, activation, alpha, extras):
    cfg = M.ModelConfig(4, 8, 3, form=form, activation=activation, alpha=alpha, **extras)
    k = jax.random.split(jax.random.PRNGKey(0), 5)
    params, struct = M.init(cfg, k[0], jnp.float64)
    params = params._replace(b=0.3 * jax.random.normal(k[1], (8,)))
    if params.s0 is not None:
        params = params._replace(s0=jax.random.normal(k[2], (8,)))
    x = np.asarray(jax.random.normal(k[3], (2, 7, 4)))
    xi = np.asarray(0.1 * jax.random.normal(k[4], (2, 7, 8)))
    _, r, _ = M.run(cfg, params, struct, jnp.asarray(x), jnp.asarray(xi))
    np.testing.assert_allclose(r, numpy_run(cfg, params, struct.rec_mask, x, xi), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("form", ["voltage", "rate"])
def test_heterogeneous_time_constants(form):
    """Per-unit leaks α_i = α^exp(−σ z_i): log-normal time constants around τ, drawn with the
    structure, used unit by unit in the forward pass."""
    cfg = M.ModelConfig(4, 400, 3, form=form, alpha=0.8, leak_spread=0.5, activation="tanh")
    params, struct = M.init(cfg, jax.random.PRNGKey(1), jnp.float64)
    log_tau = np.log(-1 / np.log(np.asarray(struct.leak)))  # τ/dt of every unit
    assert abs(np.median(log_tau) - np.log(-1 / np.log(0.8))) < 0.1 and abs(np.std(log_tau) - 0.5) < 0.05
    homogeneous = M.init(dataclasses.replace(cfg, leak_spread=0.0), jax.random.PRNGKey(1), jnp.float64)
    assert homogeneous[1].leak is None and np.array_equal(homogeneous[1].rec_mask, struct.rec_mask)
    small = dataclasses.replace(cfg, n_rec=8)
    params, struct = M.init(small, jax.random.PRNGKey(2), jnp.float64)
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (2, 7, 4)))
    _, r, _ = M.run(small, params, struct, jnp.asarray(x))
    np.testing.assert_allclose(r, numpy_run(small, params, struct.rec_mask, x, None, struct.leak), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="alpha > 0"):
        M.ModelConfig(4, 8, 3, leak_spread=0.5)


def test_paper_initialization_statistics():
    cfg = M.ModelConfig(28, 400, 10)
    params, struct = M.init(cfg, jax.random.PRNGKey(1), jnp.float64)
    assert abs(np.std(params.w_in) - np.sqrt(2 / 28)) < 0.01
    off_diag = np.asarray(params.w_rec)[~np.eye(400, dtype=bool)]
    assert abs(off_diag.std() - np.sqrt(2 / 400)) < 0.002
    limit = np.sqrt(6 / 410)
    assert np.abs(params.w_out).max() <= limit and np.abs(params.w_out).max() > 0.9 * limit
    assert np.all(params.b_out == 0) and np.all(params.b == 0) and params.s0 is None
    assert np.all(np.diag(params.w_rec) == 0)  # no self-connections by default


def test_dale_structure_and_projection():
    cfg = M.ModelConfig(3, 10, 2, dale_exc_fraction=0.8, connectivity=0.6)
    params, struct = M.init(cfg, jax.random.PRNGKey(2))
    assert cfg.n_exc == 8 and list(np.asarray(struct.cell_type)) == [0] * 8 + [1] * 2
    w = np.asarray(params.w_rec)
    sign = np.asarray(struct.sign)
    assert np.all(w * sign[None, :] >= 0)
    assert np.all(w[np.asarray(struct.rec_mask) == 0] == 0)
    flipped = params._replace(w_rec=-params.w_rec + 0.01)
    projected = np.asarray(M.project(cfg, flipped, struct).w_rec)
    assert np.all(projected * sign[None, :] >= 0)
    assert np.all(projected[np.asarray(struct.rec_mask) == 0] == 0)


def test_dale_initialization_is_balanced_and_keeps_he_variance():
    """Expected input zero (E and I columns balance) and mean squared weight 2/N, as He's init."""
    n = 400
    cfg = M.ModelConfig(3, n, 2, dale_exc_fraction=0.8, self_connections=True)
    params, struct = M.init(cfg, jax.random.PRNGKey(5), jnp.float64)
    w = np.asarray(params.w_rec)
    np.testing.assert_allclose(np.mean(w**2), 2.0 / n, rtol=0.03)
    exc, inh = w[:, : cfg.n_exc], w[:, cfg.n_exc :]
    np.testing.assert_allclose(exc.sum(1).mean() + inh.sum(1).mean(), 0.0, atol=0.05 * exc.sum(1).mean())
    np.testing.assert_allclose(-inh.mean() / exc.mean(), 4.0, rtol=0.05)


def test_from_tau_and_validation():
    cfg = M.ModelConfig.from_tau(tau=10.0, dt=1.0, n_in=1, n_rec=2, n_out=1)
    np.testing.assert_allclose(cfg.alpha, np.exp(-0.1))
    with pytest.raises(ValueError, match="ModelConfig.form: expected one of"):
        M.ModelConfig(1, 2, 1, form="spiking")
    with pytest.raises(ValueError, match="ModelConfig.alpha"):
        M.ModelConfig(1, 2, 1, alpha=1.0)
    with pytest.raises(ValueError, match="ModelConfig.activation"):
        M.ModelConfig(1, 2, 1, activation="sigmoid")
