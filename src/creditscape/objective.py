"""Batches, the masked loss, accuracy, L2, and noise draws.

The loss of a batch of B sequences with per-step mask m (DESIGN.md §2):

    L(θ) = (1/B) Σ_b Σ_t m_{b,t} ℓ(y_{b,t}, y*_{b,t}) / Σ_t m_{b,t}  =  Σ_{b,t} w_{b,t} ℓ_{b,t}

with per-step weights w = m / (B Σ_t m). Writing it as a weighted sum of per-step terms is what
lets online rules accumulate the gradient step by step. A network with a readout at its last K
steps only (``ModelConfig.readout_steps``) scores those: m is taken as zero before them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from creditscape import prng
from creditscape import model as _model
from creditscape.model import ModelConfig, Params, Structure


class Batch(NamedTuple):
    """A batch of sequences (batch-major).

    x: inputs (B, T, n_in). target: integer classes (B, T) for ``"xent"`` or reals
    (B, T, n_out) for ``"mse"``. mask: (B, T), 1 where the step is scored.
    """

    x: jax.Array
    target: jax.Array
    mask: jax.Array


class Noise(NamedTuple):
    """One draw of the model's noise for a batch: input noise already added to ``x``."""

    x: jax.Array  # (B, T, n_in) noisy inputs
    xi: jax.Array | None  # (B, T, N) recurrent noise, None when rec_noise = 0


def loss_weights(cfg: ModelConfig, mask: jax.Array) -> jax.Array:
    """w = m / (B Σ_t m), shape (B, T), with m zero before the readout steps (the last
    ``cfg.readout_steps``). A sequence with an all-zero mask gets weight 0."""
    silent = _model.steps_without_readout(cfg, mask.shape[1])
    if silent:
        mask = mask.at[:, :silent].set(0)
    per_seq = jnp.maximum(mask.sum(axis=1, keepdims=True), 1.0)
    return mask / (per_seq * mask.shape[0])


def step_losses(cfg: ModelConfig, y: jax.Array, target: jax.Array) -> jax.Array:
    """ℓ(y_t, y*_t) for every step, shape (B, T).

    ``"xent"``: −log softmax(y)[y*], via log-sum-exp (stable for large logits).
    ``"mse"``: ½ Σ_k (y_k − y*_k)².
    """
    if cfg.loss == "xent":
        # A one-hot product instead of a gather: its gradient is dense, where a gather's is a
        # scatter (slow on CPU, nondeterministic on GPU).
        picked = jnp.sum(y * jax.nn.one_hot(target, y.shape[-1], dtype=y.dtype), axis=-1)
        return jax.nn.logsumexp(y, axis=-1) - picked
    return 0.5 * jnp.sum((y - target) ** 2, axis=-1)


def check_scored_steps(cfg: ModelConfig, batch: Batch, name: str = "batch") -> None:
    """Refuse (on the host, before any compilation) a data set that scores a step where the
    network has no readout: those steps would silently not count."""
    k = cfg.readout_steps
    early = np.asarray(batch.mask)[:, : _model.steps_without_readout(cfg, batch.mask.shape[1])].any(axis=0)
    if early.any():
        raise ValueError(
            f"{name}: step {int(np.flatnonzero(early)[0])} of {batch.mask.shape[1]} is scored (mask > 0), but the "
            f"network reads out at its last {k} steps only (ModelConfig.readout_steps={k}). Use "
            f"readout_steps=None (a readout at every step) or a mask that is zero before the last {k} steps."
        )


