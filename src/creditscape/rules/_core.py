"""Shared machinery of the rules: readout error, eligibility-trace rules, forward sensitivities.

Notation (DESIGN.md §3). e_t = ∂L/∂y_t is the output error of step t (batch-weighted, masked);
the learning signal is L_t = Fᵀ e_t with feedback F = W_out (symmetric) or a fixed random B of the
same shape (n_out × N). The eligibility-trace family (e-prop, random e-prop / RFLO, MDGL) keeps
only the leak path D_t = αI of the state Jacobian, so the eligibility of a recurrent-layer weight
with presynaptic input p_j ∈ {r_{t-1,j}, x_{t,j}, 1} is

    voltage: e_{t,ij} = φ'(v_{t,i}) ε_{t,ij},     ε_{t,ij} = α_i ε_{t-1,ij} + (1-α_i) p_{t,j}
    rate:    e_{t,ij} = M_{t,ij},                 M_{t,ij} = α_i M_{t-1,ij} + (1-α_i) φ'(u_{t,i}) p_{t,j}

with α_i the leak of postsynaptic unit i (α for every unit, unless time constants are
heterogeneous). With one α the voltage trace ε_{t,ij} = ε_{t,j} does not depend on i: a vector
per sequence, O(n_pre) memory instead of O(N·n_pre).

and ĝ_ij = Σ_t L̃_{t,i} e_{t,ij} with L̃_t = L_t (e-prop) or L̃_t = L_t + R̄_{t+1}ᵀ L_{t+1} (MDGL).
A learned initial state s0 has the leak-only eligibility α_i^t.

"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from creditscape import model as _model
from creditscape.model import ModelConfig, Params, Structure
from creditscape.objective import Batch, Noise, loss_from_outputs, loss_weights, rate_penalty, step_losses


def phi_prime(cfg: ModelConfig, z: jax.Array) -> jax.Array:
    """φ'(z) elementwise."""
    return jax.jvp(cfg.phi, (z,), (jnp.ones_like(z),))[1]


def output_error(cfg: ModelConfig, params: Params, r: jax.Array, batch: Batch):
    """Loss, e = ∂L/∂y (B, T, n_out) and the exact readout gradients from the readout's inputs r
    (B, T, N): the activities, or a spiking network's filtered spikes (:func:`model.readout_input`).
    Steps without a readout (before the last ``cfg.readout_steps``) have e = 0 and cost nothing."""
    silent = _model.steps_without_readout(cfg, r.shape[1])
    r_read = r[:, silent:]
    loss, e = jax.value_and_grad(lambda y_: loss_from_outputs(cfg, y_, batch))(_model.readout(params, r_read))
    g_w_out = jnp.einsum("btk,btn->kn", e, r_read)
    g_b_out = e.sum(axis=(0, 1))
    return loss, jnp.pad(e, ((0, 0), (silent, 0), (0, 0))), g_w_out, g_b_out


def activity_signal(cfg: ModelConfig, signal: jax.Array) -> jax.Array:
    """∂/∂r_t of Σ_t ⟨signal_t, ρ_t⟩, ρ_t what the readout reads at step t: ``signal`` itself, or,
    through a spiking network's readout filter ρ_t = κ ρ_{t-1} + (1-κ) z_t, its adjoint
    (1-κ) Σ_{t'≥t} κ^{t'-t} signal_{t'} (B, T, N): the learning signal on the spikes."""
    kappa = cfg.readout_decay
    if not kappa:
        return signal

    def back(later, signal_t):
        total = signal_t + kappa * later
        return total, (1 - kappa) * total

    _, out = _model.time_scan(back, jnp.zeros_like(signal[:, 0]), jnp.swapaxes(signal, 0, 1), reverse=True)
    return jnp.swapaxes(out, 0, 1)


def activity_slope(cfg: ModelConfig, s: jax.Array, u: jax.Array) -> jax.Array:
    """How a unit's activity moves with what integrates its drive: φ'(v_t) (voltage form), φ'(u_t)
    (rate form), or a spiking unit's pseudo-derivative ψ_t = ∂z_t/∂v_t (0 while refractory)."""
    if cfg.spiking:
        along_v = jnp.concatenate([jnp.ones_like(u), jnp.zeros_like(s[..., cfg.n_rec:])], axis=-1)
        return jax.jvp(lambda s_: _model.activity(cfg, s_), (s,), (along_v,))[1]
    return phi_prime(cfg, s if cfg.form == "voltage" else u)


