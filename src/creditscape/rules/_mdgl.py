"""MDGL: e-prop plus one recurrent hop of the learning signal through modulatory weights."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from creditscape.model import ModelConfig, Params, Structure, cell_type_count
from creditscape.rules._base import Rule, register
from creditscape.rules._eprop import _trace_rule

MODULATORY = ("cell_type", "exact")


def modulatory_weights(cfg: ModelConfig, params: Params, struct: Structure, kind: str) -> jax.Array:
    """W̄: the cell-type block average of W_rec ⊙ mask (``"cell_type"``), or W_rec ⊙ mask (``"exact"``).

    The block average includes absent connections as zeros (it is the mean effective weight from
    type b onto type a) and spreads over all pairs of those types: the modulatory signal is
    diffuse, not synapse-specific.
    """
    w = params.w_rec * struct.rec_mask
    if kind == "exact":
        return w
    onehot = jax.nn.one_hot(struct.cell_type, cell_type_count(cfg), dtype=w.dtype)  # (N, C)
    sums = onehot.T @ w @ onehot
    counts = jnp.outer(onehot.sum(0), onehot.sum(0))
    return onehot @ (sums / jnp.maximum(counts, 1.0)) @ onehot.T


@register
@dataclasses.dataclass(frozen=True)
class MDGL(Rule):
    r"""Multidigraph learning: e-prop whose learning signal also takes one recurrent hop through W̄.

    .. math:: \tilde L_t = L_t + \bar R_{t+1}^\top L_{t+1},\qquad
              \bar R_{t+1}^\top L_{t+1} = (1-α)\, \bar W^\top \big(φ'_{t+1} ⊙ L_{t+1}\big),\qquad
              \hat g_{ij} = \sum_t \tilde L_{t,i}\, e_{t,ij}

    with L_t = W_outᵀ e_t, e_{t,ij} the e-prop eligibility, φ'_{t+1} = φ'(v_{t+1}) (voltage) or
    φ'(u_{t+1}) (rate), L_{T+1} = 0. With W̄ = 0 it is e-prop. The online form applies each
    step's update one step late, when L_{t+1} is known.

    Args:
        modulatory: ``"cell_type"`` (W̄ = cell-type block average of W_rec, the default) or
            ``"exact"`` (W̄ = W_rec).

    References: Liu, Ghosh, Richards, Shea-Brown & Lajoie, "Cell-type-specific neuromodulation
    guides synaptic credit assignment in a spiking neural network", PNAS 2021.
    https://doi.org/10.1073/pnas.2111821118
    """

    name = "mdgl"
    formula = "g_ij = Σ_t [L_t + (1-α) W̄ᵀ(φ'_{t+1}⊙L_{t+1})]_i · e_ij(t), W̄ = cell-type mean of W_rec"
    forms = ("offline", "online")
    modulatory: str = "cell_type"

    def __post_init__(self):
        if self.modulatory not in MODULATORY:
            raise ValueError(f"mdgl: modulatory must be one of {MODULATORY}, got {self.modulatory!r}.")

    def gradient(self, cfg, params, struct, state, batch, noise, *, form):
        w_bar = modulatory_weights(cfg, params, struct, self.modulatory)
        return _trace_rule(self.check_form(form), cfg, params, struct, batch, noise, params.w_out, w_bar)
