"""Exact backpropagation through time and its truncation."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from creditscape import model as _model
from creditscape.objective import exact_loss, rate_penalty
from creditscape.rules._base import Rule, register
from creditscape.rules._core import forward_sensitivity, output_error


@register
@dataclasses.dataclass(frozen=True)
class BPTT(Rule):
    r"""Backpropagation through time: the exact gradient, by reverse-mode autodiff.

    .. math:: \hat g = \nabla_\theta L(\theta) = \sum_t \frac{\partial L}{\partial s_t}\Big|_{\text{direct}} M_t,
              \quad M_t = J_t M_{t-1} + \frac{\partial s_t}{\partial \theta}\Big|_{\text{immediate}}

    References: Werbos, "Backpropagation through time: what it does and how to do it", 1990.
    """

    name = "bptt"
    per_sequence = True
    spiking = True
    formula = "g = dL/dθ exactly (reverse mode through the whole sequence)"
    forms = ("offline",)

    def gradient(self, cfg, params, struct, state, batch, noise, *, form):
        self.check_form(form)
        return jax.value_and_grad(lambda p: exact_loss(cfg, p, struct, batch, noise))(params)


@register
@dataclasses.dataclass(frozen=True)
class TruncatedBPTT(Rule):
    r"""Truncated BPTT with window K: each loss term back-propagates through its last K steps.

    .. math:: \hat g = \sum_t \frac{\partial L}{\partial s_t}\Big|_{\text{direct}}
              \sum_{\tau=\max(1,t-K+1)}^{t} J_t J_{t-1}\cdots J_{\tau+1}\,
              \frac{\partial s_\tau}{\partial \theta}\Big|_{\text{immediate}}

    K = 1 keeps the immediate term only; K ≥ T is BPTT. A learned initial state enters through
    step 1's immediate term. The readout gets its exact gradient.

    * offline: for every t, K steps re-run from the forward value of s_{t-K} (held fixed) and differentiated
      (cost O(T·K) steps, vmapped over t);
    * online: the last K immediate terms carried forward by the exact Jacobian (RTRL with a
      window; O(K·N·P) memory, small networks only).

    Args:
        k: window length K ≥ 1.

    References: Williams & Peng, "An efficient gradient-based algorithm for on-line training of
    recurrent network trajectories", 1990.
    """

    name = "tbptt"
    per_sequence = True
    spiking = True
    formula = "g = Σ_t dℓ_t/ds_t · Σ_{τ>t-K} J_t…J_{τ+1} ∂s_τ/∂θ (only the last K steps)"
    forms = ("offline", "online")
    k: int = 5

    def __post_init__(self):
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"tbptt: the window k must be an integer >= 1, got {self.k!r}.")

    def gradient(self, cfg, params, struct, state, batch, noise, *, form):
        if self.check_form(form) == "online":
            return forward_sensitivity(cfg, params, struct, batch, noise, window=self.k)
        return _tbptt_offline(cfg, params, struct, batch, noise, self.k)


def _tbptt_offline(cfg, params, struct, batch, noise, k):
    s_all, r_all, _ = _model.run(cfg, params, struct, noise.x, noise.xi)
    loss, e, g_w_out, g_b_out = output_error(cfg, params, _model.readout_input(cfg, s_all, r_all), batch)
    signal = jnp.swapaxes(e @ params.w_out, 0, 1)  # (T, B, N): ∂L/∂ρ_t, ρ_t what readout t reads
    n_steps = batch.x.shape[1]
    # s_all and the signal are values from outside the differentiated function: reverse mode does
    # not flow through them (the cut), forward mode still does (see creditscape.theory).

    def window_activity(p, t):
        """r_t computed from s_{t-K} (cut) through steps t-K+1..t; t counts from 1."""
        s_cut = s_all[:, jnp.clip(t - k - 1, 0, n_steps - 1)]
        s_start = jnp.where(t <= k, _model.initial_state(cfg, p, s_all.shape[0]), s_cut)

        def body(s_prev, j):
            tau = t - k + 1 + j
            i = jnp.clip(tau - 1, 0, n_steps - 1)
            xi_t = None if noise.xi is None else noise.xi[:, i]
            s_new = _model.step(cfg, p, struct, s_prev, noise.x[:, i], xi_t)[0]
            return jnp.where(tau >= 1, s_new, s_prev), None

        s_end, _ = _model.time_scan(body, s_start, jnp.arange(k))
        z_end = _model.activity(cfg, s_end)
        read = _model.readout_input(cfg, s_end, z_end)
        return (read, z_end) if cfg.rate_regularization else read  # the spikes only where R needs them

    times = jnp.arange(1, n_steps + 1)
    _, pullback = jax.vjp(lambda p: jax.vmap(lambda t: window_activity(p, t))(times), params)
    if cfg.rate_regularization:  # ∂R/∂z_t, carried back through the same K steps
        penalty, on_spikes = jax.value_and_grad(lambda z: rate_penalty(cfg, z))(r_all)
        loss, signal = loss + penalty, (signal, jnp.swapaxes(on_spikes, 0, 1))
    (g,) = pullback(signal)
    return loss, g._replace(w_out=g_w_out, b_out=g_b_out)
