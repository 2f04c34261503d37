"""Where a run's first minutes go: the XLA compile time of each program an experiment compiles.

    python benchmarks/compile_times.py [--preset paper-smnist] [--mnist-dir DIR] [--rules bptt ...]
                                       [--steps 20] [--json FILE]

Runs the first cell of ``--preset`` with only ``--rules`` (default: all of the preset's), each for
``--steps`` iterations (evaluated at 0, steps/2 and the end), in this process with an empty
compilation cache, and prints for each program JAX compiled the seconds XLA took (JAX's own
compile log) beside the run's wall time. The shapes are the preset's: the programs are those of
the full run, only fewer iterations run. On a GPU, XLA autotunes the matrix products of each
program while compiling; ``benchmarks/gpu.py``'s ``compile`` stage runs this script with the
autotuning on (XLA's default) and off (``XLA_FLAGS=--xla_gpu_autotune_level=0``), to tell how
much of the compiling of programs that run once (the final measurements) is autotuning.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import re
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import jax

from creditscape import presets
from creditscape._files import load_arrays
from creditscape.config import PRESET_DIR, resolve
from creditscape.errors import ConfigError
from creditscape.experiment import run_experiment

_COMPILED = re.compile(r"Finished XLA compilation of (.*) in ([0-9.]+) sec")


class _CompileLog(logging.Handler):
    """Collects JAX's "Finished XLA compilation of <program> in <s> sec" debug messages."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.seconds = collections.defaultdict(list)

    def emit(self, record):
        if m := _COMPILED.match(record.getMessage()):
            self.seconds[m.group(1)].append(float(m.group(2)))


def shortened(preset: str, rules: list[str] | None, steps: int) -> dict:
    """The preset's configuration with its first grid/sweep cell, ``rules`` only, ``steps`` iterations."""
    path = PRESET_DIR / f"{preset}.toml"
    if not path.is_file():
        raise SystemExit(f"no preset {preset!r}; the presets are {', '.join(presets.names())}")
    raw = tomllib.loads(path.read_text())
    for table in ("grid", "sweep"):
        raw.pop(table, None)
    chosen = []
    for rule in raw["rules"]:
        name = rule if isinstance(rule, str) else rule["name"]
        if rules is None or name in rules:
            if isinstance(rule, dict):  # its own iteration counts go: every rule runs ``steps``
                rule = {**rule, "train": {k: v for k, v in rule.get("train", {}).items()
                                          if k not in ("steps", "eval_every")}}
            chosen.append(rule)
    if not chosen:
        raise SystemExit(f"none of the rules {rules} is in the preset {preset!r}")
    raw["rules"] = chosen
    raw["train"] = {**raw.get("train", {}), "steps": steps, "eval_every": max(steps // 2, 1)}
    raw["name"] = f"{preset}-compile-times"
    return raw


def unit_times(run_dir: Path) -> dict:
    """Where each finished unit's time went: training (compiling its chunk included), the
    evaluations along training, and the final measurements (the rest of measuring)."""
    out = {}
    for path in sorted((run_dir / "runs").glob("*.npz")):
        if path.name.endswith(".ckpt.npz"):
            continue
        run = load_arrays(path)
        evals = float(run["eval_seconds"].sum())
        out[path.stem] = {"train_seconds": float(run["train_seconds"]), "evaluation_seconds": evals,
                          "final_measurement_seconds": float(run["measure_seconds"]) - evals,
                          "evaluations": int(run["eval_seconds"].shape[0])}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="paper-smnist")
    parser.add_argument("--mnist-dir", help="MNIST files, for presets that read them")
    parser.add_argument("--rules", nargs="+", help="rule names to keep (default: all of the preset's)")
    parser.add_argument("--steps", type=int, default=20, help="training iterations per rule (default 20)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    log = _CompileLog()
    for name in ("jax._src.interpreters.pxla", "jax._src.dispatch"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.DEBUG)
        logger.addHandler(log)
        logger.propagate = False  # (JAX's other debug messages stay silent)
    try:
        exp = resolve(shortened(args.preset, args.rules, args.steps), mnist_dir=args.mnist_dir)
    except ConfigError as err:  # e.g. no MNIST files: the message says where they were looked for
        raise SystemExit(str(err)) from None
    with tempfile.TemporaryDirectory() as tmp:
        # an empty persistent cache: every program is compiled, none loaded from an earlier run
        jax.config.update("jax_compilation_cache_dir", str(Path(tmp) / "jax-cache"))
        start = time.perf_counter()
        run_experiment(exp, Path(tmp) / "run", progress=False)
        wall = time.perf_counter() - start
        units = unit_times(Path(tmp) / "run")
    programs = sorted(((name, sum(s), len(s)) for name, s in log.seconds.items()), key=lambda p: -p[1])
    total = sum(p[1] for p in programs)
    result = {"preset": args.preset, "rules": [s.label for s in exp.rules], "steps": args.steps,
              "backend": jax.default_backend(), "device": str(jax.devices()[0]),
              "xla_flags": os.environ.get("XLA_FLAGS", ""), "wall_seconds": wall, "compile_seconds": total,
              "units": units, "programs": {name: {"seconds": s, "compilations": n} for name, s, n in programs}}
    print(f"{args.preset} ({', '.join(result['rules'])}; {args.steps} iterations) on {result['device']}, "
          f"XLA_FLAGS={result['xla_flags']!r}: {wall:.1f} s wall, {total:.1f} s of it compiling")
    large = [p for p in programs if p[1] >= 0.02 * total]
    for name, s, n in large:
        print(f"  {s:7.2f} s  {n:3d} x  {name}")
    rest = programs[len(large):]
    print(f"  {sum(p[1] for p in rest):7.2f} s  {sum(p[2] for p in rest):3d} x  the {len(rest)} other programs")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
