"""Benchmarks measured side by side in one run, reported as ratios (CPU or GPU, whatever JAX uses).

    python benchmarks/bench.py [--quick] [--json OUT.json]

1. creditscape's BPTT training step against a minimal hand-written compiled JAX loop (the ceiling,
   both on one device) and, as ``creditscape run`` lays out one seed (on a CPU one host device per
   core, the minibatch split over them where it pays), against a plain PyTorch eager loop over
   time on as many threads (the usual way; needs ``torch``, the ``bench`` extra — skipped with a
   note if it is not installed);
2. every rule's step (offline and online forms) relative to creditscape's BPTT step;
3. seed scaling (seed-steps per second at 1, 8, 32, 128 seeds);
4. Hessian-vector product cost over gradient cost (and PyTorch's double backward);
5. Lanczos top-5 time and the full cost of one measurement checkpoint (an experiment's evaluator);
6. compiled temporary memory of online vs offline e-prop as T grows (XLA's memory analysis).

Shapes: the sequential-MNIST shape (N=128, T=28, batch 256, 28 inputs, 10 classes, ReLU, SGD) on
random data. Times are medians of repeated compiled calls of ``CHUNK`` steps each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from creditscape import model as M
from creditscape.curvature import block_loss, hvp, lanczos
from creditscape.devices import one_host_device_per_core
from creditscape.objective import Batch, Noise
from creditscape.rules import get_rule
from creditscape.train import CurvatureProbe, TrainConfig, init_ensemble, make_chunk, make_evaluator, member_layout

N, T, B, N_IN, N_OUT = 128, 28, 256, 28, 10
CHUNK = 20
SMALL_N = 8  # for RTRL and online truncated BPTT, whose memory and cost grow as N⁴


def timed(fn, *args, repeats=5):
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired(fa, fb, rounds: int = 5, repeats: int = 3):
    """Median times of fa and fb measured in alternation, so that drifting load (another process,
    frequency scaling) hits both alike; returns (t_a, t_b, median of the per-round ratios b/a)."""
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(timed(fa, repeats=repeats))
        tb.append(timed(fb, repeats=repeats))
    return statistics.median(ta), statistics.median(tb), statistics.median(b / a for a, b in zip(ta, tb))


def data(n=4096, t=T, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, t, N_IN), dtype=np.float32)
    target = np.zeros((n, t), np.int32)
    target[:, -1] = rng.integers(N_OUT, size=n)
    mask = np.zeros((n, t), np.float32)
    mask[:, -1] = 1
    return Batch(jnp.asarray(x), jnp.asarray(target), jnp.asarray(mask))


def model_config(n_rec=N, readout_steps=1):
    """The sequential-MNIST network as an experiment builds it: no bias, one readout at the end."""
    return M.ModelConfig(N_IN, n_rec, N_OUT, bias=False, readout_steps=readout_steps)


def minimal_jax_chunk(train, lr=0.01, every_step=False):
    """The ceiling: a plain ReLU RNN, BPTT by jax.grad, SGD, CHUNK steps in one lax.scan. The loss
    is the cross-entropy of the last step; ``every_step`` reads out at every step and takes the
    masked loss of all of them (what a network without ``readout_steps`` computes)."""

    def loss(p, x, y):
        readout = lambda h: h @ p["w_out"].T + p["b_out"]

        def step(h, x_t):
            h = jax.nn.relu(h @ p["w_rec"].T + x_t @ p["w_in"].T)
            return h, readout(h) if every_step else None

        h, ys = jax.lax.scan(step, jnp.zeros((x.shape[0], N)), jnp.swapaxes(x, 0, 1))
        if every_step:  # under the data's mask, the same for every sequence: the last step
            logits, y, w = jnp.swapaxes(ys, 0, 1), y, train.mask[:1]
        else:
            logits, y, w = readout(h)[:, None], y[:, -1:], 1.0
        xent = jax.nn.logsumexp(logits, -1) - jnp.sum(logits * jax.nn.one_hot(y, N_OUT), -1)
        return jnp.sum(w * xent) / x.shape[0]

    @jax.jit
    def chunk(p, key):
        def it(carry, _):
            p, key = carry
            key, k = jax.random.split(key)
            idx = jax.random.randint(k, (B,), 0, train.x.shape[0])
            g = jax.grad(loss)(p, train.x[idx], train.target[idx])
            return (jax.tree.map(lambda a, b: a - lr * b, p, g), key), None

        return jax.lax.scan(it, (p, key), length=CHUNK)[0]

    k = jax.random.split(jax.random.PRNGKey(0), 3)
    p = {"w_in": jax.random.normal(k[0], (N, N_IN)) * np.sqrt(2 / N_IN),
         "w_rec": jax.random.normal(k[1], (N, N)) * np.sqrt(2 / N),
         "w_out": jax.random.normal(k[2], (N_OUT, N)) * 0.1, "b_out": jnp.zeros(N_OUT)}
    return lambda: chunk(p, jax.random.PRNGKey(1))


def torch_eager(train, repeats: int, against=None, rounds: int = 1) -> dict | None:
    """A plain PyTorch BPTT loop: the same model and data, a Python loop over time, SGD; and a
    Hessian-vector product by double backward. On the GPU when JAX runs on one (and torch sees
    CUDA), else on the CPU. None if torch is not installed.

    With ``against`` (a JAX chunk of ``CHUNK`` steps) the step is timed in ``rounds`` rounds in
    alternation with it, and ``"over_against"`` holds each round's ratio PyTorch / ``against``:
    on a shared CPU the two loops are hit differently by load, so one ratio taken once misleads."""
    try:
        import torch
    except ImportError:
        return None
    dev = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    torch.manual_seed(0)
    x = torch.from_numpy(np.array(train.x)).to(dev)  # a writable copy
    y = torch.from_numpy(np.array(train.target[:, -1])).long().to(dev)
    w_in = (torch.randn(N, N_IN, device=dev) * np.sqrt(2 / N_IN)).requires_grad_()
    w_rec = (torch.randn(N, N, device=dev) * np.sqrt(2 / N)).requires_grad_()
    w_out = (torch.randn(N_OUT, N, device=dev) * 0.1).requires_grad_()
    b_out = torch.zeros(N_OUT, device=dev, requires_grad=True)
    params = [w_in, w_rec, w_out, b_out]
    opt = torch.optim.SGD(params, lr=0.01)

    def loss_of(xb, yb):
        h = torch.zeros(xb.shape[0], N, device=dev)
        for t in range(xb.shape[1]):
            h = torch.relu(h @ w_rec.T + xb[:, t] @ w_in.T)
        return torch.nn.functional.cross_entropy(h @ w_out.T + b_out, yb)

    def chunk():
        for _ in range(CHUNK):
            idx = torch.randint(0, x.shape[0], (B,), device=dev)
            loss = loss_of(x[idx], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()

    def median_time(fn, n):
        fn()
        sync()
        times = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    xb, yb = x[:B], y[:B]
    vs = [torch.randn_like(p) for p in params]

    def grad_only():
        torch.autograd.grad(loss_of(xb, yb), params)

    def hvp_double_backward():
        g = torch.autograd.grad(loss_of(xb, yb), params, create_graph=True)
        torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, vs)), params)

    steps, ratios = [], []
    for _ in range(rounds):
        steps.append(median_time(chunk, repeats) / CHUNK)
        if against is not None:
            ratios.append(steps[-1] / (timed(against, repeats=repeats) / CHUNK))
    out = {"step": statistics.median(steps), "grad": median_time(grad_only, repeats),
           "hvp": median_time(hvp_double_backward, repeats), "version": torch.__version__,
           "device": torch.cuda.get_device_name() if dev == "cuda" else f"cpu, {torch.get_num_threads()} threads"}
    if against is not None:
        out["over_against"] = ratios
    return out


def creditscape_chunk(rule, form, train, seeds=1, n_rec=N, readout_steps=1, matmul_precision="highest", devices=None):
    """A training chunk of ``seeds`` members on the first device, or with ``devices`` laid out as a
    run lays them out over that many devices (each minibatch split over the devices beyond the
    members where it pays: :func:`member_layout`)."""
    cfg = model_config(n_rec, readout_steps)
    tcfg = TrainConfig(optimizer="sgd", learning_rate=0.01, batch_size=B, steps=CHUNK, eval_every=CHUNK, form=form,
                       matmul_precision=matmul_precision)
    layout = None if devices is None else member_layout(cfg, rule, tcfg, T, seeds, devices)
    chunk = make_chunk(cfg, rule, tcfg, layout)
    states, structs = init_ensemble(cfg, rule, tcfg, list(range(seeds)))
    if layout is not None:
        (states, structs), train = layout.shard((states, structs)), layout.replicate(train)
    # make_chunk donates its state argument: keep a copy to call it repeatedly on the same input.
    return lambda: chunk(jax.tree.map(jnp.copy, states), structs, train, 0, CHUNK)


def targets(r: dict) -> dict[str, tuple[str, bool | None]]:
    """Each target of issue 6 with the measured value and whether it is met (None: not measurable
    on this device)."""
    gpu = not r["device"].lower().startswith("cpu")
    mem = r["eprop_temp_memory_mib"]
    # "Flat": what online memory gains from T = 28 to 448 is no more than twice what the input
    # array itself gains (B × T × n_in floats); offline memory grows with T × N.
    growth = mem[448]["online"] - mem[28]["online"]
    input_growth = B * (448 - 28) * N_IN * 4 / 2**20
    out = {
        "bptt step <= 1.2x the minimal JAX loop": (f"{r['bptt_over_minimal']:.2f}x", r["bptt_over_minimal"] <= 1.2),
        "online e-prop/MDGL/random e-prop <= 3x offline": (
            ", ".join(f"{k} {r[f'{k}_online_over_offline']:.2f}" for k in ("eprop", "eprop_random", "mdgl")),
            all(r[f"{k}_online_over_offline"] <= 3 for k in ("eprop", "eprop_random", "mdgl"))),
        "online memory flat in T but for the input (T = 28 -> 448)": (
            f"online +{growth:.1f} MiB (the input array: +{input_growth:.1f} MiB), offline "
            f"+{mem[448]['offline'] - mem[28]['offline']:.1f} MiB", growth <= 2 * input_growth),
        f"HVP <= {2 if gpu else 2.5} gradients": (f"{r['hvp_over_gradient']:.2f}",
                                                  r["hvp_over_gradient"] <= (2 if gpu else 2.5)),
    }
    if "torch_eager_over_creditscape_bptt" in r:
        rounds = r["torch"]["over_against"]
        out["bptt step at least as fast as PyTorch eager (issue 15)"] = (
            f"PyTorch / creditscape {r['torch_eager_over_creditscape_bptt']:.2f} (per round "
            f"{min(rounds):.2f}–{max(rounds):.2f})", r["torch_eager_over_creditscape_bptt"] >= 1.0)
    steps128 = r["seed_steps_per_second"].get(128)
    out[">= 25k seed-steps/s at 128 seeds (GPU)"] = (f"{steps128:.0f}" if steps128 else "not measured",
                                                     steps128 >= 25000 if gpu and steps128 else None)
    if "quick_preset_seconds" in r:
        out["`quick` preset < 5 min (2 CPU cores)"] = (f"{r['quick_preset_seconds']:.0f} s",
                                                     r["quick_preset_seconds"] < 300 if not gpu else None)
    return out


def main():
    one_host_device_per_core()  # (before JAX starts its backend; one-device programs run on the first)
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer repeats and seeds (smoke test)")
    parser.add_argument("--json", help="write results here")
    args = parser.parse_args()
    repeats = 2 if args.quick else 5
    train = data()
    results = {"device": str(jax.devices()[0]), "shape": dict(N=N, T=T, B=B), "chunk": CHUNK}

    bptt_chunk = creditscape_chunk(get_rule("bptt"), None, train)
    ceiling, bptt, ratio = paired(minimal_jax_chunk(train), bptt_chunk, rounds=3 if args.quick else 7)
    ceiling, bptt = ceiling / CHUNK, bptt / CHUNK
    results["minimal_jax_ms_per_step"] = 1e3 * ceiling
    results["bptt_ms_per_step"] = 1e3 * bptt
    results["bptt_over_minimal"] = ratio
    print(f"device {results['device']}; N={N} T={T} B={B}")
    print(f"minimal JAX BPTT {1e3 * ceiling:.2f} ms/step; creditscape bptt {1e3 * bptt:.2f} ms/step "
          f"(ratio {ratio:.2f}, target <= 1.2)")
    # The same comparison for a network read out at every step (readout_steps=None), the
    # cognitive tasks' setting; the readouts of 28 steps cost both programs alike.
    every_min, every_cs, every_ratio = paired(minimal_jax_chunk(train, every_step=True),
                                              creditscape_chunk(get_rule("bptt"), None, train, readout_steps=None),
                                              rounds=3 if args.quick else 5)
    results["every_step_readout"] = {"minimal_ms_per_step": 1e3 * every_min / CHUNK,
                                     "bptt_ms_per_step": 1e3 * every_cs / CHUNK, "bptt_over_minimal": every_ratio}
    print(f"  with a readout at every step: minimal {1e3 * every_min / CHUNK:.2f} ms/step, creditscape "
          f"{1e3 * every_cs / CHUNK:.2f} ms/step (ratio {every_ratio:.2f})")
    # What `creditscape run` does with one seed: on a CPU split into one host device per core (set
    # up at the start, as the command does), the minibatch is split over the cores. PyTorch uses as
    # many threads, so this is the comparison a user makes.
    cores = len(jax.local_devices())
    run_chunk = bptt_chunk
    if cores > 1:
        run_chunk = creditscape_chunk(get_rule("bptt"), None, train, devices=cores)
        split, _, speedup = paired(run_chunk, bptt_chunk, rounds=3 if args.quick else 5)
        results["bptt_batch_split"] = {"devices": cores, "ms_per_step": 1e3 * split / CHUNK,
                                       "one_device_over_split": speedup}
        print(f"creditscape bptt, one seed's minibatch split over {cores} devices: {1e3 * split / CHUNK:.2f} ms/step, "
              f"{speedup:.2f}x faster than on one device")
    eager = torch_eager(train, repeats, against=run_chunk, rounds=3 if args.quick else 7)
    if eager is None:
        print("PyTorch eager baseline skipped: torch is not installed (pip install -e '.[bench]').")
    else:
        results["torch"] = eager
        results["torch_eager_ms_per_step"] = 1e3 * eager["step"]
        per_round = eager["over_against"]
        results["torch_eager_over_creditscape_bptt"] = statistics.median(per_round)
        print(f"PyTorch {eager['version']} eager BPTT on {eager['device']} {1e3 * eager['step']:.2f} ms/step "
              f"= {statistics.median(per_round):.2f} x creditscape bptt on {cores} device(s) (median of "
              f"{len(per_round)} rounds in alternation; {min(per_round):.2f}–{max(per_round):.2f}); "
              f"{eager['step'] / bptt:.2f} x creditscape on one device")

    rules = {}
    for name, form in [("tbptt", "offline"), ("eprop", "offline"), ("eprop", "online"), ("eprop_random", "offline"),
                       ("eprop_random", "online"), ("mdgl", "offline"), ("mdgl", "online")]:
        # The benchmark network has one cell type: MDGL is timed with its cell-type W̄ allowed there
        # (the cost is that of any W̄).
        opts = {"tbptt": {"k": 5}, "mdgl": {"allow_single_type": True}}.get(name, {})
        t = timed(creditscape_chunk(get_rule(name, **opts), form, train), repeats=repeats) / CHUNK
        rules[f"{name} ({form})"] = t / bptt
        vs_torch = f", {t / eager['step']:5.2f} x PyTorch eager" if eager else ""
        print(f"  {name:13s} {form:8s} {1e3 * t:7.2f} ms/step  = {t / bptt:5.2f} x bptt, {t / ceiling:5.2f} x minimal JAX"
              f"{vs_torch}")
    results["rule_over_bptt"] = rules
    # The forward-sensitivity rules carry B × N × P numbers (P ≈ N²): timed on a small network,
    # relative to bptt on the same network.
    small_bptt = timed(creditscape_chunk(get_rule("bptt"), None, train, n_rec=SMALL_N), repeats=repeats) / CHUNK
    small = {}
    for name, opts, form in [("rtrl", {}, "online"), ("tbptt", {"k": 5}, "online")]:
        t = timed(creditscape_chunk(get_rule(name, **opts), form, train, n_rec=SMALL_N), repeats=1) / CHUNK
        small[f"{name} ({form})"] = t / small_bptt
        print(f"  {name:13s} {form:8s} {1e3 * t:7.2f} ms/step  = {t / small_bptt:5.2f} x bptt at N = {SMALL_N}")
    results[f"rule_over_bptt_n{SMALL_N}"] = small
    for name in ("eprop", "eprop_random", "mdgl"):
        results[f"{name}_online_over_offline"] = rules[f"{name} (online)"] / rules[f"{name} (offline)"]
        print(f"  {name} online / offline = {results[f'{name}_online_over_offline']:.2f} (target <= 3)")

    scaling = {}
    for seeds in ([1, 8] if args.quick else [1, 8, 32, 128]):
        t = timed(creditscape_chunk(get_rule("bptt"), None, train, seeds=seeds), repeats=repeats) / CHUNK
        scaling[seeds] = seeds / t
        print(f"  {seeds:3d} seeds: {seeds / t:9.0f} seed-steps/s")
    results["seed_steps_per_second"] = scaling

    cfg = model_config()
    params, struct = M.init(cfg, jax.random.PRNGKey(0))
    batch = Batch(*(a[:B] for a in train))
    f, x0 = block_loss(cfg, params, struct, batch, "all")
    v = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
    t_grad = timed(jax.jit(jax.grad(f)), x0, repeats=repeats)
    t_hvp = timed(jax.jit(lambda x, u: hvp(f, x, u)), x0, v, repeats=repeats)
    results["hvp_over_gradient"] = t_hvp / t_grad
    print(f"HVP / gradient = {t_hvp / t_grad:.2f} (target <= 2.5 CPU, <= 2 GPU); HVP {1e3 * t_hvp:.2f} ms")
    if eager is not None:
        results["torch_hvp_ms"] = 1e3 * eager["hvp"]
        results["torch_hvp_over_gradient"] = eager["hvp"] / eager["grad"]
        print(f"PyTorch double-backward HVP {1e3 * eager['hvp']:.2f} ms = {eager['hvp'] / t_hvp:.2f} x creditscape's, "
              f"{eager['hvp'] / eager['grad']:.2f} x its own gradient")

    t_lanczos = timed(jax.jit(lambda x, u: lanczos(lambda w: hvp(f, x, w), u, 20, k=5).values), x0, v,
                      repeats=repeats)
    results["lanczos_top5_20_steps_ms"] = 1e3 * t_lanczos
    print(f"Lanczos top-5 (20 HVPs, all parameters) {1e3 * t_lanczos:.1f} ms = {t_lanczos / t_hvp:.1f} HVPs")

    # One measurement checkpoint of an experiment, 8 seeds: losses and accuracies on train, test
    # and one perturbed set (1,024 sequences each), gradient alignment, λ_max (20 Lanczos steps on
    # W_rec) and ρ.
    tcfg = TrainConfig(optimizer="sgd", learning_rate=0.01, batch_size=B, steps=CHUNK, eval_every=CHUNK)
    rule = get_rule("eprop")
    evaluator = make_evaluator(cfg, rule, tcfg, CurvatureProbe(batch, "w_rec", 0.0, 20))
    states, structs = init_ensemble(cfg, rule, tcfg, list(range(8)))
    sets = {name: Batch(*(a[i * 1024:(i + 1) * 1024] for a in train)) for i, name in enumerate(("train", "test", "noisy"))}
    v0 = jax.random.normal(jax.random.PRNGKey(2), (8, N * N))
    t_eval = timed(evaluator, states.params, structs, states.rule_state, sets, Batch(*(a[:64] for a in train)), v0,
                   states.opt_state, repeats=repeats)
    results["measurement_checkpoint_ms_8_seeds"] = 1e3 * t_eval
    print(f"one measurement checkpoint, 8 seeds: {1e3 * t_eval:.0f} ms = {t_eval / (8 * bptt):.1f} training steps "
          f"per seed")

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

    if not args.quick:  # the default experiment end to end, as `make run` runs it (install aside)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "creditscape.cli", "run", "--out", tmp, "--quiet"], check=True,
                           stdout=subprocess.DEVNULL)
            results["quick_preset_seconds"] = time.perf_counter() - start
        print(f"`quick` preset end to end: {results['quick_preset_seconds']:.0f} s")

    results["targets"] = targets(results)
    print("\nTargets (issue 6):")
    for name, (value, met) in results["targets"].items():
        print(f"  {'met    ' if met else 'NOT MET' if met is not None else 'n/a    '} {name}: {value}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
