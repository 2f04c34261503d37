"""Benchmarks measured side by side in one run, reported as ratios (CPU or GPU, whatever JAX uses).

    python benchmarks/bench.py [--quick] [--json OUT.json]

1. creditscape's BPTT training step against a minimal hand-written compiled JAX loop (the ceiling);
2. every rule's step (offline and online forms) relative to creditscape's BPTT step;
3. seed scaling (seed-steps per second at 1, 8, 32 seeds);
4. Hessian-vector product cost over gradient cost;
5. compiled temporary memory of online vs offline e-prop as T grows (XLA's memory analysis).

Shapes: the sequential-MNIST shape (N=128, T=28, batch 256, 28 inputs, 10 classes, ReLU, SGD) on
random data. Times are medians of repeated compiled calls of ``CHUNK`` steps each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from creditscape import model as M
from creditscape.curvature import block_loss, hvp
from creditscape.objective import Batch, Noise
from creditscape.rules import get_rule
from creditscape.train import TrainConfig, init_ensemble, make_chunk

N, T, B, N_IN, N_OUT = 128, 28, 256, 28, 10
CHUNK = 20


def timed(fn, *args, repeats=5):
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def data(n=4096, t=T, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, t, N_IN), dtype=np.float32)
    target = np.zeros((n, t), np.int32)
    target[:, -1] = rng.integers(N_OUT, size=n)
    mask = np.zeros((n, t), np.float32)
    mask[:, -1] = 1
    return Batch(jnp.asarray(x), jnp.asarray(target), jnp.asarray(mask))


def minimal_jax_chunk(train, lr=0.01):
    """The ceiling: a plain ReLU RNN, BPTT by jax.grad, SGD, CHUNK steps in one lax.scan."""

    def loss(p, x, y):
        def step(h, x_t):
            h = jax.nn.relu(h @ p["w_rec"].T + x_t @ p["w_in"].T)
            return h, None

        h, _ = jax.lax.scan(step, jnp.zeros((x.shape[0], N)), jnp.swapaxes(x, 0, 1))
        logits = h @ p["w_out"].T + p["b_out"]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

    @jax.jit
    def chunk(p, key):
        def it(carry, _):
            p, key = carry
            key, k = jax.random.split(key)
            idx = jax.random.randint(k, (B,), 0, train.x.shape[0])
            g = jax.grad(loss)(p, train.x[idx], train.target[idx, -1])
            return (jax.tree.map(lambda a, b: a - lr * b, p, g), key), None

        return jax.lax.scan(it, (p, key), length=CHUNK)[0]

    k = jax.random.split(jax.random.PRNGKey(0), 3)
    p = {"w_in": jax.random.normal(k[0], (N, N_IN)) * np.sqrt(2 / N_IN),
         "w_rec": jax.random.normal(k[1], (N, N)) * np.sqrt(2 / N),
         "w_out": jax.random.normal(k[2], (N_OUT, N)) * 0.1, "b_out": jnp.zeros(N_OUT)}
    return lambda: chunk(p, jax.random.PRNGKey(1))


def creditscape_chunk(rule, form, train, seeds=1, n_rec=N):
    cfg = M.ModelConfig(N_IN, n_rec, N_OUT, bias=False)
    tcfg = TrainConfig(optimizer="sgd", learning_rate=0.01, batch_size=B, steps=CHUNK, eval_every=CHUNK, form=form)
    chunk = make_chunk(cfg, rule, tcfg)
    states, structs, rs = init_ensemble(cfg, rule, tcfg, list(range(seeds)))
    # make_chunk donates its state argument: keep a copy to call it repeatedly on the same input.
    return lambda: chunk(jax.tree.map(jnp.copy, states), structs, rs, train)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer repeats and seeds (smoke test)")
    parser.add_argument("--json", help="write results here")
    args = parser.parse_args()
    repeats = 2 if args.quick else 5
    train = data()
    results = {"device": str(jax.devices()[0]), "shape": dict(N=N, T=T, B=B), "chunk": CHUNK}

    ceiling = timed(minimal_jax_chunk(train), repeats=repeats) / CHUNK
    bptt = timed(creditscape_chunk(get_rule("bptt"), None, train), repeats=repeats) / CHUNK
    results["minimal_jax_ms_per_step"] = 1e3 * ceiling
    results["bptt_ms_per_step"] = 1e3 * bptt
    results["bptt_over_minimal"] = bptt / ceiling
    print(f"device {results['device']}; N={N} T={T} B={B}")
    print(f"minimal JAX BPTT {1e3 * ceiling:.2f} ms/step; creditscape bptt {1e3 * bptt:.2f} ms/step "
          f"(ratio {bptt / ceiling:.2f}, target <= 1.2)")

    rules = {}
    for name, form in [("tbptt", "offline"), ("eprop", "offline"), ("eprop", "online"), ("eprop_random", "offline"),
                       ("eprop_random", "online"), ("mdgl", "offline"), ("mdgl", "online")]:
        opts = {"k": 5} if name == "tbptt" else {}
        t = timed(creditscape_chunk(get_rule(name, **opts), form, train), repeats=repeats) / CHUNK
        rules[f"{name} ({form})"] = t / bptt
        print(f"  {name:13s} {form:8s} {1e3 * t:7.2f} ms/step  = {t / bptt:5.2f} x bptt")
    results["rule_over_bptt"] = rules
    for name in ("eprop", "eprop_random", "mdgl"):
        results[f"{name}_online_over_offline"] = rules[f"{name} (online)"] / rules[f"{name} (offline)"]
        print(f"  {name} online / offline = {results[f'{name}_online_over_offline']:.2f} (target <= 3)")

    scaling = {}
    for seeds in ([1, 8] if args.quick else [1, 8, 32]):
        t = timed(creditscape_chunk(get_rule("bptt"), None, train, seeds=seeds), repeats=repeats) / CHUNK
        scaling[seeds] = seeds / t
        print(f"  {seeds:3d} seeds: {seeds / t:9.0f} seed-steps/s")
    results["seed_steps_per_second"] = scaling

    cfg = M.ModelConfig(N_IN, N, N_OUT, bias=False)
    params, struct = M.init(cfg, jax.random.PRNGKey(0))
    batch = Batch(*(a[:B] for a in train))
    f, x0 = block_loss(cfg, params, struct, batch, "all")
    v = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
    t_grad = timed(jax.jit(jax.grad(f)), x0, repeats=repeats)
    t_hvp = timed(jax.jit(lambda x, u: hvp(f, x, u)), x0, v, repeats=repeats)
    results["hvp_over_gradient"] = t_hvp / t_grad
    print(f"HVP / gradient = {t_hvp / t_grad:.2f} (target <= 2.5 CPU, <= 2 GPU)")

    memory = {}
    for steps in (28, 112, 448):
        long = data(n=B, t=steps)
        row = {}
        for form in ("offline", "online"):
            rule = get_rule("eprop")
            fn = jax.jit(lambda p, b, form=form: rule.gradient(cfg, p, struct, (), b, Noise(b.x, None), form=form))
            row[form] = fn.lower(params, long).compile().memory_analysis().temp_size_in_bytes / 2**20
        memory[steps] = row
        print(f"  T={steps:4d}: e-prop temporary memory offline {row['offline']:8.1f} MiB, online {row['online']:6.1f} MiB")
    results["eprop_temp_memory_mib"] = memory
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
