"""Compiled training of an ensemble of seeds with any rule.

One compiled call runs ``chunk`` iterations (a ``lax.scan`` over iterations) for every seed at
once (``vmap`` over seeds). An iteration draws a minibatch (uniformly, with replacement) from the
fixed training set, draws the model's noise, asks the rule for ĝ, adds the L2 gradient, applies
the optax update and projects the weights back onto their constraints (mask, Dale's law).

With a ``target_loss`` L*, a member **stops** at the first iteration where its smoothed training
loss (an exponential moving average of its minibatch losses, L2 term excluded) is at or below L*:
its parameters freeze there and ``reached_at`` records the iteration, so that members of every
rule are measured at the same training loss; a member that never gets there trains for all
``steps`` and is marked not reached (``reached_at = -1``).

A seed whose loss or parameters become NaN/inf is **diverged**: its parameters and optimizer
state freeze at their last finite values, the iteration is recorded in ``diverged_at``, and its
later losses read NaN. Other seeds are untouched. Between chunks, the host evaluates the
ensemble on fixed sets and measures gradient alignment; nothing recompiles along training.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jax.flatten_util import ravel_pytree
from jax.sharding import PartitionSpec

from creditscape import prng
from creditscape import model as _model
from creditscape import stopping
from creditscape._files import load_arrays, save_arrays
from creditscape.devices import MemberSharding, first_members, pad_members
from creditscape.curvature import _select, block_loss, hvp, lanczos, lanczos_tridiagonal, top_ritz_value
from creditscape.errors import DamagedFile
from creditscape.model import ModelConfig, Params, Structure
from creditscape.objective import Batch, check_scored_steps, draw_noise, evaluate, l2_gradient, l2_penalty
from creditscape.plasticity_noise import UPDATE_NOISE_SCALES, WEIGHT_NOISE_DRAWS, perturb_updates, perturb_weights
from creditscape.rules import Rule, RuleState, gradient_alignment, rule_gradient
from creditscape.theory import estimate_on_block, jacobian_vector_product

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine", "boost")
MATMUL_PRECISIONS = ("highest", "tensorfloat32")


def full_precision(fn: Callable) -> Callable:
    """``fn`` with float32 matrix products in full precision for everything it traces. On a GPU,
    JAX's default is TF32 (10-bit mantissas): gradients then differ from float64 by ≈ 3e-3
    relative and a Lanczos iteration with TF32 products repeats its top eigenvalue (ghosts).
    Training may opt in to TF32 (``TrainConfig.matmul_precision``); measurements never do."""

    @functools.wraps(fn)
    def in_full_precision(*args, **kwargs):
        with jax.default_matmul_precision("highest"):
            return fn(*args, **kwargs)

    return in_full_precision


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train.

    Args:
        optimizer: ``"sgd"`` (with optional ``momentum``) or ``"adam"``.
        learning_rate: η.
        schedule: ``"constant"``; ``"cosine"`` (decay to 0 over ``steps``); ``"boost"`` (η until
            ``boost_at``·steps, then ``boost_factor``·η: the paper's late learning-rate remedy).
        steps: number of iterations.
        batch_size: minibatch size, drawn with replacement from the training set.
        l2: coefficient λ of the penalty λ·½(‖W_in‖² + ‖W_rec‖² + ‖W_out‖²).
        form: the rule's form (``"offline"``/``"online"``); ``None`` for its default.
        eval_every: iterations per compiled chunk; evaluation and alignment are recorded at every
            chunk boundary. ``steps`` must be a multiple of it.
        target_loss: stop each member when its smoothed training loss reaches this value (None:
            train for ``steps`` iterations); ``steps`` is then the budget.
        target_smoothing: β of the moving average m ← β m + (1 − β) ℓ of minibatch losses that is
            compared with ``target_loss`` (0: the minibatch loss itself).
        weight_noise: synaptic noise, the standard deviation of Gaussian noise on every synapse
            (W_in, W_rec, W_out) while the gradient is formed
            (:func:`creditscape.plasticity_noise.perturb_weights`); 0: none.
        weight_noise_draw: ``"iteration"`` (one draw of the noisy synapses per iteration, seen by
            every trial of the minibatch) or ``"trial"`` (each trial its own draw: the rule's
            estimate is the mean of the trials' estimates, each at its own synapses).
        update_noise: noisy plasticity, Gaussian noise added to every update after the learning
            rate (:func:`creditscape.plasticity_noise.perturb_updates`); 0: none.
        update_noise_scale: ``"relative"`` (noise norm ≈ ``update_noise`` × the update's norm, per
            parameter array) or ``"absolute"`` (standard deviation ``update_noise``).
        matmul_precision: float32 matrix products while training: ``"highest"`` (full float32,
            what every rule's equivalences hold at) or ``"tensorfloat32"`` (TF32 on a GPU's tensor
            cores: 1.5× the seed-steps per second at 128 seeds on an H200, each gradient off by
            ≈ 3e-3 relative; docs/performance.md). No effect on a CPU. Measurements are always in
            full precision (:func:`full_precision`).
    """

    optimizer: str = "adam"
    learning_rate: float = 1e-3
    momentum: float = 0.0
    schedule: str = "constant"
    boost_at: float = 0.5
    boost_factor: float = 2.0
    steps: int = 500
    batch_size: int = 32
    l2: float = 0.0
    form: str | None = None
    eval_every: int = 50
    target_loss: float | None = None
    target_smoothing: float = 0.9
    weight_noise: float = 0.0
    weight_noise_draw: str = "iteration"
    update_noise: float = 0.0
    update_noise_scale: str = "relative"
    matmul_precision: str = "highest"

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"train.optimizer: expected one of {OPTIMIZERS}, got {self.optimizer!r}.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"train.schedule: expected one of {SCHEDULES}, got {self.schedule!r}.")
        for name in ("learning_rate", "steps", "batch_size", "eval_every", "boost_factor"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ValueError(f"train.{name}: must be a finite number > 0, got {getattr(self, name)!r}.")
        if self.weight_noise_draw not in WEIGHT_NOISE_DRAWS:
            raise ValueError(f"train.weight_noise_draw: expected one of {WEIGHT_NOISE_DRAWS}, "
                             f"got {self.weight_noise_draw!r}.")
        if self.matmul_precision not in MATMUL_PRECISIONS:
            raise ValueError(f"train.matmul_precision: expected one of {MATMUL_PRECISIONS}, "
                             f"got {self.matmul_precision!r}.")
        if self.update_noise_scale not in UPDATE_NOISE_SCALES:
            raise ValueError(f"train.update_noise_scale: expected one of {UPDATE_NOISE_SCALES}, "
                             f"got {self.update_noise_scale!r}.")
        for name in ("l2", "momentum", "weight_noise", "update_noise"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise ValueError(f"train.{name}: must be a finite number >= 0, got {getattr(self, name)!r}.")
        if not 0 <= self.boost_at <= 1:
            raise ValueError(f"train.boost_at: must be a fraction of the steps in [0, 1], got {self.boost_at!r}.")
        if self.target_loss is not None and not 0 < self.target_loss < float("inf"):
            raise ValueError(f"train.target_loss: must be > 0 (or unset), got {self.target_loss!r}.")
        if not 0 <= self.target_smoothing < 1:
            raise ValueError(f"train.target_smoothing: must be in [0, 1), got {self.target_smoothing!r}.")
        if self.steps % self.eval_every:
            raise ValueError(
                f"train.steps ({self.steps}) must be a multiple of train.eval_every ({self.eval_every}): "
                "each compiled chunk runs eval_every iterations. Change one of them."
            )


def learning_rate_multiplier(tcfg: TrainConfig) -> optax.Schedule:
    """The schedule relative to the base η: the learning rate at step t is η·m(t), m(0) = 1."""
    if tcfg.schedule == "cosine":
        return optax.cosine_decay_schedule(1.0, tcfg.steps)
    if tcfg.schedule == "boost":
        return optax.piecewise_constant_schedule(1.0, {int(tcfg.boost_at * tcfg.steps): tcfg.boost_factor})
    return optax.constant_schedule(1.0)


def make_optimizer(tcfg: TrainConfig) -> optax.GradientTransformation:
    """The optimizer at unit base learning rate: its update times η is the update at rate η.

    Both SGD (with momentum) and Adam end in a multiplication by the learning rate, so the base η
    can live in each ensemble member's state: members with different η share one compiled program.
    """
    m = learning_rate_multiplier(tcfg)
    if tcfg.optimizer == "adam":
        return optax.adam(m)
    return optax.sgd(m, momentum=tcfg.momentum or None)


class TrainState(NamedTuple):
    """Per-seed training state (stacked along a leading seed axis in an ensemble)."""

    params: Params
    opt_state: optax.OptState
    key: jax.Array
    step: jax.Array  # int32: iterations done
    diverged_at: jax.Array  # int32: iteration that produced NaN/inf, -1 if none
    learning_rate: jax.Array  # base η of this member (the schedule multiplies it)
    smoothed_loss: jax.Array  # moving average of minibatch losses (NaN before the first)
    reached_at: jax.Array  # int32: iterations done when the smoothed loss reached the target, -1 if not
    rule_state: RuleState  # the rule's state: fixed (random feedback) or learned along (Rule.learns)


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(tree)] or [jnp.bool_(True)]))


