"""The GPU figures of docs/performance.md in one prepared run, stage by stage within a time budget.

    python benchmarks/gpu.py --mnist-dir DIR [--out DIR] [--budget SECONDS] [--stages a,b,...]

Meant for a CUDA machine lent for a few minutes (it runs anywhere JAX runs and records the
device). Each stage writes its figures into OUT/gpu.json as soon as it ends, so a run stopped
at its limit keeps what it measured; a stage that fails records its error and the next one runs.
Stages, in order of what matters most:

- ``scaling``: creditscape's BPTT training step at the sequential-MNIST shape (N = 128, T = 28,
  batch 256, SGD; benchmarks/bench.py's) in seed-steps per second at 1–512 seeds, with float32
  products in full precision (``train.matmul_precision = "highest"``, the default) and in TF32;
  the minimal JAX loop and PyTorch's eager loop at one seed beside it;
- ``hvp``: Hessian-vector product over gradient (all parameters, batch 256);
- ``preset``: the `paper-smnist` preset end to end (2 rules × 5 seeds, 10,000 / 16,000
  iterations, 40 curvature points, the final passes over 75,000 images, the report), wall clock,
  and each finished unit's training, evaluation and final-measurement seconds;
- ``compile``: benchmarks/compile_times.py on `paper-smnist`'s BPTT unit, shortened to 20
  iterations: each program's XLA compile seconds with GEMM autotuning on and off
  (``--xla_gpu_autotune_level=0``), and the unit's final-measurement seconds both ways;
- ``precision``: benchmarks/matmul_precision.py — every rule's float32 gradient under each
  precision against float64;
- ``tests``: the float64 rule, curvature and spiking tests (``make test``'s part) on this device;
- ``rules``: every rule's step relative to BPTT's at one seed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import jax  # noqa: E402

import bench  # noqa: E402  (benchmarks/bench.py: the shapes, timers and the baselines)
from compile_times import unit_times  # noqa: E402
from creditscape.rules import get_rule  # noqa: E402

STAGES = ("scaling", "hvp", "preset", "compile", "precision", "tests", "rules")
# One BPTT training step of one seed at the sequential-MNIST shape: the forward pass is
# 2·(N² + N·n_in) per step and sequence, the backward pass twice that.
FLOP_PER_SEED_STEP = 3 * 2 * (bench.N ** 2 + bench.N * bench.N_IN) * bench.T * bench.B


def seed_steps_per_second(train, seeds: int, precision: str) -> float:
    chunk = bench.creditscape_chunk(get_rule("bptt"), None, train, seeds=seeds, matmul_precision=precision)
    return seeds * bench.CHUNK / bench.timed(chunk, repeats=5)


def scaling(train, seeds: list[int]) -> dict:
    out = {"flop_per_seed_step": FLOP_PER_SEED_STEP, "seed_steps_per_second": {}}
    for precision, counts in (("highest", seeds), ("tensorfloat32", seeds[-2:])):
        row = out["seed_steps_per_second"][precision] = {}
        for n in counts:
            row[n] = seed_steps_per_second(train, n, precision)
            print(f"  bptt, {precision:13s} {n:4d} seeds: {row[n]:9.0f} seed-steps/s "
                  f"({row[n] * FLOP_PER_SEED_STEP / 1e12:.1f} TFLOP/s)", flush=True)
    with jax.default_matmul_precision("highest"):
        ceiling, one, ratio = bench.paired(bench.minimal_jax_chunk(train),
                                           bench.creditscape_chunk(get_rule("bptt"), None, train), rounds=3)
    out["one_seed"] = {"minimal_jax_ms_per_step": 1e3 * ceiling / bench.CHUNK,
                       "bptt_ms_per_step": 1e3 * one / bench.CHUNK, "bptt_over_minimal": ratio}
    print(f"  one seed: minimal JAX {1e3 * ceiling / bench.CHUNK:.3f} ms/step, creditscape "
          f"{1e3 * one / bench.CHUNK:.3f} ms/step (ratio {ratio:.2f})", flush=True)
    eager = bench.torch_eager(train, repeats=5)
    if eager is not None:
        out["torch_eager"] = eager
        out["torch_eager_over_creditscape_bptt"] = eager["step"] / (one / bench.CHUNK)
        print(f"  PyTorch {eager['version']} eager on {eager['device']}: {1e3 * eager['step']:.3f} ms/step "
              f"= {out['torch_eager_over_creditscape_bptt']:.2f} x creditscape", flush=True)
    return out


def hvp_over_gradient(train) -> dict:
    from creditscape import model as M
    from creditscape.curvature import block_loss, hvp
    from creditscape.objective import Batch

    cfg = bench.model_config()
    params, struct = M.init(cfg, jax.random.PRNGKey(0))
    f, x0 = block_loss(cfg, params, struct, Batch(*(a[:bench.B] for a in train)), "all")
    v = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
    out = {}
    for precision in ("highest", "tensorfloat32"):
        with jax.default_matmul_precision(precision):
            t_grad = bench.timed(jax.jit(jax.grad(f)), x0, repeats=20)
            t_hvp = bench.timed(jax.jit(lambda x, u: hvp(f, x, u)), x0, v, repeats=20)
        out[precision] = {"gradient_ms": 1e3 * t_grad, "hvp_ms": 1e3 * t_hvp, "hvp_over_gradient": t_hvp / t_grad}
        print(f"  {precision:8s}: gradient {1e3 * t_grad:.3f} ms, HVP {1e3 * t_hvp:.3f} ms, "
              f"ratio {t_hvp / t_grad:.2f} (target <= 2)", flush=True)
    return out


def preset(name: str, mnist_dir: str | None, out_dir: Path, timeout: float) -> dict:
    run_dir = Path(tempfile.mkdtemp()) / name
    cmd = [sys.executable, "-m", "creditscape.cli", "run", "--preset", name, "--out", str(run_dir)]
    if mnist_dir:
        cmd += ["--mnist-dir", mnist_dir]
    start = time.perf_counter()
    with open(out_dir / f"{name}.log", "w") as log:
        try:
            done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
            returncode = done.returncode
        except subprocess.TimeoutExpired:
            returncode = "stopped at the stage's time limit"
    out = {"seconds": time.perf_counter() - start, "returncode": returncode, "timeout": timeout,
           "units": unit_times(run_dir)}
    for file in ("report.md", "environment.json"):
        if (run_dir / file).exists():
            out[file] = (run_dir / file).read_text()
    print(f"  {name} end to end: {out['seconds']:.0f} s (returncode {returncode})", flush=True)
    return out


def compile_times(mnist_dir: str, timeout: float) -> dict:
    """benchmarks/compile_times.py on `paper-smnist`'s BPTT unit (20 iterations, the full run's
    programs) with XLA's GEMM autotuning on (the default) and off: how much of compiling is
    autotuning, program by program, and what turning it off costs the final measurements' run."""
    out = {}
    for label, flag in (("autotuned", ""), ("autotune_off", "--xla_gpu_autotune_level=0")):
        env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip())
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, str(HERE / "compile_times.py"), "--preset", "paper-smnist", "--rules", "bptt",
                   "--mnist-dir", mnist_dir, "--json", f"{tmp}/times.json"]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout / 2)
            except subprocess.TimeoutExpired:
                out[label] = "stopped at the stage's time limit"
                continue
            print(done.stdout[-1500:], done.stderr[-2000:] if done.returncode else "", flush=True)
            out[label] = json.loads(Path(f"{tmp}/times.json").read_text()) if done.returncode == 0 else {
                "returncode": done.returncode, "stderr": done.stderr[-3000:]}
    return out


