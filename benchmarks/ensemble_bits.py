"""Why results agree across device counts to rounding and not bit for bit: a member's bits depend on
how many members share its compiled program, on one device already.

    python benchmarks/ensemble_bits.py

For each (optimizer, rule) it trains 40 iterations (cue recall, N = 8, float32) and prints the
largest difference in any state of member 0 between
- trained alone and trained among 8 members, both on one device (``vmap`` batch 1 against 8);
- 8 members on one device and 8 members over 4 host devices, partitioned by ``jit`` (2 per device)
  and by ``shard_map`` (the one-device program run on each device's 2 members).
Partitioning changes nothing that the batch size does not: the per-device program holds fewer
members, and XLA compiles a batch of 2 differently from a batch of 8.
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec  # noqa: E402

from creditscape import model as M  # noqa: E402
from creditscape.devices import MemberSharding  # noqa: E402
from creditscape.rules import get_rule  # noqa: E402
from creditscape.tasks import get_task, make_splits  # noqa: E402
from creditscape.train import TrainConfig, init_ensemble, make_iteration, to_device  # noqa: E402

STEPS = 40


def largest_difference(a, b, members=slice(None)) -> float:
    return max(float(np.max(np.abs(np.asarray(x)[members].astype(float) - np.asarray(y)[members].astype(float))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main():
    task = get_task("cue_recall", delay=3)
    train = to_device(make_splits(task, 64, 64, seed=0).train)
    cfg = M.ModelConfig(task.n_in, 8, task.n_out, rec_noise=0.05, dale_exc_fraction=0.75)
    layout = MemberSharding(4)
    members = PartitionSpec("members")
    print("largest difference in member 0's state after 40 iterations (float32)")
    for optimizer, rule_name in (("sgd", "bptt"), ("adam", "bptt"), ("adam", "eprop"), ("adam", "mdgl")):
        tcfg = TrainConfig(optimizer=optimizer, learning_rate=0.01, steps=STEPS, eval_every=STEPS, batch_size=8)
        rule = get_rule(rule_name)
        iteration = make_iteration(cfg, rule, tcfg)

        def one(state, struct, train_set):
            return jax.lax.fori_loop(0, STEPS, lambda t, s: iteration(s, struct, train_set)[0], state)

        ensemble = jax.vmap(one, in_axes=(0, 0, None))
        eight, alone = init_ensemble(cfg, rule, tcfg, range(8)), init_ensemble(cfg, rule, tcfg, [0])
        one_device = jax.jit(ensemble)(*eight, train)
        by_jit = jax.jit(ensemble)(*layout.shard(eight), layout.replicate(train))
        by_shard_map = jax.jit(jax.shard_map(ensemble, mesh=layout.mesh, in_specs=(members,) * 2 + (PartitionSpec(),),
                                             out_specs=members, check_vma=False))(*layout.shard(eight),
                                                                                  layout.replicate(train))
        print(f"{optimizer:4s} {rule_name:5s}  alone vs among 8: {largest_difference(jax.jit(ensemble)(*alone, train), one_device, slice(0, 1)):.1e}"
              f"   4 devices, jit: {largest_difference(by_jit, one_device):.1e}"
              f"   4 devices, shard_map: {largest_difference(by_shard_map, one_device):.1e}")


if __name__ == "__main__":
    main()
