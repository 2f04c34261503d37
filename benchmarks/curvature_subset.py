"""How much does measuring the Hessian on a subset of the training set change λ_max and the trace?

    python benchmarks/curvature_subset.py [--out results/curvature-subset] [--steps 600]

Every experiment measures curvature on its first ``measure.curvature_batch`` training sequences
(256), not on the whole training set. This script trains small networks (BPTT and e-prop, 8 seeds
each) on two tasks with training sets of 4,096 sequences, then measures the top eigenvalue of the
W_rec Hessian and its trace of every final network on the first 64, 256 and 1,024 sequences and
on the whole set (``creditscape curvature --sequences``), and prints, per task and rule, the
median [quartiles] over seeds of each subset's value divided by the whole set's. The figures are
recorded in docs/measurements.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from creditscape.config import resolve
from creditscape.experiment import measure_saved, run_experiment
from creditscape.report.document import spread

TASKS = {
    "cue_recall": {"name": "cue_recall", "delay": 8, "noise_levels": [0.2]},
    "perceptual_decision": {"name": "perceptual_decision", "noise_levels": [0.5]},
}
SUBSETS = (64, 256, 1024, 0)  # 0: the whole training set


def config(task: dict, steps: int) -> dict:
    return {
        "name": f"subset-{task['name']}", "seeds": 8, "data_seed": 0, "rules": ["bptt", "eprop"],
        "task": {**task, "n_train": 4096, "n_test": 256},
        "model": {"n_rec": 32, "form": "voltage", "alpha": 0.5, "activation": "relu", "dale_exc_fraction": 0.8},
        "train": {"optimizer": "sgd", "learning_rate": 0.03, "batch_size": 64, "steps": steps,
                  "eval_every": steps // 2},
        "measure": {"curvature_block": "w_rec", "curvature_batch": 256, "lanczos_steps": 20},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/curvature-subset")
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    for name, task in TASKS.items():
        out = Path(args.out) / name
        run_experiment(resolve(config(task, args.steps)), out, progress=False)
        tables = {n: measure_saved(out, steps=40, top=1, trace_probes=30, sequences=n) for n in SUBSETS}
        whole = tables[0]
        print(f"\n{name}: whole training set = {int(whole.sequences.iloc[0])} sequences; "
              "subset / whole, median [quartiles] over 8 seeds")
        for rule, g in whole.groupby("rule"):
            cells = []
            for n in SUBSETS[:-1]:
                sub = tables[n][tables[n].rule == rule].set_index("seed")
                ref = g.set_index("seed")
                cells.append(f"{n}: λ₁ {spread(sub.eig1 / ref.eig1)}, trace {spread(sub.trace / ref.trace)}")
            print(f"  {rule:8s} whole-set λ₁ {spread(g.eig1)}; " + "; ".join(cells))


if __name__ == "__main__":
    main()
