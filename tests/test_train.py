"""Compiled ensemble training: learning, constraints, divergence isolation, no recompilation."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from creditscape import model as M
from creditscape.objective import Batch, exact_loss
from creditscape.rules import EProp, get_rule
from creditscape.tasks import get_task, make_splits
from creditscape.train import TrainConfig, batch_parts, full_precision, init_ensemble, make_chunk, to_device, train_ensemble


@pytest.fixture(scope="module")
def cue():
    task = get_task("cue_recall", delay=4)
    return task, make_splits(task, 256, 256, seed=0)


def test_bptt_reliably_learns_the_small_task(cue):
    task, s = cue
    cfg = M.ModelConfig(task.n_in, 24, task.n_out)
    tcfg = TrainConfig(learning_rate=3e-3, steps=300, eval_every=100)
    res = train_ensemble(cfg, get_rule("bptt"), tcfg, range(4), s.train, {"train": s.train, "test": s.test}, progress=False)
    assert res.losses.shape == (4, 300) and np.all(res.diverged_at == -1)
    assert np.all(res.evals["test_accuracy"][:, -1] > 0.9), res.evals["test_accuracy"][:, -1]
    assert np.all(res.evals["train_loss"][:, -1] < 0.3 * res.evals["train_loss"][:, 0])
    np.testing.assert_allclose(res.evals["alignment"], 1.0, rtol=1e-5)


def _precisions(jaxpr) -> set[str]:
    return set(re.findall(r"precision=\(Precision\.(\w+)", str(jaxpr)))


@pytest.mark.parametrize("setting, traced", [("highest", "HIGHEST"), ("tensorfloat32", "HIGH")])
def test_training_products_at_the_configured_precision_measurements_in_full(cue, setting, traced):
    # On a CPU every setting computes the same numbers, so what is checked is what a GPU would be
    # asked to do: every matrix product of the training iteration carries the configured
    # precision, whatever the caller's context (a GPU's default is TF32).
    task, s = cue
    cfg = M.ModelConfig(task.n_in, 8, task.n_out)
    tcfg = TrainConfig(steps=10, eval_every=10, matmul_precision=setting)
    chunk = make_chunk(cfg, get_rule("eprop"), tcfg)
    states, structs = init_ensemble(cfg, get_rule("eprop"), tcfg, [0])
    with jax.default_matmul_precision("bfloat16"):
        assert _precisions(jax.make_jaxpr(chunk, static_argnums=(3, 4))(states, structs, to_device(s.train), 0, 10)) \
            == {traced}
        measured = full_precision(lambda p: jax.make_jaxpr(jax.hessian(lambda w: jnp.sum(jnp.tanh(w @ w))))(p))
        assert _precisions(measured(jnp.ones((3, 3)))) == {"HIGHEST"}
    with pytest.raises(ValueError, match="matmul_precision"):
        TrainConfig(matmul_precision="bfloat16")


def _unrolls(jaxpr) -> set[int]:
    return {int(u) for u in re.findall(r"unroll=(\d+)", str(jaxpr))}


@pytest.mark.parametrize("n_steps, unroll", [(7, 7), (40, M.GPU_PARTIAL_UNROLL)])
def test_time_loops_unrolled_on_a_gpu_while_training_only(cue, monkeypatch, n_steps, unroll):
    # What a GPU would be asked to do (the backend is faked; nothing is compiled): the training
    # iteration's time loops unrolled, a measurement's not; on a CPU never.
    task, _ = cue
    cfg = M.ModelConfig(task.n_in, 8, task.n_out, alpha=0.5, dale_exc_fraction=0.75)
    tcfg = TrainConfig(steps=4, eval_every=4, batch_size=4)
    x = jnp.zeros((4, n_steps, task.n_in), jnp.float32)
    train = Batch(x, jnp.zeros((4, n_steps), jnp.int32), jnp.ones((4, n_steps), jnp.float32))
    for rule, form in (("bptt", "offline"), ("eprop", "online"), ("mdgl", "offline")):
        states, structs = init_ensemble(cfg, get_rule(rule), tcfg, [0])
        chunk = lambda: make_chunk(cfg, get_rule(rule), dataclasses.replace(tcfg, form=form))  # traced afresh
        trace = lambda: jax.make_jaxpr(chunk(), static_argnums=(3, 4))(states, structs, train, 0, 4)
        assert _unrolls(trace()) == {1}
        monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
        assert _unrolls(trace()) == {unroll}, rule
        params, struct = M.init(cfg, jax.random.PRNGKey(0))
        assert _unrolls(jax.make_jaxpr(lambda p: exact_loss(cfg, p, struct, train))(params)) == {1}
        monkeypatch.undo()


@pytest.mark.parametrize("rule,form", [("eprop", "online"), ("mdgl", "offline"), ("tbptt", "online"), ("kf_rtrl", "online")])
def test_dale_signs_and_mask_kept_through_training(cue, rule, form):
    task, s = cue
    cfg = M.ModelConfig(task.n_in, 10, task.n_out, dale_exc_fraction=0.8, connectivity=0.7, alpha=0.5)
    tcfg = TrainConfig(learning_rate=0.05, steps=40, eval_every=20, form=form, batch_size=8)
    opts = {"k": 2} if rule == "tbptt" else {}
    res = train_ensemble(cfg, get_rule(rule, **opts), tcfg, [0, 1], s.train, progress=False)
    w, sign, mask = (np.asarray(a) for a in (res.params.w_rec, res.structs.sign, res.structs.rec_mask))
    assert np.all(w * sign[:, None, :] >= 0)
    assert np.all(w[mask == 0] == 0)
    assert np.any(w != 0)


def test_divergence_is_per_seed_and_chunk_compiles_once(cue):
    task, s = cue
    cfg = M.ModelConfig(task.n_in, 8, task.n_out)
    tcfg = TrainConfig(optimizer="sgd", learning_rate=0.1, steps=20, eval_every=10)
    traces = []

    @dataclasses.dataclass(frozen=True)
    class CountingEProp(EProp):
        """e-prop that counts how often it is traced (a retrace means a recompilation)."""

        def gradient(self, *args, **kwargs):
            traces.append(1)
            return super().gradient(*args, **kwargs)

    rule = CountingEProp()
    train = to_device(s.train)
    chunk = make_chunk(cfg, rule, tcfg)

    def run(poison, pieces=((0, 10), (0, 10))):
        states, structs = init_ensemble(cfg, rule, tcfg, [0, 1, 2], jnp.float32)
        if poison:
            w = states.params.w_rec.at[1].set(jnp.inf)
            states = states._replace(params=states.params._replace(w_rec=w))
        losses = []
        for start, stop in pieces:
            states, l = chunk(states, structs, train, start, stop)
            losses.append(np.asarray(l)[:, start:stop])
            assert np.all(np.isnan(np.delete(np.asarray(l), np.s_[start:stop], axis=1)))
        return states, np.concatenate(losses, 1)

    clean, clean_losses = run(False)
    poisoned, poisoned_losses = run(True)
    # The same 20 iterations in uneven pieces (as train_ensemble splits a chunk): identical bits.
    split, split_losses = run(False, ((0, 10), (0, 1), (1, 7), (7, 10)))
    assert len(traces) == 1  # eight calls, one trace and compilation
    np.testing.assert_array_equal(split_losses, clean_losses)
    for a, b in zip(jax.tree.leaves(split), jax.tree.leaves(clean)):
        np.testing.assert_array_equal(a, b)
    assert list(np.asarray(poisoned.diverged_at)) == [-1, 0, -1]
    assert np.all(np.isnan(poisoned_losses[1]))
    for i in (0, 2):
        np.testing.assert_array_equal(poisoned_losses[i], clean_losses[i])
        np.testing.assert_array_equal(poisoned.params.w_rec[i], clean.params.w_rec[i])


def test_same_seed_same_result(cue):
    task, s = cue
    cfg = M.ModelConfig(task.n_in, 8, task.n_out, input_noise=0.1, rec_noise=0.05, dale_exc_fraction=0.75)
    tcfg = TrainConfig(steps=20, eval_every=10)
    a = train_ensemble(cfg, get_rule("mdgl"), tcfg, [3, 4], s.train, progress=False)
    b = train_ensemble(cfg, get_rule("mdgl"), tcfg, [3, 4], s.train, progress=False)
    np.testing.assert_array_equal(a.losses, b.losses)
    assert not np.array_equal(a.losses[0], a.losses[1])


def test_train_config_errors():
    with pytest.raises(ValueError, match="multiple of train.eval_every"):
        TrainConfig(steps=105, eval_every=10)
    with pytest.raises(ValueError, match="train.optimizer"):
        TrainConfig(optimizer="rmsprop")


def test_curvature_probe_along_training(cue):
    from creditscape.curvature import top_eigenvalues
    from creditscape.objective import Batch
    from creditscape.train import CurvatureProbe

    task, s = cue
    cfg = M.ModelConfig(task.n_in, 6, task.n_out)
    probe_batch = to_device(Batch(*(a[:64] for a in s.train)))
    probe = CurvatureProbe(probe_batch, block="w_rec", l2=0.01, steps=30)
    tcfg = TrainConfig(steps=40, eval_every=20, l2=0.01)
    res = train_ensemble(cfg, get_rule("bptt"), tcfg, [0, 1], s.train, probe=probe, progress=False)
    assert res.evals["lambda_max"].shape == (2, 3) and res.eval_seconds.shape == (3,)
    np.testing.assert_allclose(res.evals["rho"], 1.0, rtol=1e-4)  # Ĵ = H for the exact gradient
    for i in range(2):
        params = jax.tree.map(lambda a: a[i], res.params)
        struct = jax.tree.map(lambda a: a[i], res.structs)
        exact = top_eigenvalues(cfg, params, struct, probe_batch, key=jax.random.PRNGKey(9), l2=0.01, steps=30)
        np.testing.assert_allclose(res.evals["lambda_max"][i, -1], exact.values[0], rtol=1e-3)
    # With a tolerance (the experiments' default), fewer HVPs for the same λ_max.
    res_t = train_ensemble(cfg, get_rule("bptt"), tcfg, [0, 1], s.train, probe=probe._replace(tol=1e-5), progress=False)
    np.testing.assert_allclose(res_t.evals["lambda_max"], res.evals["lambda_max"], rtol=1e-5)
    assert np.all(res_t.evals["lanczos_steps"] <= res.evals["lanczos_steps"])
    assert np.any(res_t.evals["lanczos_steps"] < res.evals["lanczos_steps"]), res_t.evals["lanczos_steps"]
    res_e = train_ensemble(cfg, get_rule("eprop"), tcfg, [0, 1], s.train, probe=probe, progress=False)
    assert np.all(np.isfinite(res_e.evals["rho"])) and not np.allclose(res_e.evals["rho"][:, -1], 1.0)


def test_trajectory_holds_the_parameters_of_every_evaluation(cue):
    # The state buffers are donated to the next chunk: the saved copies must not alias them.
    task, s = cue
    cfg = M.ModelConfig(task.n_in, 8, task.n_out)
    full = train_ensemble(cfg, get_rule("bptt"), TrainConfig(steps=30, eval_every=10), [0, 1], s.train,
                          keep_trajectory=True, progress=False)
    assert full.trajectory.w_rec.shape == (2, 4, 8, 8)
    for j, steps in enumerate([10, 20]):
        part = train_ensemble(cfg, get_rule("bptt"), TrainConfig(steps=steps, eval_every=10), [0, 1], s.train,
                              progress=False)
        np.testing.assert_array_equal(full.trajectory.w_rec[:, j + 1], part.params.w_rec)
    np.testing.assert_array_equal(full.trajectory.w_rec[:, -1], full.params.w_rec)


def test_evaluation_in_chunks_equals_one_pass():
    from creditscape.objective import Batch, evaluate

    task = get_task("perceptual_decision")
    s = make_splits(task, 1000, 8, seed=0)
    cfg = M.ModelConfig(task.n_in, 16, task.n_out)
    params, struct = M.init(cfg, jax.random.PRNGKey(0), jnp.float64)
    batch = Batch(*(jnp.asarray(a) for a in s.train))
    whole = evaluate(cfg, params, struct, batch)
    for chunk in (300, 500, 999):  # padded and unpadded
        np.testing.assert_allclose(evaluate(cfg, params, struct, batch, chunk=chunk), whole, rtol=1e-6)


def test_members_stop_where_their_smoothed_loss_reaches_the_target(cue):
    """reached_at is the first iteration whose moving average of minibatch losses is ≤ L*, the
    parameters freeze there, and a member that never gets there trains for the whole budget."""
    task, s = cue
    cfg = M.ModelConfig(task.n_in, 12, task.n_out)
    target, beta = 0.45, 0.8
    tcfg = TrainConfig(learning_rate=0.01, steps=120, eval_every=20, target_loss=target, target_smoothing=beta)
    res = train_ensemble(cfg, get_rule("bptt"), tcfg, [0, 1, 2], s.train, progress=False,
                         learning_rates=[0.01, 0.01, 1e-7])
    for m in range(3):
        smoothed, expected = np.nan, -1
        for t, loss in enumerate(res.losses[m]):
            smoothed = loss if np.isnan(smoothed) else beta * smoothed + (1 - beta) * loss
            if smoothed <= target:
                expected = t + 1
                break
        assert res.reached_at[m] == expected, (m, res.reached_at[m], expected)
        if expected > 0:
            assert np.isnan(res.losses[m, expected:]).all() and np.isfinite(res.losses[m, :expected]).all()
    assert res.reached_at[0] > 0 and res.reached_at[1] > 0 and res.reached_at[2] == -1  # η ≈ 0 never gets there
    # Frozen after the stop: a larger budget ends at the same parameters.
    longer = train_ensemble(cfg, get_rule("bptt"), dataclasses.replace(tcfg, steps=240), [0, 1], s.train,
                            progress=False)
    np.testing.assert_array_equal(longer.reached_at, res.reached_at[:2])
    np.testing.assert_array_equal(longer.params.w_rec, res.params.w_rec[:2])
    # Once every member has stopped, the remaining evaluations repeat the last one.
    assert np.all(longer.evals["train_loss"][:, -1] == longer.evals["train_loss"][:, -2])


def test_adam_preconditioner_is_what_adam_divides_by():
    # Adam's step is −P⁻¹m with m the moving average of gradients, both written out by hand here.
    from creditscape.train import ADAM_B1, ADAM_B2, ADAM_EPS, adam_preconditioner, make_optimizer

    opt = make_optimizer(TrainConfig(optimizer="adam"))
    params = {"a": jnp.zeros(5), "b": jnp.zeros((2, 3))}
    state = opt.init(params)
    m = jax.tree.map(jnp.zeros_like, params)
    nu = jax.tree.map(jnp.zeros_like, params)
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    for k, key in enumerate(keys, start=1):
        grads = jax.tree.map(lambda p, kk=key: jax.random.normal(kk, p.shape, jnp.float64), params)
        m = jax.tree.map(lambda a, g: ADAM_B1 * a + (1 - ADAM_B1) * g, m, grads)
        nu = jax.tree.map(lambda a, g: ADAM_B2 * a + (1 - ADAM_B2) * g**2, nu, grads)
        updates, state = opt.update(grads, state, params)
        p, count = adam_preconditioner(state)
        assert int(count) == k
        by_hand = jax.tree.map(lambda v: (1 - ADAM_B1**k) * (jnp.sqrt(v / (1 - ADAM_B2**k)) + ADAM_EPS), nu)
        for name in params:
            np.testing.assert_allclose(p[name], by_hand[name], rtol=1e-12)
            np.testing.assert_allclose(updates[name], -m[name] / p[name], rtol=1e-10)


def test_preconditioned_sharpness_against_the_dense_hessian(cue):
    # λ₁(P⁻¹H) of the W_rec block, by Lanczos over the whole block, against the eigenvalues of
    # the dense P⁻¹H; NaN before Adam's first update; absent under SGD.
    from creditscape.curvature import dense_hessian
    from creditscape.objective import Batch
    from creditscape.train import CurvatureProbe, adam_preconditioner, make_evaluator

    task, s = cue
    cfg = M.ModelConfig(task.n_in, 5, task.n_out, alpha=0.5)
    batch = to_device(Batch(*(a[:32] for a in s.train)))
    probe = CurvatureProbe(batch, block="w_rec", l2=0.0, steps=25)
    train = to_device(s.train)
    tcfg = TrainConfig(optimizer="adam", learning_rate=1e-2, steps=10, eval_every=10)
    rule = get_rule("bptt")
    states, structs = init_ensemble(cfg, rule, tcfg, [0, 1], jnp.float64)
    evaluator = make_evaluator(cfg, rule, tcfg, probe)
    v0 = jax.random.normal(jax.random.PRNGKey(1), (2, 25), jnp.float64)
    before = evaluator(states.params, structs, states.rule_state, {}, batch, v0, states.opt_state)
    assert np.all(np.isnan(before["preconditioned_sharpness"]))
    states, _ = make_chunk(cfg, rule, tcfg)(states, structs, train, 0, 10)
    after = evaluator(states.params, structs, states.rule_state, {}, batch, v0, states.opt_state)
    for i in range(2):
        member = jax.tree.map(lambda a: a[i], (states.params, structs, states.opt_state))
        h = dense_hessian(cfg, member[0], member[1], batch, "w_rec")
        p = np.asarray(adam_preconditioner(member[2])[0].w_rec).ravel()
        dense = np.linalg.eigvals(np.diag(1 / p) @ np.asarray(h)).real.max()
        np.testing.assert_allclose(after["preconditioned_sharpness"][i], dense, rtol=1e-9)
        assert dense > 1.5 * after["lambda_max"][i]  # the preconditioner matters here
    sgd = make_evaluator(cfg, rule, dataclasses.replace(tcfg, optimizer="sgd"), probe)
    assert "preconditioned_sharpness" not in sgd(states.params, structs, states.rule_state, {}, batch, v0, states.opt_state)


def test_history_on_a_subset_and_the_last_evaluation_on_the_whole_sets(cue):
    from creditscape.objective import Batch
    from creditscape.train import make_set_evaluator

    task, s = cue
    cfg = M.ModelConfig(task.n_in, 8, task.n_out)
    tcfg = TrainConfig(steps=40, eval_every=20)
    sets = {"train": s.train, "test": s.test}
    whole = train_ensemble(cfg, get_rule("bptt"), tcfg, [0, 1], s.train, sets, keep_trajectory=True, progress=False)
    part = train_ensemble(cfg, get_rule("bptt"), tcfg, [0, 1], s.train, sets, history_sequences=64, progress=False)
    np.testing.assert_array_equal(part.losses, whole.losses)  # training is untouched
    for key in ("train_loss", "test_loss", "test_accuracy"):
        np.testing.assert_allclose(part.evals[key][:, -1], whole.evals[key][:, -1], rtol=1e-6)
    assert not np.allclose(part.evals["test_loss"][:, :-1], whole.evals["test_loss"][:, :-1], rtol=1e-3)
    middle = jax.tree.map(lambda a: jnp.asarray(a[:, 1]), whole.trajectory)
    first = {k: to_device(Batch(*(a[:64] for a in b))) for k, b in sets.items()}
    expected = make_set_evaluator(cfg)(middle, whole.structs, first)
    for key in ("train_loss", "test_loss"):
        np.testing.assert_allclose(part.evals[key][:, 1], expected[key], rtol=1e-6)


def test_a_program_larger_than_the_device_is_refused_before_it_runs(cue):
    from creditscape.train import CPU_MEMORY_FACTOR, check_memory, device_memory, program_bytes

    task, s = cue
    cfg = M.ModelConfig(task.n_in, 8, task.n_out)
    tcfg = TrainConfig(steps=10, eval_every=10)
    rule = get_rule("bptt")
    states, structs = init_ensemble(cfg, rule, tcfg, [0, 1], jnp.float32)
    compiled = make_chunk(cfg, rule, tcfg).lower(states, structs, to_device(s.train), 0, 10).compile()
    check_memory(compiled, "this", available=device_memory())  # fits
    with pytest.raises(MemoryError, match="this needs about .* GiB at once; this device has"):
        check_memory(compiled, "this", available=1024)
    need = program_bytes(compiled)
    stats = compiled.memory_analysis()
    added = stats.output_size_in_bytes + stats.temp_size_in_bytes - stats.alias_size_in_bytes
    assert need == int(stats.argument_size_in_bytes + CPU_MEMORY_FACTOR * added) > 0  # the suite runs on a CPU
    check_memory(compiled, "this", available=need)
    with pytest.raises(MemoryError):  # two host devices of one CPU hold two such programs
        check_memory(compiled, "this", available=need, sharing=2)


def test_a_minibatch_is_split_over_devices_only_where_the_parts_hold_enough_work():
    """Measured on 2 CPU cores (docs/scale.md): a split in two is 1.6x faster at the
    sequential-MNIST shape and up to 3.5x slower at `quick`'s cue recall, and it is wrong for
    ModProp (a batch-mean slope) and under the spiking rate regularizer (a batch-mean rate)."""
    bptt = get_rule("bptt")
    smnist = M.ModelConfig(28, 128, 10, bias=False, readout_steps=1)
    tcfg = TrainConfig(batch_size=256)
    assert batch_parts(smnist, bptt, tcfg, 28, 2) == 2
    assert batch_parts(smnist, bptt, tcfg, 28, 8) == 8  # 32 sequences of 28 steps per part: 2^24.1
    assert batch_parts(smnist, bptt, tcfg, 28, 1) == 1
    assert batch_parts(smnist, bptt, dataclasses.replace(tcfg, batch_size=255), 28, 2) == 1  # no equal halves
    assert batch_parts(smnist, get_rule("modprop"), tcfg, 28, 2) == 1
    assert batch_parts(M.ModelConfig(3, 32, 3, alpha=0.5), bptt, TrainConfig(batch_size=32), 11, 2) == 1  # quick
    spiking = M.ModelConfig(28, 128, 10, form="lif", rate_regularization=1.0)
    assert batch_parts(spiking, bptt, tcfg, 28, 2) == 1
    assert batch_parts(dataclasses.replace(spiking, rate_regularization=0.0), bptt, tcfg, 28, 2) == 2


def test_the_evaluators_network_program_is_the_same_for_every_rule(cue):
    # What lets the rules of a cell share one compilation of it (through the persistent cache):
    # the rule enters only the second, smaller program.
    from creditscape.objective import Batch
    from creditscape.train import CurvatureProbe, make_evaluator

    task, s = cue
    cfg = M.ModelConfig(task.n_in, 6, task.n_out, alpha=0.5, dale_exc_fraction=0.5)
    batch = to_device(Batch(*(a[:16] for a in s.train)))
    tcfg = TrainConfig(optimizer="adam", learning_rate=1e-2, steps=10, eval_every=10)
    programs = {}
    for name in ("bptt", "eprop", "mdgl", "uoro"):
        rule = get_rule(name)
        states, structs = init_ensemble(cfg, rule, tcfg, [0, 1], batch.x.dtype)
        evaluator = make_evaluator(cfg, rule, tcfg, CurvatureProbe(batch, steps=4))
        v = jnp.ones((2, 36), batch.x.dtype)
        programs[name] = {k: p.lower(states.params, structs, *args).as_text() for k, (p, args) in {
            "network": (evaluator.programs["network"], ({"test": batch}, v, states.opt_state)),
            "rule": (evaluator.programs["rule"], (states.rule_state, batch, v))}.items()}
    assert len({p["network"] for p in programs.values()}) == 1
    assert len({p["rule"] for p in programs.values()}) == 4
