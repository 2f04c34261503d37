"""Synaptic noise and noisy plasticity (``train.weight_noise``, ``train.update_noise``): the noise
has the requested size, lands where it should, and leaves the rest of training's random stream
alone."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from creditscape import model as M
from creditscape.objective import draw_noise
from creditscape.plasticity_noise import WEIGHTS, perturb_updates, perturb_weights
from creditscape.rules import get_rule
from creditscape.tasks import get_task, make_splits
from creditscape.train import TrainConfig, init_ensemble, init_seed, make_iteration, to_device, train_ensemble

jax.config.update("jax_enable_x64", True)


@pytest.fixture(scope="module")
def cue():
    task = get_task("cue_recall", delay=3)
    return task, make_splits(task, 64, 16, seed=0)


def _within_sampling_error(estimate: float, expected: float, n: int, k: float = 5.0):
    """A variance estimate from n independent normal draws has relative standard error √(2/n)."""
    assert abs(estimate / expected - 1) < k * np.sqrt(2 / n), (estimate, expected)


@pytest.mark.parametrize("seed", [0, 1])
def test_update_noise_has_the_requested_variance_for_every_array(seed):
    k_u, k_noise = jax.random.split(jax.random.PRNGKey(seed))
    # Arrays of very different sizes and norms: the relative scale is per array.
    shapes, scales = [(300, 200), (200,), (50, 400)], [1e-3, 2.0, 0.05]
    updates = [s * jax.random.normal(k, shape) for k, shape, s in zip(jax.random.split(k_u, 3), shapes, scales)]
    level = 0.3
    for scale in ("absolute", "relative"):
        noisy = perturb_updates(updates, level, scale, k_noise)
        for u, v in zip(updates, noisy):
            noise = np.asarray(v - u)
            expected = level**2 if scale == "absolute" else level**2 * float(jnp.sum(u**2)) / u.size
            _within_sampling_error(float(np.mean(noise**2)), expected, u.size)
            assert abs(noise.mean()) < 5 * np.sqrt(expected / u.size)
    with pytest.raises(ValueError, match="update noise scale"):
        perturb_updates(updates, level, "proportional", k_noise)


def test_weight_noise_perturbs_synapses_only_with_the_requested_variance(cue):
    task, _ = cue
    cfg = M.ModelConfig(task.n_in, 64, task.n_out, learn_init_state=True)
    params, _ = M.init(cfg, jax.random.PRNGKey(0), jnp.float64)
    noisy = perturb_weights(params, 0.2, jax.random.PRNGKey(1))
    for name in params._fields:
        a, b = getattr(params, name), getattr(noisy, name)
        if name in WEIGHTS:
            _within_sampling_error(float(jnp.mean((b - a) ** 2)), 0.04, a.size)
        else:  # biases and the initial state are not synapses
            np.testing.assert_array_equal(a, b)


def test_one_iteration_with_noisy_synapses_and_plasticity_is_the_written_update(cue):
    """A transcription of one iteration: SGD's update −η ĝ, the rule's estimate ĝ formed at the
    perturbed, projected synapses, applied to the clean ones, plus absolute update noise; the
    keys are the iteration's (minibatch and activity noise as without these options)."""
    task, s = cue
    cfg = M.ModelConfig(task.n_in, 10, task.n_out, dale_exc_fraction=0.8, connectivity=0.7, alpha=0.3,
                        rec_noise=0.05)
    tcfg = TrainConfig(optimizer="sgd", learning_rate=0.05, batch_size=8, weight_noise=0.1, update_noise=0.01,
                       update_noise_scale="absolute")
    rule = get_rule("eprop")
    state, struct = init_seed(cfg, rule, tcfg, 3, jnp.float64)
    rule_state = state.rule_state
    train_set = to_device(s.train)
    new, _ = make_iteration(cfg, rule, tcfg)(state, struct, train_set)

    _, k_batch, k_noise = jax.random.split(state.key, 3)
    idx = jax.random.randint(k_batch, (tcfg.batch_size,), 0, train_set.x.shape[0], dtype=jnp.int32)
    batch = jax.tree.map(lambda a: a[idx], train_set)
    at = M.project(cfg, perturb_weights(state.params, 0.1, jax.random.fold_in(k_noise, 1)), struct)
    _, g = rule.gradient(cfg, at, struct, rule_state, batch, draw_noise(cfg, batch, k_noise), form=rule.check_form(None))
    step = perturb_updates(jax.tree.map(lambda x: -0.05 * x, g), 0.01, "absolute", jax.random.fold_in(k_noise, 2))
    expected = M.project(cfg, optax.apply_updates(state.params, step), struct)
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    assert not np.allclose(new.params.w_in, state.params.w_in - 0.05 * g.w_in)  # (the noise is there)


