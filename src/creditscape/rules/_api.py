"""Public entry points: a rule's gradient estimate, and its alignment with the exact gradient."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from creditscape.model import ModelConfig, Params, Structure
from creditscape.objective import Batch, Noise, exact_loss
from creditscape.rules._base import Rule, RuleState
from creditscape.rules._core import recurrent_part


def rule_gradient(
    rule: Rule,
    cfg: ModelConfig,
    params: Params,
    struct: Structure,
    state: RuleState,
    batch: Batch,
    noise: Noise | None = None,
    *,
    form: str | None = None,
) -> tuple[jax.Array, Params]:
    """(loss, ĝ) of ``rule`` on ``batch``; ``noise=None`` runs without noise, ``form=None`` uses
    the rule's default form."""
    noise = Noise(batch.x, None) if noise is None else noise
    if batch.x.shape[-1] != cfg.n_in:
        raise ValueError(f"batch.x has {batch.x.shape[-1]} inputs per step; the model expects n_in={cfg.n_in}.")
    return rule.gradient(cfg, params, struct, state, batch, noise, form=rule.check_form(form))


def _cosine(a: Params, b: Params) -> jax.Array:
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    dot = sum(jnp.vdot(x, y) for x, y in zip(leaves_a, leaves_b))
    norm_a = jnp.sqrt(sum(jnp.vdot(x, x) for x in leaves_a))
    norm_b = jnp.sqrt(sum(jnp.vdot(y, y) for y in leaves_b))
    return dot / jnp.maximum(norm_a * norm_b, jnp.finfo(dot.dtype).tiny)


class Alignment(NamedTuple):
    """A rule's estimate beside the exact gradient (same batch, same noise)."""

    estimate: Params
    exact: Params
    cosine: jax.Array  # over all parameters
    cosine_recurrent: jax.Array  # over the recurrent layer (W_in, W_rec, b, s0): what rules approximate


def gradient_alignment(
    rule: Rule,
    cfg: ModelConfig,
    params: Params,
    struct: Structure,
    state: RuleState,
    batch: Batch,
    noise: Noise | None = None,
    *,
    form: str | None = None,
) -> Alignment:
    """ĝ of ``rule``, the exact gradient ∇L, and cos(ĝ, ∇L) over all and over recurrent parameters."""
    _, estimate = rule_gradient(rule, cfg, params, struct, state, batch, noise, form=form)
    exact = jax.grad(lambda p: exact_loss(cfg, p, struct, batch, noise))(params)
    return Alignment(
        estimate,
        exact,
        _cosine(estimate, exact),
        _cosine(recurrent_part(estimate), recurrent_part(exact)),
    )
