"""Members per second with the member axis sharded over N local devices, against one device, in
one run (each device count in its own process, since XLA fixes the device count when it starts).

    python benchmarks/devices.py [--devices 2] [--members 32] [--cpu-devices]

``--cpu-devices`` splits the CPU into N host devices (``--xla_force_host_platform_device_count``):
on a machine without accelerators this is the only way to have several devices, and the host
devices share the same cores, so it measures the overhead of partitioning, not a speed-up.
Shape: BPTT on cue recall (N = 64, T = 13, batch 32, SGD), a chunk of 200 iterations, median of
3 timed chunks after a warm-up one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

WORKER = """
import json, statistics, sys, time
import jax, numpy as np
from creditscape import model as M
from creditscape.devices import MemberSharding
from creditscape.rules import get_rule
from creditscape.tasks import get_task, make_splits
from creditscape.train import TrainConfig, init_ensemble, make_chunk, to_device

devices, members = int(sys.argv[1]), int(sys.argv[2])
task = get_task("cue_recall", delay=8)
train = to_device(make_splits(task, 512, 16, seed=0).train)
cfg = M.ModelConfig(task.n_in, 64, task.n_out)
tcfg = TrainConfig(optimizer="sgd", learning_rate=0.01, batch_size=32, steps=200, eval_every=200)
rule = get_rule("bptt")
layout = MemberSharding(devices)
states, structs = layout.shard(init_ensemble(cfg, rule, tcfg, list(range(members))))
train = layout.replicate(train)
chunk = make_chunk(cfg, rule, tcfg)
times = []
for i in range(4):
    start = time.perf_counter()
    states, losses = chunk(states, structs, train, 0, tcfg.eval_every)
    losses.block_until_ready()
    times.append(time.perf_counter() - start)
seconds = statistics.median(times[1:])
print(json.dumps({"devices": devices, "members": members, "member_steps_per_s": members * tcfg.eval_every / seconds,
                  "platform": jax.devices()[0].platform}))
"""


def measure(devices: int, members: int, cpu_devices: int | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    if cpu_devices:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={cpu_devices}").strip()
    out = subprocess.run([sys.executable, "-c", WORKER, str(devices), str(members)], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--members", type=int, default=32)
    parser.add_argument("--cpu-devices", action="store_true", help="split the CPU into --devices host devices")
    args = parser.parse_args()
    split = args.devices if args.cpu_devices else None
    one = measure(1, args.members, split)
    many = measure(args.devices, args.members, split)
    print(f"{one['platform']}: {args.members} members, BPTT, N = 64")
    print(f"  1 device : {one['member_steps_per_s']:9.0f} member-steps/s")
    print(f"  {args.devices} devices: {many['member_steps_per_s']:9.0f} member-steps/s  "
          f"({many['member_steps_per_s'] / one['member_steps_per_s']:.2f}x)")


if __name__ == "__main__":
    main()