def mdgl_hop(alpha, signal_next: jax.Array, slope_next: jax.Array, w_bar: jax.Array):
    """MDGL's one hop R̄_{t+1}ᵀ L_{t+1} = W̄ᵀ ((1-α) ⊙ φ'_{t+1} ⊙ L_{t+1}) (row-vector form), α the
    leak of each postsynaptic unit (:func:`creditscape.model.leak`).

    ``slope_next`` is φ'(v_{t+1}) (voltage) or φ'(u_{t+1}) (rate); both forms' one-step
    activity-to-activity Jacobians give this expression.
    """
    return ((1 - alpha) * slope_next * signal_next) @ w_bar


def _next(a: jax.Array) -> jax.Array:
    """a_{t+1} at position t (B, T, ·), zero after the last step."""
    return jnp.concatenate([a[:, 1:], jnp.zeros_like(a[:, :1])], axis=1)


def modulated_signal(alpha, signal: jax.Array, slope: jax.Array, w_bar: jax.Array, hops: int | None) -> jax.Array:
    """L̃_t = Σ_{s=0}^{hops} (R̄ᵀ)^s L_{t+s}: the learning signal plus s consecutive hops through W̄
    (:func:`mdgl_hop`, R̄_{t+1}ᵀ carrying step t+1 back to t), for s up to ``hops`` (``None``: up
    to the end of the sequence). ``hops=1`` is MDGL's signal. (B, T, N) arrays."""
    if hops is None:  # Λ_t = L_t + R̄_{t+1}ᵀ Λ_{t+1}, backward in time
        def back(carry, inp):
            signal_t, slope_t = inp
            out = signal_t + mdgl_hop(alpha, carry[0], carry[1], w_bar)
            return (out, slope_t), out

        zero = jnp.zeros_like(signal[:, 0])
        _, out = _model.time_scan(back, (zero, zero), (jnp.swapaxes(signal, 0, 1), jnp.swapaxes(slope, 0, 1)), reverse=True)
        return jnp.swapaxes(out, 0, 1)
    out = signal
    for _ in range(hops):  # Λ^(k)_t = L_t + R̄_{t+1}ᵀ Λ^(k-1)_{t+1}
        out = signal + mdgl_hop(alpha, _next(out), _next(slope), w_bar)
    return out


def trace_rule_offline(
    cfg: ModelConfig,
    params: Params,
    struct: Structure,
    batch: Batch,
    noise: Noise,
    feedback: jax.Array,
    w_bar: jax.Array | None,
    hops: int | None = 1,
    mean_slope: bool = False,
) -> tuple[jax.Array, Params]:
    """Offline e-prop family: ĝ = ∇_θ Σ_t ⟨L̃_t, r̃_t(θ)⟩ + exact readout gradients, where r̃ is the
    network with r_{t-1} frozen at its forward-pass value c_{t-1} where (and only where) it enters
    the recurrent drive, and L̃_t is computed from the forward pass: L_t (no ``w_bar``), or L_t
    plus up to ``hops`` consecutive hops through W̄ (:func:`modulated_signal`; ``None``: every
    hop), at the receiving units' φ' or, with ``mean_slope``, at its mean μ over the batch.

    The frozen values and L̃ are computed outside the differentiated function rather than with
    ``stop_gradient``: reverse mode then ignores them as it should, while forward mode (``jvp``
    through ĝ, for the update-map Jacobian of :mod:`creditscape.theory`) still sees how they move
    with θ. ``stop_gradient`` would zero those tangents too.
    """
    s, r, u = _model.run(cfg, params, struct, noise.x, noise.xi)
    s_init = _model.initial_state(cfg, params, batch.x.shape[0])
    r_prev = jnp.concatenate([_model.activity(cfg, s_init)[:, None], r[:, :-1]], axis=1)
    xis = None if noise.xi is None else jnp.swapaxes(noise.xi, 0, 1)
    inputs = (jnp.swapaxes(noise.x, 0, 1), xis, jnp.swapaxes(r_prev, 0, 1))

    def truncated_activities(p):
        def body(s_prev, inp):
            x_t, xi_t, c_t = inp
            s_t, r_t, _ = _model.step(cfg, p, struct, s_prev, x_t, xi_t, recurrent_input=lambda _: c_t)
            return s_t, r_t

        _, r_trunc = _model.time_scan(body, _model.initial_state(cfg, p, batch.x.shape[0]), inputs)
        return jnp.swapaxes(r_trunc, 0, 1)

    loss, e, g_w_out, g_b_out = output_error(cfg, params, _model.readout_input(cfg, s, r), batch)
    signal = activity_signal(cfg, e @ feedback)
    if cfg.rate_regularization:  # its learning signal ∂R/∂z_t, the same at every step
        penalty, on_spikes = jax.value_and_grad(lambda z: rate_penalty(cfg, z))(r)
        loss, signal = loss + penalty, signal + on_spikes
    if w_bar is not None:
        slope = activity_slope(cfg, s, u)
        if mean_slope:
            slope = jnp.full_like(slope, jnp.mean(slope))
        signal = modulated_signal(_model.leak(cfg, struct), signal, slope, w_bar, hops)
    _, pullback = jax.vjp(truncated_activities, params)
    (g,) = pullback(signal)
    return loss, g._replace(w_out=g_w_out, b_out=g_b_out)


