"""MDGL: e-prop plus one recurrent hop of the learning signal through modulatory weights."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from creditscape.model import ModelConfig, Params, Structure, cell_type_count
from creditscape.rules._base import Rule, register
from creditscape.rules._eprop import _trace_rule

MODULATORY = ("cell_type", "cell_type_all_pairs", "exact")


def modulatory_weights(cfg: ModelConfig, params: Params, struct: Structure, kind: str) -> jax.Array:
    """W̄, MDGL's modulatory weights, from W = W_rec ⊙ mask and the cell types c(i).

    * ``"cell_type"`` (the MDGL authors' released code, default mode): the mean of W over the
      connections that exist from type c(j) onto type c(i), placed on the connections that exist:
      W̄_ij = m_ij · mean{W_kl : m_kl = 1, c(k) = c(i), c(l) = c(j)}.
    * ``"cell_type_all_pairs"``: the mean over all pairs of those types, absent connections counted
      as zeros, placed on every pair (a diffuse signal that also reaches unconnected pairs).
    * ``"exact"``: W̄ = W (MDGL without the cell-type approximation).
    """
    mask = struct.rec_mask
    w = params.w_rec * mask
    if kind == "exact":
        return w
    onehot = jax.nn.one_hot(struct.cell_type, cell_type_count(cfg), dtype=w.dtype)  # (N, C)
    sums = onehot.T @ w @ onehot
    if kind == "cell_type_all_pairs":
        counts = jnp.outer(onehot.sum(0), onehot.sum(0))
        return onehot @ (sums / jnp.maximum(counts, 1.0)) @ onehot.T
    counts = onehot.T @ mask @ onehot
    return mask * (onehot @ (sums / jnp.maximum(counts, 1.0)) @ onehot.T)


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
        modulatory: how W̄ is made from W_rec (:func:`modulatory_weights`): ``"cell_type"`` (the
            published rule: cell-type means over existing connections, sent along existing
            connections), ``"cell_type_all_pairs"`` or ``"exact"`` (W̄ = W_rec).
        allow_single_type: run a cell-type W̄ on a network with a single cell type. W̄ is then
            one number (the mean weight, ≈ 0 at initialization) and MDGL is e-prop to within a
            few per cent, so it is refused unless this is set.

    References: Liu, Ghosh, Richards, Shea-Brown & Lajoie, "Cell-type-specific neuromodulation
    guides synaptic credit assignment in a spiking neural network", PNAS 2021.
    https://doi.org/10.1073/pnas.2111821118
    """

    name = "mdgl"
    per_sequence = True
    spiking = True
    formula = ("g_ij = Σ_t [L_t + (1-α) W̄ᵀ(φ'_{t+1}⊙L_{t+1})]_i · e_ij(t), "
               "W̄ = cell-type mean of W_rec over existing connections")
    forms = ("offline", "online")
    modulatory: str = "cell_type"
    allow_single_type: bool = False

    def __post_init__(self):
        if self.modulatory not in MODULATORY:
            raise ValueError(f"mdgl: modulatory must be one of {MODULATORY}, got {self.modulatory!r}.")

    def check_model(self, cfg: ModelConfig) -> None:
        if self.modulatory != "exact" and cell_type_count(cfg) == 1 and not self.allow_single_type:
            raise ValueError(
                "mdgl: this network has a single cell type, so the cell-type modulatory weights W̄ are one "
                "number (the mean recurrent weight, about 0) and MDGL is e-prop to within a few per cent. "
                "Give the network cell types: Dale's law (model.dale_exc_fraction = 0.8 gives E and I types) "
                "or model.cell_types > 1; or use modulatory = \"exact\"; or set allow_single_type = true "
                "on the rule to run it anyway."
            )

    def computation(self, cfg):
        return (self.name, self.modulatory)

    def gradient(self, cfg, params, struct, state, batch, noise, *, form):
        self.check_model(cfg)
        w_bar = modulatory_weights(cfg, params, struct, self.modulatory)
        return _trace_rule(self.check_form(form), cfg, params, struct, batch, noise, params.w_out, w_bar)
