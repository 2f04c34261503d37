"""The report's statistics on synthetic results: matched training loss, summaries, correlations."""

import numpy as np
import pandas as pd

from creditscape.report import _findings, correlation, matched_loss, summary_table


def _results():
    """bptt fits to 0.1, eprop only to 0.4; eprop seed 2 diverged at iteration 7."""
    final, history = [], []
    for cond, final_loss in (("bptt", 0.1), ("eprop", 0.4)):
        for seed in range(3):
            losses = [2.0, 1.0, 0.5 + 0.01 * seed, final_loss + 0.01 * seed]
            diverged = 7 if (cond, seed) == ("eprop", 2) else -1
            for step, loss in zip((0, 10, 20, 30), losses):
                history.append({"task": "t", "condition": cond, "seed": seed, "learning_rate": 0.1, "step": step,
                                "train_loss": loss, "train_accuracy": 1 - loss / 2, "test_loss": loss + 0.2 * (cond == "eprop"),
                                "test_accuracy": 0.5, "lambda_max": 10.0 * step + seed})
            h = history[-1]
            final.append({**{k: h[k] for k in ("task", "condition", "seed", "learning_rate", "train_loss", "train_accuracy",
                                                "test_loss", "test_accuracy", "lambda_max")},
                          "diverged_at": diverged, "gap_loss": h["test_loss"] - h["train_loss"], "trace": 1.0 + seed})
    return pd.DataFrame(final), pd.DataFrame(history)


def test_matched_loss_reads_each_run_at_its_first_step_below_the_level():
    final, history = _results()
    matched = matched_loss(final, history)
    # L* = the higher of the medians of final training loss over non-diverged runs: eprop's 0.405.
    np.testing.assert_allclose(matched.level.unique(), [0.405])
    assert len(matched) == 5  # the diverged run is left out
    bptt = matched[matched.condition == "bptt"].set_index("seed")
    assert bptt.step.tolist() == [30, 30, 30]  # 0.5 > L* at step 20, 0.1 at step 30
    eprop = matched[matched.condition == "eprop"].set_index("seed")
    assert eprop.loc[0, "reached"] and eprop.loc[0, "step"] == 30 and not eprop.loc[1, "reached"]  # 0.41 > L*
    np.testing.assert_allclose(bptt.lambda_max, [300.0, 301.0, 302.0])


def test_summary_excludes_and_counts_diverged_runs():
    final, _ = _results()
    table = summary_table(final).set_index("condition")
    assert table.loc["eprop", "runs"] == 3 and table.loc["eprop", "diverged"] == 1
    assert table.loc["eprop", "trace"].startswith("1.5 ± 0.5 [1.5]")  # seeds 0 and 1 only
    assert table.loc["bptt", "diverged"] == 0


def test_correlation_and_findings():
    x = np.arange(10.0)
    c = correlation(x, x**3)
    np.testing.assert_allclose([c["spearman"], *c["spearman_ci"]], 1.0, rtol=1e-12)
    assert c["pearson"] < 0.99 and c["n"] == 10
    assert correlation(x[:3], x[:3]) == {"n": 3}  # too few runs: no statistic
    final, history = _results()
    text = " ".join(_findings(final, matched_loss(final, history), {}, {}))
    assert "**eprop** vs bptt" in text and "not like-for-like" in text
    assert "1 of 6 runs diverged" in text and "eprop seed 2 at iteration 7" in text