def trace_rule_online(
    cfg: ModelConfig,
    params: Params,
    struct: Structure,
    batch: Batch,
    noise: Noise,
    feedback: jax.Array,
    w_bar: jax.Array | None,
) -> tuple[jax.Array, Params]:
    """Online e-prop family: one forward pass carrying eligibility traces (module docstring).

    The weight update of step t is added at step t+1, once L_{t+1} is known (MDGL needs it; for
    e-prop the hop is zero). Memory is O(B·N·(N+n_in)) whatever T.
    """
    n, bsz = cfg.n_rec, batch.x.shape[0]
    dtype = params.w_rec.dtype
    n_pre = n + cfg.n_in + 1  # presynaptic vector p_t = [r_{t-1}, x_t, 1]
    a = _model.leak(cfg, struct)
    a_post = jnp.reshape(a, (n, 1)) if struct.leak is not None else a  # α_i along a trace's rows
    vector_trace = cfg.form == "voltage" and struct.leak is None  # ε_{t,ij} = ε_{t,j}
    trace0 = jnp.zeros((bsz, n_pre) if vector_trace else (bsz, n, n_pre), dtype)
    s_init = _model.initial_state(cfg, params, bsz)

    def credit(trace, decay, delta):
        """This step's contribution to [g_rec | g_in | g_b] and to g_s0."""
        g_full = jnp.einsum("bi,bj->ij" if vector_trace else "bi,bij->ij", delta, trace)
        return g_full, jnp.sum(delta * decay, axis=0)

    def body(carry, inp):
        s_prev, trace, decay, prev, acc = carry
        x_t, xi_t, w_t, target_t = inp
        s, r, u = _model.step(cfg, params, struct, s_prev, x_t, xi_t)
        p = presynaptic_input(cfg, s_prev, x_t)
        slope = phi_prime(cfg, s if cfg.form == "voltage" else u)
        if vector_trace:
            trace = a * trace + (1 - a) * p
        elif cfg.form == "voltage":
            trace = a_post * trace + (1 - a_post) * p[:, None, :]
        else:
            trace = a_post * trace + (1 - a_post) * slope[:, :, None] * p[:, None, :]
        decay = a * decay  # leak-only eligibility of s0: α_i^t
        y = _model.readout(params, r)
        loss_t, e_t = step_output_error(cfg, w_t, target_t, y)
        signal = e_t @ feedback
        # Credit the previous step, now that its MDGL hop is known.
        prev_trace, prev_decay, prev_signal, prev_slope = prev
        if w_bar is not None:
            prev_signal = prev_signal + mdgl_hop(a, signal, slope, w_bar)
        prev_delta = prev_signal * (prev_slope if cfg.form == "voltage" else 1.0)
        g_full, g_s0 = credit(prev_trace, prev_decay, prev_delta)
        loss, g_full_acc, g_s0_acc, g_out, g_bout = acc
        acc = (
            loss + loss_t,
            g_full_acc + g_full,
            g_s0_acc + g_s0,
            g_out + jnp.einsum("bk,bn->kn", e_t, r),
            g_bout + e_t.sum(0),
        )
        return (s, trace, decay, (trace, decay, signal, slope), acc), None

    zeros_bn = jnp.zeros((bsz, n), dtype)
    prev0 = (trace0, jnp.zeros(jnp.shape(a), dtype), zeros_bn, zeros_bn)
    acc0 = (
        jnp.zeros((), dtype),
        jnp.zeros((n, n_pre), dtype),
        jnp.zeros((n,), dtype),
        jnp.zeros((cfg.n_out, n), dtype),
        jnp.zeros((cfg.n_out,), dtype),
    )
    carry0 = (s_init, trace0, jnp.ones(jnp.shape(a), dtype), prev0, acc0)
    (_, _, _, prev, acc), _ = _model.time_scan(body, carry0, time_major(cfg, batch, noise))
    # Flush the last step (no step after it: L̃_T = L_T).
    prev_trace, prev_decay, prev_signal, prev_slope = prev
    prev_delta = prev_signal * (prev_slope if cfg.form == "voltage" else 1.0)
    g_full_last, g_s0_last = credit(prev_trace, prev_decay, prev_delta)
    loss, g_full, g_s0, g_out, g_bout = acc
    grads = presynaptic_gradient(cfg, params, struct, g_full + g_full_last, g_s0 + g_s0_last)
    return loss, grads._replace(w_out=g_out, b_out=g_bout)


