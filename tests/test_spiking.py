"""Spiking networks (LIF, ALIF): the forward pass against a transcription of its equations, the
surrogate's derivatives, every spiking rule against its path-sum reference in float64, the limits,
the surrogate Hessian against dense computations, and training."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cases import assert_close, draw, flat, light_or_heavy
from conftest import MNIST_DIR, needs_mnist
from creditscape import _reference as ref
from creditscape import model as M
from creditscape.curvature import block_loss, dense_hessian, hvp, lanczos
from creditscape.rules import get_rule, modulatory_weights, rule_gradient, rule_names
from creditscape.rules._core import recurrent_part

N_IN, N_REC, N_OUT = 3, 5, 2
# Low thresholds and doubled inputs: most units spike and sit inside ψ's window, so every
# path the rules keep or cut carries weight and the equalities below can fail.
SPIKING_CASES = {
    "lif-dale": dict(form="lif", alpha=0.7, threshold=0.3, dale_exc_fraction=0.6),
    "alif-sparse-types": dict(form="alif", alpha=0.5, threshold=0.3, connectivity=0.7, cell_types=2,
                              adaptive_fraction=0.6),
    "alif-hard-refractory-filter": dict(form="alif", alpha=0.7, threshold=0.3, reset="hard", refractory=2,
                                        readout_decay=0.7, cell_types=2, adapt_decay=0.8),
    "lif-filter-superspike-mse": dict(form="lif", alpha=0.6, threshold=0.3, readout_decay=0.6, surrogate="superspike",
                                      loss="mse", bias=False, self_connections=True, cell_types=2),
}
IDS = list(SPIKING_CASES)


def _draw(name, seed=0, mask="random", noise=False, **changes):
    cfg = M.ModelConfig(N_IN, N_REC, N_OUT, **{**SPIKING_CASES[name], **changes})
    params, struct, batch, nz = draw(cfg, seed, mask=mask, noise=noise)
    batch = batch._replace(x=2 * batch.x)
    return cfg, params, struct, batch, nz._replace(x=batch.x)


def _grad(rule, cfg, params, struct, batch, noise, form=None):
    state = rule.init(cfg, params, struct, key=jax.random.PRNGKey(5))
    return rule_gradient(rule, cfg, params, struct, state, batch, noise, form=form)


def _differs(a, b, by):
    """Whether the recurrent-layer parts of two gradients differ by more than ``by`` relative to b's."""
    a, b = flat(recurrent_part(a)), flat(recurrent_part(b))
    return np.abs(a - b).max() > by * np.abs(b).max()


def _transcription(cfg, params, struct, x, xi):
    """The spiking network's equations (creditscape.model) as a numpy loop: (v, z, y) per step."""
    p = jax.tree.map(lambda a: None if a is None else np.asarray(a), params)
    w = p.w_rec * np.asarray(struct.rec_mask)
    bsz, n_steps, _ = x.shape
    v, a, ref_, trace, z = (np.zeros((bsz, cfg.n_rec)) for _ in range(5))
    vs, zs, ys = [], [], []
    for t in range(n_steps):
        u = z @ w.T + x[:, t] @ p.w_in.T + (0 if p.b is None else p.b) + (0 if xi is None else xi[:, t])
        if cfg.reset == "soft":
            v = cfg.alpha * v + (1 - cfg.alpha) * u - cfg.threshold * z
        else:
            v = cfg.alpha * (1 - z) * v + (1 - cfg.alpha) * u
        if cfg.form == "alif":
            a = cfg.adapt_decay * a + (1 - cfg.adapt_decay) * z
        ref_ = np.where(z > 0, cfg.refractory, np.maximum(ref_ - 1, 0))
        beta = cfg.adapt_strength * (np.arange(cfg.n_rec) >= cfg.n_rec - round(cfg.adaptive_fraction * cfg.n_rec))
        limit = cfg.threshold + (beta * a if cfg.form == "alif" else 0)
        z = ((v > limit) & (ref_ == 0)).astype(float)
        trace = cfg.readout_decay * trace + (1 - cfg.readout_decay) * z
        vs.append(v), zs.append(z), ys.append((trace if cfg.readout_decay else z) @ p.w_out.T + p.b_out)
    return np.stack(vs, 1), np.stack(zs, 1), np.stack(ys, 1)


