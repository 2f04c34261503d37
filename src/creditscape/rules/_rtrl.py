"""Real-time recurrent learning: the exact gradient, forward in time."""

from __future__ import annotations

import dataclasses

from creditscape.rules._base import Rule, register
from creditscape.rules._core import forward_sensitivity


@register
@dataclasses.dataclass(frozen=True)
class RTRL(Rule):
    r"""Real-time recurrent learning: exact sensitivities carried forward in time.

    .. math:: M_t = J_t M_{t-1} + \frac{\partial s_t}{\partial\theta}\Big|_{\text{immediate}},\qquad
              \hat g = \sum_t \frac{\partial L}{\partial s_t}\Big|_{\text{direct}} M_t = \nabla_\theta L

    M_t has N × P entries per sequence (P recurrent-layer parameters, ~N²), and each step costs
    O(N²·P): for small networks and for checking other rules. Equal to BPTT.

    References: Williams & Zipser, "A learning algorithm for continually running fully recurrent
    neural networks", Neural Computation 1989.
    """

    name = "rtrl"
    per_sequence = True
    spiking = True
    formula = "M_t = J_t M_{t-1} + ∂s_t/∂θ;  g = Σ_t dℓ_t/ds_t · M_t  (exact, O(N^4); small N)"
    forms = ("online",)

    def computation(self, cfg):
        return ("bptt",)  # the exact gradient, forward in time

    def gradient(self, cfg, params, struct, state, batch, noise, *, form):
        self.check_form(form)
        return forward_sensitivity(cfg, params, struct, batch, noise, window=None)