def presynaptic_gradient(cfg: ModelConfig, params: Params, struct: Structure, g_full: jax.Array,
                         g_s0: jax.Array | None = None) -> Params:
    """The recurrent layer's gradient from its (N × (N + n_in + 1)) matrix over the presynaptic
    vector p_t = [r_{t-1}, x_t, 1] (absent connections zeroed), readout ``None``."""
    n = cfg.n_rec
    return Params(
        w_in=g_full[:, n : n + cfg.n_in],
        w_rec=g_full[:, :n] * struct.rec_mask,
        b=None if params.b is None else g_full[:, -1],
        w_out=None,
        b_out=None,
        s0=None if params.s0 is None else g_s0,
    )


def presynaptic_input(cfg: ModelConfig, s_prev: jax.Array, x_t: jax.Array) -> jax.Array:
    """p_t = [r_{t-1}, x_t, 1] (B, N + n_in + 1): what each synapse of the recurrent layer carries."""
    return jnp.concatenate([_model.activity(cfg, s_prev), x_t, jnp.ones_like(x_t[:, :1])], axis=1)


def drive_slope(cfg: ModelConfig, struct: Structure, u: jax.Array) -> jax.Array:
    """D_t = ∂s_{t,i}/∂u_{t,i} (B, N), the immediate effect of the drive u = W p on the state:
    (1 − α_i) (voltage form) or (1 − α_i) φ'(u_{t,i}) (rate form); ∂s_t/∂W_ij = δ_ki D_{t,i} p_{t,j}."""
    slope = 1 - _model.leak(cfg, struct)
    return slope * (jnp.ones_like(u) if cfg.form == "voltage" else phi_prime(cfg, u))


def step_output_error(cfg: ModelConfig, weight_t: jax.Array, target_t: jax.Array, y: jax.Array):
    """(ℓ_t, e_t = ∂ℓ_t/∂y_t) of one step from its readouts y (B, n_out): weighted loss and output error."""
    return jax.value_and_grad(lambda y_: jnp.sum(weight_t * step_losses(cfg, y_[:, None], target_t[:, None])[:, 0]))(y)


def step_signal(cfg: ModelConfig, params: Params, weight_t: jax.Array, target_t: jax.Array, s: jax.Array):
    """(ℓ_t, c_t = ∂ℓ_t/∂s_t) of one step: its weighted loss and the direct error on the state."""

    def step_loss(s_):
        r = _model.activity(cfg, s_)
        y = _model.readout(params, _model.readout_input(cfg, s_, r))
        return jnp.sum(weight_t * step_losses(cfg, y[:, None], target_t[:, None])[:, 0])

    return jax.value_and_grad(step_loss)(s)


