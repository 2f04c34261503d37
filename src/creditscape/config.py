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

    [model]                  # ModelConfig fields except n_in, n_out, loss, readout_steps (the task's)
    n_rec = 32
    [train]                  # TrainConfig fields
    steps = 600

    [grid]                   # optional: every combination of these values is run
    "task.name" = ["perceptual_decision", "delayed_match_sample"]
    "model.alpha" = [0.0, 0.9]
    "train.learning_rate" = [0.01, 0.02]   # learning rates share one compiled program

The grid's points other than the learning rate are **cells**; every rule runs in every cell, and
within a cell all seeds × learning rates (the **members**) train in one vmapped program.

A ``[sweep]`` varies one setting at a time from the base setup instead of crossing them::

    [sweep]                  # the base cell, and one cell per value below (each differing from it in one key)
    "model.rec_noise" = [0.05, 0.2]
    "train.weight_noise" = [0.02]

(crossed with the [grid], if there is one: every grid point gets its base and its variants). The
report then compares each variant with its base cell, rule by rule.

Every error names the offending key, what was expected, and how to fix it.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from creditscape import presets
from creditscape.errors import ConfigError
from creditscape.model import ModelConfig
from creditscape.rules import Rule, check_network, rule_class
from creditscape.tasks import Task, task_class
from creditscape.train import TrainConfig

PRESET_DIR = presets.DIRECTORY
preset_names = presets.names


@dataclasses.dataclass(frozen=True)
class MeasureConfig:
    """Measurements. ``curvature_batch``: training sequences used for the Hessian (of the exact
    loss, with the L2 term if ``l2_in_curvature``); ``lanczos_steps``: Lanczos iterations for
    λ_max w.r.t. ``curvature_block`` at every evaluation; ``trace_probes``: HVPs of the final
    Hutch++ trace; ``slice_points``/``slice_radius``: the final filter-normalized loss slices
    (coordinates in [-radius, radius]); ``sharpness_scale``: relative scale of the final random
    weight perturbations (expected loss increase, antithetic pairs); ``save_trajectory``: keep the parameters at every
    evaluation so that ``creditscape curvature`` can measure them later; ``arnoldi_steps``: Arnoldi
    iterations for the leading eigenvalues μ of ηĴ of the final networks (the rule's update map);
    ``lanczos_tol``: stop each evaluation's Lanczos before ``lanczos_steps`` once λ₁ and λ₂ move by at
    most lanczos_tol·|λ₁| in one step (warm starts converge in a few; 0: always ``lanczos_steps``);
    ``history_sequences``: when > 0, losses and accuracies along training are measured on the
    first that many sequences of each set (the final ones always on the whole sets);
    ``generalization_measures``: also measure the final networks by PAC-Bayes flatness (loss
    increase ``pac_bayes_bound``, ``pac_bayes_draws`` draws), relative flatness, the Fisher–Rao
    norm, the spectral-norm product and the distance from initialization
    (:func:`creditscape.generalization_measures.network_measures`, on the curvature batch)."""

    curvature_block: str = "w_rec"
    curvature_batch: int = 256
    lanczos_steps: int = 30
    lanczos_tol: float = 1e-5
    l2_in_curvature: bool = True
    trace_probes: int = 30
    slice_points: int = 21
    slice_radius: float = 1.0
    sharpness_scale: float = 0.05
    save_trajectory: bool = True
    arnoldi_steps: int = 20
    history_sequences: int = 0
    generalization_measures: bool = False
    pac_bayes_bound: float = 0.1
    pac_bayes_draws: int = 32

    def __post_init__(self):
        if self.curvature_block not in ("all", "recurrent", "w_rec"):
            raise ValueError(f"measure.curvature_block: expected all, recurrent or w_rec, got {self.curvature_block!r}.")
        for name in ("curvature_batch", "lanczos_steps", "trace_probes", "slice_points", "slice_radius", "sharpness_scale",
                     "arnoldi_steps", "pac_bayes_bound", "pac_bayes_draws"):
            if not getattr(self, name) > 0:
                raise ValueError(f"measure.{name}: must be > 0, got {getattr(self, name)!r}.")
        if not 0 <= self.lanczos_tol < 1:
            raise ValueError(f"measure.lanczos_tol: must be in [0, 1) (0: always lanczos_steps), got {self.lanczos_tol!r}.")
        if self.history_sequences < 0:
            raise ValueError(f"measure.history_sequences: must be >= 0 (0: the whole sets), got {self.history_sequences!r}.")


