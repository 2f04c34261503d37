"""Unbiased low-rank estimates of the RTRL influence matrix: UORO, KF-RTRL and reverse KF-RTRL.

Each keeps, per sequence, a factorization M̂_t of the influence matrix M_t = ∂s_t/∂θ (N × P) whose
expectation over the rule's random signs is exactly M_t: if E[M̂_{t-1}] = M_{t-1}, the update

    M̂_t = (ρ₀ ⋅ propagated factor + ρ₁ ν ⋅ new factor) ⊗ (propagated / ρ₀ + new / ρ₁)

has E[M̂_t] = J_t M_{t-1} + I_t, because the cross terms are odd in the zero-mean signs ν while
their scales ρ are even in them, and E[ν νᵀ] = I. The scales ρ₀, ρ₁ equalize the norms of the two
factors of each term, which minimizes the variance among such scalings (Tallec & Ollivier 2018,
Prop. 1). ĝ = Σ_t c_t M̂_t with c_t = ∂ℓ_t/∂s_t is then unbiased: E[ĝ] = ∇L. The readout gets
its exact gradient, as for every rule.

Signs ν are Rademacher (±1), drawn for every step and sequence from the key of the estimate.
KF-RTRL and its reverse factor the influence of W = [W_rec | W_in | b] acting on p_t = [r_{t-1},
x_t, 1], ∂s_t/∂W_ij = δ_ki D_{t,i} p_{t,j} (:func:`~creditscape.rules._core.drive_slope`): a
learned initial state has no such factor, and those two rules refuse it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from creditscape import prng
from creditscape import model as _model
from creditscape.rules._base import Rule, register
from creditscape.rules._core import (
    drive_slope, online_estimate, presynaptic_gradient, presynaptic_input, refuse_learned_initial_state,
    with_readout,
)


def balance(norm_a: jax.Array, norm_b: jax.Array) -> jax.Array:
    """ρ = √(‖a‖/‖b‖), the scale that gives ρ‖b‖ = ‖a‖/ρ; 1 where either norm is zero (then the
    product of the two factors is zero whatever ρ)."""
    ok = (norm_a > 0) & (norm_b > 0)
    return jnp.where(ok, jnp.sqrt(jnp.where(ok, norm_a, 1.0) / jnp.where(ok, norm_b, 1.0)), 1.0)


def _norm(*arrays: jax.Array) -> jax.Array:
    """Per-sequence Frobenius norm of (B, ...) arrays taken together."""
    return jnp.sqrt(sum(jnp.sum(a.reshape(a.shape[0], -1) ** 2, axis=1) for a in arrays))


def _column(v: jax.Array) -> jax.Array:
    """A per-sequence scalar (B,) as (B, 1), to scale a (B, ·) factor."""
    return v[:, None]


@register
@dataclasses.dataclass(frozen=True)
class UORO(Rule):
    r"""Unbiased online recurrent optimization: a rank-one unbiased estimate of RTRL's M_t.

    .. math:: \tilde u_t = \rho_0 J_t \tilde u_{t-1} + \rho_1 \nu_t,\qquad
              \tilde\theta_t = \tilde\theta_{t-1}/\rho_0 + \nu_t^\top I_t/\rho_1,\qquad
              \hat g = \sum_t (c_t \cdot \tilde u_t)\, \tilde\theta_t

    with ν_t ∈ {±1}^N, ρ₀ = √(‖θ̃_{t-1}‖/‖J_t ũ_{t-1}‖), ρ₁ = √(‖ν_tᵀ I_t‖/‖ν_t‖), so that
    E[ũ_t θ̃_tᵀ] = M_t and E[ĝ] = ∇L. Every recurrent-layer parameter (s0 included: θ̃_0 = ν_0ᵀ
    ∂s_0/∂θ, ũ_0 = ν_0) is estimated. Per step and sequence: one Jacobian-vector product J_t ũ and
    ν_tᵀ I_t = (ν_t ⊙ D_t) p_tᵀ on the weights (0 on s0), O(N² + P) time and O(N + P) memory.

    References: Tallec & Ollivier, "Unbiased online recurrent optimization", ICLR 2018.
    https://openreview.net/forum?id=rJQDjk-0b
    """

    name = "uoro"
    formula = "M ≈ ũ θ̃ᵀ: ũ ← ρ0 J ũ + ρ1 ν, θ̃ ← θ̃/ρ0 + νᵀI/ρ1 (ν = ±1);  g = Σ_t (c_t·ũ_t) θ̃_t, unbiased"
    forms = ("online",)
    stochastic = True

    def gradient(self, cfg, params, struct, state, batch, noise, *, form, key):
        self.check_form(form)
        bsz, n, dtype = batch.x.shape[0], cfg.n_rec, params.w_rec.dtype
        # θ̃ held as the weights' (B, N, N + n_in + 1) matrix over p_t = [r_{t-1}, x_t, 1] and s0's
        # (B, N): the immediate term's pullback ν_tᵀ I_t is (ν ⊙ D_t) p_tᵀ on existing weights (the
        # mask zeroes absent ones and b's column without a bias), and 0 for s0.
        exists = jnp.concatenate([struct.rec_mask, jnp.ones((n, cfg.n_in), dtype),
                                  jnp.full((n, 1), params.b is not None, dtype)], axis=1)
        k_init, k_steps = jax.random.split(key)
        zeros_w = jnp.zeros((bsz, n, n + cfg.n_in + 1), dtype)
        if params.s0 is None:  # M_0 = 0
            factors0 = (jnp.zeros((bsz, n), dtype), zeros_w, jnp.zeros((bsz, 0), dtype))
        else:  # M_0 = ∂s_0/∂θ = [0 | I on s0], estimated by ν_0 (ν_0ᵀ M_0)
            nu0 = prng.rademacher(k_init, (bsz, n), dtype)
            factors0 = (nu0, zeros_w, nu0)

        def advance(factors, s_prev, x_t, xi_t, k):
            u_tilde, theta_w, theta_s0 = factors
            step = lambda sp: _model.step(cfg, params, struct, sp, x_t, xi_t)
            (s, _, u), (j_u, _, _) = jax.jvp(step, (s_prev,), (u_tilde,))
            nu = prng.rademacher(k, s.shape, dtype)
            nu_imm = exists * ((nu * drive_slope(cfg, struct, u))[:, :, None] * presynaptic_input(cfg, s_prev, x_t)[:, None, :])
            rho0 = balance(_norm(theta_w, theta_s0), _norm(j_u))
            rho1 = balance(_norm(nu_imm), _norm(nu))
            return s, (_column(rho0) * j_u + _column(rho1) * nu,
                       theta_w / _column(rho0)[..., None] + nu_imm / _column(rho1)[..., None],
                       theta_s0 / _column(rho0))

        def credit(factors, c_t):
            u_tilde, theta_w, theta_s0 = factors
            q = jnp.sum(c_t * u_tilde, axis=1)  # c_t · ũ_t per sequence
            return jnp.einsum("b,bij->ij", q, theta_w), jnp.einsum("b,bi->i", q, theta_s0)

        g0 = (jnp.zeros_like(zeros_w[0]), jnp.zeros((factors0[2].shape[1],), dtype))
        loss, (g_w, g_s0) = online_estimate(cfg, params, struct, batch, noise, k_steps, factors0, advance, credit, g0)
        return loss, with_readout(cfg, params, struct, noise, batch, presynaptic_gradient(cfg, params, struct, g_w, g_s0))


def _kronecker_estimate(cfg, params, struct, batch, noise, key, factors0, update, credit):
    """(loss, ĝ) of a Kronecker-factored rule: each step gives ``update`` the factors, J_t B_{t-1}
    (the second factor carried by the exact state Jacobian, one Jacobian-vector product per
    column), p_t, D_t and the step's key; ``credit`` maps (factors, c_t) to the (N × n_pre) matrix
    over [W_rec | W_in | b]."""

    def advance(factors, s_prev, x_t, xi_t, k):
        step = lambda sp: _model.step(cfg, params, struct, sp, x_t, xi_t)
        s, _, u = step(s_prev)
        carried = jax.vmap(lambda col: jax.jvp(lambda sp: step(sp)[0], (s_prev,), (col,))[1], in_axes=2, out_axes=2)
        factors = update(factors, carried(factors[1]), presynaptic_input(cfg, s_prev, x_t), drive_slope(cfg, struct, u), k)
        return s, factors

    g0 = jnp.zeros((cfg.n_rec, cfg.n_rec + cfg.n_in + 1), params.w_rec.dtype)
    loss, g = online_estimate(cfg, params, struct, batch, noise, key, factors0, advance, credit, g0)
    return loss, with_readout(cfg, params, struct, noise, batch, presynaptic_gradient(cfg, params, struct, g))


@dataclasses.dataclass(frozen=True)
class _KroneckerRule(Rule):
    """The shared frame of the Kronecker-factored rules: ``factors0``, ``update`` and ``credit``
    (see :func:`_kronecker_estimate`) define one."""

    forms = ("online",)
    stochastic = True

    def check_model(self, cfg):
        refuse_learned_initial_state(self.name, cfg, "the Kronecker factors describe weights acting on [r, x, 1]")

    def gradient(self, cfg, params, struct, state, batch, noise, *, form, key):
        self.check_form(form)
        self.check_model(cfg)
        factors0 = self.factors0(cfg, batch.x.shape[0], params.w_rec.dtype)
        return _kronecker_estimate(cfg, params, struct, batch, noise, key, factors0, self.update, self.credit)


@register
@dataclasses.dataclass(frozen=True)
class KFRTRL(_KroneckerRule):
    r"""Kronecker-factored RTRL: M_t ≈ a_t ⊗ B_t, an unbiased estimate with two random signs.

    .. math:: a_t = \nu_0\rho_0\, a_{t-1} + \nu_1\rho_1\, p_t,\qquad
              B_t = \nu_0 J_t B_{t-1}/\rho_0 + \nu_1 \operatorname{diag}(D_t)/\rho_1,\qquad
              \hat g_{ij} = \sum_t a_{t,j}\, [c_t B_t]_i

    M_t[k, (i, j)] ≈ a_{t,j} B_{t,ki} for W = [W_rec | W_in | b] and p_t = [r_{t-1}, x_t, 1]; the
    immediate influence δ_ki D_{t,i} p_{t,j} is exactly Kronecker (D_t = ∂s_t/∂u_t, diagonal).
    ν₀, ν₁ = ±1 per step and sequence; ρ₀ = √(‖J_t B_{t-1}‖/‖a_{t-1}‖), ρ₁ = √(‖D_t‖/‖p_t‖).
    Per step and sequence: J_t B (N Jacobian-vector products), O(N³) time, O(N² + N + n_in)
    memory. Lower variance than UORO (Mujika et al. 2018, Thm. 1): the noise of one step is two
    signs, not N.

    References: Mujika, Meier & Steger, "Approximating real-time recurrent learning with random
    Kronecker factors", NeurIPS 2018. https://arxiv.org/abs/1805.10842
    """

    name = "kf_rtrl"
    formula = "M ≈ a ⊗ B: a ← ν0ρ0 a + ν1ρ1 p, B ← ν0 J B/ρ0 + ν1 diag(D)/ρ1 (ν = ±1);  g_ij = Σ_t a_j [c_t B]_i"

    @staticmethod
    def factors0(cfg, bsz, dtype):
        return jnp.zeros((bsz, cfg.n_rec + cfg.n_in + 1), dtype), jnp.zeros((bsz, cfg.n_rec, cfg.n_rec), dtype)

    @staticmethod
    def update(factors, jb, p, d, key):
        a, _ = factors
        nu = prng.rademacher(key, (2, a.shape[0]), a.dtype)
        rho0 = balance(_norm(jb), _norm(a))
        rho1 = balance(_norm(d), _norm(p))
        a = _column(nu[0] * rho0) * a + _column(nu[1] * rho1) * p
        b = _column(nu[0] / rho0)[..., None] * jb + jax.vmap(jnp.diag)(_column(nu[1] / rho1) * d)
        return a, b

    @staticmethod
    def credit(factors, c_t):
        a, b = factors
        return jnp.einsum("bi,bj->ij", jnp.einsum("bk,bki->bi", c_t, b), a)


@register
@dataclasses.dataclass(frozen=True)
class ReverseKFRTRL(_KroneckerRule):
    r"""Reverse KF-RTRL: M_t ≈ A_t ⊗ B_t with the postsynaptic unit in A, an unbiased estimate.

    .. math:: A_t = \rho_0 A_{t-1} + \rho_1 \nu_t,\qquad
              B_t = J_t B_{t-1}/\rho_0 + (\nu_t \odot D_t)\, p_t^\top/\rho_1,\qquad
              \hat g_{ij} = \sum_t A_{t,i}\, [c_t B_t]_j

    M_t[k, (i, j)] ≈ A_{t,i} B_{t,kj}: A (N) indexes the postsynaptic unit of W_ij, B (N × (N +
    n_in + 1)) the state unit and the presynaptic input. ν_t ∈ {±1}^N per step and sequence;
    ρ₀ = √(‖J_t B_{t-1}‖/‖A_{t-1}‖), ρ₁ = √(‖(ν ⊙ D) pᵀ‖/‖ν‖). Per step and sequence:
    J_t B (N + n_in + 1 Jacobian-vector products), O(N²(N + n_in)) time, O(N(N + n_in)) memory.

    References: Marschall, Cho & Savin, "A unified framework of online learning algorithms for
    training recurrent neural networks", JMLR 2020, §4.3. https://jmlr.org/papers/v21/19-562.html
    """

    name = "reverse_kf_rtrl"
    formula = "M ≈ A ⊗ B: A ← ρ0 A + ρ1 ν, B ← J B/ρ0 + (ν⊙D) pᵀ/ρ1 (ν = ±1);  g_ij = Σ_t A_i [c_t B]_j"

    @staticmethod
    def factors0(cfg, bsz, dtype):
        return jnp.zeros((bsz, cfg.n_rec), dtype), jnp.zeros((bsz, cfg.n_rec, cfg.n_rec + cfg.n_in + 1), dtype)

    @staticmethod
    def update(factors, jb, p, d, key):
        a, _ = factors
        nu = prng.rademacher(key, a.shape, a.dtype)
        projected = (nu * d)[:, :, None] * p[:, None, :]
        rho0 = balance(_norm(jb), _norm(a))
        rho1 = balance(_norm(projected), _norm(nu))
        return _column(rho0) * a + _column(rho1) * nu, jb / _column(rho0)[..., None] + projected / _column(rho1)[..., None]

    @staticmethod
    def credit(factors, c_t):
        a, b = factors
        return jnp.einsum("bi,bj->ij", a, jnp.einsum("bk,bkj->bj", c_t, b))
