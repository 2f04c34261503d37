"""Experiment configuration: TOML → validated, resolved experiment, before any work starts.

A config has top-level keys ``name``, ``seeds`` (a list, or a count n meaning 0..n-1),
``data_seed``, ``rules`` and ``measure``, and tables ``[task]``, ``[model]`` and ``[train]``::

    name = "my-experiment"
    seeds = 8
    rules = ["bptt", "eprop", {name = "tbptt", k = 3}, {name = "mdgl", form = "online"}]

    [task]
    name = "cue_recall"      # any task of `creditscape tasks`; other keys are its parameters
    n_train = 256            # fixed training set size
    n_test = 512
    noise_levels = [0.2, 0.4]

    [model]                  # ModelConfig fields except n_in, n_out, loss (taken from the task)
    n_rec = 32
    [train]                  # TrainConfig fields
    steps = 600

Every error names the offending key, what was expected, and how to fix it.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from creditscape.model import ModelConfig
from creditscape.rules import Rule, rule_class
from creditscape.tasks import Task, task_class
from creditscape.train import TrainConfig

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A configuration problem, found before any work: the message says what to change."""


@dataclasses.dataclass(frozen=True)
class MeasureConfig:
    """Final measurements. ``curvature_batch``: training sequences used for the Hessian;
    ``lanczos_steps``: Lanczos iterations for λ_max of the exact loss w.r.t. ``curvature_block``."""

    curvature_block: str = "w_rec"
    curvature_batch: int = 256
    lanczos_steps: int = 30
    l2_in_curvature: bool = True


@dataclasses.dataclass(frozen=True)
class RuleSpec:
    rule: Rule
    form: str
    label: str


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A fully resolved experiment."""

    name: str
    seeds: tuple[int, ...]
    data_seed: int
    task: Task
    n_train: int
    n_test: int
    noise_levels: tuple[float, ...]
    model: ModelConfig
    train: TrainConfig
    rules: tuple[RuleSpec, ...]
    measure: MeasureConfig
    raw: dict  # the config as given, with defaults filled in (written to the results folder)


_TOP = {"name", "seeds", "data_seed", "rules", "task", "model", "train", "measure"}
_TASK_KEYS = {"name", "n_train", "n_test", "noise_levels"}


def _unknown(keys, allowed, where: str):
    for key in keys:
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"Unknown key {key!r} in {where}.{hint} Allowed keys: {', '.join(sorted(allowed))}.")


def _type_ok(value, annotation) -> bool:
    """A light check of TOML values against (resolved) dataclass field annotations."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is tuple:
        return isinstance(value, (list, tuple))
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def _build(cls, values: dict, where: str, **fixed):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)  # resolves the modules' postponed (string) annotations
    _unknown(values, set(fields) - set(fixed), where)
    for key, value in values.items():
        if not _type_ok(value, hints[key]):
            raise ConfigError(f"{where}.{key}: expected {fields[key].type}, got {value!r} ({type(value).__name__}).")
        if isinstance(value, list):
            values = {**values, key: tuple(value)}
    required = [f.name for f in fields.values() if f.default is dataclasses.MISSING and f.name not in fixed]
    missing = [name for name in required if name not in values]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {missing}, e.g. `{missing[0]} = ...`.")
    try:
        return cls(**values, **fixed)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"In {where}: {err}") from None


def _rule_spec(entry, default_form: str | None, where: str) -> RuleSpec:
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict) or "name" not in entry:
        raise ConfigError(f"{where}: a rule is a name or a table with a `name` key, got {entry!r}.")
    options = {k: v for k, v in entry.items() if k not in ("name", "form")}
    try:
        cls = rule_class(entry["name"])
        rule = _build(cls, options, f"{where} ({entry['name']})")
        form = rule.check_form(entry.get("form", default_form))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    label = rule.name + "".join(f" {k}={v}" for k, v in options.items())
    if "form" in entry:
        label += f" ({form})"
    return RuleSpec(rule, form, label)


