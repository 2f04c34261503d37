"""Rules that learn auxiliary parameters beside the network: KeRNL and DNI.

Their state holds the auxiliary parameters; :meth:`Rule.learn` updates them once per training
iteration by plain gradient descent on their own loss, computed on the iteration's batch and noise
at the parameters the network's gradient was formed at (the batch's version of the papers'
per-step online updates). The state is checkpointed and resumed with the network.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from creditscape import prng
from creditscape import model as _model
from creditscape.rules._base import Rule, register
from creditscape.rules._core import (
    drive_slope, online_estimate, presynaptic_gradient, presynaptic_input, refuse_learned_initial_state, step_signal,
    time_major, with_readout,
)


class KeRNLState(NamedTuple):
    sensitivity: jax.Array  # A (N × N): effect of a perturbation of unit i on unit k, A_ki
    decay: jax.Array  # κ (N,): the learned per-unit decay of a perturbation's effect, per step


@register
@dataclasses.dataclass(frozen=True)
class KeRNL(Rule):
    r"""Kernel RNN learning: M_t[k, (i, j)] ≈ A_ki B_{t,ij}, with a learned sensitivity matrix A and
    per-unit decays κ that filter each synapse's immediate influence.

    .. math:: B_{t,ij} = κ_i B_{t-1,ij} + D_{t,i}\, p_{t,j},\qquad
              \hat g_{ij} = \sum_t (c_t A)_i\, B_{t,ij}

    (D_t = ∂s_t/∂u_t, p_t = [r_{t-1}, x_t, 1], c_t = ∂ℓ_t/∂s_t.) A and κ are trained to predict
    how a perturbation spreads: a copy of the network runs beside it with a perturbation σξ_t
    (ξ_t ~ N(0, I)) added to its state after every step; with Ω_t = κ ⊙ Ω_{t-1} + ξ_t the
    filtered perturbation and Γ_t = κ ⊙ Γ_{t-1} + Ω_{t-1} = ∂Ω_t/∂κ, the prediction error is
    ε_t = A Ω_t − (s̃_t − s_t)/σ, and one step of gradient descent on ½ mean_{b,t} ‖ε_t‖² gives

    .. math:: A ← A − η_a\, \mathrm{mean}(ε_t Ω_t^\top),\qquad
              κ ← \mathrm{clip}_{[0, 1]}\big(κ − η_a\, \mathrm{mean}((A^\top ε_t) ⊙ Γ_t)\big)

    Starting from A = I and κ = α (the network's leaks), KeRNL is e-prop (tested). Per step and
    sequence: O(N·(N + n_in)) memory and time for the traces, O(N²) for c_t A; learning runs the
    network twice more. A learned s0 is refused. (Roth et al. write the decay as e^{−γΔt}; κ = e^{−γ}
    per step. Marschall et al.'s online version updates A and κ at every time step; here once per
    iteration, from the whole batch.)

    Args:
        perturbation: σ, the standard deviation of the perturbations (small: the prediction is linear).
        aux_learning_rate: η_a, the step size of A and κ.

    References: Roth, Kanitscheider & Fiete, "Kernel RNN learning (KeRNL)", ICLR 2019.
    https://openreview.net/forum?id=ryGfnoC5KQ ; Marschall, Cho & Savin, JMLR 2020, §4.4.
    """

    name = "kernl"
    per_sequence = True
    formula = "g_ij = Σ_t (c_t A)_i B_ij(t), B_ij = κ_i B_ij + D_i p_j;  A, κ learned to predict perturbations"
    forms = ("online",)
    learns = True
    perturbation: float = 1e-3
    aux_learning_rate: float = 0.01

    def check_model(self, cfg):
        refuse_learned_initial_state(self.name, cfg, "KeRNL's traces are those of weights acting on [r, x, 1]")

    def init(self, cfg, params, struct, *, key):
        del key
        leak = jnp.broadcast_to(jnp.asarray(_model.leak(cfg, struct), params.w_rec.dtype), (cfg.n_rec,))
        return KeRNLState(jnp.eye(cfg.n_rec, dtype=params.w_rec.dtype), leak)

    def gradient(self, cfg, params, struct, state, batch, noise, *, form):
        self.check_form(form)
        self.check_model(cfg)
        bsz, n = batch.x.shape[0], cfg.n_rec
        kappa = state.decay[:, None]

        def advance(traces, s_prev, x_t, xi_t, _):
            s, _, u = _model.step(cfg, params, struct, s_prev, x_t, xi_t)
            immediate = drive_slope(cfg, struct, u)[:, :, None] * presynaptic_input(cfg, s_prev, x_t)[:, None, :]
            return s, kappa * traces + immediate

        def credit(traces, c_t):
            return jnp.einsum("bi,bij->ij", c_t @ state.sensitivity, traces)

        traces0 = jnp.zeros((bsz, n, n + cfg.n_in + 1), params.w_rec.dtype)
        loss, g = online_estimate(cfg, params, struct, batch, noise, None, traces0, advance, credit, jnp.zeros_like(traces0[0]))
        return loss, with_readout(cfg, params, struct, noise, batch, presynaptic_gradient(cfg, params, struct, g))

    def learn(self, cfg, params, struct, state, batch, noise, *, key):
        bsz, n_steps = batch.x.shape[:2]
        xi = prng.normal(key, (n_steps, bsz, cfg.n_rec), params.w_rec.dtype)
        kappa = state.decay

        def body(carry, inp):
            s, s_perturbed, omega, gamma, grad_a, grad_kappa = carry
            (x_t, xi_t, _, _), xi_step = inp
            s = _model.step(cfg, params, struct, s, x_t, xi_t)[0]
            s_perturbed = _model.step(cfg, params, struct, s_perturbed, x_t, xi_t)[0] + self.perturbation * xi_step
            gamma = kappa * gamma + omega
            omega = kappa * omega + xi_step
            error = omega @ state.sensitivity.T - (s_perturbed - s) / self.perturbation
            grad_a = grad_a + jnp.einsum("bk,bi->ki", error, omega)
            grad_kappa = grad_kappa + jnp.sum((error @ state.sensitivity) * gamma, axis=0)
            return (s, s_perturbed, omega, gamma, grad_a, grad_kappa), None

        s0 = _model.initial_state(cfg, params, bsz)
        zeros = jnp.zeros_like(s0)
        carry0 = (s0, s0, zeros, zeros, jnp.zeros_like(state.sensitivity), jnp.zeros_like(kappa))
        (*_, grad_a, grad_kappa), _ = _model.time_scan(body, carry0, (time_major(cfg, batch, noise), xi))
        scale = self.aux_learning_rate / (bsz * n_steps)
        return KeRNLState(state.sensitivity - scale * grad_a, jnp.clip(kappa - scale * grad_kappa, 0.0, 1.0))


def _label(cfg, target_t: jax.Array, weight_t: jax.Array) -> jax.Array:
    """y*_t as DNI's input (B, n_out): the one-hot class (cross-entropy) or the target (MSE) where
    the step is scored, zero elsewhere."""
    y = jax.nn.one_hot(target_t, cfg.n_out, dtype=weight_t.dtype) if cfg.loss == "xent" else target_t
    return y * (weight_t > 0)[:, None]


def _dni_input(cfg, s: jax.Array, target_t: jax.Array, weight_t: jax.Array) -> jax.Array:
    """ã_t = [s_t, y*_t, 1] (B, N + n_out + 1)."""
    return jnp.concatenate([s, _label(cfg, target_t, weight_t), jnp.ones_like(s[:, :1])], axis=1)


@register
@dataclasses.dataclass(frozen=True)
class DNI(Rule):
    r"""Decoupled neural interfaces (online form): a learned linear synthetic gradient ŝg_t = A ã_t
    of the credit δ_t = ∂L_{≥t}/∂s_t, ã_t = [s_t, y*_t, 1], times each synapse's immediate influence.

    .. math:: \hat g_{ij} = \frac1B \sum_{b,t} \hat{sg}_{t,i}\, D_{t,i}\, p_{t,j},\qquad
              c^*_t = B c_t + J_{t+1}^\top (A ã_{t+1}),\qquad
              A ← A − η_a\, \mathrm{mean}_{b,t}\big((A ã_t − c^*_t)\, ã_t^\top\big)

    The bootstrapped target c*_t (c*_T = B c_T) uses the exact state Jacobian J_{t+1} and A as it
    was at the start of the iteration (Jaderberg et al.'s target network, refreshed every
    iteration); B c_t is the per-sequence credit (c_t carries the batch's 1/B), so A predicts a
    sequence's credit whatever the batch size. y*_t is the one-hot target (cross-entropy) or the
    target (MSE) on scored steps, zero elsewhere. A starts at zero: the recurrent layer learns
    nothing until A has learned to predict the credit. Per step and sequence: O(N·(N + n_out)) for
    ŝg, O(N·(N + n_in)) for the estimate; learning adds one vector-Jacobian product (O(N²)) per step
    for the target (computed here over the stored forward pass, O(T·N) memory). A learned s0 is
    refused.

    Args:
        aux_learning_rate: η_a, the step size of A.

    References: Jaderberg et al., "Decoupled neural interfaces using synthetic gradients", ICML
    2017; Marschall, Cho & Savin, JMLR 2020, §4.5 (the online, linear form used here).
    """

    name = "dni"
    per_sequence = True
    formula = "g_ij = Σ_t [A ã_t]_i D_i p_j, ã = [s, y*, 1];  A learned to predict c_t + J_{t+1}ᵀ A ã_{t+1}"
    forms = ("online",)
    learns = True
    aux_learning_rate: float = 0.01

    def check_model(self, cfg):
        refuse_learned_initial_state(self.name, cfg, "DNI credits the immediate influence of weights acting on [r, x, 1]")

    def init(self, cfg, params, struct, *, key):
        del struct, key
        return jnp.zeros((cfg.n_rec, cfg.n_rec + cfg.n_out + 1), params.w_rec.dtype)

    def gradient(self, cfg, params, struct, state, batch, noise, *, form):
        self.check_form(form)
        self.check_model(cfg)
        bsz = batch.x.shape[0]

        def body(carry, inp):
            s_prev, loss, g = carry
            x_t, xi_t, w_t, target_t = inp
            s, _, u = _model.step(cfg, params, struct, s_prev, x_t, xi_t)
            synthetic = _dni_input(cfg, s, target_t, w_t) @ state.T
            g = g + jnp.einsum("bi,bj->ij", synthetic * drive_slope(cfg, struct, u), presynaptic_input(cfg, s_prev, x_t))
            return (s, loss + step_signal(cfg, params, w_t, target_t, s)[0], g), None

        g0 = jnp.zeros((cfg.n_rec, cfg.n_rec + cfg.n_in + 1), params.w_rec.dtype)
        carry0 = (_model.initial_state(cfg, params, bsz), jnp.zeros((), g0.dtype), g0)
        (_, loss, g), _ = _model.time_scan(body, carry0, time_major(cfg, batch, noise))
        return loss, with_readout(cfg, params, struct, noise, batch, presynaptic_gradient(cfg, params, struct, g / bsz))

    def learn(self, cfg, params, struct, state, batch, noise, *, key):
        del key
        bsz = batch.x.shape[0]
        x, xi, weights, targets = time_major(cfg, batch, noise)
        s_all = jnp.swapaxes(_model.run(cfg, params, struct, noise.x, noise.xi)[0], 0, 1)  # (T, B, N)
        inputs = jax.vmap(_dni_input, in_axes=(None, 0, 0, 0))(cfg, s_all, targets, weights)  # (T, B, M)
        credit = jax.vmap(lambda w, tg, s: step_signal(cfg, params, w, tg, s)[1])(weights, targets, s_all) * bsz
        predicted = inputs @ state.T  # (T, B, N)

        def carried_back(s_prev, x_t, xi_t, sg_t):
            """J_tᵀ ŝg_t: the synthetic gradient of step t, carried back to step t − 1."""
            step = lambda sp: _model.step(cfg, params, struct, sp, x_t, xi_t)[0]
            return jax.vjp(step, s_prev)[1](sg_t)[0]

        future = jax.vmap(carried_back)(s_all[:-1], x[1:], None if xi is None else xi[1:], predicted[1:])
        target = credit + jnp.concatenate([future, jnp.zeros_like(future[:1])], axis=0)
        error = predicted - target
        grad = jnp.einsum("tbk,tbm->km", error, inputs) / (bsz * x.shape[0])
        return state - self.aux_learning_rate * grad