def time_major(cfg: ModelConfig, batch: Batch, noise: Noise) -> tuple:
    """A scan's per-step inputs (x_t, xi_t, loss weight_t, target_t), time first."""
    xis = None if noise.xi is None else jnp.swapaxes(noise.xi, 0, 1)
    weights = jnp.swapaxes(loss_weights(cfg, batch.mask), 0, 1)
    return jnp.swapaxes(noise.x, 0, 1), xis, weights, jnp.swapaxes(batch.target, 0, 1)


def recurrent_part(params: Params) -> Params:
    """The recurrent-layer parameters (readout set to ``None``)."""
    return params._replace(w_out=None, b_out=None)


def forward_sensitivity(
    cfg: ModelConfig,
    params: Params,
    struct: Structure,
    batch: Batch,
    noise: Noise,
    window: int | None,
    pattern: jax.Array | None = None,
) -> tuple[jax.Array, Params]:
    """Gradient from forward-propagated sensitivities M_t = ∂s_t/∂θ_rec (RTRL), optionally windowed
    or restricted to a sparsity pattern.

    ``window=None``: M_t = J_t M_{t-1} + I_t, with I_t the immediate term of step t (that of step 1
    includes the dependence through a learned s0), exact RTRL. ``window=K``: keep the last K
    immediate terms separately, each carried by the exact J, and drop older ones — truncated BPTT
    computed forward in time. ``pattern`` (N × P, 0/1): M_t = pattern ⊙ (J_t M_{t-1} + I_t) after
    every step (SnAp). Memory O(B·N·P) (× K with a window), P the number of recurrent-layer
    parameters: small networks only.
    """
    bsz = batch.x.shape[0]
    theta0, unravel = ravel_pytree(recurrent_part(params))
    n_par = theta0.shape[0]
    dtype = theta0.dtype
    full = lambda th: unravel(th)._replace(w_out=params.w_out, b_out=params.b_out)
    step_from = lambda th, s_prev, x_t, xi_t: _model.step(cfg, full(th), struct, s_prev, x_t, xi_t)[0]
    s_init_from = lambda th: _model.initial_state(cfg, full(th), bsz)
    s_init = s_init_from(theta0)
    # ∂s_0/∂θ as (B, N, P): columns by forward mode on each basis direction.
    m0 = jax.vmap(lambda d: jax.jvp(s_init_from, (theta0,), (d,))[1], out_axes=2)(jnp.eye(n_par, dtype=dtype))

    def tangent(s_prev, x_t, xi_t, d_theta, d_s):
        return jax.jvp(lambda th, sp: step_from(th, sp, x_t, xi_t), (theta0, s_prev), (d_theta, d_s))[1]

    basis = jnp.eye(n_par, dtype=dtype)

    def body(carry, inp):
        s_prev, sens, m_start, acc = carry
        x_t, xi_t, w_t, target_t = inp
        s = step_from(theta0, s_prev, x_t, xi_t)
        # One forward-mode column per parameter: J_t (carried sensitivity) + immediate term, where
        # the immediate term of step 1 carries ∂s_0/∂θ (m_start, zero afterwards). jvp is linear
        # in (dθ, ds), so one call gives both parts.
        columns = jax.vmap(lambda d, ds: tangent(s_prev, x_t, xi_t, d, ds), in_axes=(0, 2), out_axes=2)
        if window is None:
            sens = columns(basis, sens + m_start)
            if pattern is not None:
                sens = sens * pattern
            m_t = sens
        else:
            immediate = columns(basis, m_start)
            moved = jax.vmap(lambda m: columns(jnp.zeros_like(basis), m))(sens[:-1])
            sens = jnp.concatenate([immediate[None], moved], axis=0)  # (K, B, N, P)
            m_t = sens.sum(axis=0)
        loss_t, c_t = step_signal(cfg, params, w_t, target_t, s)
        loss, g, spikes = acc
        g = g + jnp.einsum("bn,bnp->p", c_t, m_t)
        if cfg.rate_regularization:  # Σ_{b,t} (z_t, ∂z_t/∂θ), for the regularizer at the end
            z_t, dz = jax.vmap(lambda m: jax.jvp(lambda s_: _model.activity(cfg, s_), (s,), (m,)), in_axes=2,
                               out_axes=(None, 2))(m_t)
            spikes = (spikes[0] + z_t.sum(0), spikes[1] + dz.sum(0))
        return (s, sens, jnp.zeros_like(m_start), (loss + loss_t, g, spikes)), None

    if window is None:
        sens0 = jnp.zeros((bsz, _model.state_size(cfg), n_par), dtype)
    else:
        sens0 = jnp.zeros((window, bsz, _model.state_size(cfg), n_par), dtype)
    spikes0 = (jnp.zeros((cfg.n_rec,), dtype), jnp.zeros((cfg.n_rec, n_par), dtype)) if cfg.rate_regularization else ()
    acc0 = (jnp.zeros((), dtype), jnp.zeros((n_par,), dtype), spikes0)
    (_, _, _, (loss, g, spikes)), _ = _model.time_scan(body, (s_init, sens0, m0, acc0), time_major(cfg, batch, noise))
    if cfg.rate_regularization:
        penalty, on_spikes = rate_penalty_from_counts(cfg, spikes[0], batch.x.shape[:2])
        loss, g = loss + penalty, g + on_spikes @ spikes[1]
    return loss, with_readout(cfg, params, struct, noise, batch, unravel(g))