def initial_network(cfg: ModelConfig, seed, dtype=jnp.float32) -> tuple[Params, Structure]:
    """The parameters and structure member ``seed`` starts training from."""
    return _model.init(cfg, jax.random.split(jax.random.PRNGKey(seed), 3)[0], dtype)


def init_seed(cfg: ModelConfig, rule: Rule, tcfg: TrainConfig, seed, dtype=jnp.float32, learning_rate=None):
    """(TrainState, Structure) of one seed; every random choice flows from ``seed``.
    ``learning_rate`` (default ``tcfg.learning_rate``) is the member's base η."""
    _, k_rule, k_train = jax.random.split(jax.random.PRNGKey(seed), 3)
    params, struct = initial_network(cfg, seed, dtype)
    rule_state = rule.init(cfg, params, struct, key=k_rule)
    opt_state = make_optimizer(tcfg).init(params)
    lr = jnp.asarray(tcfg.learning_rate if learning_rate is None else learning_rate, dtype)
    state = TrainState(params, opt_state, k_train, jnp.int32(0), jnp.int32(-1), lr, jnp.asarray(jnp.nan, dtype),
                       jnp.int32(-1), rule_state)
    return state, struct


def _member_rates(tcfg, seeds: list, learning_rates) -> list:
    """Each member's base η: ``learning_rates``, one per seed, or ``tcfg.learning_rate`` for all."""
    lrs = [tcfg.learning_rate] * len(seeds) if learning_rates is None else list(learning_rates)
    if len(lrs) != len(seeds):
        raise ValueError(f"{len(seeds)} seeds but {len(lrs)} learning rates: give one per member.")
    return lrs