def precision_accuracy(timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([sys.executable, str(HERE / "matmul_precision.py"), "--json", f"{tmp}/p.json"],
                              capture_output=True, text=True, timeout=timeout)
        print(done.stdout, done.stderr[-2000:] if done.returncode else "", flush=True)
        return json.loads(Path(f"{tmp}/p.json").read_text())


def tests_on_device(out_dir: Path, timeout: float) -> dict:
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")  # several workers share the card
    files = [str(ROOT / "tests" / f) for f in ("test_rules.py", "test_curvature.py", "test_spiking.py")]
    with open(out_dir / "tests.log", "w") as log:
        try:
            done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not heavy",
                                   "-p", "no:benchmark", "-n", "8", *files], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                  timeout=timeout)
            returncode = done.returncode
        except subprocess.TimeoutExpired:
            returncode = "stopped at the stage's time limit"
    tail = (out_dir / "tests.log").read_text().strip().splitlines()[-3:]
    print(f"  tests: {tail}", flush=True)
    return {"returncode": returncode, "tail": tail}


def rule_steps(train) -> dict:
    one = bench.timed(bench.creditscape_chunk(get_rule("bptt"), None, train))
    out = {}
    for name, form in [("tbptt", "offline"), ("eprop", "offline"), ("eprop", "online"), ("eprop_random", "online"),
                       ("mdgl", "offline"), ("mdgl", "online")]:
        opts = {"tbptt": {"k": 5}, "mdgl": {"allow_single_type": True}}.get(name, {})
        out[f"{name} ({form})"] = bench.timed(bench.creditscape_chunk(get_rule(name, **opts), form, train)) / one
        print(f"  {name:13s} {form:8s} {out[f'{name} ({form})']:.2f} x bptt", flush=True)
    return out


