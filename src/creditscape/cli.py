"""The ``creditscape`` command: ``run``, ``report``, ``curvature``, ``tasks``, ``rules``."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import textwrap
import threading
from pathlib import Path

from creditscape import presets, stopping
from creditscape.errors import ConfigError, FolderInUse, ResultsFolderError, UnitsFailed


DETERMINISTIC_XLA_FLAG = "--xla_gpu_deterministic_ops=true"
LOCAL_RAY = "local"  # `--ray` without an address


def _acknowledge_interrupts() -> None:
    """Say at once that Ctrl-C was received, and request the stop (:mod:`creditscape.stopping`).
    Python acts on the signal only between compiled calls; the signal's byte on a wakeup pipe
    reaches a watcher thread immediately, since a waiting JAX call does not hold the interpreter
    lock."""
    read, write = os.pipe()
    os.set_blocking(write, False)
    signal.set_wakeup_fd(write)

    def watch():
        while True:
            if signal.SIGINT in os.read(read, 16):
                print("\ncreditscape: interrupt received; stopping within about a second of training (an evaluation "
                      "or the final measurements in progress finish first; finished runs and the last checkpoint "
                      "are kept)…", file=sys.stderr, flush=True)
                stopping.requested.set()

    threading.Thread(target=watch, daemon=True, name="interrupt-acknowledger").start()


def _cmd_run(args) -> int:
    if threading.current_thread() is threading.main_thread():
        _acknowledge_interrupts()
    from creditscape.devices import one_host_device_per_core

    # Read by XLA when its backend starts, which has not happened yet.
    one_host_device_per_core()
    if args.deterministic:
        os.environ["XLA_FLAGS"] = f"{os.environ['XLA_FLAGS']} {DETERMINISTIC_XLA_FLAG}"
    _persistent_compilation_cache()
    from creditscape.config import load
    from creditscape.experiment import run_experiment
    from creditscape.report import summary_table, write_report

    exp = load(args.config, preset=args.preset, mnist_dir=args.mnist_dir)
    out = args.out or f"results/{exp.name}"
    final = run_experiment(exp, out, progress=not args.quiet, checkpoint_seconds=args.checkpoint_seconds,
                           devices=args.devices, ray=_ray_cluster(args))
    page = write_report(out)
    table = summary_table(final)
    cols = [c for c in ("task", "condition", "diverged", "train_accuracy", "test_accuracy", "gap_loss", "lambda_max")
            if c in table]
    table["condition"] = table.condition.str.slice(0, 40)
    with_median = table[cols].map(lambda v: v.split(" [")[0] if isinstance(v, str) and " ± " in v else v)
    print(with_median.to_string(index=False))
    print(f"\nReport: {page}\n        {page.with_suffix('.md')}")
    return 0


def _persistent_compilation_cache() -> None:
    """Keep compiled programs on disk (JAX's persistent cache) in ``$JAX_COMPILATION_CACHE_DIR``,
    by default ``~/.cache/creditscape/jax``: a rerun, a resumed run and the cells of a grid that
    compile the same program (e.g. the final measurements of cells that differ only in their
    training noise) then load it instead of compiling it again. JAX keys each entry by the
    program, the versions and the device, so a cached program is the one a compilation would
    give. Processes started from here (Ray workers) inherit the setting."""
    import jax

    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "creditscape" / "jax"
    directory = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(default))
    jax.config.update("jax_compilation_cache_dir", directory)


def _ray_cluster(args):
    """The cluster of ``--ray`` (None without it), checked before any work: Ray installed, and no
    option that only a local run has."""
    if args.ray is None:
        if args.ray_cpus is not None or args.ray_gpus is not None:
            raise ConfigError("--ray-cpus and --ray-gpus set what each unit asks of a Ray cluster: add --ray.")
        return None
    if args.devices is not None:
        raise ConfigError("--devices spreads a local run over this machine's devices; on Ray each unit uses the "
                          "devices it asks for: give --ray-cpus or --ray-gpus instead.")
    from creditscape.distributed import RayCluster, import_ray

    import_ray()
    return RayCluster(address=None if args.ray == LOCAL_RAY else args.ray,
                      cpus=1.0 if args.ray_cpus is None else args.ray_cpus, gpus=args.ray_gpus or 0.0)


def _cmd_report(args) -> int:
    from creditscape.report import write_report

    print(write_report(args.run_dir))
    return 0


def _cmd_curvature(args) -> int:
    from creditscape.experiment import curvature_table_name, measure_saved
    from creditscape.report.document import spread

    table = measure_saved(args.run_dir, block=args.block, steps=args.steps, top=args.top,
                          trace_probes=args.trace_probes, along_training=args.along_training,
                          sequences=args.sequences, mnist_dir=args.mnist_dir)
    last = table[table.step == table.step.max()] if args.along_training else table
    print("median [first quartile, third quartile] over runs" + (", last step" if args.along_training else ""))
    print(last.groupby(["task", "condition"], sort=False)[["eig1", "eig1_residual", "trace"]].agg(spread).to_string())
    print(f"\nWritten: {args.run_dir}/{curvature_table_name(args.along_training)}")
    return 0


def _cmd_tasks(args) -> int:
    from creditscape.tasks import task_class, task_names, task_parameters

    for name in task_names():
        cls = task_class(name)
        print(f"{name}: {cls.summary}")
        params = ", ".join(f"{k}={v!r}" for k, v in task_parameters(cls).items())
        print(textwrap.indent(textwrap.fill(params, 96), "    "))
    return 0


def _cmd_rules(args) -> int:
    from creditscape.rule_catalogue import builtin_rules

    for rule in builtin_rules():
        options = ", ".join(f"{k}={v!r}" for k, v in rule.options.items())
        print(f"{rule.name:13s} {rule.formula}")
        print(f"{'':13s} forms: {', '.join(rule.forms)}" + (f"; options: {options}" if options else ""))
    return 0


def _count(text: str) -> int:
    """An argparse type: a whole number ≥ 0."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def _positive(text: str) -> int:
    """An argparse type: a whole number ≥ 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def _number_at_least_zero(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite {what} >= 0, got {text!r}")
    return value


def _amount(text: str) -> float:
    """An argparse type: a resource amount ≥ 0 (Ray takes fractions)."""
    return _number_at_least_zero(text, "number")


def _seconds(text: str) -> float:
    """An argparse type: a finite number of seconds ≥ 0."""
    return _number_at_least_zero(text, "number of seconds")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="creditscape", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an experiment (default: the embedded `quick` preset) and write its report")
    source = run.add_mutually_exclusive_group()
    source.add_argument("--preset", help=f"embedded experiment: {', '.join(presets.names())}")
    source.add_argument("--config", help="experiment TOML file")
    run.add_argument("--out", help="results folder (default results/<name>); rerunning resumes it")
    run.add_argument("--mnist-dir", help="folder holding the MNIST files (tasks that read MNIST)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--checkpoint-seconds", type=_seconds, default=30.0,
                     help="save the run in flight at most this often (default 30; 0: at every evaluation)")
    run.add_argument("--devices", type=_positive, default=None,
                     help="spread each run's members over at most this many local devices (default: all; on a CPU, "
                          "one host device per core)")
    run.add_argument("--ray", nargs="?", const=LOCAL_RAY, metavar="ADDRESS",
                     help="train each (grid cell, rule) unit as a task on the Ray cluster at ADDRESS ('auto', "
                          "HOST:6379, ray://HOST:10001), or on a local cluster started for the run when no address is "
                          "given (needs the extra: pip install 'creditscape[ray]'; docs/scale.md)")
    run.add_argument("--ray-cpus", type=_amount, default=None, help="CPUs each unit asks for on Ray (default 1)")
    run.add_argument("--ray-gpus", type=_amount, default=None, help="GPUs each unit asks for on Ray (default 0)")
    run.add_argument("--deterministic", action="store_true",
                     help=f"deterministic GPU kernels ({DETERMINISTIC_XLA_FLAG}); CPU runs are deterministic anyway")
    run.set_defaults(func=_cmd_run)
    rep = sub.add_parser("report", help="(re)write the report of a results folder")
    rep.add_argument("run_dir")
    rep.set_defaults(func=_cmd_report)
    cur = sub.add_parser("curvature", help="measure the Hessian of the saved networks of a results folder")
    cur.add_argument("run_dir")
    cur.add_argument("--block", default="w_rec", choices=["all", "recurrent", "w_rec"], help="parameter block (default w_rec)")
    cur.add_argument("--steps", type=int, default=30, help="Lanczos iterations (HVPs) per network (default 30)")
    cur.add_argument("--top", type=int, default=3, help="number of top signed eigenvalues (default 3)")
    cur.add_argument("--trace-probes", type=int, default=30, help="HVPs for the Hutch++ trace (default 30)")
    cur.add_argument("--along-training", action="store_true",
                     help="measure the parameters saved at every evaluation, not only the final ones")
    cur.add_argument("--sequences", type=_count, default=None,
                     help="training sequences the Hessian is taken on (default: the experiment's curvature "
                          "batch; 0: the whole training set, in chunks of the curvature batch)")
    cur.add_argument("--mnist-dir", help="folder holding the MNIST files (tasks that read MNIST)")
    cur.set_defaults(func=_cmd_curvature)
    sub.add_parser("tasks", help="list tasks and their parameters").set_defaults(func=_cmd_tasks)
    sub.add_parser("rules", help="list learning rules with their formulas").set_defaults(func=_cmd_rules)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"creditscape: configuration error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FolderInUse, ResultsFolderError, MemoryError) as err:
        print(f"creditscape: {err}", file=sys.stderr)
        return 2
    except UnitsFailed as err:
        print(f"creditscape: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the output was piped into a command that stopped reading (`| head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        if args.func is _cmd_run:
            # `run`'s watcher thread prints its acknowledgement, then sets `requested`: waiting for it
            # keeps the two lines whole and in order when Python acted on the signal at once (they
            # were seen interleaved on one line).
            stopping.requested.wait(1.0)
            print("\ncreditscape: interrupted. Finished runs and the last checkpoint are saved; rerun the same command "
                  "to resume.", file=sys.stderr)
        else:  # `curvature` writes its table at the end, `report` its files one by one
            print("\ncreditscape: interrupted; rerun the same command to complete it.", file=sys.stderr)
        return 130


def entry() -> None:
    """The ``creditscape`` console script: :func:`main`, then exit with its status. After Ctrl-C
    it leaves without the interpreter's teardown, which can crash (SIGSEGV) while XLA still holds
    the interrupted computation; every results file is already complete on disk (atomic writes)."""
    status = main()
    if status == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    entry()
