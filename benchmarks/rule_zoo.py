"""The online-rule taxonomy's training steps against BPTT's, measured side by side in one run.

    python benchmarks/rule_zoo.py [--quick] [--sizes 32 128] [--json OUT.json]

Each rule's compiled training step (one seed, a chunk of ``CHUNK`` iterations, plain SGD; for
KeRNL and DNI the update of their auxiliary parameters included) on the
sequential-MNIST shape (T = 28, 28 inputs, 10 classes, a last-step readout) at N = 32 and N = 128
with a batch of 32, as a ratio to BPTT's step on the same shape, BPTT timed in alternation with
each rule (:func:`bench.paired`). SnAp-n and RTRL run the dense forward-sensitivity recursion
(O(N·P) numbers per sequence, P ≈ N²): timed at N = 32 only, in one round (a step takes seconds). Networks have Dale's law (MDGL and
ModProp need cell types) and 30 % connectivity (SnAp-2's pattern is then not full).
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from bench import CHUNK, N_IN, N_OUT, T, data, paired
from creditscape import model as M
from creditscape.rules import get_rule
from creditscape.train import TrainConfig, init_ensemble, make_chunk

B = 32
RULES = [  # (label, rule name, options, form, largest N it is timed at)
    ("tbptt k=5 (offline)", "tbptt", {"k": 5}, "offline", 128),
    ("eprop (online)", "eprop", {}, "online", 128),
    ("mdgl (online)", "mdgl", {}, "online", 128),
    ("modprop (offline)", "modprop", {}, "offline", 128),
    ("uoro", "uoro", {}, "online", 128),
    ("kf_rtrl", "kf_rtrl", {}, "online", 128),
    ("reverse_kf_rtrl", "reverse_kf_rtrl", {}, "online", 128),
    ("kernl", "kernl", {}, "online", 128),
    ("dni", "dni", {}, "online", 128),
    ("snap n=2", "snap", {"n": 2}, "online", 32),
    ("rtrl", "rtrl", {}, "online", 32),
]


def step(rule, form, train, n_rec):
    cfg = M.ModelConfig(N_IN, n_rec, N_OUT, activation="relu", readout_steps=1, dale_exc_fraction=0.8,
                        connectivity=0.3)
    tcfg = TrainConfig(optimizer="sgd", learning_rate=0.01, batch_size=B, steps=CHUNK, eval_every=CHUNK, form=form)
    chunk = make_chunk(cfg, rule, tcfg)
    states, structs = init_ensemble(cfg, rule, tcfg, [0])
    # make_chunk donates its state argument: keep a copy to call it repeatedly on the same input.
    return lambda: chunk(jax.tree.map(jnp.copy, states), structs, train, 0, CHUNK)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="one round per rule (smoke test)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 128], help="network sizes N")
    parser.add_argument("--json", help="write results here")
    args = parser.parse_args()
    train = data(n=1024)
    results = {"device": str(jax.devices()[0]), "shape": dict(T=T, B=B), "chunk": CHUNK, "rules": {}}
    print(f"device {results['device']}; T={T} B={B}, ms per training step and ratio to BPTT's")
    for n_rec in args.sizes:
        bptt = step(get_rule("bptt"), None, train, n_rec)
        for label, name, opts, form, largest in RULES:
            if n_rec > largest:
                continue
            slow = name in ("snap", "rtrl")
            t_bptt, t_rule, ratio = paired(bptt, step(get_rule(name, **opts), form, train, n_rec),
                                           rounds=1 if args.quick or slow else 3, repeats=1 if slow else 2 if args.quick else 3)
            results["rules"][f"{label} N={n_rec}"] = {"ms_per_step": 1e3 * t_rule / CHUNK,
                                                     "bptt_ms_per_step": 1e3 * t_bptt / CHUNK, "over_bptt": ratio}
            print(f"  N={n_rec:3d} {label:20s} {1e3 * t_rule / CHUNK:9.2f} ms/step = {ratio:7.2f} x bptt "
                  f"({1e3 * t_bptt / CHUNK:.2f} ms)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
