"""The report's statistics and comparisons on synthetic results with a known answer."""

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from creditscape.report import analysis as A
from creditscape.report import stats, summary_table, write_report
from creditscape.report.document import _analyse, _findings, number


def test_contrast_finds_a_planted_effect_and_covers_it():
    rng = np.random.default_rng(0)
    a, b = rng.normal(3.0, 1.0, 10), rng.normal(0.0, 1.0, 10)
    c = stats.contrast(a, b, resamples=1999)
    assert c.p < 0.01 and c.n_a == c.n_b == 10
    assert c.ci[0] < c.effect < c.ci[1] and c.ci[0] < 3.0 < c.ci[1]
    np.testing.assert_allclose(c.effect, np.median(a) - np.median(b))


def test_contrast_holds_its_level_under_the_null():
    """Same distribution in both groups: p < 0.05 in about 5 % of 300 synthetic experiments."""
    rng = np.random.default_rng(1)
    ps = np.array([stats.contrast(rng.lognormal(size=8), rng.lognormal(size=8), resamples=499, seed=i).p
                   for i in range(300)])
    assert 0.015 <= np.mean(ps < 0.05) <= 0.09, np.mean(ps < 0.05)


def test_interaction_finds_a_planted_change_of_difference_and_holds_its_level():
    """A setting that widens a rule's difference from the reference by 4 (groups of 8, unit
    spread: about 4.5 standard errors of a difference of differences of medians) is found and
    covered; with no change, p < 0.05 in about 5 % of synthetic experiments (the bootstrap
    test is approximate: a looser band than the permutation tests')."""
    rng = np.random.default_rng(2)
    draw = lambda mean: rng.normal(mean, 1.0, 8)
    c = stats.interaction(draw(5.0), draw(0.0), draw(1.0), draw(0.0), resamples=1999)
    assert c.p < 0.01 and c.ci[0] < 4.0 < c.ci[1] and (c.n_a, c.n_b) == (16, 16)
    a, a_ref, b, b_ref = draw(0), draw(0), draw(0), draw(0)
    np.testing.assert_allclose(stats.interaction(a, a_ref, b, b_ref, resamples=99).effect,
                               (np.median(a) - np.median(a_ref)) - (np.median(b) - np.median(b_ref)))
    ps = np.array([stats.interaction(*(rng.lognormal(size=8) for _ in range(4)), resamples=499, seed=i).p
                   for i in range(200)])
    assert 0.01 <= np.mean(ps < 0.05) <= 0.12, np.mean(ps < 0.05)
    assert np.isnan(stats.interaction([1.0], [1.0, 2.0], [1.0, 2.0], [1.0, 2.0]).effect)
    separated = stats.interaction(draw(50.0), draw(0.0), draw(0.0), draw(0.0), resamples=999)
    assert separated.p == 2 / 1000  # never 0: no test from 999 resamples shows less


def test_setting_effects_compare_each_varied_cell_with_its_base_rule_by_rule():
    rng = np.random.default_rng(3)
    rows = []
    for point, varied, noise in (("", "", 0.0), ("rec_noise=0.3", "model.rec_noise", 0.3)):
        for rule, shift in (("bptt", 0.0), ("eprop", 5.0 * noise)):  # noise sharpens e-prop only
            for seed in range(6):
                rows.append({"task": "t", "point": point, "base_point": "", "varied": varied, "rec_noise": noise,
                             "rule": rule, "seed": seed, "lambda_max": 1.0 + shift + 0.05 * rng.normal()})
    effects = A.setting_effects(pd.DataFrame(rows))
    assert set(effects.kind) == {"effect", "interaction"} and set(effects.metric) == {"lambda_max"}
    by = {(r.rule, r.kind): r for r in effects.itertuples()}
    assert by["bptt", "effect"].level == 0.3 and abs(by["bptt", "effect"].effect) < 0.2
    assert by["eprop", "effect"].p < 0.01 and abs(by["eprop", "effect"].effect - 1.5) < 0.2
    assert by["eprop", "interaction"].ci_low > 1.0 and ("bptt", "interaction") not in by
    assert A.setting_effects(pd.DataFrame(rows).drop(columns="varied")).empty  # not a sweep


