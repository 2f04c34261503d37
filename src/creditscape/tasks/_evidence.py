"""Evidence accumulation (Bellec et al. 2020 e-prop; Liu et al. 2021 MDGL)."""

from __future__ import annotations

import dataclasses

import numpy as np

from creditscape.objective import Batch
from creditscape.tasks._base import Task, empty_trials, register_task


@register_task
@dataclasses.dataclass(frozen=True)
class EvidenceAccumulation(Task):
    """Count left and right cues, hold the answer through a delay, report the majority side.

    40 inputs in 4 groups of ``group_size``: left cues, right cues, recall cue, background. Each of
    ``n_cues`` cues lasts ``cue`` ms after ``silence`` ms; the cued group fires at ``cue_rate`` Hz.
    Each trial picks a dominant side; every cue goes to it with probability ``p_dominant``. A
    delay follows, then the recall cue for the last ``recall`` ms. Background fires at
    ``background_rate`` Hz throughout. Inputs are Bernoulli spikes with probability rate·dt
    (``spikes=True``) or the rates themselves, rate·dt. Label: the side with more cues (0 left,
    1 right; ``n_cues`` odd avoids ties), scored on every recall step (e-prop's loss; set
    ``score_last_only`` for MDGL's last-step loss). Defaults: e-prop timing (2250 ms) at dt = 10 ms.
    """

    name = "evidence_accumulation"
    summary = "Count left/right cue spikes, remember through a delay, report the majority (e-prop, MDGL)"
    dt: float = 10.0
    n_cues: int = 7
    cue: float = 100.0
    silence: float = 50.0
    delay: float = 1050.0
    recall: float = 150.0
    group_size: int = 10
    cue_rate: float = 40.0
    background_rate: float = 10.0
    p_dominant: float = 0.7
    spikes: bool = True
    score_last_only: bool = False

    def __post_init__(self):
        if self.n_cues < 1 or self.n_cues % 2 == 0:
            raise ValueError(f"{self.name}: n_cues must be a positive odd number (no ties), got {self.n_cues}.")
        if self.dt <= 0 or self.recall <= 0:
            raise ValueError(f"{self.name}: dt and recall must be > 0.")

    @property
    def n_in(self):
        return 4 * self.group_size

    @property
    def n_out(self):
        return 2

    @property
    def readout_steps(self):
        return 1 if self.score_last_only else int(round(self.recall / self.dt))

    def generate(self, n, rng, *, split):
        st = lambda ms: int(round(ms / self.dt))
        cue, sil, delay, rec = st(self.cue), st(self.silence), st(self.delay), st(self.recall)
        n_steps = self.n_cues * (cue + sil) + delay + rec
        g = self.group_size
        x, target, mask = empty_trials(n, n_steps, self.n_in)
        rate = np.zeros((n, n_steps, self.n_in))
        rate[:, :, 3 * g :] = self.background_rate
        dominant = rng.integers(2, size=n)
        to_dominant = rng.random((n, self.n_cues)) < self.p_dominant
        side = np.where(to_dominant, dominant[:, None], 1 - dominant[:, None])
        for k in range(self.n_cues):
            t0 = k * (cue + sil) + sil
            for s in (0, 1):
                rate[side[:, k] == s, t0 : t0 + cue, s * g : (s + 1) * g] = self.cue_rate
        rate[:, n_steps - rec :, 2 * g : 3 * g] = self.cue_rate
        p = rate * self.dt / 1000.0
        x[:] = (rng.random(p.shape) < p) if self.spikes else p
        label = (side.sum(axis=1) > self.n_cues // 2).astype(np.int32)
        target[:] = label[:, None]
        if self.score_last_only:
            mask[:, -1] = 1.0
        else:
            mask[:, n_steps - rec :] = 1.0
        return Batch(x, target, mask)

    def shifts(self):
        return {
            "long delay": dataclasses.replace(self, delay=2 * self.delay),
            "high background": dataclasses.replace(self, background_rate=2 * self.background_rate),
            "more cues": dataclasses.replace(self, n_cues=self.n_cues + 4),
        }
