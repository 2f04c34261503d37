"""Tasks: seeded generators of fixed, finite, masked data sets, and their perturbations.

A task draws ``n`` trials from a ``numpy.random.Generator`` and returns a :class:`Batch` of numpy
arrays (batch-major: x (n, T, n_in) float32, target (n, T) int32 or (n, T, n_out) float32, mask
(n, T) float32). :func:`make_splits` draws a training set, a disjoint test set and perturbed test
sets from explicit seeds, so a data set is a pure function of (task, sizes, seed).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import ClassVar, NamedTuple

import numpy as np

from creditscape.objective import Batch

_REGISTRY: dict[str, type["Task"]] = {}


@dataclasses.dataclass(frozen=True)
class Task(abc.ABC):
    """Base class: a frozen dataclass of the task's parameters."""

    name: ClassVar[str]
    summary: ClassVar[str]
    loss: ClassVar[str] = "xent"
    # Inputs live in this range (perturbation noise is clipped to it), or None.
    input_range: ClassVar[tuple[float, float] | None] = None

    @property
    @abc.abstractmethod
    def n_in(self) -> int:
        """Inputs per step."""

    @property
    @abc.abstractmethod
    def n_out(self) -> int:
        """Readout size (classes, or regression outputs)."""

    @abc.abstractmethod
    def generate(self, n: int, rng: np.random.Generator, *, split: str) -> Batch:
        """Draw ``n`` trials. ``split`` is "train" or "test" (file-backed tasks pick disjoint
        examples by it; generators ignore it and rely on disjoint seeds)."""

    @property
    def readout_steps(self) -> int | None:
        """K if every trial, of this task and of its shifts, is scored within its last K steps
        only (the network then needs a readout there only, see ``ModelConfig.readout_steps``);
        None if any step may be scored."""
        return None

    def shifts(self) -> dict[str, "Task"]:
        """Task-specific distribution shifts for perturbed test sets (name → shifted task)."""
        return {}

    def check(self) -> None:
        """Fail early (before any training) if the task cannot produce data, e.g. a missing file."""


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make a task available by its ``name``."""
    _REGISTRY[cls.name] = cls
    return cls


def task_names() -> list[str]:
    return list(_REGISTRY)


def task_class(name: str) -> type[Task]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"Unknown task {name!r}. Known tasks: {', '.join(_REGISTRY)} (`creditscape tasks` lists them)."
        ) from None


def get_task(name: str, **params) -> Task:
    """Build the task registered as ``name`` with parameters overriding its defaults."""
    cls = task_class(name)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise ValueError(f"Task {name!r} has no parameter(s) {unknown}; its parameters are {sorted(fields)}.")
    return cls(**params)


def task_parameters(task_or_cls) -> dict:
    """Parameter name → default (class) or value (instance)."""
    if isinstance(task_or_cls, type):
        return {f.name: f.default for f in dataclasses.fields(task_or_cls)}
    return dataclasses.asdict(task_or_cls)


class Splits(NamedTuple):
    """Fixed data sets of one experiment: train, test, and perturbed test sets by name."""

    train: Batch
    test: Batch
    perturbed: dict[str, Batch]


def add_input_noise(batch: Batch, sigma: float, rng: np.random.Generator, clip: tuple[float, float] | None) -> Batch:
    """The same trials with Gaussian noise of standard deviation ``sigma`` on every input."""
    x = batch.x + sigma * rng.standard_normal(batch.x.shape).astype(batch.x.dtype)
    if clip is not None:
        x = np.clip(x, *clip)
    return batch._replace(x=x.astype(np.float32))


def make_splits(
    task: Task, n_train: int, n_test: int, seed: int, noise_levels: tuple[float, ...] = (0.2,)
) -> Splits:
    """Draw train and test sets from independent streams of ``seed``, and perturbed test sets:
    ``noise=σ`` (the test trials plus input noise σ, clipped to the task's input range) for each
    level, and each of ``task.shifts()`` (fresh trials of the shifted task)."""
    task.check()
    train_ss, test_ss, noise_ss, shift_ss = np.random.SeedSequence(seed).spawn(4)
    train = task.generate(n_train, np.random.default_rng(train_ss), split="train")
    test = task.generate(n_test, np.random.default_rng(test_ss), split="test")
    perturbed = {}
    noise_rng = np.random.default_rng(noise_ss)
    for sigma in noise_levels:
        perturbed[f"noise={sigma:g}"] = add_input_noise(test, sigma, noise_rng, task.input_range)
    for (name, shifted), ss in zip(task.shifts().items(), shift_ss.spawn(len(task.shifts()))):
        perturbed[name] = shifted.generate(n_test, np.random.default_rng(ss), split="test")
    return Splits(train, test, perturbed)


def empty_trials(n: int, n_steps: int, n_in: int):
    """Zeroed (x, target, mask) arrays to fill in."""
    return (
        np.zeros((n, n_steps, n_in), np.float32),
        np.zeros((n, n_steps), np.int32),
        np.zeros((n, n_steps), np.float32),
    )
