"""The e-prop family's online form on spiking networks: eligibility vectors of LIF and ALIF units.

Bellec et al. (2020), in this project's conventions (creditscape.model). For a weight W_ij of the
recurrent layer with presynaptic input p_{t,j} ∈ {z_{t-1,j}, x_{t,j}, 1}, the eligibility vector
follows the unit's own state, the recurrent spikes z_{t-1} held fixed where they enter the drive:

    ε^v_{t,ij} = α (1 − z_{t-1,i})^[hard reset] ε^v_{t-1,ij} + (1-α) p_{t,j}
    ε^a_{t,ij} = (1-ρ) ψ_{t-1,i} ε^v_{t-1,ij} + (ρ − (1-ρ) β ψ_{t-1,i}) ε^a_{t-1,ij}      (ALIF)
    e_{t,ij}   = ψ_{t,i} (ε^v_{t,ij} − β ε^a_{t,ij})                                   (= ∂z_{t,i}/∂W_ij)

(the soft reset's derivative is dropped, as in the model), and with a readout filter the
eligibility is filtered like the spikes, ē_t = κ ē_{t-1} + (1-κ) e_t. The estimate is
ĝ_ij = Σ_t L̃_{t,i} ē_{t,ij}, L_t = Fᵀ ∂L/∂y_t, which equals the offline form's
Σ_t [(1-κ) Σ_{t'≥t} κ^{t'-t} L_{t'}]_i e_{t,ij} (the sums reordered). MDGL's hop L_{t+1} → step t
is credited one step late, as for the rate forms; with a readout filter its signal on the spikes
at t+1 involves every later step, so that case has no online form here (refused). A firing-rate
regularizer R = c Σ_i (f̄_i − f₀)² has the learning signal ∂R/∂z_{t,i} = 2c (f̄_i − f₀)/(B·T) at every
step, known once the batch's rates are: the pass accumulates Σ_{b,t} e_t and the spike counts and
credits it at the end (memory still flat in T; MDGL's hop of it is refused online likewise).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from creditscape import model as _model
from creditscape.model import ModelConfig, Params, Structure
from creditscape.objective import Batch, Noise
from creditscape.rules._core import (
    activity_slope, mdgl_hop, presynaptic_gradient, presynaptic_input, rate_penalty_from_counts, step_output_error,
    time_major,
)


def spiking_trace_online(cfg: ModelConfig, params: Params, struct: Structure, batch: Batch, noise: Noise,
                         feedback: jax.Array, w_bar: jax.Array | None) -> tuple[jax.Array, Params]:
    """Online e-prop family on a spiking network (module docstring): one forward pass carrying the
    eligibility vectors, memory O(B·N·(N + n_in)) whatever T."""
    if w_bar is not None and (cfg.readout_decay or cfg.rate_regularization):
        raise ValueError(
            "mdgl: no online form with a readout filter (model.readout_decay > 0) or a firing-rate regularizer: "
            "the hop's learning signal on the spikes of step t+1 then depends on every later step. Use "
            "form = \"offline\", or model.readout_decay = 0 and model.rate_regularization = 0.")
    n, bsz = cfg.n_rec, batch.x.shape[0]
    dtype = params.w_rec.dtype
    n_pre = n + cfg.n_in + 1
    alpha, rho, kappa = cfg.alpha, cfg.adapt_decay, cfg.readout_decay
    beta = jnp.reshape(_model.adaptation_strength(cfg), (-1, 1))  # β_i along a trace's rows
    alif, hard = cfg.form == "alif", cfg.reset == "hard"
    per_synapse = jnp.zeros((bsz, n, n_pre), dtype)
    # ε^v does not depend on the postsynaptic unit unless a hard reset scales it.
    ev0 = per_synapse if hard else jnp.zeros((bsz, 1, n_pre), dtype)

    def body(carry, inp):
        s_prev, psi_prev, ev, ea, ebar, prev, acc = carry
        x_t, xi_t, w_t, target_t = inp
        s, z, u = _model.step(cfg, params, struct, s_prev, x_t, xi_t)
        p = presynaptic_input(cfg, s_prev, x_t)[:, None, :]
        psi = activity_slope(cfg, s, u)
        if alif:  # from ε^v_{t-1}, before it moves on
            ea = (1 - rho) * psi_prev[:, :, None] * ev + (rho - (1 - rho) * beta * psi_prev[:, :, None]) * ea
        keep = alpha * (1 - _model.activity(cfg, s_prev))[:, :, None] if hard else alpha
        ev = keep * ev + (1 - alpha) * p
        own = psi[:, :, None] * (ev - beta * ea if alif else ev)  # ∂z_t/∂W through the unit's own state
        elig = own
        if kappa:
            ebar = kappa * ebar + (1 - kappa) * own
            elig = ebar
        read = _model.readout_input(cfg, s, z)
        loss_t, e_t = step_output_error(cfg, w_t, target_t, _model.readout(params, read))
        signal = e_t @ feedback
        prev_elig, prev_signal = prev
        if w_bar is not None:  # credit the previous step, now that its hop is known
            prev_signal = prev_signal + mdgl_hop(alpha, signal, psi, w_bar)
        loss, g_full, g_out, g_bout, spikes = acc
        if cfg.rate_regularization:  # Σ_{b,t} (z_t, e_t): the regularizer's credit at the end
            spikes = (spikes[0] + z.sum(0), spikes[1] + own.sum(0))
        acc = (loss + loss_t, g_full + jnp.einsum("bi,bij->ij", prev_signal, prev_elig),
               g_out + jnp.einsum("bk,bn->kn", e_t, read), g_bout + e_t.sum(0), spikes)
        return (s, psi, ev, ea, ebar, (elig, signal), acc), None

    s_init = _model.initial_state(cfg, params, bsz)
    psi_init = activity_slope(cfg, s_init, jnp.zeros((bsz, n), dtype))
    spikes0 = (jnp.zeros((n,), dtype), jnp.zeros((n, n_pre), dtype)) if cfg.rate_regularization else ()
    acc0 = (jnp.zeros((), dtype), jnp.zeros((n, n_pre), dtype), jnp.zeros((cfg.n_out, n), dtype),
            jnp.zeros((cfg.n_out,), dtype), spikes0)
    prev0 = (per_synapse, jnp.zeros((bsz, n), dtype))
    carry0 = (s_init, psi_init, ev0, per_synapse, per_synapse, prev0, acc0)
    (*_, (last_elig, last_signal), acc), _ = _model.time_scan(body, carry0, time_major(cfg, batch, noise))
    loss, g_full, g_out, g_bout, spikes = acc
    g_full = g_full + jnp.einsum("bi,bij->ij", last_signal, last_elig)
    if cfg.rate_regularization:
        penalty, on_spikes = rate_penalty_from_counts(cfg, spikes[0], batch.x.shape[:2])
        loss, g_full = loss + penalty, g_full + on_spikes[:, None] * spikes[1]  # e_{t,ij} acts on z_{t,i} only
    return loss, presynaptic_gradient(cfg, params, struct, g_full)._replace(w_out=g_out, b_out=g_bout)
