"""ModProp: the learning signal carried back through any number of modulatory hops."""

from __future__ import annotations

import dataclasses

from creditscape.rules._base import register
from creditscape.rules._core import trace_rule_offline
from creditscape.rules._eprop import EProp
from creditscape.rules._mdgl import MDGL, modulatory_weights

SLOPES = ("mean", "exact")


@register
@dataclasses.dataclass(frozen=True)
class ModProp(MDGL):
    r"""ModProp: e-prop whose learning signal reaches back through s = 0, 1, 2, … consecutive hops
    of the modulatory weights W̄, each hop a time step.

    .. math:: \tilde L_t = \sum_{s=0}^{S} \big(\bar R_{t+1}^\top \cdots \bar R_{t+s}^\top\big) L_{t+s},
              \qquad \bar R_{t+1}^\top L = (1-α)\, \bar W^\top (μ_{t+1} ⊙ L),\qquad
              \hat g_{ij} = \sum_t \tilde L_{t,i}\, e_{t,ij}

    with L_t = W_outᵀ e_t, e_{t,ij} e-prop's eligibility, S = ``hops`` (all steps to the end of
    the sequence by default) and μ the slope of the receiving units. With ``slope = "mean"`` (the
    paper's time-invariant filter) μ is one number, the mean of φ' over the batch's units and
    steps, so that the hops form causal, time-invariant, cell-type-specific filter taps
    F_s = ((1−α) μ W̄ᵀ)^s convolving the eligibility traces: ĝ = Σ_t Σ_s (F_s L_{t+s}) ⊙ e_t.
    With ``slope = "exact"`` μ_{t+1} = φ'_{t+1} of each receiving unit.

    Limits (tested): ``hops = 0`` is e-prop; ``hops = 1, slope = "exact"`` is MDGL; with no leak
    (α = 0), ``modulatory = "exact"`` and ``slope = "exact"``, every hop is the exact Jacobian and
    ModProp is BPTT for every weight and bias (a learned s0 keeps e-prop's leak-only eligibility,
    as in MDGL). With a leak the paths that take the leak after a hop are dropped (as in MDGL).

    Assumptions stated by the paper (Liu et al. 2022, §3): the activation derivative is replaced
    by a constant μ along the propagated paths, and W^s by powers of the cell-type approximation;
    our μ (the batch mean of φ') is our choice where the paper leaves a constant. Offline form only:
    a causal form filters every synapse's eligibility with the taps (memory O(N·P) in general,
    O(C·P) for C cell types with the all-pairs W̄), not built here. Cost: one backward pass of
    O(T·N²) for the signal, then e-prop's.

    References: Liu, Smith, Mihalas, Shea-Brown & Sümbül, "Biologically-plausible backpropagation
    through arbitrary timespans via local neuromodulators", NeurIPS 2022.
    https://arxiv.org/abs/2206.01338
    """

    name = "modprop"
    spiking = False  # its hop is written for the rate-model forms
    formula = "g_ij = Σ_t [Σ_s (R̄ᵀ)^s L_{t+s}]_i · e_ij(t), R̄ᵀL = (1-α) W̄ᵀ(μ⊙L), μ = mean φ'; hops s ≤ S (all)"
    forms = ("offline",)
    per_sequence = False  # μ is a batch statistic
    hops: int | None = None
    slope: str = "mean"

    def __post_init__(self):
        super().__post_init__()
        if self.slope not in SLOPES:
            raise ValueError(f"modprop: slope must be one of {SLOPES}, got {self.slope!r}.")
        if self.hops is not None and (not isinstance(self.hops, int) or self.hops < 0):
            raise ValueError(f"modprop: hops must be an integer >= 0 (or left unset for every hop), got {self.hops!r}.")

    def computation(self, cfg):
        if self.hops == 0:
            return EProp().computation(cfg)
        if self.hops == 1 and self.slope == "exact":
            return MDGL(self.modulatory).computation(cfg)
        return (self.name, self.modulatory, self.hops, self.slope)

    def gradient(self, cfg, params, struct, state, batch, noise, *, form):
        self.check_form(form)
        self.check_model(cfg)
        w_bar = modulatory_weights(cfg, params, struct, self.modulatory)
        return trace_rule_offline(cfg, params, struct, batch, noise, params.w_out, w_bar,
                                  hops=self.hops, mean_slope=self.slope == "mean")