@pytest.mark.parametrize("name", IDS)
def test_forward_pass_is_its_equations(name):
    cfg, params, struct, batch, noise = _draw(name, noise=True)
    v, z, y = _transcription(cfg, params, struct, np.asarray(batch.x), np.asarray(noise.xi))
    s, r, _ = M.run(cfg, params, struct, noise.x, noise.xi)
    np.testing.assert_allclose(M.state_part(cfg, s, "v"), v, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(r, z)
    np.testing.assert_allclose(M.outputs(cfg, params, struct, noise.x, noise.xi), y, rtol=1e-12, atol=1e-12)
    assert 0.05 < z.mean() < 0.7  # the network spikes, and not always
    if cfg.refractory:  # no unit fires within `refractory` steps of its last spike
        fired = np.asarray(z)
        for lag in range(1, cfg.refractory + 1):
            assert not np.any(fired[:, lag:] * fired[:, :-lag])


@pytest.mark.parametrize("surrogate", ["piecewise_linear", "superspike"])
def test_the_spike_derivatives_are_the_pseudo_derivative_and_its_slope(surrogate):
    x = jnp.array([-1.7, -0.6, -0.2, 0.3, 0.45, 0.9, 1.4])
    psi = {"piecewise_linear": 0.3 * np.maximum(0, 1 - np.abs(x)), "superspike": 0.3 / (1 + 10 * np.abs(x)) ** 2}[surrogate]
    h = lambda x_: M.spike(x_, surrogate, 0.3)
    np.testing.assert_array_equal(h(x), (x > 0).astype(float))
    np.testing.assert_allclose(jax.vmap(jax.grad(h))(x), psi, rtol=1e-12)
    # Second order: the derivative of ψ (by central differences of the formula, away from its kinks).
    eps = 1e-6
    psi_at = lambda y: np.asarray(M.pseudo_derivative(jnp.asarray(y), surrogate, 0.3))
    np.testing.assert_allclose(jax.vmap(jax.grad(jax.grad(h)))(x), (psi_at(x + eps) - psi_at(x - eps)) / (2 * eps),
                               rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", light_or_heavy(IDS, {"alif-hard-refractory-filter"}))
def test_exact_rules_are_the_surrogate_path_sum(name):
    cfg, params, struct, batch, noise = _draw(name, seed=1, noise=name.startswith("alif"))
    loss, g_bptt = _grad(get_rule("bptt"), cfg, params, struct, batch, noise)
    loss_rtrl, g_rtrl = _grad(get_rule("rtrl"), cfg, params, struct, batch, noise)
    np.testing.assert_allclose(loss_rtrl, loss, rtol=1e-12)
    assert_close(g_rtrl, g_bptt)
    assert_close(recurrent_part(g_bptt), ref.reference_gradient(cfg, params, struct, batch, "exact", xi=noise.xi))
    for k in (1, 3):
        rule = get_rule("tbptt", k=k)
        g_off, g_on = (_grad(rule, cfg, params, struct, batch, noise, form=f)[1] for f in ("offline", "online"))
        assert_close(g_on, g_off)
        assert_close(recurrent_part(g_off), ref.reference_gradient(cfg, params, struct, batch, "tbptt", k=k, xi=noise.xi))
        assert _differs(g_off, g_bptt, 1e-3)


@pytest.mark.parametrize("rule_name,name", light_or_heavy(
    [(r, n) for r in ("eprop", "eprop_random") for n in IDS],
    {("eprop", "alif-hard-refractory-filter"), ("eprop_random", "lif-dale")}))
def test_eprop_online_equals_offline_equals_its_eligibility_vectors(name, rule_name):
    cfg, params, struct, batch, noise = _draw(name, seed=2, mask="every", noise=name.startswith("lif"))
    rule = get_rule(rule_name)
    _, g_off = _grad(rule, cfg, params, struct, batch, noise, form="offline")
    _, g_on = _grad(rule, cfg, params, struct, batch, noise, form="online")
    assert_close(g_on, g_off)
    feedback = rule.init(cfg, params, struct, key=jax.random.PRNGKey(5)) if rule_name == "eprop_random" else None
    expected = ref.reference_gradient(cfg, params, struct, batch, "eprop", feedback=feedback, xi=noise.xi)
    assert_close(recurrent_part(g_off), expected)
    g_bptt = _grad(get_rule("bptt"), cfg, params, struct, batch, noise)[1]
    assert _differs(g_off, g_bptt, 1e-3)


@pytest.mark.parametrize("modulatory,name", light_or_heavy(
    [(m, n) for m in ("cell_type", "exact") for n in IDS],
    {("cell_type", "lif-dale"), ("exact", "alif-hard-refractory-filter")}))
def test_mdgl_is_its_one_hop_path_sum(name, modulatory):
    cfg, params, struct, batch, noise = _draw(name, seed=3)
    rule = get_rule("mdgl", modulatory=modulatory)
    _, g_off = _grad(rule, cfg, params, struct, batch, noise, form="offline")
    w_bar = modulatory_weights(cfg, params, struct, modulatory)
    assert_close(recurrent_part(g_off), ref.reference_gradient(cfg, params, struct, batch, "mdgl", w_bar=w_bar))
    g_eprop = _grad(get_rule("eprop"), cfg, params, struct, batch, noise, form="offline")[1]
    assert _differs(g_off, g_eprop, 1e-6)
    if cfg.readout_decay:
        with pytest.raises(ValueError, match="no online form with a readout filter"):
            _grad(rule, cfg, params, struct, batch, noise, form="online")
    else:
        assert_close(_grad(rule, cfg, params, struct, batch, noise, form="online")[1], g_off)


@pytest.mark.parametrize("name", IDS)
def test_without_recurrence_eprop_is_bptt(name):
    cfg, params, struct, batch, noise = _draw(name, seed=4)
    params = params._replace(w_rec=jnp.zeros_like(params.w_rec))
    g_bptt = _grad(get_rule("bptt"), cfg, params, struct, batch, noise)[1]
    for form in ("offline", "online"):
        assert_close(_grad(get_rule("eprop"), cfg, params, struct, batch, noise, form=form)[1], g_bptt)


def test_without_a_leak_lif_eprop_is_one_step_truncation_and_alif_is_not():
    cfg, params, struct, batch, noise = _draw("lif-dale", seed=5, alpha=0.0)
    assert get_rule("eprop").computation(cfg) == ("tbptt", 1)
    g_eprop = _grad(get_rule("eprop"), cfg, params, struct, batch, noise, form="online")[1]
    assert_close(g_eprop, _grad(get_rule("tbptt", k=1), cfg, params, struct, batch, noise)[1])
    for changes in (dict(form="alif"), dict(readout_decay=0.5)):  # the unit's own memory remains
        cfg2 = dataclasses.replace(cfg, **changes)
        params2, struct2, batch2, noise2 = _draw("lif-dale", seed=5, alpha=0.0, **changes)[1:]
        assert get_rule("eprop").computation(cfg2) != ("tbptt", 1)
        a = _grad(get_rule("eprop"), cfg2, params2, struct2, batch2, noise2)[1]
        b = _grad(get_rule("tbptt", k=1), cfg2, params2, struct2, batch2, noise2)[1]
        assert _differs(a, b, 1e-3)


def test_rules_without_a_spiking_form_refuse_spiking_networks():
    from creditscape.config import ConfigError, resolve

    cfg, params, struct, batch, noise = _draw("lif-dale")
    spiking = {n for n in rule_names() if get_rule(n).spiking}
    assert spiking == {"bptt", "tbptt", "rtrl", "eprop", "eprop_random", "rflo", "mdgl"}
    for name in sorted(set(rule_names()) - spiking):
        with pytest.raises(ValueError, match="not built for spiking networks.*bptt, tbptt, rtrl, eprop"):
            _grad(get_rule(name), cfg, params, struct, batch, noise)
    with pytest.raises(ConfigError, match="rules\\[1\\].*uoro.*not built for spiking"):
        resolve({"rules": ["eprop", "uoro"], "task": {"name": "cue_recall"}, "model": {"form": "lif", "n_rec": 8}})
    with pytest.raises(ValueError, match="readout_decay"):
        M.ModelConfig(N_IN, N_REC, N_OUT, readout_decay=0.5)
    with pytest.raises(ValueError, match="learn_init_state"):
        M.ModelConfig(N_IN, N_REC, N_OUT, form="lif", learn_init_state=True)


@pytest.mark.parametrize("name", light_or_heavy(["alif-sparse-types", "alif-hard-refractory-filter"],
                                                {"alif-hard-refractory-filter"}))
def test_the_surrogate_hessian_is_symmetric_and_its_estimators_match_it(name):
    """The Hessian of the surrogate loss (docs/measurements.md): forward over reverse mode, every
    spike's derivative ψ in both. It is symmetric, reverse over forward mode gives the same
    matrix, and the HVP and Lanczos agree with its dense form."""
    cfg, params, struct, batch, _ = _draw(name, seed=6, mask="every")
    H = np.asarray(dense_hessian(cfg, params, struct, batch, "recurrent", l2=0.01))
    np.testing.assert_allclose(H, H.T, atol=1e-12 * np.abs(H).max())
    f, x0 = block_loss(cfg, params, struct, batch, "recurrent", l2=0.01)
    np.testing.assert_allclose(jax.jacrev(jax.jacfwd(f))(x0), H, atol=1e-11 * np.abs(H).max())
    v = jax.random.normal(jax.random.PRNGKey(2), x0.shape)
    np.testing.assert_allclose(hvp(f, x0, v), H @ np.asarray(v), rtol=1e-10, atol=1e-12 * np.abs(H).max())
    dense = np.sort(np.linalg.eigvalsh(H))[::-1]
    eig = lanczos(lambda u: hvp(f, x0, u), jax.random.normal(jax.random.PRNGKey(3), x0.shape), x0.shape[0], k=3)
    np.testing.assert_allclose(eig.values, dense[:3], rtol=1e-6)


@pytest.mark.parametrize("rule,form", light_or_heavy([("eprop", "online"), ("mdgl", "offline"), ("bptt", None)],
                                                     {("eprop", "online")}))
def test_spiking_networks_train_with_every_spiking_rule_and_the_probe(rule, form):
    from creditscape.objective import Batch
    from creditscape.tasks import get_task, make_splits
    from creditscape.train import CurvatureProbe, TrainConfig, to_device, train_ensemble

    task = get_task("evidence_accumulation", n_cues=3, delay=200.0, dt=50.0)
    splits = make_splits(task, 64, 64, seed=0)
    cfg = M.ModelConfig(task.n_in, 12, task.n_out, form="alif", alpha=0.8, threshold=0.5, readout_decay=0.5,
                        dale_exc_fraction=0.75, readout_steps=task.readout_steps)
    probe = CurvatureProbe(to_device(Batch(*(a[:32] for a in splits.train))), block="w_rec", steps=8)
    tcfg = TrainConfig(learning_rate=0.01, steps=40, eval_every=20, batch_size=16, form=form)
    res = train_ensemble(cfg, get_rule(rule), tcfg, [0, 1], splits.train, probe=probe, progress=False)
    assert np.all(res.diverged_at == -1) and np.all(np.isfinite(res.evals["lambda_max"]))
    assert np.all(np.isfinite(res.evals["rho"]))
    assert np.all(res.losses[:, -10:].mean(1) < res.losses[:, :10].mean(1)), (rule, res.losses)


@pytest.mark.parametrize("name,rule_name", light_or_heavy(
    [(n, r) for n in IDS for r in ("exact", "tbptt", "eprop", "mdgl")],
    {("lif-dale", "exact"), ("alif-hard-refractory-filter", "eprop")}))
def test_the_firing_rate_regularizer_is_credited_by_every_rule_as_its_definition_says(name, rule_name):
    """R = c Σ_i (f̄_i − f₀)² joins the loss (Bellec et al. 2020): BPTT's gradient of it equals its
    path sum (and RTRL's); each approximate rule credits its learning signal ∂R/∂z_t through the
    same paths as the task's (online == offline == the reference), and R moves every estimate."""
    cfg, params, struct, batch, noise = _draw(name, seed=7, rate_regularization=3.0, target_rate=0.05)
    plain = dataclasses.replace(cfg, rate_regularization=0.0)
    if rule_name == "exact":
        g_bptt = _grad(get_rule("bptt"), cfg, params, struct, batch, noise)[1]
        assert_close(recurrent_part(g_bptt), ref.reference_gradient(cfg, params, struct, batch, "exact"))
        assert_close(_grad(get_rule("rtrl"), cfg, params, struct, batch, noise)[1], g_bptt)
        assert _differs(g_bptt, _grad(get_rule("bptt"), plain, params, struct, batch, noise)[1], 1e-3)
        return
    options, extra = {"tbptt": (dict(k=2), dict(k=2)), "eprop": ({}, {}),
                      "mdgl": (dict(modulatory="exact"), dict(w_bar=modulatory_weights(cfg, params, struct, "exact")))}[rule_name]
    rule = get_rule(rule_name, **options)
    loss, g_off = _grad(rule, cfg, params, struct, batch, noise, form="offline")
    assert_close(recurrent_part(g_off), ref.reference_gradient(cfg, params, struct, batch, rule_name, **extra))
    if rule_name == "mdgl":
        with pytest.raises(ValueError, match="firing-rate regularizer"):
            _grad(rule, cfg, params, struct, batch, noise, form="online")
    else:
        assert_close(_grad(rule, cfg, params, struct, batch, noise, form="online")[1], g_off)
    assert _differs(g_off, _grad(rule, plain, params, struct, batch, noise, form="offline")[1], 1e-3)
    z = np.asarray(M.run(cfg, params, struct, noise.x, noise.xi)[1])
    penalty = 3.0 * np.sum((z.mean(axis=(0, 1)) - 0.05) ** 2)
    np.testing.assert_allclose(loss, _grad(rule, plain, params, struct, batch, noise, form="offline")[0] + penalty, rtol=1e-12)


@needs_mnist
def test_sequential_mnist_spike_encodings():
    from creditscape.tasks import get_task, make_splits

    analog = get_task("smnist", pixel=True, mnist_dir=str(MNIST_DIR))
    pixels = make_splits(analog, 16, 8, seed=3, noise_levels=()).train.x[..., 0]
    crossing = get_task("smnist", pixel=True, encoding="threshold", mnist_dir=str(MNIST_DIR))
    assert crossing.n_in == 80
    splits = make_splits(crossing, 16, 8, seed=3, noise_levels=())
    x = splits.train.x.reshape(16, 784, 2, 40)  # the same images: the encoding draws nothing
    # Up minus down crossings, summed over time, count the thresholds at or below each pixel.
    below = np.cumsum(x[:, :, 0] - x[:, :, 1], axis=1)
    np.testing.assert_array_equal(below, (pixels[..., None] >= (np.arange(40) + 0.5) / 40))
    assert set(np.unique(x)) <= {0.0, 1.0} and "pixel noise" in splits.perturbed
    poisson = make_splits(get_task("smnist", encoding="poisson", mnist_dir=str(MNIST_DIR)), 256, 8, seed=3,
                          noise_levels=()).train.x
    rows = make_splits(get_task("smnist", mnist_dir=str(MNIST_DIR)), 256, 8, seed=3, noise_levels=()).train.x
    assert set(np.unique(poisson)) == {0.0, 1.0}
    assert abs(poisson.mean() - rows.mean()) < 4 * np.sqrt(rows.mean() / poisson.size)  # spikes with p = pixel
    with pytest.raises(ValueError, match="encoding must be one of"):
        get_task("smnist", encoding="latency")


def test_the_spiking_preset_runs_end_to_end_in_a_shortened_form(tmp_path, capsys):
    """The `spiking` preset (evidence accumulation, ALIF), shortened (tests/cases.py) to BPTT and to
    45 steps of 50 ms: it trains, measures curvature and generalization, and writes its report."""
    from cases import shortened_preset
    from creditscape.cli import main

    cfg = tmp_path / "spiking.toml"
    text = shortened_preset("spiking", rules='["bptt"]')
    cfg.write_text(text.replace('name = "evidence_accumulation"', 'name = "evidence_accumulation"\ndt = 50.0'))
    assert main(["run", "--config", str(cfg), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert "report.html" in capsys.readouterr().out
    report = (tmp_path / "out" / "report.md").read_text()
    assert "alif" in report and "lambda" in report.lower()
