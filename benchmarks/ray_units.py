"""Units per second of an experiment grid on a local Ray cluster with 1, 2, … workers, against the
same grid run here one unit after another, in one run.

    python benchmarks/ray_units.py [--workers 1 2] [--units 4] [--steps 2000]

The grid: cue recall (N = 32), BPTT at ``--units`` L2 coefficients as grid cells (one unit each),
2 seeds, ``--steps`` iterations. Each configuration runs end to end (`run_experiment`, results
folder, final measurements) in its own process with one XLA host device per unit, so compile time
is part of each unit's cost, as in a real grid. The numbers bound what a cluster gives: units are
independent, so with enough CPUs the speed-up is the number of workers, less Ray's start-up
(a few seconds) and each worker's JAX start and compilation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

GRID = """
name = "ray-units"
seeds = 2
rules = ["bptt"]
[task]
name = "cue_recall"
n_train = 256
n_test = 64
delay = 6
[model]
n_rec = 32
[train]
optimizer = "sgd"
learning_rate = 0.05
steps = {steps}
eval_every = {eval_every}
batch_size = 16
[grid]
"train.l2" = {l2}
[measure]
curvature_batch = 32
lanczos_steps = 8
trace_probes = 6
slice_points = 5
"""

WORKER = """
import json, sys, time, tomllib
import ray
from creditscape.config import resolve
from creditscape.distributed import RayCluster
from creditscape.experiment import run_experiment

grid, out, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
exp = resolve(tomllib.loads(open(grid).read()))
start = time.perf_counter()
if workers:
    ray.init(num_cpus=workers, include_dashboard=False, logging_level="ERROR")
    run_experiment(exp, out, progress=False, ray=RayCluster(cpus=1), log=lambda line: None)
    ray.shutdown()
else:
    run_experiment(exp, out, progress=False, log=lambda line: None)
seconds = time.perf_counter() - start
print(json.dumps({"workers": workers, "units": len(exp.cells), "seconds": seconds}))
"""


def measure(grid: Path, workers: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "RAY_worker_niceness": "0",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    with tempfile.TemporaryDirectory() as out:
        run = subprocess.run([sys.executable, "-c", WORKER, str(grid), out, str(workers)], env=env,
                             capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(run.stderr)
    return json.loads(run.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--units", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    l2 = [0.0] + [10.0 ** -(6 - i) for i in range(args.units - 1)]  # one grid cell (one unit) each
    with tempfile.TemporaryDirectory() as folder:
        grid = Path(folder) / "grid.toml"
        grid.write_text(GRID.format(steps=args.steps, eval_every=args.steps // 10, l2=l2))
        here = measure(grid, 0)
        print(f"here, one unit after another: {here['units'] / here['seconds']:.3f} units/s "
              f"({here['seconds']:.0f} s for {here['units']} units)")
        for workers in args.workers:
            r = measure(grid, workers)
            print(f"Ray, {workers} worker(s): {r['units'] / r['seconds']:.3f} units/s ({r['seconds']:.0f} s; "
                  f"{here['seconds'] / r['seconds']:.2f}x here)")


if __name__ == "__main__":
    main()