def test_smallest_p_is_what_the_permutation_test_gives_to_separated_groups():
    for n_a, n_b in [(5, 4), (3, 3), (2, 6)]:
        a, b = np.arange(n_a) + 100.0, np.arange(n_b)  # every a above every b
        assert stats.contrast(a, b).p == pytest.approx(stats.smallest_p(n_a, n_b), rel=1e-12)
    assert stats.smallest_p(5, 4) == pytest.approx(2 / 126) and stats.smallest_p(1, 1) == 1.0


def test_contrast_of_too_few_or_constant_runs():
    assert np.isnan(stats.contrast([1.0], [2.0, 3.0]).p)
    assert np.isnan(stats.contrast([1.0, np.nan], [2.0, 3.0]).effect)  # one finite value left
    c = stats.contrast([1.0, 1.0, 1.0], [1.0, 1.0])
    assert c.effect == 0 and c.p == 1.0


def _confounded(rng, slope_within=1.0, n=12):
    """Three conditions whose curvature rises with the gap within each, while between conditions
    the flattest has the largest gaps (an underfitting rule): pooled raw, the sign flips."""
    x, y, strata = [], [], []
    for k, offset in enumerate((0.0, 10.0, 20.0)):
        xi = offset + rng.normal(size=n)
        yi = -offset + slope_within * (xi - offset) + 0.5 * rng.normal(size=n)
        x += list(xi)
        y += list(yi)
        strata += [k] * n
    return np.array(x), np.array(y), np.array(strata)


def test_stratified_spearman_sees_the_within_condition_relation():
    x, y, strata = _confounded(np.random.default_rng(2))
    raw = stats.spearman(x, y)
    np.testing.assert_allclose(raw.rho, sps.spearmanr(x, y).statistic, rtol=1e-12)
    assert raw.rho < -0.5
    strat = stats.spearman(x, y, strata)
    assert strat.rho > 0.6 and strat.p < 0.01 and strat.ci[0] > 0.3 and strat.strata == 3 and strat.n == 36


def test_stratified_spearman_holds_its_level_under_the_null():
    rng = np.random.default_rng(3)
    ps = []
    for i in range(150):
        x, y, strata = _confounded(rng, slope_within=0.0, n=6)
        ps.append(stats.spearman(x, y, strata, resamples=499, seed=i).p)
    assert 0.01 <= np.mean(np.array(ps) < 0.05) <= 0.10


def test_kendall_ranks_a_monotone_measure_perfectly_and_holds_its_level_under_the_null():
    rng = np.random.default_rng(0)
    gap = rng.normal(size=30)
    perfect = stats.kendall(np.exp(gap), gap)
    assert perfect.tau == pytest.approx(1.0) and perfect.ci[0] > 0.9 and perfect.p < 1e-6 and perfect.n == 30
    nulls = [stats.kendall(rng.normal(size=30), rng.normal(size=30), resamples=10).p for _ in range(300)]
    assert 0.015 < np.mean(np.less(nulls, 0.05)) < 0.09
    assert np.isnan(stats.kendall([1.0, 2.0, np.nan], [1.0, 2.0, 3.0]).tau)  # too few finite pairs


@pytest.mark.parametrize("ties", [False, True])
def test_kendalls_bootstrap_statistic_is_scipys_on_every_resample(ties):
    rng = np.random.default_rng(int(ties))
    x, y = rng.normal(size=(2, 23))
    if ties:  # ties within x, within y and in both; a resample where x is constant gives NaN
        x, y = np.round(x), np.round(0.5 * y)
    resamples = np.concatenate([rng.integers(0, 23, (200, 23)), np.zeros((1, 23), int)])
    expected = [sps.kendalltau(x[r], y[r]).statistic for r in resamples]
    np.testing.assert_allclose(stats._resampled_tau_b(x, y, resamples), expected, rtol=1e-14, atol=1e-15)