def test_synaptic_noise_drawn_per_trial_is_the_mean_of_the_trials_estimates(cue):
    """With ``weight_noise_draw = "trial"`` each trial of the minibatch is a batch of one at its own
    noisy synapses; the rule's estimate is the mean of theirs, and at level 0 (option off) it is
    the whole batch's estimate."""
    task, s = cue
    cfg = M.ModelConfig(task.n_in, 10, task.n_out, alpha=0.3, rec_noise=0.05)
    rule = get_rule("bptt")
    tcfg = TrainConfig(optimizer="sgd", learning_rate=0.05, batch_size=4, weight_noise=0.1, weight_noise_draw="trial")
    state, struct = init_seed(cfg, rule, tcfg, 3, jnp.float64)
    rule_state = state.rule_state
    train_set = to_device(s.train)
    new, loss = make_iteration(cfg, rule, tcfg)(state, struct, train_set)

    _, k_batch, k_noise = jax.random.split(state.key, 3)
    idx = jax.random.randint(k_batch, (4,), 0, train_set.x.shape[0], dtype=jnp.int32)
    batch = jax.tree.map(lambda a: a[idx], train_set)
    noise = draw_noise(cfg, batch, k_noise)
    keys = jax.random.split(jax.random.fold_in(k_noise, 1), 4)
    trials = [rule.gradient(cfg, M.project(cfg, perturb_weights(state.params, 0.1, keys[b]), struct), struct, rule_state,
                            jax.tree.map(lambda a: a[b:b + 1], batch), jax.tree.map(lambda a: a[b:b + 1], noise),
                            form="offline") for b in range(4)]
    np.testing.assert_allclose(loss, np.mean([t[0] for t in trials]), rtol=1e-12)
    g = jax.tree.map(lambda *a: sum(a) / 4, *(t[1] for t in trials))
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(jax.tree.map(lambda p, d: p - 0.05 * d, state.params, g))):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    # Without noise the mean over batches of one is the batch's own estimate (to rounding).
    _, whole = rule.gradient(cfg, state.params, struct, rule_state, batch, noise, form="offline")
    parts = [rule.gradient(cfg, state.params, struct, rule_state, jax.tree.map(lambda a: a[b:b + 1], batch),
                           jax.tree.map(lambda a: a[b:b + 1], noise), form="offline")[1] for b in range(4)]
    for a, *b in zip(jax.tree.leaves(whole), *(jax.tree.leaves(p) for p in parts)):
        np.testing.assert_allclose(a, sum(b) / 4, rtol=1e-11, atol=1e-14)


def test_noise_leaves_the_minibatches_alone_and_level_zero_is_no_noise(cue):
    task, s = cue
    cfg = M.ModelConfig(task.n_in, 8, task.n_out, rec_noise=0.05)
    rule = get_rule("bptt")

    def losses(**noise):
        tcfg = TrainConfig(optimizer="sgd", learning_rate=0.05, steps=20, eval_every=10, batch_size=8, **noise)
        return train_ensemble(cfg, rule, tcfg, [0, 1], s.train, progress=False).losses

    clean = losses()
    np.testing.assert_array_equal(losses(weight_noise=0.0, update_noise=0.0), clean)
    plastic = losses(update_noise=0.5)
    # The first loss comes before any update: same minibatch, same activity noise, same value.
    np.testing.assert_array_equal(plastic[:, 0], clean[:, 0])
    assert not np.array_equal(plastic[:, 1:], clean[:, 1:])
    assert not np.array_equal(losses(weight_noise=0.2)[:, 0], clean[:, 0])  # read at noisy synapses


def test_dale_signs_and_absent_connections_survive_both_noises(cue):
    task, s = cue
    cfg = M.ModelConfig(task.n_in, 10, task.n_out, dale_exc_fraction=0.8, connectivity=0.7)
    tcfg = TrainConfig(learning_rate=0.05, steps=20, eval_every=10, batch_size=8, weight_noise=0.3, update_noise=1.0)
    res = train_ensemble(cfg, get_rule("mdgl"), tcfg, [0, 1], s.train, progress=False)
    w, sign, mask = (np.asarray(a) for a in (res.params.w_rec, res.structs.sign, res.structs.rec_mask))
    assert np.all(w * sign[:, None, :] >= 0) and np.all(w[mask == 0] == 0) and np.all(res.diverged_at == -1)


@pytest.mark.parametrize("options, message", [({"weight_noise": -0.1}, "train.weight_noise"),
                                              ({"update_noise": float("inf")}, "train.update_noise"),
                                              ({"update_noise_scale": "per-synapse"}, "train.update_noise_scale"),
                                              ({"weight_noise_draw": "step"}, "train.weight_noise_draw")])
def test_bad_noise_settings_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**options)


def test_init_ensemble_is_unchanged_by_the_noise_options(cue):
    task, _ = cue
    cfg = M.ModelConfig(task.n_in, 8, task.n_out)
    a = init_ensemble(cfg, get_rule("bptt"), TrainConfig(), [0, 1])
    b = init_ensemble(cfg, get_rule("bptt"), TrainConfig(weight_noise=0.1, update_noise=0.1), [0, 1])
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