def init_ensemble(cfg, rule, tcfg, seeds, dtype=jnp.float32, learning_rates=None):
    """Stacked (TrainState, Structure) for ``seeds`` (member i: seed ``seeds[i]``,
    base η ``learning_rates[i]``, default ``tcfg.learning_rate`` for all)."""
    seeds = list(seeds)
    lrs = _member_rates(tcfg, seeds, learning_rates)
    return jax.vmap(lambda s, lr: init_seed(cfg, rule, tcfg, s, dtype, lr))(
        jnp.asarray(seeds), jnp.asarray(lrs, dtype)
    )


def minibatch_splits(cfg: ModelConfig, rule: Rule) -> bool:
    """Whether the loss and ĝ are batch means of per-sequence values, so that a minibatch may be
    split over devices and the parts' means averaged: the rule's estimate is
    (``Rule.per_sequence``) and the loss has no batch-level term (the spiking firing-rate
    regularizer's f̄ is a mean over the batch)."""
    return rule.per_sequence and not cfg.rate_regularization


# The least work (sequences × T × N(N + n_in)) a device's part of a minibatch must hold for a split
# to pay for its exchange between devices at every iteration. Measured on 2 CPU cores
# (docs/scale.md): halves of 2^22.5 and less lost for some rule (up to 3.5× slower at `quick`'s cue
# recall), halves of 2^24.5 and more won for every rule (1.6–1.7×, the sequential-MNIST shape).
MIN_PART_WORK = 2**24