@dataclasses.dataclass(frozen=True)
class RuleSpec:
    """A rule as the experiment runs it: its form, its label in results, and its own training
    settings (``train`` overrides of [train], e.g. more iterations for a slower rule)."""

    rule: Rule
    form: str
    label: str
    train: tuple[tuple[str, Any], ...] = ()

    def train_config(self, base: TrainConfig) -> TrainConfig:
        return dataclasses.replace(base, form=self.form, **dict(self.train))


@dataclasses.dataclass(frozen=True)
class Cell:
    """One point of the grid, learning rates aside: a task, its data sizes, a model and a training
    setup. ``values`` are the cell's grid coordinates (dotted key → value, learning rate excluded);
    ``learning_rates`` the base η values that train side by side in each of its programs."""

    index: int
    values: tuple[tuple[str, Any], ...]
    task: Task
    n_train: int
    n_test: int
    noise_levels: tuple[float, ...]
    model: ModelConfig
    train: TrainConfig
    learning_rates: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A fully resolved experiment: every rule runs in every cell, for every seed × learning rate."""

    name: str
    seeds: tuple[int, ...]
    data_seed: int
    cells: tuple[Cell, ...]
    rules: tuple[RuleSpec, ...]
    measure: MeasureConfig
    raw: dict  # the config as given (written to the results folder)

    def members(self, cell: Cell, spec: RuleSpec) -> list[tuple[int, float]]:
        """(seed, learning rate) of each network trained in the program of ``spec`` in ``cell``."""
        lrs = [dict(spec.train)["learning_rate"]] if "learning_rate" in dict(spec.train) else cell.learning_rates
        return [(seed, lr) for lr in lrs for seed in self.seeds]


_TOP = {"name", "seeds", "data_seed", "rules", "task", "model", "train", "measure", "grid", "sweep"}
_GRID_SECTIONS = ("task", "model", "train")
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
    for key in set(values) & set(fixed):
        raise ConfigError(f"{where}.{key} comes from the task (here {fixed[key]!r}) and cannot be set in a config: "
                          "remove it.")
    _unknown(values, set(fields) - set(fixed), where)
    for key, value in values.items():
        if not _type_ok(value, hints[key]):
            raise ConfigError(f"{where}.{key}: expected {fields[key].type}, got {value!r} ({type(value).__name__}).")
        if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
            raise ConfigError(f"{where}.{key}: expected a finite number, got {value!r}.")
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
    options = {k: v for k, v in entry.items() if k not in ("name", "form", "train")}
    train = entry.get("train", {})
    if not isinstance(train, dict):
        raise ConfigError(f"{where}.train: expected a table of [train] settings, e.g. train = {{steps = 16000}}.")
    if "form" in train:
        raise ConfigError(f"{where}.train: set the form as the rule's own `form` key, not in its train table.")
    try:
        cls = rule_class(entry["name"])
        rule = _build(cls, options, f"{where} ({entry['name']})")
        form = rule.check_form(entry.get("form", default_form))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    # The label names what changes the rule's result (not the evaluation cadence).
    label = rule.name + "".join(f" {k}={v}" for k, v in {**options, **train}.items() if k != "eval_every")
    if "form" in entry:
        label += f" ({form})"
    return RuleSpec(rule, form, label, tuple(train.items()))


def _grid(raw: dict, table: str = "grid") -> dict[str, list]:
    """The [grid] (or [sweep]) table, checked: dotted keys of the sections, lists of distinct values."""
    grid = raw.get(table, {})
    if not isinstance(grid, dict):
        raise ConfigError(f"[{table}]: expected a table of `\"section.key\" = [values]`, got {grid!r}.")
    for key, values in grid.items():
        section, _, field = key.partition(".")
        if section not in _GRID_SECTIONS or not field:
            raise ConfigError(f"[{table}] key {key!r}: expected \"task.<key>\", \"model.<key>\" or \"train.<key>\", "
                              'e.g. "model.n_rec" = [16, 32].')
        if field in ("n_train", "n_test", "noise_levels"):
            raise ConfigError(f"[{table}] key {key!r}: data sizes and noise levels cannot vary; set them in [task].")
        if key == "train.form":
            raise ConfigError(f'[{table}] key "train.form": forms belong to rules, e.g. rules = [{{name = "eprop", form = "online"}}].')
        if not isinstance(values, list) or not values or len(set(map(repr, values))) != len(values):
            raise ConfigError(f"[{table}].{key!r}: expected a non-empty list of distinct values, got {values!r}.")
    return grid


def _sweep(raw: dict, grid: dict) -> list[dict]:
    """The variants of a [sweep]: the base (no change), then one {key: value} per value."""
    sweep = _grid(raw, "sweep")
    for key, values in sweep.items():
        if key == "task.name" or key == "train.learning_rate":
            where = "rules' own train tables or [grid]" if key == "train.learning_rate" else "[grid]"
            raise ConfigError(f"[sweep] key {key!r}: it cannot be swept from a base; vary it in {where}.")
        if key in grid:
            raise ConfigError(f"[sweep] key {key!r} is also in [grid]: vary it in one of them.")
        section, _, field = key.partition(".")
        defaults = {f.name: f.default for f in dataclasses.fields({"model": ModelConfig, "train": TrainConfig}[section])} \
            if section != "task" else {}
        base = dict(raw.get(section, {})).get(field, defaults.get(field))
        if base is not None and base in values:
            raise ConfigError(f"[sweep].{key!r}: {base!r} is the base value ([{section}] {field} = {base!r}); "
                              "the base cell runs anyway, list only the other values.")
    return [{}] + [{key: value} for key, values in sweep.items() for value in values]


def _cell(index: int, values: dict, raw: dict, mnist_dir: str | None, learning_rates) -> Cell:
    sections = {name: dict(raw.get(name, {})) for name in _GRID_SECTIONS}
    sections["task"].setdefault("name", "cue_recall")
    for key, value in values.items():
        section, _, field = key.partition(".")
        sections[section][field] = value
    where = "".join(f" {k}={v}" for k, v in values.items())
    where = f" (grid point{where})" if where else ""
    task_raw = sections["task"]
    try:
        cls = task_class(task_raw["name"])
    except ValueError as err:
        raise ConfigError(str(err)) from None
    task_params = {k: v for k, v in task_raw.items() if k not in _TASK_KEYS}
    if mnist_dir is not None and "mnist_dir" in {f.name for f in dataclasses.fields(cls)}:
        task_params["mnist_dir"] = mnist_dir
    task = _build(cls, task_params, f"[task] ({cls.name}){where}")
    try:
        task.check()  # e.g. MNIST files present and valid, before anything else
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from None
    n_train, n_test = task_raw.get("n_train", 256), task_raw.get("n_test", 512)
    for key, value in (("n_train", n_train), ("n_test", n_test)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"[task].{key}: expected a positive integer, got {value!r}.")
    noise_levels = task_raw.get("noise_levels", [0.2])
    if not isinstance(noise_levels, list) or not all(_type_ok(v, float) and 0 <= v < math.inf for v in noise_levels):
        raise ConfigError(f"[task].noise_levels: expected a list of non-negative numbers, got {noise_levels!r}.")
    model = _build(ModelConfig, sections["model"], f"[model]{where}", n_in=task.n_in, n_out=task.n_out,
                   loss=task.loss, readout_steps=task.readout_steps)
    train = _build(TrainConfig, sections["train"], f"[train]{where}")
    lrs = tuple(float(lr) for lr in learning_rates) if learning_rates else (train.learning_rate,)
    for lr in lrs:
        _build(TrainConfig, {**sections["train"], "learning_rate": lr}, "[grid].\"train.learning_rate\"")
    return Cell(index, tuple(values.items()), task, n_train, n_test, tuple(float(v) for v in noise_levels),
                model, train, lrs)


def resolve(raw: dict, *, mnist_dir: str | None = None) -> Experiment:
    """Validate a parsed config and resolve it into an :class:`Experiment`.

    Raises:
        ConfigError: unknown key, wrong type, bad value, unknown task or rule (with the fix).
    """
    _unknown(raw, _TOP, "the config")
    if mnist_dir is not None and not str(mnist_dir).strip():
        raise ConfigError("--mnist-dir is empty: give the folder that holds the MNIST files.")
    if "task" in raw and "name" not in raw["task"] and "task.name" not in raw.get("grid", {}):
        raise ConfigError("[task] needs a `name` (see `creditscape tasks`).")
    grid = _grid(raw)
    variants = _sweep(raw, grid)
    learning_rates = grid.get("train.learning_rate")
    axes = {k: v for k, v in grid.items() if k != "train.learning_rate"}
    if mnist_dir is not None:
        names = grid.get("task.name", [dict(raw.get("task", {})).get("name", "cue_recall")])
        try:
            reads = [any(f.name == "mnist_dir" for f in dataclasses.fields(task_class(n))) for n in names]
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if not any(reads):
            raise ConfigError("--mnist-dir was given but no task of this experiment reads MNIST files.")
    points = [{**dict(zip(axes, point)), **variant}
              for point in itertools.product(*axes.values()) for variant in variants]
    cells = tuple(_cell(i, values, raw, mnist_dir, learning_rates) for i, values in enumerate(points))
    measure = _build(MeasureConfig, dict(raw.get("measure", {})), "[measure]")
    for cell in cells:  # sizes that name sequences which do not exist
        for key, size in (("[measure].curvature_batch", measure.curvature_batch),
                          ("[train].batch_size", cell.train.batch_size)):
            if size > cell.n_train:
                raise ConfigError(f"{key} = {size} is larger than the training set ([task].n_train = {cell.n_train}): "
                                  f"lower it, or raise n_train.")

    seeds = raw.get("seeds", 4)
    if isinstance(seeds, int) and not isinstance(seeds, bool) and seeds > 0:
        seeds = list(range(seeds))
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ConfigError(f"seeds: expected a positive count or a list of non-negative integers, got {seeds!r}.")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds: each seed once, got {seeds!r}.")
    data_seed = raw.get("data_seed", 0)
    if not isinstance(data_seed, int) or isinstance(data_seed, bool):
        raise ConfigError(f"data_seed: expected an integer, got {data_seed!r}.")

    rules_raw = raw.get("rules", ["bptt"])
    if not isinstance(rules_raw, list) or not rules_raw:
        raise ConfigError(f"rules: expected a non-empty list of rule names or tables, got {rules_raw!r}.")
    specs = tuple(_rule_spec(e, cells[0].train.form, f"rules[{i}]") for i, e in enumerate(rules_raw))
    for i, spec in enumerate(specs):
        if spec.train and "train.learning_rate" in grid and "learning_rate" in dict(spec.train):
            raise ConfigError(f"rules[{i}]: a learning rate is set both for the rule and in [grid]; keep one.")
        for cell in cells:  # every rule's own settings must make a valid [train] in every cell
            _build(TrainConfig, {**_jsonable(cell.train), **dict(spec.train)}, f"rules[{i}].train")
            try:
                check_network(spec.rule, cell.model)
            except ValueError as err:
                where = "".join(f" {k}={v}" for k, v in cell.values)
                raise ConfigError(f"rules[{i}] ({spec.label}){' at grid point' + where if where else ''}: {err}") from None
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"rules: the same rule appears twice ({labels}); give each a different option or form.")

    name = raw.get("name", "experiment")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ConfigError(f"name: expected a plain name (letters, digits, '.', '_', '-'; no path separators), "
                          f"got {name!r}. It names the default results folder results/<name>.")
    return Experiment(name=name, seeds=tuple(seeds), data_seed=data_seed, cells=cells, rules=specs,
                      measure=measure, raw=raw)


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
        "cells": [
            {
                "values": dict(c.values),
                "task": {"name": c.task.name, "n_train": c.n_train, "n_test": c.n_test,
                         "noise_levels": list(c.noise_levels), **_jsonable(c.task)},
                "model": _jsonable(c.model),
                "train": _jsonable(c.train),
                "learning_rates": list(c.learning_rates),
            }
            for c in exp.cells
        ],
        "rules": [{"name": s.rule.name, "form": s.form, "label": s.label, "train": dict(s.train), **_jsonable(s.rule)}
                  for s in exp.rules],
        "measure": _jsonable(exp.measure),
    }