def rate_penalty_from_counts(cfg: ModelConfig, counts: jax.Array, shape: tuple[int, int]):
    """(R, ∂R/∂z_{t,i}) from the spike counts Σ_{b,t} z_t (N,) of a batch of ``shape`` (B, T):
    R = c Σ_i (f̄_i − f₀)² with f̄ = counts / (B·T), whose signal on every spike of unit i is
    2c (f̄_i − f₀)/(B·T) — what a forward-in-time rule multiplies its accumulated Σ_{b,t} ∂z_t/∂θ by."""
    n = shape[0] * shape[1]
    penalty, slope = jax.value_and_grad(lambda f: rate_penalty(cfg, f[None, None]))(counts / n)
    return penalty, slope / n


def with_readout(cfg: ModelConfig, params: Params, struct: Structure, noise: Noise, batch: Batch,
                 recurrent: Params) -> Params:
    """``recurrent`` with the exact readout gradients filled in (from a forward pass)."""
    s, r, _ = _model.run(cfg, params, struct, noise.x, noise.xi)
    _, _, g_w_out, g_b_out = output_error(cfg, params, _model.readout_input(cfg, s, r), batch)
    return recurrent._replace(w_out=g_w_out, b_out=g_b_out)


def online_estimate(cfg: ModelConfig, params: Params, struct: Structure, batch: Batch, noise: Noise,
                    key: jax.Array | None, carried0, advance: Callable, credit: Callable, g0):
    """(loss, Σ_t credit(m_t, c_t)) of a forward-in-time rule (``g0``: zeros shaped as credit's pytree): m_t = what the rule carries, from
    ``advance(m_{t-1}, s_{t-1}, x_t, ξ_t, key_t) → (s_t, m_t)`` (``key_t`` from ``key`` split per
    step, or None), c_t = ∂ℓ_t/∂s_t. The caller adds the exact readout gradient."""
    n_steps = batch.x.shape[1]

    def body(carry, inp):
        s_prev, carried, loss, g = carry
        (x_t, xi_t, w_t, target_t), k_t = inp
        s, carried = advance(carried, s_prev, x_t, xi_t, k_t)
        loss_t, c_t = step_signal(cfg, params, w_t, target_t, s)
        return (s, carried, loss + loss_t, jax.tree.map(jnp.add, g, credit(carried, c_t))), None

    s_init = _model.initial_state(cfg, params, batch.x.shape[0])
    carry0 = (s_init, carried0, jnp.zeros((), params.w_rec.dtype), g0)
    keys = None if key is None else jax.random.split(key, n_steps)
    (_, _, loss, g), _ = _model.time_scan(body, carry0, (time_major(cfg, batch, noise), keys))
    return loss, g


def refuse_learned_initial_state(name: str, cfg: ModelConfig, why: str) -> None:
    """The ``ValueError`` of a rule that has no credit for a learned s0 (``why`` says why)."""
    if cfg.learn_init_state:
        raise ValueError(f"{name}: {why}; a learned initial state s0 has none. Set model.learn_init_state = false, "
                         "or use uoro, which estimates every parameter's influence.")
