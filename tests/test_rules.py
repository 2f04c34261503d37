"""Every rule against an independent reference, in float64 on fresh random instances."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cases import MASKS, assert_close, draw, flat, model_cases
from creditscape import _reference as ref
from creditscape import model as M
from creditscape.tasks import make_splits
from creditscape.train import minibatch_splits
from creditscape.rules import (
    Rule, get_rule, gradient_alignment, modulatory_weights, register, rule_class, rule_gradient, rule_names,
)
from creditscape.rules import _base
from creditscape.rules._mdgl import MODULATORY
from creditscape.rules._core import phi_prime, recurrent_part, trace_rule_offline, trace_rule_online

CASES = model_cases()
CASE_IDS = [c[0] for c in CASES]
# Reference comparisons are slow (dense Jacobians per step): run them on a subset that still
# covers both forms, every α, both activations, noise on and off, every mask, and the special cases.
SUBSET = sorted({i for i in range(len(CASES)) if i % 4 in (0, 3)} | set(range(12, len(CASES))))
# `make test` runs every rule on a representative part of the matrix (both forms, α = 0 and > 0,
# every mask, noise on and off, Dale's law, cell types, MSE, heterogeneous leaks); the rest is
# marked heavy (`pytest -m heavy`). The slow references run on a smaller part still.
LIGHT = {3, 7, 8, 12, 13, 14, 15, 16}
LIGHT_REFERENCE = {3, 7, 13, 15, 16}


def cases(indices, light=LIGHT):
    """pytest parameters for the cases ``indices``, those outside ``light`` marked heavy."""
    return [pytest.param(i, id=CASE_IDS[i], marks=() if i in light else pytest.mark.heavy) for i in indices]


def _case(i):
    """Case i with a mask and noise setting that vary across cases."""
    name, cfg = CASES[i]
    return cfg, MASKS[i % len(MASKS)], i % 2 == 1


def _two_form_rules():
    """Every registered rule with both forms (default options), plus non-default options. MDGL runs
    with each W̄, allowed on the single-type cases too (its equalities hold whatever W̄ is)."""
    rules = [get_rule(n) for n in rule_names() if set(rule_class(n).forms) >= {"offline", "online"} and n != "mdgl"]
    return rules + [get_rule("tbptt", k=2)] + [get_rule("mdgl", modulatory=m, allow_single_type=True) for m in MODULATORY]


def _grad(rule, cfg, params, struct, batch, noise, form=None, seed=0):
    state = rule.init(cfg, params, struct, key=jax.random.PRNGKey(seed))
    key = jax.random.PRNGKey(seed + 1) if rule.stochastic else None  # the same draws on every call
    return rule_gradient(rule, cfg, params, struct, state, batch, noise, form=form, key=key)


@pytest.mark.parametrize("i", cases(range(len(CASES))))
@pytest.mark.parametrize("rule", _two_form_rules(), ids=lambda r: f"{r.name}{dataclasses.astuple(r)}")
def test_online_equals_offline(rule, i):
    cfg, mask, noise = _case(i)
    params, struct, batch, nz = draw(cfg, seed=100 + i, mask=mask, noise=noise)
    l_off, g_off = _grad(rule, cfg, params, struct, batch, nz, "offline")
    l_on, g_on = _grad(rule, cfg, params, struct, batch, nz, "online")
    np.testing.assert_allclose(l_on, l_off, rtol=1e-12)
    assert_close(g_on, g_off, 1e-10)


@pytest.mark.parametrize("i", cases(SUBSET))
def test_exact_rules_equal_bptt(i):
    cfg, mask, noise = _case(i)
    params, struct, batch, nz = draw(cfg, seed=200 + i, mask=mask, noise=noise)
    _, g_bptt = _grad(get_rule("bptt"), cfg, params, struct, batch, nz)
    assert_close(_grad(get_rule("rtrl"), cfg, params, struct, batch, nz)[1], g_bptt)
    for form in ("offline", "online"):
        assert_close(_grad(get_rule("tbptt", k=batch.x.shape[1]), cfg, params, struct, batch, nz, form)[1], g_bptt)
        assert_close(_grad(get_rule("tbptt", k=50), cfg, params, struct, batch, nz, form)[1], g_bptt)


@pytest.mark.parametrize("i", cases(range(0, len(CASES), 2)))
def test_reference_exact_equals_bptt(i):
    """The brute-force reference itself reproduces autodiff (so it can judge the other rules)."""
    cfg, mask, noise = _case(i)
    params, struct, batch, nz = draw(cfg, seed=300 + i, mask=mask, noise=noise)
    _, g_bptt = _grad(get_rule("bptt"), cfg, params, struct, batch, nz)
    assert_close(ref.reference_gradient(cfg, params, struct, batch, "exact", xi=nz.xi), recurrent_part(g_bptt))


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("i", cases(range(1, len(CASES), 3)))
def test_tbptt_matches_definition(i, k):
    cfg, mask, noise = _case(i)
    params, struct, batch, nz = draw(cfg, seed=400 + i, mask=mask, noise=noise)
    expected = ref.reference_gradient(cfg, params, struct, batch, "tbptt", k=k, xi=nz.xi)
    for form in ("offline", "online"):
        assert_close(recurrent_part(_grad(get_rule("tbptt", k=k), cfg, params, struct, batch, nz, form)[1]), expected)


@pytest.mark.parametrize("i", cases(SUBSET, LIGHT_REFERENCE))
def test_eprop_matches_definition_and_bptt_without_recurrence(i):
    cfg, mask, noise = _case(i)
    params, struct, batch, nz = draw(cfg, seed=500 + i, mask=mask, noise=noise)
    expected = ref.reference_gradient(cfg, params, struct, batch, "eprop", xi=nz.xi)
    assert_close(recurrent_part(_grad(get_rule("eprop"), cfg, params, struct, batch, nz)[1]), expected)
    no_rec = params._replace(w_rec=jnp.zeros_like(params.w_rec))
    _, g_bptt = _grad(get_rule("bptt"), cfg, no_rec, struct, batch, nz)
    for form in ("offline", "online"):
        assert_close(_grad(get_rule("eprop"), cfg, no_rec, struct, batch, nz, form)[1], g_bptt)


@pytest.mark.parametrize("i", cases(SUBSET, LIGHT_REFERENCE))
def test_random_feedback_matches_definition(i):
    cfg, mask, noise = _case(i)
    params, struct, batch, nz = draw(cfg, seed=600 + i, mask=mask, noise=noise)
    rule = get_rule("eprop_random")
    fb = rule.init(cfg, params, struct, key=jax.random.PRNGKey(7))
    expected = ref.reference_gradient(cfg, params, struct, batch, "eprop", feedback=fb, xi=nz.xi)
    for form in ("offline", "online"):
        _, g = rule_gradient(rule, cfg, params, struct, fb, batch, nz, form=form)
        assert_close(recurrent_part(g), expected)
        _, g_exact = _grad(get_rule("bptt"), cfg, params, struct, batch, nz)
        np.testing.assert_allclose(g.w_out, g_exact.w_out, rtol=1e-12)  # readout stays exact


@pytest.mark.parametrize("modulatory", MODULATORY)
@pytest.mark.parametrize("i", cases(SUBSET, LIGHT_REFERENCE))
def test_mdgl_matches_one_hop_definition(i, modulatory):
    """Both forms == the path sum with W̄ written out entry by entry (independent of the rule's W̄)."""
    cfg, mask, noise = _case(i)
    params, struct, batch, nz = draw(cfg, seed=700 + i, mask=mask, noise=noise)
    w_bar = ref.modulatory_weights(params.w_rec, struct.rec_mask, struct.cell_type, modulatory)
    expected = ref.reference_gradient(cfg, params, struct, batch, "mdgl", w_bar=w_bar, xi=nz.xi)
    for form in ("offline", "online"):
        got = _grad(get_rule("mdgl", modulatory=modulatory, allow_single_type=True), cfg, params, struct, batch, nz, form)[1]
        assert_close(recurrent_part(got), expected)


@pytest.mark.parametrize("modulatory", ["cell_type", "cell_type_all_pairs"])
@pytest.mark.parametrize("types", [{"dale_exc_fraction": 0.5}, {"cell_types": 3}])
def test_cell_type_modulatory_weights_match_their_definition(modulatory, types):
    """On a sparse network (absent connections are where the two averages differ)."""
    cfg = M.ModelConfig(3, 7, 2, connectivity=0.6, **types)
    params, struct = M.init(cfg, jax.random.PRNGKey(3), jnp.float64)
    got = np.asarray(modulatory_weights(cfg, params, struct, modulatory))
    np.testing.assert_allclose(got, ref.modulatory_weights(params.w_rec, struct.rec_mask, struct.cell_type, modulatory),
                               rtol=1e-12, atol=1e-15)
    absent = np.asarray(struct.rec_mask) == 0
    assert np.all(got[absent] == 0) if modulatory == "cell_type" else np.any(got[absent] != 0)


def test_mdgl_differs_from_eprop_on_the_quick_model():
    """With the quick preset's E/I types, MDGL's hop changes the recurrent estimate by > 10 %."""
    from creditscape.config import load

    exp = load(preset="quick")
    cfg, cell = exp.cells[0].model, exp.cells[0]
    splits = make_splits(cell.task, 128, 8, seed=0)
    batch = jax.tree.map(jnp.asarray, splits.train)
    for seed in range(4):
        params, struct = M.init(cfg, jax.random.PRNGKey(seed), jnp.float64)
        _, g_e = _grad(get_rule("eprop"), cfg, params, struct, batch, None)
        _, g_m = _grad(get_rule("mdgl"), cfg, params, struct, batch, None)
        diff = np.linalg.norm(flat(recurrent_part(g_m)) - flat(recurrent_part(g_e)))
        assert diff > 0.1 * np.linalg.norm(flat(recurrent_part(g_e))), seed


def test_mdgl_on_a_single_cell_type_is_refused_unless_asked_for():
    cfg = M.ModelConfig(3, 5, 2)
    params, struct, batch, nz = draw(cfg, seed=1)
    with pytest.raises(ValueError, match="single cell type.*dale_exc_fraction"):
        _grad(get_rule("mdgl"), cfg, params, struct, batch, nz)
    _grad(get_rule("mdgl", modulatory="exact"), cfg, params, struct, batch, nz)
    _grad(get_rule("mdgl", allow_single_type=True), cfg, params, struct, batch, nz)


def test_one_computation_one_key():
    """The registry knows which rules compute the same estimate (a comparison counts them once)."""
    leaky, no_leak = M.ModelConfig(3, 5, 2, alpha=0.5), M.ModelConfig(3, 5, 2, alpha=0.0)
    for cfg in (leaky, no_leak, M.ModelConfig(3, 5, 2, form="rate", alpha=0.5)):
        key = lambda name, **o: get_rule(name, **o).computation(cfg)
        assert key("rflo") == key("eprop_random") and key("rtrl") == key("bptt")
        assert len({key("bptt"), key("eprop_random"), key("tbptt", k=2), key("tbptt", k=3),
                    key("mdgl"), key("mdgl", modulatory="exact"), key("mdgl", allow_single_type=True)}) == 6
    assert get_rule("eprop").computation(no_leak) == get_rule("tbptt", k=1).computation(no_leak)
    assert get_rule("eprop").computation(leaky) != get_rule("tbptt", k=1).computation(leaky)


@pytest.mark.parametrize("i", cases(range(0, len(CASES), 3)))
def test_mdgl_with_zero_modulatory_weights_is_eprop(i):
    cfg, mask, noise = _case(i)
    params, struct, batch, nz = draw(cfg, seed=800 + i, mask=mask, noise=noise)
    zero = jnp.zeros((cfg.n_rec, cfg.n_rec))
    _, g_eprop = _grad(get_rule("eprop"), cfg, params, struct, batch, nz)
    for impl in (trace_rule_offline, trace_rule_online):
        assert_close(impl(cfg, params, struct, batch, nz, params.w_out, zero)[1], g_eprop)


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_rflo_on_rate_form_is_murray_2019(alpha):
    """Direct transcription of Murray (2019), eLife, Eqs. for h, p_ij and ΔW (1/τ = 1 − α)."""
    cfg = M.ModelConfig(2, 6, 1, form="rate", alpha=alpha, activation="tanh", loss="mse", bias=False)
    params, struct, batch, _ = draw(cfg, seed=11, mask="every")
    rule = get_rule("rflo")
    B = np.asarray(rule.init(cfg, params, struct, key=jax.random.PRNGKey(2)))
    _, g = rule_gradient(rule, cfg, params, struct, B, batch, form="online")
    W, Win, Wout = (np.asarray(a) for a in (params.w_rec * struct.rec_mask, params.w_in, params.w_out))
    inv_tau = 1 - alpha
    n_seq, n_steps = batch.x.shape[:2]
    dW, dWin = np.zeros_like(W), np.zeros_like(Win)
    for b in range(n_seq):
        h = np.zeros(6)
        p, q = np.zeros_like(W), np.zeros_like(Win)
        for t in range(n_steps):
            x = np.asarray(batch.x[b, t])
            u = W @ h + Win @ x
            p = (1 - inv_tau) * p + inv_tau * np.outer(1 - np.tanh(u) ** 2, h)
            q = (1 - inv_tau) * q + inv_tau * np.outer(1 - np.tanh(u) ** 2, x)
            h = h + inv_tau * (-h + np.tanh(u))
            err = np.asarray(batch.target[b, t]) - (Wout @ h + np.asarray(params.b_out))
            dW += (B.T @ err)[:, None] * p / n_steps
            dWin += (B.T @ err)[:, None] * q / n_steps
    # Murray's ΔW is the descent direction (per unit η); creditscape's ĝ is the batch mean of −ΔW.
    np.testing.assert_allclose(np.asarray(g.w_rec), -dW * np.asarray(struct.rec_mask) / n_seq, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(np.asarray(g.w_in), -dWin / n_seq, rtol=1e-10, atol=1e-14)


def test_random_feedback_fixed_per_seed():
    cfg = M.ModelConfig(3, 5, 2)
    params, struct = M.init(cfg, jax.random.PRNGKey(0))
    rule = get_rule("eprop_random")
    b1 = rule.init(cfg, params, struct, key=jax.random.PRNGKey(4))
    b2 = rule.init(cfg, params, struct, key=jax.random.PRNGKey(4))
    b3 = rule.init(cfg, params, struct, key=jax.random.PRNGKey(5))
    np.testing.assert_array_equal(b1, b2)
    assert not np.allclose(b1, b3)
    assert b1.shape == params.w_out.shape


def test_eprop_trap_no_leak_last_step_loss():
    """Paper's released setting: α = 0 and a last-step loss make e-prop a one-step truncation, and
    W_in learns only from the last input step."""
    cfg = M.ModelConfig(3, 5, 2, alpha=0.0, activation="relu")
    params, struct, batch, nz = draw(cfg, seed=12, mask="last")
    _, g = _grad(get_rule("eprop"), cfg, params, struct, batch, nz)
    _, g_k1 = _grad(get_rule("tbptt", k=1), cfg, params, struct, batch, nz)
    assert_close(g, g_k1)
    s, r, _ = M.run(cfg, params, struct, batch.x)
    y = M.readout(params, r)
    e = jax.nn.softmax(y[:, -1]) - jax.nn.one_hot(batch.target[:, -1], 2)
    delta = (e @ params.w_out) * phi_prime(cfg, s[:, -1]) / batch.x.shape[0]
    np.testing.assert_allclose(g.w_in, delta.T @ batch.x[:, -1], rtol=1e-10)
    # Changing every input but the last leaves ĝ_in's formula in terms of x_T only.
    _, g_bptt = _grad(get_rule("bptt"), cfg, params, struct, batch, nz)
    assert not np.allclose(g.w_in, g_bptt.w_in)


def test_alignment_is_one_for_exact_rules_and_less_for_eprop():
    cfg = M.ModelConfig(3, 5, 2, alpha=0.3, activation="tanh")
    params, struct, batch, nz = draw(cfg, seed=13, mask="every")
    for name in ("bptt", "rtrl"):
        al = gradient_alignment(get_rule(name), cfg, params, struct, (), batch)
        np.testing.assert_allclose([al.cosine, al.cosine_recurrent], 1.0, rtol=1e-12)
    al = gradient_alignment(get_rule("eprop"), cfg, params, struct, (), batch)
    assert -1 <= al.cosine_recurrent < 0.999
    assert al.cosine_recurrent < al.cosine  # the exact readout pulls the overall cosine up


@pytest.mark.parametrize("cfg", [
    M.ModelConfig(3, 5, 2, alpha=0.3, activation="tanh", learn_init_state=True),
    M.ModelConfig(3, 5, 2, form="rate", alpha=0.4, activation="softplus", loss="mse"),
], ids=["voltage", "rate-mse"])
def test_readout_at_the_last_steps_scores_only_those(cfg):
    """A network read out at its last K steps: every rule, in every form, computes what the full
    readout computes on the mask cut to those steps; the exact loss and evaluation too."""
    from creditscape.objective import evaluate, exact_loss

    k = 2
    windowed = dataclasses.replace(cfg, readout_steps=k)
    params, struct, batch, nz = draw(cfg, seed=41, mask="random", noise=True)
    cut = batch._replace(mask=batch.mask.at[:, :-k].set(0))  # the random mask scores earlier steps too
    y = M.outputs(windowed, params, struct, batch.x)
    assert y.shape == (batch.x.shape[0], k, cfg.n_out)
    np.testing.assert_allclose(y, M.outputs(cfg, params, struct, batch.x)[:, -k:], rtol=1e-13)
    np.testing.assert_allclose(exact_loss(windowed, params, struct, batch, nz), exact_loss(cfg, params, struct, cut, nz),
                               rtol=1e-13)
    np.testing.assert_allclose(evaluate(windowed, params, struct, batch), evaluate(cfg, params, struct, cut), rtol=1e-13)
    for name in rule_names():
        rule = get_rule(name, **({"allow_single_type": True} if name in ("mdgl", "modprop") else {}))
        try:
            rule.check_model(cfg)
        except ValueError:  # (the Kronecker-factored rules and a learned s0)
            continue
        for form in rule.forms:
            l_win, g_win = _grad(rule, windowed, params, struct, batch, nz, form)
            l_cut, g_cut = _grad(rule, cfg, params, struct, cut, nz, form)
            np.testing.assert_allclose(l_win, l_cut, rtol=1e-12, err_msg=f"{name} {form}")
            assert_close(g_win, g_cut, 1e-10)


def test_scored_steps_without_a_readout_are_refused():
    from creditscape.objective import check_scored_steps

    cfg = M.ModelConfig(3, 5, 2, readout_steps=1)
    _, _, batch, _ = draw(cfg, seed=1, mask="last")
    check_scored_steps(cfg, batch)
    _, _, batch, _ = draw(cfg, seed=1, mask="every")
    with pytest.raises(ValueError, match=r"train_set: step 0 of 6 is scored .* readout_steps=None"):
        check_scored_steps(cfg, batch, "train_set")
    with pytest.raises(ValueError, match="readout_steps"):
        M.ModelConfig(3, 5, 2, readout_steps=0)


def test_forms_are_checked_and_options_validated():
    with pytest.raises(ValueError, match="has no 'online' form"):
        get_rule("bptt").check_form("online")
    with pytest.raises(ValueError, match="Unknown rule 'bptx'"):
        get_rule("bptx")
    with pytest.raises(ValueError, match="no option"):
        get_rule("eprop", k=3)
    with pytest.raises(ValueError, match="window k must be"):
        get_rule("tbptt", k=0)
    with pytest.raises(ValueError, match="modulatory must be"):
        get_rule("mdgl", modulatory="avg")


def test_user_defined_rule_registers_and_trains():
    """The docs' example: a rule is one class plus @register."""

    @dataclasses.dataclass(frozen=True)
    class HalfEProp(Rule):
        """ĝ = ½ ĝ_eprop (a toy: e-prop at half the step size)."""

        name = "half_eprop_test"
        formula = "g = 0.5 * g_eprop"
        forms = ("offline",)

        def gradient(self, cfg, params, struct, state, batch, noise, *, form):
            loss, g = get_rule("eprop").gradient(cfg, params, struct, state, batch, noise, form=form)
            return loss, jax.tree.map(lambda a: 0.5 * a, g)

    register(HalfEProp)
    try:
        assert "half_eprop_test" in rule_names()
        cfg = M.ModelConfig(3, 5, 2)
        params, struct, batch, nz = draw(cfg, seed=14)
        _, g = _grad(get_rule("half_eprop_test"), cfg, params, struct, batch, nz)
        _, g_e = _grad(get_rule("eprop"), cfg, params, struct, batch, nz)
        np.testing.assert_allclose(flat(g), 0.5 * flat(g_e), rtol=1e-12)
        with pytest.raises(ValueError, match="already registered"):
            register(HalfEProp)
    finally:
        _base._REGISTRY.pop("half_eprop_test")


def _whole_and_mean_of_halves(rule, cfg, form):
    """(loss, ĝ) of a batch of 2B sequences, and the mean of those of its two halves."""
    params, struct, *first = draw(cfg, 0, noise=True)
    first, second = tuple(first), draw(cfg, 1, noise=True)[2:]
    whole = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), first, second)
    grad = jax.jit(lambda batch, noise: _grad(rule, cfg, params, struct, batch, noise, form=form))  # (one program)
    halves = [grad(*part) for part in (first, second)]
    return grad(*whole), jax.tree.map(lambda a, b: (a + b) / 2, *halves)