def _last_steps(cfg: ModelConfig, y: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Weights and targets of the last K steps of the batch, K = y.shape[1]: readouts y cover all
    T steps, or only the last ones (:func:`creditscape.model.outputs`)."""
    k = y.shape[1]
    return loss_weights(cfg, batch.mask)[:, -k:], batch.target[:, -k:]


def loss_from_outputs(cfg: ModelConfig, y: jax.Array, batch: Batch) -> jax.Array:
    """Σ_{b,t} w_{b,t} ℓ_{b,t}: the batch loss from readouts y (B, T, n_out), or (B, K, n_out) of
    the last K steps."""
    w, target = _last_steps(cfg, y, batch)
    return jnp.sum(w * step_losses(cfg, y, target))


def accuracy(cfg: ModelConfig, y: jax.Array, batch: Batch) -> jax.Array:
    """Mean over sequences of the fraction of scored steps classified right (NaN for ``"mse"``)."""
    if cfg.loss != "xent":
        return jnp.array(jnp.nan, y.dtype)
    w, target = _last_steps(cfg, y, batch)
    return jnp.sum(w * (jnp.argmax(y, axis=-1) == target).astype(y.dtype))


def l2_penalty(params: Params) -> jax.Array:
    """½(‖W_in‖² + ‖W_rec‖² + ‖W_out‖²): the paper's L2 (biases and s0 are not penalized)."""
    return 0.5 * sum(jnp.sum(w**2) for w in (params.w_in, params.w_rec, params.w_out))


def l2_gradient(params: Params) -> Params:
    """Gradient of :func:`l2_penalty`: the weights themselves, zeros elsewhere."""
    zero = lambda a: None if a is None else jnp.zeros_like(a)
    return Params(params.w_in, params.w_rec, zero(params.b), params.w_out,
                  jnp.zeros_like(params.b_out), zero(params.s0))


def rate_penalty(cfg: ModelConfig, z: jax.Array) -> jax.Array:
    """The firing-rate regularizer c Σ_i (f̄_i − f₀)² of spike trains z (B, T, N), f̄_i the mean of
    z_{·,·,i} over the batch and the steps (``model.rate_regularization``, ``model.target_rate``)."""
    return cfg.rate_regularization * jnp.sum((jnp.mean(z, axis=(0, 1)) - cfg.target_rate) ** 2)


def exact_loss(
    cfg: ModelConfig, params: Params, struct: Structure, batch: Batch, noise: Noise | None = None
) -> jax.Array:
    """The exact loss L(θ) (no L2) of ``batch``, with a spiking network's firing-rate regularizer
    when it has one; ``noise`` defaults to none (clean inputs)."""
    x, xi = (batch.x, None) if noise is None else noise
    if not cfg.rate_regularization:
        return loss_from_outputs(cfg, _model.outputs(cfg, params, struct, x, xi), batch)
    s, z, _ = _model.run(cfg, params, struct, x, xi)
    silent = _model.steps_without_readout(cfg, x.shape[1])
    y = _model.readout(params, _model.readout_input(cfg, s, z)[:, silent:])
    return loss_from_outputs(cfg, y, batch) + rate_penalty(cfg, z)


EVAL_CHUNK = 4096


def evaluate(cfg: ModelConfig, params: Params, struct: Structure, batch: Batch, chunk: int = EVAL_CHUNK):
    """(loss, accuracy) of ``batch`` without noise; the loss is the task's (a firing-rate
    regularizer, part of the training objective, is not a property of a held-out set).

    Sets larger than ``chunk`` sequences go through the network ``chunk`` at a time (``lax.map``),
    so memory stays that of one chunk (the 55,000 training images of sequential MNIST, say).
    Padding sequences have an all-zero mask and weigh nothing.
    """
    n = batch.x.shape[0]

    def totals(b: Batch):  # Σ over the chunk's sequences, i.e. its mean times its size
        y = _model.outputs(cfg, params, struct, b.x)
        size = b.x.shape[0]
        return size * loss_from_outputs(cfg, y, b), size * accuracy(cfg, y, b)

    if n <= chunk:
        loss, acc = totals(batch)
        return loss / n, acc / n
    pad = -n % chunk
    padded = jax.tree.map(lambda a: jnp.concatenate([a, jnp.zeros((pad, *a.shape[1:]), a.dtype)]), batch)
    chunks = jax.tree.map(lambda a: a.reshape(-1, chunk, *a.shape[1:]), padded)
    loss, acc = jax.lax.map(totals, chunks)
    return loss.sum() / n, acc.sum() / n


def draw_noise(cfg: ModelConfig, batch: Batch, key: jax.Array) -> Noise:
    """Draw the model's input and recurrent noise for ``batch`` (exactly ``batch.x`` if none)."""
    k_in, k_rec = jax.random.split(key)
    x = batch.x
    if cfg.input_noise > 0:
        x = x + cfg.input_noise * prng.normal(k_in, x.shape, x.dtype)
    xi = None
    if cfg.rec_noise > 0:
        shape = x.shape[:2] + (cfg.n_rec,)
        xi = cfg.rec_noise * prng.normal(k_rec, shape, x.dtype)
    return Noise(x, xi)
