"""Pattern generation (Murray 2019 RFLO), as a cued family of target waveforms."""

from __future__ import annotations

import dataclasses

import numpy as np

from creditscape.objective import Batch
from creditscape.tasks._base import Task, register_task


@register_task
@dataclasses.dataclass(frozen=True)
class PatternGeneration(Task):
    """Produce a periodic waveform whose phase is given by a brief cue.

    Target (Murray 2019): y*(t) = sin(2π t/P + φ) + 0.5 sin(4π t/P + 2φ) + 0.25 sin(8π t/P + 4φ),
    scored (MSE) on every step after the cue. The phase φ is drawn uniformly from
    [0, ``train_phase_span``·2π) and announced by the input (cos φ, sin φ) for the first
    ``cue_steps`` steps; inputs are 0 afterwards. Phases outside the training span are held out
    (shift "held-out phases"), making a family with unseen members. Inputs 2, output 1.
    """

    name = "pattern_generation"
    summary = "Generate a sum-of-sines waveform with a cued phase (Murray 2019 RFLO), MSE every step"
    loss = "mse"
    n_steps: int = 100
    period: float = 100.0
    cue_steps: int = 5
    train_phase_span: float = 0.75
    amplitude: float = 1.0

    def __post_init__(self):
        if not 0 < self.cue_steps < self.n_steps:
            raise ValueError(f"{self.name}: need 0 < cue_steps < n_steps, got {self.cue_steps}, {self.n_steps}.")
        if not 0 < self.train_phase_span <= 1:
            raise ValueError(f"{self.name}: train_phase_span must be in (0, 1], got {self.train_phase_span}.")

    @property
    def n_in(self):
        return 2

    @property
    def n_out(self):
        return 1

    @property
    def readout_steps(self):
        return self.n_steps - self.cue_steps

    def _trials(self, phase):
        n = phase.shape[0]
        t = np.arange(1, self.n_steps + 1)[None, :]
        w = 2 * np.pi * t / self.period
        ph = phase[:, None]
        y = self.amplitude * (np.sin(w + ph) + 0.5 * np.sin(2 * w + 2 * ph) + 0.25 * np.sin(4 * w + 4 * ph))
        x = np.zeros((n, self.n_steps, 2), np.float32)
        x[:, : self.cue_steps, 0] = np.cos(phase)[:, None]
        x[:, : self.cue_steps, 1] = np.sin(phase)[:, None]
        mask = np.zeros((n, self.n_steps), np.float32)
        mask[:, self.cue_steps :] = 1.0
        return Batch(x, y[..., None].astype(np.float32), mask)

    def generate(self, n, rng, *, split):
        return self._trials(rng.uniform(0, 2 * np.pi * self.train_phase_span, size=n))

    def shifts(self):
        return {"held-out phases": _HeldOutPhases(**dataclasses.asdict(self))}


@dataclasses.dataclass(frozen=True)
class _HeldOutPhases(PatternGeneration):
    """Phases from the part of the circle never seen in training."""

    def generate(self, n, rng, *, split):
        return self._trials(rng.uniform(2 * np.pi * self.train_phase_span, 2 * np.pi, size=n))

    def shifts(self):
        return {}
