"""The online-rule taxonomy beyond the paper's rules (SnAp-n, UORO, KF-RTRL, reverse KF-RTRL)
against independent references, in float64: SnAp against RTRL and a written-out masked
recursion; the stochastic rules' unbiasedness by a test whose tolerance comes from the sample."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from cases import assert_close, draw, flat, light_or_heavy, model_cases
from creditscape import _reference as ref
from creditscape.rules import get_rule, gradient_alignment, rule_gradient
from creditscape.rules._snap import snap_pattern
from creditscape.theory import estimate_on_block, jacobian_vector_product

CASES = dict(model_cases())
STOCHASTIC = ("uoro", "kf_rtrl", "reverse_kf_rtrl")


def _exact(cfg, params, struct, batch, nz):
    return rule_gradient(get_rule("bptt"), cfg, params, struct, (), batch, nz)[1]


@pytest.mark.parametrize("case, n", [("voltage-a0.3-tanh", 2), ("rate-a0.9-relu", 2), ("voltage-heterotau-s0", 2),
                                     ("voltage-dale-sparse-s0", 5)])
def test_snap_is_rtrl_when_its_pattern_is_full(case, n):
    cfg = CASES[case]
    params, struct, batch, nz = draw(cfg, seed=11, mask="random", noise=True)
    assert np.all(np.asarray(snap_pattern(cfg, params, struct, n)) == 1)
    assert_close(rule_gradient(get_rule("snap", n=n), cfg, params, struct, (), batch, nz)[1],
                 _exact(cfg, params, struct, batch, nz))


@pytest.mark.parametrize("case, n", [("voltage-dale-sparse-s0", 1), ("voltage-dale-sparse-s0", 2),
                                     ("rate-dale-types-s0-mse", 1), ("voltage-celltypes-selfconn-nobias", 1)])
def test_snap_is_the_pattern_restricted_recursion(case, n):
    """Against the masked recursion written out with dense per-step Jacobians, its pattern found
    from the definition (tests _reference.py); on these cases the pattern is not full, so SnAp-n
    differs from the exact gradient, and the test says by how much at least."""
    cfg = CASES[case]
    params, struct, batch, nz = draw(cfg, seed=12, mask="every", noise=True)
    _, g = rule_gradient(get_rule("snap", n=n), cfg, params, struct, (), batch, nz)
    expected = ref.reference_gradient(cfg, params, struct, batch, "snap", n=n, xi=nz.xi)
    assert_close(g._replace(w_out=None, b_out=None), expected)
    exact = flat(_exact(cfg, params, struct, batch, nz)._replace(w_out=None, b_out=None))
    assert np.abs(flat(expected) - exact).max() > 1e-3 * np.abs(exact).max()


@pytest.mark.parametrize("case", ["voltage-a0.3-relu", "rate-a0.9-tanh", "voltage-dale-sparse-s0", "rate-heterotau-s0"])
def test_snap_1_is_eprop_without_self_connections(case):
    """J_t[i, i] is the leak alone when W_ii does not exist: SnAp-1's diagonal recursion is e-prop's
    eligibility (with self-connections it differs: test_snap_is_the_pattern_restricted_recursion)."""
    cfg = CASES[case]
    params, struct, batch, nz = draw(cfg, seed=13, mask="random", noise=True)
    assert_close(rule_gradient(get_rule("snap", n=1), cfg, params, struct, (), batch, nz)[1],
                 rule_gradient(get_rule("eprop"), cfg, params, struct, (), batch, nz)[1])
    assert get_rule("snap", n=1).computation(cfg) == get_rule("eprop").computation(cfg)


def _draws(rule, cfg, params, struct, batch, nz, n_draws, seed=0):
    """(n_draws, P) estimates of the rule, one per key."""
    one = lambda k: jnp.concatenate([jnp.ravel(a) for a in jax.tree.leaves(
        rule_gradient(rule, cfg, params, struct, (), batch, nz, key=k)[1])])
    return np.asarray(jax.jit(jax.vmap(one))(jax.random.split(jax.random.PRNGKey(seed), n_draws)))


def _largest_z(samples, target, scale):
    """(max |mean − target| / (sd/√n) over the components that vary, their number); the others
    must equal the target (the readout's exact gradient, absent weights)."""
    mean, sd = samples.mean(axis=0), samples.std(axis=0, ddof=1)
    varies = sd > 1e-12 * scale
    assert np.abs(mean - target)[~varies].max(initial=0) < 1e-10 * scale
    z = np.abs(mean - target)[varies] / (sd[varies] / np.sqrt(len(samples)))
    return z.max(), int(varies.sum())


@pytest.mark.parametrize("name, case", light_or_heavy(
    [(n, c) for n in STOCHASTIC for c in ("voltage-a0.3-tanh", "rate-a0.9-tanh", "voltage-celltypes-selfconn-nobias")],
    {("uoro", "voltage-a0.3-tanh"), ("kf_rtrl", "rate-a0.9-tanh"), ("reverse_kf_rtrl", "voltage-celltypes-selfconn-nobias")}))
def test_stochastic_rules_are_unbiased(name, case):
    """The mean of n draws is the exact gradient within the error the draws' own spread predicts:
    every component's z = (mean − ∇L)/(sd/√n) below the Bonferroni bound of a 1e-3 family-wise
    level. The same statistic rejects e-prop's gradient as the mean (the test can fail)."""
    cfg = CASES[case]
    params, struct, batch, nz = draw(cfg, seed=21, mask="random", noise=True)
    exact = flat(_exact(cfg, params, struct, batch, nz))
    scale = np.abs(exact).max()
    samples = _draws(get_rule(name), cfg, params, struct, batch, nz, 3000)
    z, varying = _largest_z(samples, exact, scale)
    bound = stats.norm.isf(1e-3 / (2 * varying))
    assert z < bound, f"{name}: max |z| {z:.2f} ≥ {bound:.2f} over {varying} components"
    eprop = flat(rule_gradient(get_rule("eprop"), cfg, params, struct, (), batch, nz)[1])
    assert _largest_z(samples, eprop, scale)[0] > bound


def test_uoro_is_unbiased_with_a_learned_initial_state_and_sparse_connections():
    cfg = CASES["voltage-dale-sparse-s0"]
    params, struct, batch, nz = draw(cfg, seed=22, mask="every")
    exact = flat(_exact(cfg, params, struct, batch, nz))
    z, varying = _largest_z(_draws(get_rule("uoro"), cfg, params, struct, batch, nz, 3000), exact, np.abs(exact).max())
    assert z < stats.norm.isf(1e-3 / (2 * varying))


def test_the_expected_update_jacobian_of_an_unbiased_rule_is_the_hessian():
    """E[Ĵ] = ∂E[ĝ]/∂θ = H for an unbiased rule: Ĵv of single draws (the theory module's jvp
    through the estimate) average to Hv within their sampling error."""
    cfg = CASES["voltage-a0.3-tanh"]
    params, struct, batch, nz = draw(cfg, seed=23, mask="every")
    v = jax.random.normal(jax.random.PRNGKey(5), params.w_rec.shape).ravel()
    g_exact, x0 = estimate_on_block(get_rule("bptt"), cfg, params, struct, (), batch)
    hv = np.asarray(jacobian_vector_product(g_exact, x0, v))

    def one(k):
        g, _ = estimate_on_block(get_rule("uoro"), cfg, params, struct, (), batch, key=k, draws=1)
        return jacobian_vector_product(g, x0, v)

    samples = np.asarray(jax.jit(jax.vmap(one))(jax.random.split(jax.random.PRNGKey(6), 3000)))
    z, varying = _largest_z(samples, hv, np.abs(hv).max())
    assert z < stats.norm.isf(1e-3 / (2 * varying))


def test_kronecker_rules_refuse_a_learned_initial_state_and_keys_are_checked():
    cfg = CASES["voltage-heterotau-s0"]
    params, struct, batch, nz = draw(cfg, seed=1)
    for name in ("kf_rtrl", "reverse_kf_rtrl"):
        with pytest.raises(ValueError, match="learn_init_state = false, or use uoro"):
            get_rule(name).check_model(cfg)
    with pytest.raises(ValueError, match="stochastic: pass key"):
        rule_gradient(get_rule("uoro"), cfg, params, struct, (), batch, nz)
    with pytest.raises(ValueError, match="draws no random numbers"):
        rule_gradient(get_rule("eprop"), cfg, params, struct, (), batch, nz, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        get_rule("snap", n=0)


def test_alignment_of_a_stochastic_rule_reports_its_variance():
    """Over draws: the mean estimate, the mean cosine, and the variance relative to ‖∇L‖², the
    last against a direct computation from the same draws; zero for a deterministic rule."""
    cfg = CASES["rate-a0.9-tanh"]
    params, struct, batch, nz = draw(cfg, seed=24, mask="every")
    key = jax.random.PRNGKey(3)
    al = gradient_alignment(get_rule("kf_rtrl"), cfg, params, struct, (), batch, key=key, draws=6)
    keys = jax.random.split(key, 6)
    grads = np.stack([flat(rule_gradient(get_rule("kf_rtrl"), cfg, params, struct, (), batch, key=k)[1]) for k in keys])
    exact = flat(al.exact)
    np.testing.assert_allclose(flat(al.estimate), grads.mean(axis=0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(al.relative_variance, grads.var(axis=0, ddof=1).sum() / (exact @ exact), rtol=1e-10)
    cosines = grads @ exact / np.linalg.norm(grads, axis=1) / np.linalg.norm(exact)
    np.testing.assert_allclose(al.cosine, cosines.mean(), rtol=1e-10)
    assert 0 < al.relative_variance
    assert gradient_alignment(get_rule("bptt"), cfg, params, struct, (), batch).relative_variance == 0


# `make test` trains ModProp here; UORO trains in test_cli's end-to-end experiment, KeRNL in the
# checkpoint test below.
@pytest.mark.parametrize("name", light_or_heavy(["snap", "modprop", *STOCHASTIC, "kernl", "dni"], {"modprop"}))
def test_every_new_rule_trains_with_the_probe_and_its_draws_follow_the_seed(name):
    """In the compiled, seed-vmapped trainer: the loss falls, ρ and λ_max are finite, a stochastic
    rule records its relative variance, and a seed's run is reproducible while seeds differ."""
    from creditscape import model as M
    from creditscape.objective import Batch
    from creditscape.tasks import get_task, make_splits
    from creditscape.train import CurvatureProbe, TrainConfig, to_device, train_ensemble

    task = get_task("cue_recall", delay=3)
    splits = make_splits(task, 64, 64, seed=0)
    cfg = M.ModelConfig(task.n_in, 6, task.n_out, alpha=0.5, dale_exc_fraction=0.7)  # (cell types for ModProp)
    probe = CurvatureProbe(to_device(Batch(*(a[:32] for a in splits.train))), block="w_rec", steps=10)
    tcfg = TrainConfig(learning_rate=0.01, steps=40, eval_every=20, batch_size=16)
    run = lambda seeds: train_ensemble(cfg, get_rule(name), tcfg, seeds, splits.train, probe=probe, progress=False)
    res = run([0, 1])
    assert np.all(res.diverged_at == -1)
    assert np.all(res.evals["train_loss"][:, -1] < res.evals["train_loss"][:, 0])
    assert np.all(np.isfinite(res.evals["rho"])) and np.all(np.isfinite(res.evals["lambda_max"]))
    assert ("relative_variance" in res.evals) == (name in STOCHASTIC)
    if name in STOCHASTIC:
        assert np.all(res.evals["relative_variance"] > 0)
    if name in ("kernl", "dni"):  # the auxiliary parameters moved, per seed
        initial = jax.tree.leaves(get_rule(name).init(cfg, *M.init(cfg, jax.random.PRNGKey(0)), key=None))
        for before, after in zip(initial, jax.tree.leaves(res.rule_states)):
            assert not np.allclose(after[0], before) and not np.allclose(after[0], after[1])
    if name in STOCHASTIC:
        swapped = run([1, 0])  # the same program, members swapped: a seed's draws are its own
        np.testing.assert_array_equal(swapped.losses[::-1], res.losses)


MODPROP_CASES = ["voltage-dale-sparse-s0", "rate-dale-types-s0-mse", "voltage-celltypes-selfconn-nobias"]


def _mean_slope(cfg, params, struct, nz):
    from creditscape import model as M
    from creditscape.rules._core import phi_prime

    s, _, u = M.run(cfg, params, struct, nz.x, nz.xi)
    return float(np.mean(np.asarray(phi_prime(cfg, s if cfg.form == "voltage" else u))))


@pytest.mark.parametrize("case, hops, slope", light_or_heavy(
    [(c, h, sl) for c in MODPROP_CASES for h in (2, 3, None) for sl in ("mean", "exact")],
    {(c, h, sl) for c in MODPROP_CASES for h, sl in ((None, "mean"), (2, "exact"))}))
def test_modprop_is_its_path_sum(case, hops, slope):
    """Against the written-out sum over s consecutive hops of dense R̄ matrices (tests/_reference)."""
    from creditscape.rules import modulatory_weights

    cfg = CASES[case]
    params, struct, batch, nz = draw(cfg, seed=31, mask="every", noise=True)
    rule = get_rule("modprop", hops=hops, slope=slope)
    _, g = rule_gradient(rule, cfg, params, struct, (), batch, nz)
    w_bar = modulatory_weights(cfg, params, struct, "cell_type")
    mu = _mean_slope(cfg, params, struct, nz) if slope == "mean" else None
    expected = ref.reference_gradient(cfg, params, struct, batch, "modprop", w_bar=w_bar, xi=nz.xi,
                                      n=batch.x.shape[1] if hops is None else hops, slope=mu)
    assert_close(g._replace(w_out=None, b_out=None), expected)


@pytest.mark.parametrize("case", MODPROP_CASES)
def test_modprop_limits_eprop_mdgl_and_bptt(case):
    cfg = CASES[case]
    params, struct, batch, nz = draw(cfg, seed=32, mask="random", noise=True)
    grad = lambda name, **o: rule_gradient(get_rule(name, **o), cfg, params, struct, (), batch, nz)[1]
    assert_close(grad("modprop", hops=0), grad("eprop"))
    for modulatory in ("cell_type", "cell_type_all_pairs", "exact"):
        assert_close(grad("modprop", hops=1, slope="exact", modulatory=modulatory), grad("mdgl", modulatory=modulatory))
    assert get_rule("modprop", hops=1, slope="exact").computation(cfg) == get_rule("mdgl").computation(cfg)
    # Without a leak every hop is the exact Jacobian: BPTT (a learned s0 keeps e-prop's leak-only
    # eligibility, zero without a leak, as in MDGL: left out here).
    import dataclasses

    no_leak = dataclasses.replace(cfg, alpha=0.0, learn_init_state=False)
    params, struct, batch, nz = draw(no_leak, seed=33, mask="random", noise=True)
    _, g = rule_gradient(get_rule("modprop", modulatory="exact", slope="exact"), no_leak, params, struct, (), batch, nz)
    assert_close(g, _exact(no_leak, params, struct, batch, nz))
    _, g_mean = rule_gradient(get_rule("modprop", modulatory="exact"), no_leak, params, struct, (), batch, nz)
    assert np.abs(flat(g_mean) - flat(g)).max() > 1e-3 * np.abs(flat(g)).max()  # μ is an approximation


AUX_CASES = ["voltage-a0.3-tanh", "rate-a0.9-tanh", "voltage-celltypes-selfconn-nobias", "rate-a0.0-relu"]


@pytest.mark.parametrize("case", AUX_CASES)
def test_kernl_starts_as_eprop_and_is_its_definition_at_any_state(case):
    """At its initial state (A = I, κ = α) KeRNL is e-prop; at a random (A, κ) it is
    Σ_t c_t A B_t with B_t = diag(κ) B_{t-1} + I_t written out with dense immediate terms."""
    from creditscape.rules._auxiliary import KeRNLState

    cfg = CASES[case]
    params, struct, batch, nz = draw(cfg, seed=41, mask="random", noise=True)
    rule = get_rule("kernl")
    state = rule.init(cfg, params, struct, key=None)
    assert_close(rule_gradient(rule, cfg, params, struct, state, batch, nz)[1],
                 rule_gradient(get_rule("eprop"), cfg, params, struct, (), batch, nz)[1])
    keys = jax.random.split(jax.random.PRNGKey(4), 2)
    state = KeRNLState(jnp.eye(cfg.n_rec) + 0.3 * jax.random.normal(keys[0], (cfg.n_rec, cfg.n_rec)),
                       jax.random.uniform(keys[1], (cfg.n_rec,)))
    _, g = rule_gradient(rule, cfg, params, struct, state, batch, nz)
    expected = ref.reference_gradient(cfg, params, struct, batch, "kernl", xi=nz.xi, sensitivity=state.sensitivity,
                                      decay=state.decay)
    assert_close(g._replace(w_out=None, b_out=None), expected)


@pytest.mark.parametrize("case", AUX_CASES[:2])
def test_kernl_learns_by_the_papers_update(case):
    """One call of ``learn`` against the perturbation-prediction update transcribed step by step
    (Roth et al. 2019, Algorithm 1, in Marschall et al.'s discrete form), same perturbation draws."""
    from creditscape import model as M
    from creditscape.rules._auxiliary import KeRNLState

    cfg = CASES[case]
    params, struct, batch, nz = draw(cfg, seed=42, mask="every", noise=True)
    rule = get_rule("kernl", perturbation=1e-4, aux_learning_rate=0.5)
    keys = jax.random.split(jax.random.PRNGKey(5), 3)
    state = KeRNLState(jnp.eye(cfg.n_rec) + 0.2 * jax.random.normal(keys[0], (cfg.n_rec, cfg.n_rec)),
                       jax.random.uniform(keys[1], (cfg.n_rec,), minval=0.2, maxval=0.9))
    new = rule.learn(cfg, params, struct, state, batch, nz, key=keys[2])
    n_b, n_t = batch.x.shape[:2]
    xi = np.asarray(jax.random.normal(keys[2], (n_t, n_b, cfg.n_rec)))
    a, kappa = np.asarray(state.sensitivity), np.asarray(state.decay)
    grad_a, grad_kappa = np.zeros_like(a), np.zeros_like(kappa)
    one = lambda s, b, t: np.asarray(M.step(cfg, params, struct, jnp.asarray(s)[None], nz.x[b, t][None],
                                            None if nz.xi is None else nz.xi[b, t][None])[0][0])
    for b in range(n_b):
        s = perturbed = np.asarray(M.initial_state(cfg, params, 1)[0])
        omega, gamma = np.zeros(cfg.n_rec), np.zeros(cfg.n_rec)
        for t in range(n_t):
            s, perturbed = one(s, b, t), one(perturbed, b, t) + rule.perturbation * xi[t, b]
            gamma = kappa * gamma + omega  # ∂Ω_t/∂κ
            omega = kappa * omega + xi[t, b]
            error = a @ omega - (perturbed - s) / rule.perturbation
            grad_a += np.outer(error, omega)
            grad_kappa += (a.T @ error) * gamma
    step = rule.aux_learning_rate / (n_b * n_t)
    np.testing.assert_allclose(new.sensitivity, a - step * grad_a, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(new.decay, np.clip(kappa - step * grad_kappa, 0, 1), rtol=1e-9, atol=1e-12)


def _dni_transcribed_update(cfg, params, struct, batch, nz, synthetic, rate):
    """A − η mean_{b,t} (A ã_t − c*_t) ã_tᵀ, c*_t = B c_t + J_{t+1}ᵀ A ã_{t+1}, written out per sequence."""
    from creditscape.objective import loss_weights

    weights = np.asarray(loss_weights(cfg, batch.mask))
    n_b, n_t = batch.x.shape[:2]
    a = np.asarray(synthetic)
    grad = np.zeros_like(a)
    for b in range(n_b):
        pc, _ = ref._pieces(cfg, params, struct, batch.x[b], None if nz.xi is None else nz.xi[b], batch.target[b],
                            weights[b], params.w_out)
        label = lambda t: (np.eye(cfg.n_out)[int(batch.target[b][t])] if cfg.loss == "xent"
                           else np.asarray(batch.target[b][t])) * (weights[b][t] > 0)
        inp = [np.concatenate([pc["s"][t], label(t), [1.0]]) for t in range(n_t)]
        for t in range(n_t):
            target = n_b * pc["c"][t] + (pc["J"][t + 1].T @ (a @ inp[t + 1]) if t + 1 < n_t else 0)
            grad += np.outer(a @ inp[t] - target, inp[t])
    return a - rate * grad / (n_b * n_t)


@pytest.mark.parametrize("case", AUX_CASES[:2])
def test_dni_is_its_definition_and_learns_by_the_bootstrapped_target(case):
    cfg = CASES[case]
    params, struct, batch, nz = draw(cfg, seed=43, mask="random", noise=True)
    rule = get_rule("dni", aux_learning_rate=0.3)
    zero = rule.init(cfg, params, struct, key=None)
    assert np.all(np.asarray(rule_gradient(rule, cfg, params, struct, zero, batch, nz)[1].w_rec) == 0)
    synthetic = 0.3 * jax.random.normal(jax.random.PRNGKey(6), zero.shape)
    _, g = rule_gradient(rule, cfg, params, struct, synthetic, batch, nz)
    assert_close(g._replace(w_out=None, b_out=None),
                 ref.reference_gradient(cfg, params, struct, batch, "dni", xi=nz.xi, synthetic=synthetic))
    np.testing.assert_allclose(rule.learn(cfg, params, struct, synthetic, batch, nz, key=None),
                               _dni_transcribed_update(cfg, params, struct, batch, nz, synthetic, 0.3),
                               rtol=1e-9, atol=1e-12)


def test_dni_learned_on_a_fixed_network_aligns_with_bptt():
    """The synthetic gradient, trained by its bootstrapped target on one batch of a fixed network,
    comes to point where BPTT does (recurrent layer; it starts at zero)."""
    cfg = CASES["rate-a0.0-relu"]
    params, struct, batch, nz = draw(cfg, seed=44, mask="every")
    rule = get_rule("dni")
    learn = jax.jit(lambda a: rule.learn(cfg, params, struct, a, batch, nz, key=None))
    recurrent = lambda g: np.concatenate([np.ravel(g.w_rec), np.ravel(g.w_in), np.ravel(g.b)])
    exact = recurrent(_exact(cfg, params, struct, batch, nz))

    def cosine(synthetic):
        dni = recurrent(rule_gradient(rule, cfg, params, struct, synthetic, batch, nz)[1])
        return dni @ exact / np.linalg.norm(dni) / np.linalg.norm(exact)

    synthetic = rule.init(cfg, params, struct, key=None)
    cosines = []
    for i in range(1000):
        synthetic = learn(synthetic)
        if i + 1 in (10, 1000):
            cosines.append(cosine(synthetic))
    assert cosines[1] > max(0.8, cosines[0] + 0.1), cosines


def test_a_learned_rule_state_is_checkpointed_and_resumed_bit_identically(tmp_path, monkeypatch):
    """KeRNL's A and κ are part of the training state: a run stopped after its second chunk and
    started again ends where an uninterrupted run ends, bit for bit, rule state included."""
    from creditscape import model as M
    from creditscape import stopping
    from creditscape import train as T
    from creditscape.tasks import get_task, make_splits

    task = get_task("cue_recall", delay=3)
    splits = make_splits(task, 64, 64, seed=0)
    cfg = M.ModelConfig(task.n_in, 6, task.n_out, alpha=0.5)
    tcfg = T.TrainConfig(learning_rate=0.01, steps=60, eval_every=20, batch_size=16)
    run = lambda checkpoint: T.train_ensemble(cfg, get_rule("kernl"), tcfg, [0, 1], splits.train,
                                              checkpoint=checkpoint, progress=False)
    whole = run(None)
    original, chunks = T._train_chunk, []

    def stop_after_two(*args, **kwargs):
        out = original(*args, **kwargs)
        chunks.append(1)
        if len(chunks) == 2:
            stopping.requested.set()
        return out

    monkeypatch.setattr(T, "_train_chunk", stop_after_two)
    checkpoint = T.Checkpoint(tmp_path / "run.npz", every_seconds=0.0)
    try:
        with pytest.raises(KeyboardInterrupt):
            run(checkpoint)
    finally:
        stopping.requested.clear()
    monkeypatch.setattr(T, "_train_chunk", original)
    resumed = run(checkpoint)
    assert resumed.restored_evaluations == 3
    np.testing.assert_array_equal(resumed.losses, whole.losses)
    for a, b in zip(jax.tree.leaves((resumed.params, resumed.rule_states)), jax.tree.leaves((whole.params, whole.rule_states))):
        np.testing.assert_array_equal(a, b)