def resolve(raw: dict, *, mnist_dir: str | None = None) -> Experiment:
    """Validate a parsed config and resolve it into an :class:`Experiment`.

    Raises:
        ConfigError: unknown key, wrong type, bad value, unknown task or rule (with the fix).
    """
    _unknown(raw, _TOP, "the config")
    task_raw = dict(raw.get("task", {"name": "cue_recall"}))
    if "name" not in task_raw:
        raise ConfigError("[task] needs a `name` (see `creditscape tasks`).")
    try:
        cls = task_class(task_raw["name"])
    except ValueError as err:
        raise ConfigError(str(err)) from None
    task_params = {k: v for k, v in task_raw.items() if k not in _TASK_KEYS}
    if mnist_dir is not None:
        if "mnist_dir" not in {f.name for f in dataclasses.fields(cls)}:
            raise ConfigError(f"--mnist-dir was given but task {cls.name!r} reads no MNIST files.")
        task_params["mnist_dir"] = mnist_dir
    task = _build(cls, task_params, f"[task] ({cls.name})")
    try:
        task.check()  # e.g. MNIST files present and valid, before anything else
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from None
    n_train, n_test = task_raw.get("n_train", 256), task_raw.get("n_test", 512)
    for key, value in (("n_train", n_train), ("n_test", n_test)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"[task].{key}: expected a positive integer, got {value!r}.")
    noise_levels = task_raw.get("noise_levels", [0.2])
    if not isinstance(noise_levels, list) or not all(_type_ok(v, float) and v >= 0 for v in noise_levels):
        raise ConfigError(f"[task].noise_levels: expected a list of non-negative numbers, got {noise_levels!r}.")

    model = _build(
        ModelConfig, dict(raw.get("model", {})), "[model]", n_in=task.n_in, n_out=task.n_out, loss=task.loss
    )
    train = _build(TrainConfig, dict(raw.get("train", {})), "[train]")
    measure = _build(MeasureConfig, dict(raw.get("measure", {})), "[measure]")

    seeds = raw.get("seeds", 4)
    if isinstance(seeds, int) and not isinstance(seeds, bool) and seeds > 0:
        seeds = list(range(seeds))
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ConfigError(f"seeds: expected a positive count or a list of non-negative integers, got {seeds!r}.")
    data_seed = raw.get("data_seed", 0)
    if not isinstance(data_seed, int) or isinstance(data_seed, bool):
        raise ConfigError(f"data_seed: expected an integer, got {data_seed!r}.")

    rules_raw = raw.get("rules", ["bptt"])
    if not isinstance(rules_raw, list) or not rules_raw:
        raise ConfigError(f"rules: expected a non-empty list of rule names or tables, got {rules_raw!r}.")
    specs = tuple(_rule_spec(e, train.form, f"rules[{i}]") for i, e in enumerate(rules_raw))
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"rules: the same rule appears twice ({labels}); give each a different option or form.")

    name = raw.get("name", "experiment")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"name: expected a non-empty string, got {name!r}.")
    return Experiment(
        name=name, seeds=tuple(seeds), data_seed=data_seed, task=task, n_train=n_train, n_test=n_test,
        noise_levels=tuple(float(v) for v in noise_levels), model=model, train=train, rules=specs,
        measure=measure, raw=raw,
    )


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def load(path: str | Path | None = None, *, preset: str | None = None, mnist_dir: str | None = None) -> Experiment:
    """Load and resolve a config file, or an embedded preset (default ``quick``)."""
    if path is not None and preset is not None:
        raise ConfigError("Give either a config file or a preset, not both.")
    if path is None:
        preset = preset or "quick"
        path = PRESET_DIR / f"{preset}.toml"
        if not path.is_file():
            raise ConfigError(f"Unknown preset {preset!r}. Presets: {', '.join(preset_names())}.")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {str(path)!r} not found.")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err}).") from None
    return resolve(raw, mnist_dir=mnist_dir)


def _jsonable(value: Any):
    if dataclasses.is_dataclass(value):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def resolved_dict(exp: Experiment) -> dict:
    """The resolved experiment as plain data (every default made explicit)."""
    return {
        "name": exp.name,
        "seeds": list(exp.seeds),
        "data_seed": exp.data_seed,
        "task": {"name": exp.task.name, "n_train": exp.n_train, "n_test": exp.n_test,
                 "noise_levels": list(exp.noise_levels), **_jsonable(exp.task)},
        "model": _jsonable(exp.model),
        "train": _jsonable(exp.train),
        "rules": [{"name": s.rule.name, "form": s.form, "label": s.label, **_jsonable(s.rule)} for s in exp.rules],
        "measure": _jsonable(exp.measure),
    }