def test_granulated_kendall_credits_a_measure_only_for_the_hyperparameter_it_tracks():
    """gap = f(η) + g(N) + noise over a 3 × 3 grid with 4 seeds (Jiang et al. 2020, eq. 4)."""
    rng = np.random.default_rng(1)
    settings = pd.DataFrame([(lr, n) for lr in (0.01, 0.03, 0.1) for n in (16, 32, 64) for _ in range(4)],
                            columns=["learning_rate", "n_rec"])
    f, g = np.log10(settings.learning_rate.to_numpy()), np.log2(settings.n_rec.to_numpy()) / 3
    gap = f + g + 0.01 * rng.normal(size=len(settings))
    psi, per = stats.granulated_kendall(gap, gap, settings)
    assert psi == pytest.approx(1.0) and per == {"learning_rate": pytest.approx(1.0), "n_rec": pytest.approx(1.0)}
    psi, per = stats.granulated_kendall(f, gap, settings)  # sees the learning rate's effect only
    assert per["learning_rate"] > 0.7 and per["n_rec"] == 0.0 and psi == pytest.approx(per["learning_rate"] / 2)
    psi, per = stats.granulated_kendall(-g, gap, settings)  # the size's effect, with the wrong sign
    assert per["n_rec"] < -0.7 and per["learning_rate"] == 0.0
    psi, per = stats.granulated_kendall(f, gap, settings[["learning_rate"]])  # one hyperparameter: all runs
    assert per["learning_rate"] == pytest.approx(stats.kendall(f, gap).tau)


def test_benjamini_hochberg_by_hand_and_nan_kept():
    p = np.array([0.01, 0.04, np.nan, 0.03, 0.5])
    got = stats.adjust(p)
    finite = np.array([0.01, 0.04, 0.03, 0.5])
    order = np.argsort(finite)
    m = len(finite)
    by_hand = np.minimum.accumulate((finite[order] * m / np.arange(1, m + 1))[::-1])[::-1]
    expected = np.empty(m)
    expected[order] = by_hand
    np.testing.assert_allclose(got[[0, 1, 3, 4]], expected, rtol=1e-12)
    assert np.isnan(got[2])


def _history(conditions=(("bptt", 0.1), ("eprop", 0.4)), seeds=3, diverged=(("eprop", 2, 7),)):
    """Training losses 2 → 1 → 0.5 → final; λ_max = 10·step + seed; the test loss is 0.2 above the
    training loss for e-prop."""
    final, history = [], []
    for cond, final_loss in conditions:
        for seed in range(seeds):
            d = next((it for c, s, it in diverged if (c, s) == (cond, seed)), -1)
            losses = [2.0, 1.0, 0.5 + 0.01 * seed, final_loss + 0.01 * seed]
            for step, loss in zip((0, 10, 20, 30), losses):
                history.append({"task": "t", "point": "", "condition": cond, "rule": cond, "seed": seed,
                                "learning_rate": 0.1, "step": step, "diverged_at": d, "train_loss": loss,
                                "train_accuracy": 1 - loss / 2, "test_loss": loss + 0.2 * (cond == "eprop"),
                                "test_accuracy": 0.5, "perturbed[noise=0.2]_loss": loss + 1.0,
                                "lambda_max": 10.0 * step + seed})
            h = history[-1]
            final.append({**{k: v for k, v in h.items() if k != "step"}, "computation": repr((cond,)),
                          "reached_at": -1, "trace": 1.0 + seed, "optimizer": "sgd", "momentum": 0.0,
                          "schedule": "constant", "boost_at": 0.5, "boost_factor": 2.0, "steps": 30})
    return pd.DataFrame(final), pd.DataFrame(history)


def test_matched_level_is_the_lowest_loss_every_run_reached_and_readings_interpolate():
    final, history = _history()
    level = A.matched_level(final, history, None)
    np.testing.assert_allclose(level[""], 0.41)  # eprop seed 1's minimum; seed 2 diverged
    matched = A.read_at_loss(history, level).set_index(["condition", "seed"])
    assert matched.reached.all() or not matched.loc[("eprop", 2), "reached"]
    # bptt seed 0 crosses between step 20 (0.5) and step 30 (0.1): w = log(0.5/0.41)/log(0.5/0.1).
    w = np.log(0.5 / 0.41) / np.log(0.5 / 0.1)
    row = matched.loc[("bptt", 0)]
    np.testing.assert_allclose([row.step, row.lambda_max, row.train_loss], [20 + 10 * w, 200 + 100 * w, 0.41],
                               rtol=1e-12)
    assert row.coarse  # 0.5 → 0.1 is more than twofold
    assert matched.loc[("eprop", 1), "step"] == 30 and not matched.loc[("eprop", 1), "coarse"]
    np.testing.assert_allclose(A.matched_level(final, history, 0.7)[""], 0.7)  # a training target
    assert not A.read_at_loss(history, pd.Series({"": 1e-3})).reached.any()


