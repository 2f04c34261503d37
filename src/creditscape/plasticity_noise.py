"""Noise in learning itself, one of the kinds of noise a brain has (the paper's second open
question): noisy synapses while a gradient is formed, and noisy plasticity when it is applied.

Both are pure functions of a key, used by the training iteration (``train.weight_noise``,
``train.update_noise``); a level of 0 leaves training untouched. The noise of the network's
activity (``model.rec_noise``) and of its inputs (``task`` options) live with the model and the
tasks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from creditscape import prng
from creditscape.model import Params

WEIGHTS = ("w_in", "w_rec", "w_out")  # synapses; biases and the initial state are not
WEIGHT_NOISE_DRAWS = ("iteration", "trial")
UPDATE_NOISE_SCALES = ("relative", "absolute")


def perturb_weights(params: Params, level: float, key: jax.Array) -> Params:
    r"""Synaptic noise: every synapse of W_in, W_rec and W_out read with independent Gaussian
    noise of standard deviation ``level``,

    .. math:: \tilde W = W + \sigma \xi, \quad \xi_{ij} \sim \mathcal N(0, 1),

    one draw per call: training draws once per iteration (every trial of a minibatch sees the same
    perturbed synapses) or once per trial (``train.weight_noise_draw``); the rule forms its
    gradient there, and the update is applied to the unperturbed weights. (Absent connections and
    Dale's signs are restored by the caller's projection.)"""
    keys = dict(zip(WEIGHTS, jax.random.split(key, len(WEIGHTS))))
    return params._replace(**{name: getattr(params, name) + level * prng.normal(
        keys[name], getattr(params, name).shape, getattr(params, name).dtype) for name in WEIGHTS})


def perturb_updates(updates: Params, level: float, scale: str, key: jax.Array) -> Params:
    r"""Noisy plasticity: Gaussian noise added to every parameter's update Δθ (after the
    learning rate),

    .. math:: \widetilde{\Delta\theta} = \Delta\theta + s\,\xi, \quad \xi \sim \mathcal N(0, I),

    with s = ``level`` (``scale = "absolute"``), or s = ``level`` · ‖Δθ_k‖ / √n_k for each
    parameter array k of n_k entries (``"relative"``), so that the noise's expected squared norm is
    level² times the update's: a signal-to-noise ratio of 1/level for every array."""
    if scale not in UPDATE_NOISE_SCALES:
        raise ValueError(f"update noise scale: expected one of {UPDATE_NOISE_SCALES}, got {scale!r}.")
    leaves, tree = jax.tree.flatten(updates)
    keys = jax.random.split(key, len(leaves))

    def noisy(u, k):
        s = level if scale == "absolute" else level * jnp.linalg.norm(u) / jnp.sqrt(u.size)
        return u + s * prng.normal(k, u.shape, u.dtype)

    return jax.tree.unflatten(tree, [noisy(u, k) for u, k in zip(leaves, keys)])
