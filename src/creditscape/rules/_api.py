"""Public entry points: a rule's gradient estimate, and its alignment with the exact gradient."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from creditscape.model import ModelConfig, Params, Structure
from creditscape.objective import Batch, Noise, exact_loss
from creditscape.rules._base import Rule, RuleState, check_network
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
    key: jax.Array | None = None,
) -> tuple[jax.Array, Params]:
    """(loss, ĝ) of ``rule`` on ``batch``; ``noise=None`` runs without noise, ``form=None`` uses
    the rule's default form. A stochastic rule (``rule.stochastic``) needs ``key`` for its draws;
    other rules take none."""
    noise = Noise(batch.x, None) if noise is None else noise
    if batch.x.shape[-1] != cfg.n_in:
        raise ValueError(f"batch.x has {batch.x.shape[-1]} inputs per step; the model expects n_in={cfg.n_in}.")
    form = rule.check_form(form)
    if cfg.spiking:  # (the rate-model forms are checked where a rule starts its work)
        check_network(rule, cfg)
    if not rule.stochastic:
        if key is not None:
            raise ValueError(f"Rule {rule.name!r} draws no random numbers; pass no key.")
        return rule.gradient(cfg, params, struct, state, batch, noise, form=form)
    if key is None:
        raise ValueError(f"Rule {rule.name!r} is stochastic: pass key=jax.random.key(...) for its random draws.")
    return rule.gradient(cfg, params, struct, state, batch, noise, form=form, key=key)


def expected_gradient(
    rule: Rule,
    cfg: ModelConfig,
    params: Params,
    struct: Structure,
    state: RuleState,
    batch: Batch,
    noise: Noise | None = None,
    *,
    form: str | None = None,
    key: jax.Array | None = None,
    draws: int = 1,
) -> tuple[jax.Array, Params]:
    """(loss, mean of ĝ over ``draws`` keys split from ``key``): a stochastic rule's expected
    update, estimated; for a deterministic rule (``key=None``) its ĝ. The draws run one after
    another (``lax.map``) so memory does not grow with ``draws``."""
    if not rule.stochastic:
        return rule_gradient(rule, cfg, params, struct, state, batch, noise, form=form)
    if key is None:
        raise ValueError(f"Rule {rule.name!r} is stochastic: pass key=jax.random.key(...) for its random draws.")
    losses, grads = jax.lax.map(
        lambda k: rule_gradient(rule, cfg, params, struct, state, batch, noise, form=form, key=k),
        jax.random.split(key, draws),
    )
    return losses[0], jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)


def _cosine(a: Params, b: Params) -> jax.Array:
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    dot = sum(jnp.vdot(x, y) for x, y in zip(leaves_a, leaves_b))
    norm_a = jnp.sqrt(sum(jnp.vdot(x, x) for x in leaves_a))
    norm_b = jnp.sqrt(sum(jnp.vdot(y, y) for y in leaves_b))
    return dot / jnp.maximum(norm_a * norm_b, jnp.finfo(dot.dtype).tiny)


class Alignment(NamedTuple):
    """A rule's estimate beside the exact gradient (same batch, same noise). For a stochastic rule
    over ``draws`` keys: ``estimate`` is their mean, the cosines are means of each draw's, and
    ``relative_variance`` is the draws' total variance E‖ĝ − Eĝ‖² over ‖∇L‖² (0 for a
    deterministic rule)."""

    estimate: Params
    exact: Params
    cosine: jax.Array  # over all parameters
    cosine_recurrent: jax.Array  # over the recurrent layer (W_in, W_rec, b, s0): what rules approximate
    relative_variance: jax.Array


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
    key: jax.Array | None = None,
    draws: int = 8,
) -> Alignment:
    """ĝ of ``rule``, the exact gradient ∇L, and cos(ĝ, ∇L) over all and over recurrent parameters;
    a stochastic rule's over ``draws`` keys split from ``key`` (see :class:`Alignment`)."""
    exact = jax.grad(lambda p: exact_loss(cfg, p, struct, batch, noise))(params)
    if not rule.stochastic:
        _, estimate = rule_gradient(rule, cfg, params, struct, state, batch, noise, form=form)
        zero = jnp.zeros((), jax.tree.leaves(exact)[0].dtype)
        return Alignment(estimate, exact, _cosine(estimate, exact),
                         _cosine(recurrent_part(estimate), recurrent_part(exact)), zero)
    if key is None or draws < 2:
        raise ValueError(f"Rule {rule.name!r} is stochastic: pass key=jax.random.key(...) and draws >= 2 "
                         f"(got draws={draws}) to estimate its mean and variance.")

    def one_draw(k):
        _, g = rule_gradient(rule, cfg, params, struct, state, batch, noise, form=form, key=k)
        return g, _cosine(g, exact), _cosine(recurrent_part(g), recurrent_part(exact))

    grads, cosines, cosines_recurrent = jax.lax.map(one_draw, jax.random.split(key, draws))
    mean = jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)
    spread = sum(jnp.sum((g - m) ** 2) for g, m in zip(jax.tree.leaves(grads), jax.tree.leaves(mean))) / (draws - 1)
    size = sum(jnp.vdot(g, g) for g in jax.tree.leaves(exact))
    return Alignment(mean, exact, jnp.mean(cosines), jnp.mean(cosines_recurrent),
                     spread / jnp.maximum(size, jnp.finfo(size.dtype).tiny))