def environment() -> dict:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                          "--format=csv,noheader"], capture_output=True, text=True) if _has("nvidia-smi") else None
    return {"jax": jax.__version__, "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "python": platform.python_version(), "nvidia_smi": smi.stdout.strip() if smi else None}


def _has(program: str) -> bool:
    return any((Path(p) / program).exists() for p in os.environ.get("PATH", "").split(os.pathsep))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist-dir", help="MNIST files for the paper-smnist timing")
    parser.add_argument("--out", default="gpu-results", help="folder for gpu.json and the logs")
    parser.add_argument("--budget", type=float, default=480, help="seconds for all stages together")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 8, 32, 128, 512])
    parser.add_argument("--preset", default="paper-smnist", help="the preset timed end to end")
    args = parser.parse_args()
    stages = args.stages.split(",")
    if unknown := set(stages) - set(STAGES):
        parser.error(f"unknown stages {sorted(unknown)}; the stages are {', '.join(STAGES)}")
    if ("preset" in stages and args.preset == "paper-smnist" or "compile" in stages) and not args.mnist_dir:
        parser.error("--mnist-dir is needed for the paper-smnist timings (or leave out the preset and compile stages)")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.perf_counter() + args.budget
    left = lambda reserve=0.0: max(deadline - time.perf_counter() - reserve, 1.0)  # noqa: E731

    train = bench.data()
    results = {"environment": environment()}
    print(json.dumps(results["environment"]), flush=True)
    work = {"scaling": lambda: scaling(train, args.seeds), "hvp": lambda: hvp_over_gradient(train),
            # the stages after the preset keep about a third of what is left
            "preset": lambda: preset(args.preset, args.mnist_dir, out_dir, left() * 0.65),
            "compile": lambda: compile_times(args.mnist_dir, left() * 0.65),
            "precision": lambda: precision_accuracy(min(left(), 150)), "tests": lambda: tests_on_device(out_dir, left(30)),
            "rules": lambda: rule_steps(train)}
    for stage in stages:
        if left() <= 1.0:
            results[stage] = "not run: the budget was spent"
            continue
        print(f"[{stage}] ({left():.0f} s left)", flush=True)
        start = time.perf_counter()
        try:
            results[stage] = work[stage]()
        except Exception:  # record and go on: the other stages' figures still count
            results[stage] = {"error": traceback.format_exc()}
            print(results[stage]["error"], flush=True)
        results.setdefault("stage_seconds", {})[stage] = time.perf_counter() - start
        (out_dir / "gpu.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"Written: {out_dir / 'gpu.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
