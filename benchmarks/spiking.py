"""Spiking networks against rate networks, measured side by side in one run.

    python benchmarks/spiking.py [--quick] [--json OUT.json]

1. The compiled BPTT training step (one seed, a chunk of ``CHUNK`` iterations, plain SGD) of a LIF
   and of an ALIF network with a readout filter, each as a ratio to the voltage-form network's step
   at the same N, T and batch, timed in alternation (:func:`bench.paired`): the evidence-
   accumulation shape (T = 225 steps of 40 inputs, N = 100, batch 64, a readout at the last 15 steps).
2. e-prop's compiled temporary memory on the ALIF network, offline against online, as T grows
   (XLA's memory analysis, as benchmarks/bench.py does for the rate forms).
"""

from __future__ import annotations

import argparse
import json
import math

import jax
import jax.numpy as jnp

from bench import CHUNK, paired
from creditscape import model as M
from creditscape.objective import Batch, Noise
from creditscape.rules import get_rule
from creditscape.train import TrainConfig, init_ensemble, make_chunk

N_IN, N_OUT, N, T, B, READ = 40, 2, 100, 225, 64, 15
ALPHA = math.exp(-0.5)
FORMS = {
    "voltage (relu)": dict(form="voltage", activation="relu"),
    "lif": dict(form="lif", threshold=0.6),
    "alif + readout filter": dict(form="alif", threshold=0.6, adapt_decay=math.exp(-1 / 200), readout_decay=ALPHA),
}


def config(options, readout_steps=READ):
    return M.ModelConfig(N_IN, N, N_OUT, alpha=ALPHA, dale_exc_fraction=0.8, readout_steps=readout_steps, **options)


def spikes(n, t, seed=0):
    key = jax.random.PRNGKey(seed)
    x = (jax.random.uniform(key, (n, t, N_IN)) < 0.1).astype(jnp.float32)
    target = jnp.broadcast_to(jax.random.randint(jax.random.fold_in(key, 1), (n, 1), 0, N_OUT), (n, t))
    mask = jnp.zeros((n, t), jnp.float32).at[:, -READ:].set(1.0)
    return Batch(x, target, mask)


def bptt_step(options, train):
    cfg = config(options)
    tcfg = TrainConfig(optimizer="sgd", learning_rate=0.01, batch_size=B, steps=CHUNK, eval_every=CHUNK)
    chunk = make_chunk(cfg, get_rule("bptt"), tcfg)
    states, structs = init_ensemble(cfg, get_rule("bptt"), tcfg, [0])
    # make_chunk donates its state argument: keep a copy to call it repeatedly on the same input.
    return lambda: chunk(jax.tree.map(jnp.copy, states), structs, train, 0, CHUNK)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="one round (smoke test)")
    parser.add_argument("--json", help="write results here")
    args = parser.parse_args()
    rounds = 1 if args.quick else 5
    train = spikes(1024, T)
    results = {"device": str(jax.devices()[0]), "shape": dict(N=N, T=T, B=B), "chunk": CHUNK, "bptt_step": {}}
    base = bptt_step(FORMS["voltage (relu)"], train)
    for label, options in FORMS.items():
        if label.startswith("voltage"):
            continue
        t_rate, t_spk, ratio = paired(base, bptt_step(options, train), rounds=rounds, repeats=1 if args.quick else 3)
        results["bptt_step"][label] = dict(rate_ms=1e3 * t_rate / CHUNK, spiking_ms=1e3 * t_spk / CHUNK, ratio=ratio)
        print(f"BPTT step, {label:22s}: {1e3 * t_spk / CHUNK:7.1f} ms against {1e3 * t_rate / CHUNK:6.1f} ms "
              f"(voltage form) = {ratio:.2f}x")

    cfg = config(FORMS["alif + readout filter"], readout_steps=None)
    params, struct = M.init(cfg, jax.random.PRNGKey(0))
    memory = {}
    for steps in (225, 900, 3600):
        batch = spikes(B, steps)
        batch = batch._replace(mask=jnp.ones_like(batch.mask))
        row = {}
        for form in ("offline", "online"):
            fn = jax.jit(lambda p, b, form=form: get_rule("eprop").gradient(cfg, p, struct, (), b, Noise(b.x, None), form=form))
            row[form] = fn.lower(params, batch).compile().memory_analysis().temp_size_in_bytes / 2**20
        memory[steps] = row
        print(f"  T={steps:5d}: ALIF e-prop temporary memory offline {row['offline']:8.1f} MiB, online {row['online']:6.1f} MiB")
    results["alif_eprop_temp_memory_mib"] = memory
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
