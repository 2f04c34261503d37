"""The whole benchmark suite plus the `paper-smnist` timing, in one command, into one JSON.

    python benchmarks/gpu.py --mnist-dir DIR [--out gpu-results.json] [--skip-preset]

Meant for a CUDA machine (it runs anywhere JAX runs and records which device it used):
1. ``bench.py`` (every ratio of docs/performance.md, plus 128-seed scaling at the
   sequential-MNIST shape, in seed-steps per second);
2. the `paper-smnist` preset end to end — 2 rules × 5 seeds, full length (10,000 / 16,000
   iterations), λ_max of W_rec at 40 points, final measurements and report — timed by wall clock
   (target: under 5 minutes on one GPU);
3. with ``--tests``, the float64 equivalence tests of the rules and estimators on that device
   (needs pytest there).
The JSON holds the device, the versions and every figure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist-dir", help="MNIST files for the paper-smnist timing")
    parser.add_argument("--out", default="gpu-results.json")
    parser.add_argument("--skip-preset", action="store_true", help="only the benchmark suite")
    parser.add_argument("--skip-bench", action="store_true", help="only the paper-smnist timing")
    parser.add_argument("--tests", action="store_true",
                        help="also run the rule and estimator tests (float64) on this device")
    args = parser.parse_args()
    if not args.skip_preset and not args.mnist_dir:
        parser.error("--mnist-dir is needed for the paper-smnist timing (or pass --skip-preset)")

    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        if not args.skip_bench:
            bench_json = Path(tmp) / "bench.json"
            subprocess.run([sys.executable, str(HERE / "bench.py"), "--json", str(bench_json)], check=True)
            results["bench"] = json.loads(bench_json.read_text())
        if not args.skip_preset:
            out = Path(tmp) / "paper-smnist"
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "creditscape.cli", "run", "--preset", "paper-smnist", "--mnist-dir",
                            args.mnist_dir, "--out", str(out), "--quiet"], check=True)
            results["paper_smnist_seconds"] = time.perf_counter() - start
            results["paper_smnist_environment"] = json.loads((out / "environment.json").read_text())
            results["paper_smnist_report"] = (out / "report.md").read_text()
            print(f"paper-smnist end to end: {results['paper_smnist_seconds']:.0f} s (target < 300 s on one GPU)")
        if args.tests:  # correctness on this device: every rule's equivalences, every estimator
            tests = [str(HERE.parent / "tests" / name) for name in ("test_rules.py", "test_curvature.py")]
            done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                                  capture_output=True, text=True)
            results["tests"] = {"returncode": done.returncode, "summary": done.stdout.strip().splitlines()[-1:]}
            print(f"tests on this device: {results['tests']['summary']}")
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"Written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