def test_one_computation_is_counted_once():
    final, history = _history(conditions=(("bptt", 0.1), ("eprop_random", 0.4), ("rflo", 0.4)), diverged=())
    final.loc[final.condition == "rflo", "computation"] = repr(("eprop_random",))
    final.loc[final.condition == "eprop_random", "computation"] = repr(("eprop_random",))
    runs, dropped = A.counted(final)
    assert dropped == [("rflo", "eprop_random")] and set(runs.condition) == {"bptt", "eprop_random"}
    a = _analyse(final, history, None)
    A.adjust_all(a["contrasts"], a["correlations"])
    assert set(a["contrasts"].condition) == {"eprop_random"}
    assert set(a["correlations"].scope) <= {"bptt", "eprop_random", "all conditions (condition as stratum)"}
    assert any("rflo is the same computation as eprop_random" in f for f in _findings(a, None, tests=4) if isinstance(f, str))


def test_findings_state_n_test_corrected_p_and_interval():
    final, history = _history(seeds=8, diverged=(("eprop", 2, 7),))
    a = _analyse(final, history, None)
    A.adjust_all(a["contrasts"], a["correlations"])
    assert set(a["contrasts"].reading) == {"fixed budget", "matched"}
    assert a["contrasts"].p_adjusted.between(0, 1).all()
    (head, lines), = [f for f in _findings(a, None, tests=4) if isinstance(f, tuple)]
    assert "**eprop** against bptt (n = 7 vs 8 runs" in head and "permutation tests" in head
    assert "Benjamini–Hochberg" in head and "no permutation test can give" not in head
    # Few runs: the report says how small a p-value they allow at all (2/C(7+8, 7) = 3.1e-4).
    (few, _), = [f for f in _findings(a, None, tests=400) if isinstance(f, tuple)]
    assert "With 7 and 8 runs no permutation test can give p below 3.1e-04" in few and "adjusts to 0.12" in few
    assert all("95% CI [" in line and "p = " in line for line in lines)
    assert "not like-for-like" in lines[1]
    text = " ".join(f if isinstance(f, str) else f[0] for f in _findings(a, None, tests=4))
    assert "1 of 16 runs diverged" in text and "eprop seed 2 at iteration 7" in text


def test_summary_excludes_and_counts_diverged_runs():
    final, _ = _history()
    table = summary_table(final).set_index("condition")
    assert table.loc["eprop", "runs"] == 3 and table.loc["eprop", "diverged"] == 1
    assert table.loc["eprop", "trace"] == "1.50 [1.25, 1.75]"  # seeds 0 and 1 only
    assert table.loc["bptt", "diverged"] == 0


@pytest.mark.parametrize("x,text", [(222.3, "222"), (0.0029, "0.00290"), (2e-4, "2.00e-04"), (123456.0, "1.23e+05"),
                                    (-1.5, "-1.50"), (0.0, "0"), (np.nan, "—")])
def test_numbers_have_one_format(x, text):
    assert number(x) == text


def _folder(tmp_path, final, history):
    final.to_parquet(tmp_path / "final.parquet")
    history.to_parquet(tmp_path / "history.parquet")
    cell = {"task": {"name": "t", "n_train": 64, "n_test": 64}, "learning_rates": [0.1],
            "train": {"optimizer": "sgd", "steps": 30, "batch_size": 8, "l2": 0.0, "target_loss": None},
            "model": {"form": "voltage", "n_rec": 8, "alpha": 0.0, "activation": "relu", "dale_exc_fraction": None}}
    config = {"name": "synthetic", "cells": [cell], "rules": [{}, {}], "seeds": [0, 1, 2],
              "measure": {"curvature_block": "w_rec", "curvature_batch": 32, "lanczos_steps": 8, "trace_probes": 6,
                          "l2_in_curvature": True, "sharpness_scale": 0.05}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return write_report(tmp_path)


def test_report_of_finished_and_of_all_diverged_runs(tmp_path):
    final, history = _history()
    page = _folder(tmp_path, final, history).read_text()
    assert "Each condition against BPTT" in page and "1 of 6 runs diverged" in page
    every = [(c, s, 3 + s) for c in ("bptt", "eprop") for s in range(3)]
    final, history = _history(diverged=every)
    history.loc[history.step > 0, ["train_loss", "test_loss", "lambda_max"]] = np.nan
    text = _folder(tmp_path, final, history).with_suffix(".md").read_text()
    assert "Every run diverged" in text and "bptt seed 0 at iteration 3" in text