@pytest.mark.parametrize("name", rule_names())
def test_a_per_sequence_rule_estimates_the_mean_of_its_sequences_estimates(name):
    """What lets training split one member's minibatch over devices (``train.minibatch_splits``):
    the loss and ĝ of a batch are the means of those of its halves, on a rate model (and for BPTT
    and e-prop on a spiking one). ModProp's slope μ and the spiking firing-rate
    regularizer's f̄ are batch statistics: there it fails, and neither is declared splittable."""
    rule = get_rule(name)
    rate = M.ModelConfig(3, 5, 2, alpha=0.3, activation="tanh", dale_exc_fraction=0.6, cell_types=2)
    spiking = M.ModelConfig(3, 5, 2, form="alif", alpha=0.5, threshold=0.3, cell_types=2, adaptive_fraction=0.6)
    assert minibatch_splits(rate, rule) == rule.per_sequence
    if rule.stochastic:  # (each part would draw its own numbers)
        assert not rule.per_sequence
        return
    cases = [(rate, None)]  # (its default form: the other is equal to it, test_online_equals_offline)
    if name in ("bptt", "eprop"):
        regularized = dataclasses.replace(spiking, rate_regularization=3.0, target_rate=0.05)
        assert minibatch_splits(spiking, rule) and not minibatch_splits(regularized, rule)
        cases += [(spiking, None), (regularized, None)]
    for cfg, form in cases:
        whole, mean = _whole_and_mean_of_halves(rule, cfg, form)
        if minibatch_splits(cfg, rule):
            assert_close(whole, mean, rtol=1e-12)
        else:
            assert np.abs(flat(whole) - flat(mean)).max() > 1e-6 * np.abs(flat(whole)).max(), name
