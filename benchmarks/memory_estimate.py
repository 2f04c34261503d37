"""The memory check against measured memory: XLA's count of a compiled training chunk's buffers
(``train.program_bytes``, what ``creditscape run`` compares with the device's memory before any
work) against the resident memory the process actually gains while the chunk runs.

    python benchmarks/memory_estimate.py

Each shape runs in a fresh process. Arguments (the ensemble state, the data) are in memory
before the run, so the comparison is of what the run adds: XLA's outputs + temporaries − aliased
outputs against the peak resident set size during the run (sampled every millisecond) less the
resident size just before it. CPU only (on a GPU, read ``memory_stats()['peak_bytes_in_use']``).
The ratio measured here is ``train.CPU_MEMORY_FACTOR``'s reason (1.03–1.31 on 2026-11-29).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

WORKER = r"""
import json, sys, threading, time
import jax, jax.numpy as jnp
from creditscape import model as M
from creditscape.objective import Batch
from creditscape.rules import get_rule
from creditscape.train import TrainConfig, init_ensemble, make_chunk

rule_name, form, members = sys.argv[1], sys.argv[2], int(sys.argv[3])
page = 4096
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
n_rec, t, b = 128, 28, 256
key = jax.random.PRNGKey(0)
x = jax.random.uniform(key, (4096, t, 28), jnp.float32)
y = jax.random.randint(key, (4096, t), 0, 10)
train = Batch(x, y, jnp.zeros((4096, t), jnp.float32).at[:, -1].set(1.0))
cfg = M.ModelConfig(28, n_rec, 10, activation="relu", readout_steps=1)
tcfg = TrainConfig(optimizer="sgd", learning_rate=0.01, batch_size=b, steps=10, eval_every=10, form=form)
rule = get_rule(rule_name)
states, structs = init_ensemble(cfg, rule, tcfg, list(range(members)))
compiled = make_chunk(cfg, rule, tcfg).lower(states, structs, train, 0, 10).compile()
stats = compiled.memory_analysis()
added = stats.output_size_in_bytes + stats.temp_size_in_bytes - stats.alias_size_in_bytes
jax.block_until_ready(states)
time.sleep(0.2)
before, peak, running = rss(), [0], [True]
def sample():
    while running[0]:
        peak[0] = max(peak[0], rss())
        time.sleep(0.001)
sampler = threading.Thread(target=sample)
sampler.start()
out = compiled(states, structs, train, 0, 10)
jax.block_until_ready(out)
running[0] = False
sampler.join()
print(json.dumps({"estimate_added": added, "measured_added": peak[0] - before,
                  "arguments": stats.argument_size_in_bytes}))
"""

SHAPES = [("bptt", "offline", 32), ("bptt", "offline", 128), ("eprop", "offline", 32), ("eprop", "offline", 128),
          ("eprop", "online", 128)]


def main() -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    print("sequential-MNIST shape (N = 128, T = 28, batch 256), a chunk of 10 iterations")
    print(f"{'rule':8s} {'form':8s} {'members':>7s} {'XLA: added MiB':>15s} {'measured MiB':>13s} {'ratio':>6s}")
    for rule, form, members in SHAPES:
        done = subprocess.run([sys.executable, "-c", WORKER, rule, form, str(members)], env=env, capture_output=True,
                              text=True, check=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        est, got = r["estimate_added"] / 2**20, r["measured_added"] / 2**20
        print(f"{rule:8s} {form:8s} {members:7d} {est:15.0f} {got:13.0f} {got / est:6.2f}", flush=True)


if __name__ == "__main__":
    main()
