"""A small built-in task that trains in seconds: recall a cue after a delay."""

from __future__ import annotations

import dataclasses

import numpy as np

from creditscape.objective import Batch
from creditscape.tasks._base import Task, empty_trials, register_task


@register_task
@dataclasses.dataclass(frozen=True)
class CueRecall(Task):
    """Remember which of ``n_cues`` channels flashed at step 1, report it after a delay.

    Inputs: ``n_cues`` cue channels (one flashes for ``cue_steps`` steps at the start, with amplitude
    drawn from [0.5, 1.5]), and a go channel that turns on for the final step. Every input carries
    Gaussian noise of standard deviation ``sigma``; the loss is cross-entropy on the last step. The
    delay forces credit to be assigned across ``delay`` steps, so rules that truncate the recurrent
    Jacobian struggle as the delay grows; with a small training set the noise makes a
    generalization gap. Shifts: a delay twice as long, doubled noise.
    """

    name = "cue_recall"
    summary = "Small built-in: report which cue flashed before a delay (trains in seconds; no files)"
    n_cues: int = 2
    cue_steps: int = 2
    delay: int = 8
    sigma: float = 0.3

    def __post_init__(self):
        if self.n_cues < 2 or self.cue_steps < 1 or self.delay < 0 or self.sigma < 0:
            raise ValueError(f"{self.name}: need n_cues >= 2, cue_steps >= 1, delay >= 0, sigma >= 0.")

    @property
    def n_in(self):
        return self.n_cues + 1

    @property
    def n_out(self):
        return self.n_cues

    @property
    def readout_steps(self):
        return 1

    def generate(self, n, rng, *, split):
        n_steps = self.cue_steps + self.delay + 1
        x, target, mask = empty_trials(n, n_steps, self.n_in)
        cue = rng.integers(self.n_cues, size=n)
        amplitude = rng.uniform(0.5, 1.5, size=n)
        x[np.arange(n), : self.cue_steps, cue] = amplitude[:, None]
        x[:, -1, -1] = 1.0
        x += self.sigma * rng.standard_normal(x.shape).astype(np.float32)
        target[:, -1] = cue
        mask[:, -1] = 1.0
        return Batch(x, target, mask)

    def shifts(self):
        return {
            "long delay": dataclasses.replace(self, delay=2 * self.delay),
            "noise x2": dataclasses.replace(self, sigma=2 * self.sigma),
        }
