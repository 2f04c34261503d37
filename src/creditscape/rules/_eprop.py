"""e-prop (symmetric and random feedback) and RFLO: eligibility traces × learning signals."""

from __future__ import annotations

import dataclasses
import math

from creditscape import prng
from creditscape.rules._base import Rule, register
from creditscape.rules._core import trace_rule_offline, trace_rule_online
from creditscape.rules._spiking import spiking_trace_online


def _trace_rule(form, cfg, params, struct, batch, noise, feedback, w_bar=None):
    if form == "offline":
        impl = trace_rule_offline
    else:
        impl = spiking_trace_online if cfg.spiking else trace_rule_online
    return impl(cfg, params, struct, batch, noise, feedback, w_bar)


@register
@dataclasses.dataclass(frozen=True)
class EProp(Rule):
    r"""e-prop with symmetric feedback: leak-only eligibility traces times the readout error.

    .. math:: \hat g_{ij} = \sum_t L_{t,i}\, e_{t,ij},\qquad L_t = W_{out}^\top \frac{\partial L}{\partial y_t}

    with eligibility e_{t,ij} = φ'(v_{t,i}) ε_{t,j}, ε_{t,j} = α ε_{t-1,j} + (1-α) r_{t-1,j} (voltage
    form), or e_{t,ij} = α e_{t-1,ij} + (1-α) φ'(u_{t,i}) r_{t-1,j} (rate form); x_{t,j} and 1
    replace r_{t-1,j} for W_in and b. The state Jacobian is cut to its leak D_t = αI.

    .. warning:: With no leak (α = 0) the trace is the immediate term alone: e-prop becomes a
       one-step truncation (tbptt with K = 1). With a last-step loss (sequential MNIST), W_in then
       learns only from the last input step. This is the paper's released setting.

    References: Bellec et al., "A solution to the learning dilemma for recurrent networks of
    spiking neurons", Nature Communications 2020. https://doi.org/10.1038/s41467-020-17236-y
    """

    name = "eprop"
    per_sequence = True
    spiking = True
    formula = "g_ij = Σ_t [W_outᵀ e_t]_i · e_ij(t), eligibility e from the leak path only"
    forms = ("offline", "online")

    def computation(self, cfg):
        # Without a leak the eligibility is the immediate term alone: one-step truncated BPTT
        # (not for spiking units that adapt or whose readout filters their spikes).
        own_memory = cfg.form == "alif" or cfg.readout_decay > 0
        return ("tbptt", 1) if cfg.alpha == 0 and not own_memory else super().computation(cfg)

    def gradient(self, cfg, params, struct, state, batch, noise, *, form):
        return _trace_rule(self.check_form(form), cfg, params, struct, batch, noise, params.w_out)


@register
@dataclasses.dataclass(frozen=True)
class RandomEProp(Rule):
    r"""e-prop with fixed random feedback B in place of W_out in the learning signal.

    .. math:: \hat g_{ij} = \sum_t [B^\top e_t]_i\, e_{t,ij}

    B (n_out × N) is drawn once per seed, Glorot-uniform like W_out, and kept fixed (the rule
    state). Eligibility as in :class:`EProp`.

    References: Bellec et al. 2020 (random e-prop); Lillicrap et al., "Random synaptic feedback
    weights support error backpropagation for deep learning", Nature Communications 2016.
    """

    name = "eprop_random"
    per_sequence = True
    spiking = True
    formula = "g_ij = Σ_t [Bᵀ e_t]_i · e_ij(t), B fixed random, eligibility from the leak path"
    forms = ("offline", "online")

    def init(self, cfg, params, struct, *, key):
        limit = math.sqrt(6.0 / (cfg.n_rec + cfg.n_out))
        return prng.uniform(key, (cfg.n_out, cfg.n_rec), params.w_out.dtype, -limit, limit)

    def gradient(self, cfg, params, struct, state, batch, noise, *, form):
        return _trace_rule(self.check_form(form), cfg, params, struct, batch, noise, state)


@register
@dataclasses.dataclass(frozen=True)
class RFLO(RandomEProp):
    r"""Random-feedback local online learning: the same rule as ``eprop_random``, Murray's name.

    On ``form="rate"`` it is exactly Murray's RFLO:

    .. math:: M_{t,ij} = α M_{t-1,ij} + (1-α) φ'(u_{t,i}) p_{t,j},\qquad
              \hat g_{ij} = \sum_t [B^\top e_t]_i M_{t,ij}

    (Murray writes 1/τ for 1 − α.) One implementation, two registered names.

    References: Murray, "Local online learning in recurrent networks with random feedback",
    eLife 2019. https://doi.org/10.7554/eLife.43299
    """

    name = "rflo"
    formula = "same as eprop_random (Murray 2019); exactly RFLO on form='rate'"

    def computation(self, cfg):
        return RandomEProp().computation(cfg)