def batch_parts(cfg: ModelConfig, rule: Rule, tcfg: TrainConfig, n_steps: int, devices_per_member: int) -> int:
    """Into how many equal parts each member's minibatch is split over devices: the most, up to
    ``devices_per_member``, that divide the minibatch and leave every part at least
    :data:`MIN_PART_WORK`; 1 (no split) when :func:`minibatch_splits` is false, and on
    accelerators, where one member's small program is bound by latency, not arithmetic, and no
    split has been measured."""
    if not minibatch_splits(cfg, rule) or jax.default_backend() != "cpu":
        return 1
    per_sequence = n_steps * cfg.n_rec * (cfg.n_rec + cfg.n_in)
    return max(k for k in range(1, max(devices_per_member, 1) + 1)
               if tcfg.batch_size % k == 0 and (k == 1 or tcfg.batch_size // k * per_sequence >= MIN_PART_WORK))


def member_layout(cfg: ModelConfig, rule: Rule, tcfg: TrainConfig, n_steps: int, members: int,
                  devices: int | None = None) -> MemberSharding:
    """How a run lays ``members`` out over ``devices`` local devices (default: all): spread over
    them, the devices beyond the members splitting each member's minibatch where
    :func:`batch_parts` says it pays."""
    spare = (len(jax.local_devices()) if devices is None else devices) // members
    return MemberSharding(devices, members, batch_parts(cfg, rule, tcfg, n_steps, spare))


def _batch_part(tree, axis: str):
    """This device's equal share of the leading (batch) axis of every leaf, along mesh ``axis``."""
    parts, i = jax.lax.axis_size(axis), jax.lax.axis_index(axis)
    return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, i * (a.shape[0] // parts), a.shape[0] // parts), tree)


def make_iteration(cfg: ModelConfig, rule: Rule, tcfg: TrainConfig, batch_axis: str | None = None) -> Callable:
    """One training iteration of one seed: (state, struct, train_set) → (state, loss). A rule that
    learns (``Rule.learns``) updates its state from the same batch and noise, at the parameters
    the gradient was formed at.

    ``batch_axis``: the iteration runs on each device of that mesh axis (inside ``shard_map``); the
    minibatch, its noise and its draws are those of one device, but each device forms the loss and
    ĝ of its equal part only, and their mean over the axis is the minibatch's
    (:func:`minibatch_splits`). Everything else is computed alike on every device."""
    if batch_axis is not None and not minibatch_splits(cfg, rule):
        raise ValueError(f"{rule.name!r} on this model is not a batch mean of per-sequence estimates (see "
                         "minibatch_splits); its minibatch cannot be split.")
    optimizer = make_optimizer(tcfg)
    form = rule.check_form(tcfg.form)
    part = (lambda tree: _batch_part(tree, batch_axis)) if batch_axis else (lambda tree: tree)

    def iteration(state: TrainState, struct: Structure, train_set: Batch):
        rule_state = state.rule_state
        key, k_batch, k_noise = jax.random.split(state.key, 3)
        idx = prng.randint(k_batch, (tcfg.batch_size,), 0, train_set.x.shape[0], dtype=jnp.int32)
        batch = jax.tree.map(lambda a: a[idx], train_set)
        noise = draw_noise(cfg, batch, k_noise)
        # The rule forms its gradient at the synapses, noisy or not (keys folded from the noise
        # key: without these options, the random stream is the same). A stochastic rule's draws
        # come from a key of their own.
        def noisy_synapses(key):
            return _model.project(cfg, perturb_weights(state.params, tcfg.weight_noise, key), struct)

        def estimate(params, batch, noise, key):
            return rule_gradient(rule, cfg, params, struct, rule_state, batch, noise, form=form,
                                 key=key if rule.stochastic else None)

        k_rule = jax.random.fold_in(k_noise, 3)
        if not tcfg.weight_noise:
            loss, grads = estimate(state.params, part(batch), part(noise), k_rule)
        elif tcfg.weight_noise_draw == "iteration":
            loss, grads = estimate(noisy_synapses(jax.random.fold_in(k_noise, 1)), part(batch), part(noise), k_rule)
        else:  # a trial's loss weights are 1/B of its own as a batch of one: the mean is the batch's
            def one_trial(key, k_trial_rule, trial, trial_noise):
                one = lambda tree: jax.tree.map(lambda a: a[None], tree)
                return estimate(noisy_synapses(key), one(trial), one(trial_noise), k_trial_rule)

            keys = jax.random.split(jax.random.fold_in(k_noise, 1), tcfg.batch_size)
            rule_keys = jax.random.split(k_rule, tcfg.batch_size)
            trials = part((keys, rule_keys, batch, noise))
            loss, grads = jax.tree.map(lambda a: jnp.mean(a, axis=0), jax.vmap(one_trial)(*trials))
        if batch_axis is not None:  # equal parts: the mean of their means is the minibatch's
            loss, grads = jax.lax.pmean((loss, grads), batch_axis)
        beta = tcfg.target_smoothing
        smoothed = jnp.where(jnp.isnan(state.smoothed_loss), loss, beta * state.smoothed_loss + (1 - beta) * loss)
        if tcfg.l2:
            loss = loss + tcfg.l2 * l2_penalty(state.params)
            grads = jax.tree.map(lambda g, w: g + tcfg.l2 * w, grads, l2_gradient(state.params))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        updates = jax.tree.map(lambda u: state.learning_rate * u, updates)
        if tcfg.update_noise:
            updates = perturb_updates(updates, tcfg.update_noise, tcfg.update_noise_scale, jax.random.fold_in(k_noise, 2))
        params = _model.project(cfg, optax.apply_updates(state.params, updates), struct)
        if rule.learns:  # (from the batch and noise of this iteration, the parameters ĝ was formed at)
            rule_state = rule.learn(cfg, state.params, struct, rule_state, batch, noise, key=jax.random.fold_in(k_noise, 4))
        alive = (state.diverged_at < 0) & (state.reached_at < 0)
        ok = jnp.isfinite(loss) & _all_finite(params) & _all_finite(rule_state)
        keep = alive & ok
        params, opt_state, rule_state = jax.tree.map(
            lambda new, old: jnp.where(keep, new, old), (params, opt_state, rule_state),
            (state.params, state.opt_state, state.rule_state)
        )
        diverged_at = jnp.where(alive & ~ok, state.step, state.diverged_at)
        reached_at = state.reached_at
        if tcfg.target_loss is not None:  # the update of this iteration is the last one
            reached_at = jnp.where(keep & (smoothed <= tcfg.target_loss), state.step + 1, reached_at)
        new_state = TrainState(params, opt_state, key, state.step + 1, diverged_at, state.learning_rate,
                               jnp.where(keep, smoothed, state.smoothed_loss), reached_at, rule_state)
        return new_state, jnp.where(keep, loss, jnp.nan)

    return iteration


def make_chunk(cfg: ModelConfig, rule: Rule, tcfg: TrainConfig, layout: MemberSharding | None = None) -> Callable:
    """Compiled: iterations ``start`` to ``stop`` of a chunk of ``eval_every`` for every seed.

    (states, structs, train_set, start, stop) → (states, losses (seeds, eval_every)),
    the losses of iterations [start, stop) in their places and NaN elsewhere. One program serves
    every split of a chunk (the bounds are traced), and the result does not depend on the split:
    each piece runs the same compiled iteration.

    ``layout``: with a batch split (``layout.batch_split > 1``) the program runs on every device of
    the layout's mesh, each member's minibatch split over the devices of its row (the states
    sharded as ``layout.shard`` places them); otherwise XLA partitions the member axis as the
    arguments lie.
    """
    split = layout is not None and layout.batch_split > 1
    iteration = make_iteration(cfg, rule, tcfg, batch_axis="batch" if split else None)

    def one_seed(state, struct, train_set, start, stop):
        def body(t, carry):
            state, losses = carry
            state, loss = iteration(state, struct, train_set)
            return state, losses.at[t].set(loss)

        losses = jnp.full(tcfg.eval_every, jnp.nan, jnp.result_type(train_set.x, *jax.tree.leaves(state.params)))
        # Both read as the iteration is traced.
        with jax.default_matmul_precision(tcfg.matmul_precision), _model.unrolled_time_loops():
            return jax.lax.fori_loop(start, stop, body, (state, losses))

    seeds = jax.vmap(one_seed, in_axes=(0, 0, None, None, None))
    if split:
        members, whole = PartitionSpec("members"), PartitionSpec()
        # (check_vma off: the rules' loops start from constants that the batch part then varies;
        # the states are the same on every device of a row, as they come from the mean)
        seeds = jax.shard_map(seeds, mesh=layout.mesh, in_specs=(members, members, whole, whole, whole),
                              out_specs=(members, members), check_vma=False)
    return jax.jit(seeds, donate_argnums=0)


PIECE_SECONDS = 1.0  # the longest a stop request waits for training (between two pieces)


def _train_chunk(chunk, states, structs, train_set, length: int, seconds_per_step: float | None):
    """One chunk of ``length`` iterations, run in pieces of about :data:`PIECE_SECONDS` so that
    Ctrl-C is acted on within about that time however long the chunk. Returns (states, losses,
    measured seconds per iteration), the last to size the next chunk's pieces."""
    losses = np.full((len(states.diverged_at), length), np.nan)
    start = 0
    while start < length:
        piece = 1 if seconds_per_step is None else max(1, int(PIECE_SECONDS / seconds_per_step))
        stop = min(length, start + piece)
        began = time.perf_counter()
        states, part = chunk(states, structs, train_set, start, stop)
        losses[:, start:stop] = np.asarray(part)[:, start:stop]  # waits for the piece to finish
        seconds_per_step = (time.perf_counter() - began) / (stop - start)
        stopping.raise_if_requested()
        start = stop
    return states, losses, seconds_per_step


class CurvatureProbe(NamedTuple):
    """λ_max (with its Lanczos residual ‖Hv₁ − λ₁v₁‖ and the gap λ₁ − λ₂ to the next eigenvalue)
    and the rule's gain ρ measured at every evaluation (DESIGN.md §4–5).

    batch: fixed evaluation batch (the exact loss, no noise); block: ``"all"``, ``"recurrent"``
    or ``"w_rec"``; l2: L2 coefficient included in the Hessian; steps: Lanczos iterations, warm
    started from the previous evaluation's top eigenvector; tol: stop before ``steps`` once λ₁
    and λ₂ move by at most tol·|λ₁| in one step (:func:`creditscape.curvature.lanczos_tridiagonal`;
    None: always ``steps``).
    """

    batch: Batch
    block: str = "w_rec"
    l2: float = 0.0
    steps: int = 30
    tol: float | None = None


ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8  # optax.adam's defaults, which make_optimizer uses


def adam_edge(learning_rate):
    """The stability threshold (2 + 2β₁)/((1 − β₁)η) of Adam's preconditioned sharpness (38/η for
    β₁ = 0.9; Cohen et al., "Adaptive gradient methods at the edge of stability", 2022)."""
    return (2 + 2 * ADAM_B1) / ((1 - ADAM_B1) * learning_rate)


def adam_preconditioner(opt_state: optax.OptState) -> tuple[Params, jax.Array]:
    """(P, k): the diagonal preconditioner of Adam's last update and the number k of updates made,
    P = (1 − β₁ᵏ)(√(ν_k / (1 − β₂ᵏ)) + ε) per parameter (Cohen et al. 2022, eq. 2), so that with P
    frozen Adam's step is heavy-ball momentum on P⁻¹∇L and is stable while λ₁(P⁻¹H) < 38/η.
    Undefined (division by zero) before the first update, k = 0."""
    adam = opt_state[0]  # make_optimizer: optax.adam = chain(scale_by_adam, scale by the schedule)
    if not isinstance(adam, optax.ScaleByAdamState):
        raise TypeError(f"adam_preconditioner: expected the state of optax.adam, got {type(adam).__name__}.")
    k = adam.count.astype(jax.tree.leaves(adam.nu)[0].dtype)
    p = jax.tree.map(lambda nu: (1 - ADAM_B1 ** k) * (jnp.sqrt(nu / (1 - ADAM_B2 ** k)) + ADAM_EPS), adam.nu)
    return p, adam.count


def _set_metrics(cfg: ModelConfig, params: Params, struct: Structure, sets: dict[str, Batch]) -> dict:
    out = {}
    for name, batch in sets.items():
        out[f"{name}_loss"], out[f"{name}_accuracy"] = evaluate(cfg, params, struct, batch)
    return out


def make_set_evaluator(cfg: ModelConfig) -> Callable:
    """Compiled: (params, structs, sets) → per-member ``<set>_loss`` and ``<set>_accuracy`` of
    each named set (no noise)."""
    return jax.jit(jax.vmap(lambda p, s, sets: _set_metrics(cfg, p, s, sets), in_axes=(0, 0, None)))


EVAL_DRAWS = 8  # draws of a stochastic rule per evaluation point: its mean alignment, variance and Ĵ


def make_evaluator(cfg: ModelConfig, rule: Rule, tcfg: TrainConfig, probe: CurvatureProbe | None = None) -> Callable:
    """Compiled (its results on the host): per-seed (loss, accuracy) on each named set, the rule's gradient alignment
    (cosine with the exact gradient, no noise) on the alignment batch, and with a ``probe`` λ_max
    (Lanczos from the warm-start vector ``v0``), its eigenvector ``v1`` and ρ = v₁ᵀĴv₁/λ₁; under
    Adam also the preconditioned sharpness λ₁(P⁻¹H) of the probe's block (P from
    :func:`adam_preconditioner`; NaN before the first update), the quantity Adam's stability edge
    38/η bounds. (Arguments: params, structs, rule states, sets, alignment batch, v0, optimizer
    states.)

    Two programs, ``evaluator.programs``: ``"network"`` measures the networks alone (the sets,
    λ_max, the preconditioned sharpness) and is the same program for every rule, so that the rules
    of a cell, and the cells of a sweep that share a model and data, compile it once and load it
    from the persistent compilation cache after that (:mod:`creditscape.cli`); ``"rule"`` takes
    v₁ from it for the rule's own numbers (alignment, ρ)."""
    form = rule.check_form(tcfg.form)
    # A stochastic rule: over EVAL_DRAWS draws of fixed keys (the same at every point).
    draws = dict(key=jax.random.PRNGKey(0), draws=EVAL_DRAWS) if rule.stochastic else {}

    def network(params, struct, sets: dict[str, Batch], v0, opt_state):
        out = _set_metrics(cfg, params, struct, sets)
        if probe is not None:
            f, x0 = block_loss(cfg, params, struct, probe.batch, probe.block, probe.l2)
            steps = min(probe.steps, x0.shape[0])
            eig = lanczos(lambda v: hvp(f, x0, v), v0, steps, min(2, steps), tol=probe.tol)
            v1 = eig.vectors[0] / jnp.linalg.norm(eig.vectors[0])
            out["lambda_max"] = eig.values[0]
            # How far the pair is from converged, and whether v₁ (hence ρ) is well defined.
            out["lambda_residual"] = jnp.linalg.norm(hvp(f, x0, v1) - eig.values[0] * v1)
            out["lambda_gap"] = eig.values[0] - eig.values[-1] if steps > 1 else jnp.full((), jnp.nan, x0.dtype)
            out["lanczos_steps"] = eig.steps
            out["v1"] = v1
            if tcfg.optimizer == "adam":
                p, updates = adam_preconditioner(opt_state)
                s = 1 / jnp.sqrt(ravel_pytree(_select(p, probe.block))[0])
                # λ₁(P⁻¹H) = λ₁(P^(-1/2) H P^(-1/2)), a symmetric operator Lanczos can take.
                tri, basis = lanczos_tridiagonal(lambda v: s * hvp(f, x0, s * v), v0, steps)
                out["preconditioned_tridiagonal"] = jnp.where(updates > 0, tri, jnp.nan)
                out["preconditioned_krylov_dim"] = jnp.sum(jnp.linalg.norm(basis, axis=1) > 0)
        return out

    def rule_measures(params, struct, rule_state, align_batch: Batch, v1):
        al = gradient_alignment(rule, cfg, params, struct, rule_state, align_batch, form=form, **draws)
        out = {"alignment": al.cosine, "alignment_recurrent": al.cosine_recurrent}
        if rule.stochastic:
            out["relative_variance"] = al.relative_variance
        if probe is not None:
            g, x0 = estimate_on_block(rule, cfg, params, struct, rule_state, probe.batch, probe.block, probe.l2,
                                      form=form, **draws)
            out["v1_J_v1"] = jnp.vdot(v1, jacobian_vector_product(g, x0, v1))
        return out

    def evaluator(params, structs, rule_states, sets, align_batch, v0, opt_states) -> dict:
        net = evaluator.programs["network"](params, structs, sets, v0, opt_states)
        # v₁ laid out over the devices as v0 is (what the rule program was compiled for)
        v1 = jax.device_put(net["v1"], getattr(v0, "sharding", None)) if probe is not None else v0
        out = jax.device_get({**net, **evaluator.programs["rule"](params, structs, rule_states, align_batch, v1)})
        if probe is not None:
            out["rho"] = out.pop("v1_J_v1") / out["lambda_max"]
        if "preconditioned_tridiagonal" in out:
            # Its eigenvalues on the host: a second eigensolver call in the compiled program (beside
            # λ_max's) deadlocked XLA's CPU runtime on two cores (all threads idle, waiting).
            tri, dim = out.pop("preconditioned_tridiagonal"), out.pop("preconditioned_krylov_dim")
            out["preconditioned_sharpness"] = np.array([top_ritz_value(t, d) for t, d in zip(tri, dim)])
        return out

    # :func:`train_ensemble` swaps in their compiled forms after a size check
    evaluator.programs = {"network": jax.jit(jax.vmap(network, in_axes=(0, 0, None, 0, 0))),
                          "rule": jax.jit(jax.vmap(rule_measures, in_axes=(0, 0, 0, None, 0)))}
    return evaluator


def device_memory() -> int | None:
    """Bytes the first device can hold: the accelerator's limit, or the machine's physical memory
    for the CPU (None where neither is known)."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


CPU_MEMORY_FACTOR = 1.5  # measured: a process gains 1.03–1.31× XLA's count while a chunk runs (docs/scale.md)


def program_bytes(compiled, sharing: int = 1) -> int | None:
    """Bytes to reserve for a compiled program on ``sharing`` devices that draw on one memory:
    its arguments plus what a run adds (outputs and temporaries, less the outputs that reuse an
    argument's buffer), by XLA's own count; on a CPU what a run adds is taken
    :data:`CPU_MEMORY_FACTOR` times, as measured by benchmarks/memory_estimate.py."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    added = stats.output_size_in_bytes + stats.temp_size_in_bytes - stats.alias_size_in_bytes
    if jax.devices()[0].platform == "cpu":
        added *= CPU_MEMORY_FACTOR
    return int(sharing * (stats.argument_size_in_bytes + added))


def check_memory(compiled, what: str, available: int | None = None, sharing: int = 1) -> None:
    """Refuse, before it runs, a compiled program that needs more (:func:`program_bytes`) than
    the device's memory (``available``, default :func:`device_memory`), instead of failing with an
    out-of-memory error part-way through."""
    need = program_bytes(compiled, sharing)
    available = device_memory() if available is None else available
    if need is None or available is None:
        return
    if need > available:
        raise MemoryError(f"{what} needs about {need / 2**30:.1f} GiB at once; this device has "
                          f"{available / 2**30:.1f} GiB. Use fewer seeds or learning rates per run (or a smaller "
                          f"batch), or a machine with more memory.")


class TrainResult(NamedTuple):
    """What training an ensemble produced (leading axis: member = seed, learning rate)."""

    params: Params
    structs: Structure
    rule_states: object
    diverged_at: np.ndarray  # (members,) iteration of divergence, -1 if none
    reached_at: np.ndarray  # (members,) iterations done when the target loss was reached, -1 if not
    losses: np.ndarray  # (members, steps) training minibatch loss (incl. L2), NaN after divergence
    eval_steps: np.ndarray  # (n_evals,) iteration counts at which ``evals`` were taken
    evals: dict[str, np.ndarray]  # name → (members, n_evals)
    eval_seconds: np.ndarray  # (n_evals,) wall time of each evaluation (incl. curvature)
    trajectory: Params | None  # parameters at every evaluation, leaves (members, n_evals, ...)
    restored_evaluations: int = 0  # the first evaluations, read from a checkpoint (timed by an earlier process)


def to_device(batch: Batch) -> Batch:
    return Batch(*(jnp.asarray(a) for a in batch))


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """Where and how often :func:`train_ensemble` saves its progress.

    The file holds the whole ensemble state after the last finished chunk (parameters, optimizer
    state, random keys, the rule's state, Lanczos warm start) and everything recorded so far, written
    atomically.
    Training started again with the same arguments continues from it and produces results
    bit-identical to an uninterrupted run. ``every_seconds = 0`` saves after every chunk.
    """

    path: Path
    every_seconds: float = 30.0


def _snapshot(states, v, losses, evals, seconds, trajectory) -> dict:
    out = {f"state/{i}": np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(states))}
    out["v"] = np.asarray(v)
    out["losses"] = np.concatenate(losses, axis=1) if losses else np.zeros((len(v), 0))
    out["seconds"] = np.asarray(seconds)
    out.update({f"eval/{k}": np.stack([e[k] for e in evals]) for k in evals[0]})
    if trajectory:
        for name, leaves in zip(Params._fields, zip(*trajectory)):
            if leaves[0] is not None:
                out[f"traj/{name}"] = np.stack(leaves)
    return out


def _restore(snap: dict, states):
    leaves, treedef = jax.tree.flatten(states)
    if not {"v", "losses", "seconds"} <= set(snap) or not any(k.startswith("eval/") for k in snap):
        raise DamagedFile(f"The checkpoint lacks {sorted({'v', 'losses', 'seconds', 'eval/…'} - set(snap))}: "
                          "delete it to start this run again from its beginning.")
    if len(leaves) != sum(k.startswith("state/") for k in snap) or any(
        snap[f"state/{i}"].shape != leaf.shape for i, leaf in enumerate(leaves)
    ):
        raise DamagedFile("The checkpoint does not match this ensemble (other model, rule or seeds): delete it to "
                          "start this run again from its beginning.")
    states = jax.tree.unflatten(treedef, [jnp.asarray(snap[f"state/{i}"]) for i in range(len(leaves))])
    n = snap["seconds"].shape[0]
    evals = [{k[5:]: snap[k][j] for k in snap if k.startswith("eval/")} for j in range(n)]
    trajectory = [
        Params(*(jnp.asarray(snap[f"traj/{f}"][j]) if f"traj/{f}" in snap else None for f in Params._fields))
        for j in range(n if any(k.startswith("traj/") for k in snap) else 0)
    ]
    losses = [snap["losses"]] if snap["losses"].shape[1] else []
    return states, jnp.asarray(snap["v"]), losses, evals, list(snap["seconds"]), trajectory


@full_precision
def train_ensemble(
    cfg: ModelConfig,
    rule: Rule,
    tcfg: TrainConfig,
    seeds,
    train_set: Batch,
    eval_sets: dict[str, Batch] | None = None,
    *,
    learning_rates=None,
    align_size: int = 64,
    probe: CurvatureProbe | None = None,
    keep_trajectory: bool = False,
    checkpoint: Checkpoint | None = None,
    progress: bool | str = True,
    history_sequences: int = 0,
    devices: int | None = None,
) -> TrainResult:
    """Train one network per member with ``rule``; evaluate at every chunk boundary.

    Args:
        seeds: integer seeds; seed s draws the network, the rule's state, minibatches and noise.
        train_set: the fixed training set.
        eval_sets: named fixed sets evaluated along training (default: ``{"train": train_set}``).
        learning_rates: base η of each member (same length as ``seeds``; default
            ``tcfg.learning_rate``). Members with different η train in the same compiled program.
        align_size: the first ``align_size`` training sequences form the alignment batch.
        probe: also measure λ_max and ρ at every evaluation (warm-started Lanczos).
        keep_trajectory: also return the parameters at every evaluation (for later measurement).
        checkpoint: save progress there and continue from it if it exists.
        progress: show a progress bar (a string sets its label).
        history_sequences: when > 0, the evaluations along training measure the first
            ``history_sequences`` sequences of each evaluation set, and only the last one the
            whole sets (what the final tables report); the cost of the evaluations falls in
            proportion.
        devices: spread the members over this many local devices (default: all of them, but no
            more than the members; devices at least twice the members may split each member's
            minibatch instead, see :func:`member_layout`); the results
            agree with one device's to rounding, and are the same bits for the same device count.
    """
    if train_set.x.shape[-1] != cfg.n_in:
        raise ValueError(f"Training inputs have {train_set.x.shape[-1]} channels; the model has n_in={cfg.n_in}.")
    for name, batch in {"train_set": train_set, **(eval_sets or {}),
                        **({"probe batch": probe.batch} if probe else {})}.items():
        check_scored_steps(cfg, batch, name)
    seeds = list(seeds)
    n = len(seeds)
    layout = member_layout(cfg, rule, tcfg, train_set.x.shape[1], n, devices)
    train_set = layout.replicate(to_device(train_set))
    eval_sets = {k: layout.replicate(to_device(v)) for k, v in (eval_sets or {"train": train_set}).items()}
    history_sets = eval_sets
    if history_sequences and any(b.x.shape[0] > history_sequences for b in eval_sets.values()):
        history_sets = {k: jax.tree.map(lambda a: a[:history_sequences], b) for k, b in eval_sets.items()}
    align_batch = jax.tree.map(lambda a: a[:align_size], train_set)
    lrs = _member_rates(tcfg, seeds, learning_rates)  # checked before padding hides a missing one
    # Padded members copy the last one; the checkpoint and the result hold the first n only.
    members = layout.padded(n)
    states, structs = layout.shard(init_ensemble(
        cfg, rule, tcfg, pad_members(np.asarray(seeds), members), train_set.x.dtype,
        pad_members(np.asarray(lrs, dtype=np.float64), members)))
    chunk = make_chunk(cfg, rule, tcfg, layout)
    evaluator = make_evaluator(cfg, rule, tcfg, probe)
    if probe is not None:
        dim = ravel_pytree(_select(jax.tree.map(lambda a: a[0], states.params), probe.block))[0].shape[0]
        v = pad_members(prng.normal(jax.random.PRNGKey(n), (n, dim), train_set.x.dtype), members)
    else:
        v = jnp.zeros((members, 1), train_set.x.dtype)
    # Warm start of the next Lanczos: the last v₁ plus a tenth of the first (random) start, so that
    # the Krylov space also holds other directions (from v₁ alone it would be exhausted at once on
    # an unchanged network, and λ₂ unknown).
    v = layout.shard(v)
    v_random = 0.1 * v / jnp.linalg.norm(v, axis=1, keepdims=True)
    seconds, evals, losses, trajectory = [], [], [], []

    def record(states):
        nonlocal v
        start = time.perf_counter()
        out = evaluator(states.params, structs, states.rule_state, history_sets, align_batch, v, states.opt_state)
        seconds.append(time.perf_counter() - start)
        if probe is not None:
            v = layout.shard(jnp.asarray(out.pop("v1"))) + v_random
        evals.append(out)
        if keep_trajectory:
            trajectory.append(jax.device_get(states.params))

    n_chunks = tcfg.steps // tcfg.eval_every
    label = progress if isinstance(progress, str) else rule.name
    with tqdm(total=tcfg.steps, desc=label, disable=not progress, leave=False, unit="it") as bar:
        resumed = checkpoint is not None and Path(checkpoint.path).is_file()
        if resumed:
            snap = load_arrays(checkpoint.path, "delete it to start this run again from its beginning")
            states, v, losses, evals, seconds, trajectory = _restore(snap, first_members(states, n))
            states, v, losses, evals, trajectory = pad_members((states, v, losses, evals, trajectory), members)
            states, v = layout.shard((states, v))
        restored = len(evals) if resumed else 0
        # The evaluator's two programs and the chunk compiled here, once, so that their sizes are checked
        # before any work.
        bar.set_postfix_str("compiling…")
        what = f"{n} members with {rule.name}"
        sharing = layout.count if jax.devices()[0].platform == "cpu" else 1  # host devices share the RAM
        for name, args in (("network", (states.params, structs, history_sets, v, states.opt_state)),
                           ("rule", (states.params, structs, states.rule_state, align_batch, v))):
            evaluator.programs[name] = evaluator.programs[name].lower(*args).compile()
            check_memory(evaluator.programs[name], f"Evaluating {what}", sharing=sharing)
        chunk = chunk.lower(states, structs, train_set, 0, tcfg.eval_every).compile()
        check_memory(chunk, f"Training {what}", sharing=sharing)
        if not resumed:
            bar.set_postfix_str("measuring iteration 0…")
            record(states)
        last_save = time.monotonic()
        done = len(evals) - 1
        bar.update(done * tcfg.eval_every)
        seconds_per_step = None
        for i in range(done, n_chunks):
            stopping.raise_if_requested()
            if np.all((np.asarray(states.diverged_at) >= 0) | (np.asarray(states.reached_at) >= 0)):
                # Every member has stopped (target reached or diverged): its parameters are frozen, so
                # the remaining evaluations are the last one, and there is nothing left to train.
                losses.append(np.full((members, tcfg.eval_every), np.nan))
                evals.append(evals[-1])
                seconds.append(0.0)
                if keep_trajectory:
                    trajectory.append(trajectory[-1])
            else:
                states, chunk_losses, seconds_per_step = _train_chunk(chunk, states, structs, train_set,
                                                                      tcfg.eval_every, seconds_per_step)
                losses.append(chunk_losses)
                record(states)
            bar.update(tcfg.eval_every)
            last = losses[-1][:n, -1]  # (the real members: padding copies are not counted)
            postfix = {"loss": f"{np.nanmean(last):.4f}" if np.isfinite(last).any() else "nan",
                       "diverged": int((np.asarray(states.diverged_at)[:n] >= 0).sum())}
            if tcfg.target_loss is not None:
                postfix["reached"] = int((np.asarray(states.reached_at)[:n] >= 0).sum())
            bar.set_postfix(postfix)
            if checkpoint is not None and i + 1 < n_chunks and time.monotonic() - last_save >= checkpoint.every_seconds:
                kept = first_members((states, v, losses, evals, trajectory), n)
                save_arrays(Path(checkpoint.path), _snapshot(*kept[:4], seconds, kept[4]))
                last_save = time.monotonic()
    if history_sets is not eval_sets:  # the last evaluation on the whole sets
        start = time.perf_counter()
        evals[-1] = {**evals[-1], **jax.device_get(make_set_evaluator(cfg)(states.params, structs, eval_sets))}
        seconds[-1] += time.perf_counter() - start
    states, structs, losses, evals, trajectory = first_members((states, structs, losses, evals, trajectory), n)
    # Gathered on one device: what measures the trained networks next is a one-device program. (Left
    # sharded, with the padding cut off, the members lie unevenly over the devices; a program on
    # them needs XLA's cross-device exchanges, and on CPU host devices one such program hung.)
    states, structs = jax.device_put((states, structs), jax.local_devices()[0])
    return TrainResult(
        params=states.params,
        structs=structs,
        rule_states=states.rule_state,
        diverged_at=np.asarray(states.diverged_at),
        reached_at=np.asarray(states.reached_at),
        losses=np.concatenate(losses, axis=1),
        eval_steps=np.arange(n_chunks + 1) * tcfg.eval_every,
        evals={k: np.stack([e[k] for e in evals], axis=1) for k in evals[0]},
        eval_seconds=np.asarray(seconds),
        trajectory=Params(*(None if leaves[0] is None else np.stack(leaves, axis=1) for leaves in zip(*trajectory)))
        if keep_trajectory else None,
        restored_evaluations=restored,
    )
