"""NeuroGym-style cognitive tasks: 2AF, DMS, CxtDM (one trial per sequence, with masks).

Conventions follow NeuroGym 2.x (no dependency on it). Times are in milliseconds; a period of
``p`` ms lasts ``round(p / dt)`` steps. Input 0 is fixation: 1 until the decision period, 0 during
it. Stimuli are cosine bumps on a ring of ``dim_ring`` directions θ_i = 2πi/dim_ring around a
baseline of 0.5. Noise of standard deviation ``sigma / sqrt(dt)`` (dt in ms, as NeuroGym) is added
to the ring inputs at every step of the stimulus periods. Targets are actions per step: 0 = fixate,
1..n = choices; the loss mask covers the decision period (and fixation too with
``score_fixation=True``).

Differences from NeuroGym: one trial per sequence with a mask instead of an endless stream of
trials; CxtDM receives its context as two one-hot inputs (7 inputs) rather than fixing it per
environment; variable-length trials are padded at the end with zero inputs and zero mask.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from creditscape.objective import Batch
from creditscape.tasks._base import Task, empty_trials, register_task


def _steps(ms: float, dt: float) -> int:
    return int(round(ms / dt))


def _ring(dim_ring: int) -> np.ndarray:
    return np.arange(dim_ring) * 2 * np.pi / dim_ring


def _bump(theta_target: np.ndarray, strength: np.ndarray, dim_ring: int) -> np.ndarray:
    """(n, dim_ring): cos(θ_i − θ_target) · strength + 0.5."""
    return np.cos(_ring(dim_ring)[None, :] - theta_target[:, None]) * strength[:, None] + 0.5


def _decide(x, target, mask, n_decision, answer, score_fixation) -> Batch:
    """Targets ``answer`` (n,) and mask 1 on the last ``n_decision`` steps (mask 1 everywhere if
    fixation is scored too; its target is 0 = fixate)."""
    target[:, -n_decision:] = answer[:, None]
    mask[:, -n_decision:] = 1.0
    if score_fixation:
        mask[:] = 1.0
    return Batch(x, target, mask)


def _validate_positive(task, *names):
    for n in names:
        if getattr(task, n) <= 0:
            raise ValueError(f"{task.name}: {n} must be > 0, got {getattr(task, n)!r}.")


@register_task
@dataclasses.dataclass(frozen=True)
class PerceptualDecision(Task):
    """Two-alternative perceptual decision making (NeuroGym PerceptualDecisionMaking-v0, "2AF").

    A noisy ring stimulus points to one of ``dim_ring`` directions with strength coh/200; after the
    stimulus (and delay) the network reports the direction. Inputs 1 + dim_ring, actions 1 + dim_ring.
    """

    name = "perceptual_decision"
    summary = "2AF: report the direction of a noisy ring stimulus (NeuroGym PerceptualDecisionMaking)"
    dt: float = 100.0
    fixation: float = 100.0
    stimulus: float = 2000.0
    delay: float = 0.0
    decision: float = 100.0
    coherences: tuple[float, ...] = (0.0, 6.4, 12.8, 25.6, 51.2)
    sigma: float = 1.0
    dim_ring: int = 2
    score_fixation: bool = False

    def __post_init__(self):
        _validate_positive(self, "dt", "stimulus", "decision", "dim_ring")

    @property
    def n_in(self):
        return 1 + self.dim_ring

    @property
    def n_out(self):
        return 1 + self.dim_ring

    @property
    def readout_steps(self):
        return None if self.score_fixation else _steps(self.decision, self.dt)

    def generate(self, n, rng, *, split):
        fix, stim, delay, dec = (_steps(p, self.dt) for p in (self.fixation, self.stimulus, self.delay, self.decision))
        n_steps = fix + stim + delay + dec
        x, target, mask = empty_trials(n, n_steps, self.n_in)
        choice = rng.integers(self.dim_ring, size=n)
        coh = rng.choice(np.asarray(self.coherences, float), size=n)
        x[:, : n_steps - dec, 0] = 1.0
        bump = _bump(_ring(self.dim_ring)[choice], coh / 200.0, self.dim_ring)
        noise = self.sigma / np.sqrt(self.dt) * rng.standard_normal((n, stim, self.dim_ring))
        x[:, fix : fix + stim, 1:] = bump[:, None, :] + noise
        return _decide(x, target, mask, dec, 1 + choice, self.score_fixation)

    def shifts(self):
        return {
            "noise x2": dataclasses.replace(self, sigma=2 * self.sigma),
            "unseen coherences": dataclasses.replace(self, coherences=(3.2, 9.6, 19.2, 38.4)),
            "long stimulus": dataclasses.replace(self, stimulus=1.5 * self.stimulus),
        }


@register_task
@dataclasses.dataclass(frozen=True)
class DelayedMatchToSample(Task):
    """Delayed match-to-sample (NeuroGym DelayMatchSample-v0, "DMS").

    A sample direction, a delay, a test direction; respond 1 (match) if test == sample, else 2.
    Stimulus strength 0.5 (cos · 0.5 + 0.5); a non-match test is a different ring direction.
    """

    name = "delayed_match_sample"
    summary = "DMS: after a delay, report whether the test direction matches the sample (NeuroGym DelayMatchSample)"
    dt: float = 100.0
    fixation: float = 300.0
    sample: float = 500.0
    delay: float = 1000.0
    test: float = 500.0
    decision: float = 900.0
    sigma: float = 1.0
    dim_ring: int = 2
    score_fixation: bool = False

    def __post_init__(self):
        _validate_positive(self, "dt", "sample", "test", "decision")
        if self.dim_ring < 2:
            raise ValueError(f"{self.name}: dim_ring must be >= 2 for a non-match to exist, got {self.dim_ring}.")

    @property
    def n_in(self):
        return 1 + self.dim_ring

    @property
    def n_out(self):
        return 3

    @property
    def readout_steps(self):
        return None if self.score_fixation else _steps(self.decision, self.dt)

    def generate(self, n, rng, *, split):
        fix, smp, delay, tst, dec = (
            _steps(p, self.dt) for p in (self.fixation, self.sample, self.delay, self.test, self.decision)
        )
        n_steps = fix + smp + delay + tst + dec
        x, target, mask = empty_trials(n, n_steps, self.n_in)
        sample = rng.integers(self.dim_ring, size=n)
        match = rng.random(n) < 0.5
        other = (sample + rng.integers(1, self.dim_ring, size=n)) % self.dim_ring
        test = np.where(match, sample, other)
        ring = _ring(self.dim_ring)
        half = np.full(n, 0.5)
        x[:, : n_steps - dec, 0] = 1.0
        x[:, fix : fix + smp, 1:] = _bump(ring[sample], half, self.dim_ring)[:, None, :]
        t0 = fix + smp + delay
        x[:, t0 : t0 + tst, 1:] = _bump(ring[test], half, self.dim_ring)[:, None, :]
        x[:, : n_steps - dec, 1:] += self.sigma / np.sqrt(self.dt) * rng.standard_normal((n, n_steps - dec, self.dim_ring))
        return _decide(x, target, mask, dec, np.where(match, 1, 2), self.score_fixation)

    def shifts(self):
        return {
            "noise x2": dataclasses.replace(self, sigma=2 * self.sigma),
            "long delay": dataclasses.replace(self, delay=2 * self.delay),
        }


@register_task
@dataclasses.dataclass(frozen=True)
class ContextDecision(Task):
    """Context-dependent decision making (NeuroGym ContextDecisionMaking-v0; Mante et al. 2013).

    Two modalities each show a noisy two-direction ring stimulus with its own direction and
    coherence; a context cue (inputs 5–6, one-hot, present all trial) says which modality to
    report. The delay is a truncated exponential (mean ``delay_mean``, within
    [``delay_min``, ``delay_max``]); trials are padded to the longest possible length.
    Inputs: fixation, modality 1 (2), modality 2 (2), context (2). Actions 3.
    """

    name = "context_decision"
    summary = "CxtDM: report the direction of the cued one of two modalities (NeuroGym ContextDecisionMaking)"
    dt: float = 100.0
    fixation: float = 300.0
    stimulus: float = 750.0
    delay_mean: float = 600.0
    delay_min: float = 300.0
    delay_max: float = 3000.0
    decision: float = 100.0
    coherences: tuple[float, ...] = (5.0, 15.0, 50.0)
    sigma: float = 1.0
    score_fixation: bool = False

    def __post_init__(self):
        _validate_positive(self, "dt", "stimulus", "decision", "delay_mean")
        if not 0 <= self.delay_min <= self.delay_max:
            raise ValueError(f"{self.name}: need 0 <= delay_min <= delay_max, got {self.delay_min}, {self.delay_max}.")

    @property
    def n_in(self):
        return 7

    @property
    def n_out(self):
        return 3

    def _delays(self, n, rng):
        """Exponential(mean) draws rejected outside [min, max], in steps (fixed if min == max)."""
        if self.delay_min == self.delay_max:
            return np.full(n, int(round(self.delay_min / self.dt)))
        out = np.empty(n)
        todo = np.ones(n, bool)
        while todo.any():
            d = rng.exponential(self.delay_mean, size=todo.sum())
            out[todo] = d
            todo[todo] = (d < self.delay_min) | (d > self.delay_max)
        return np.round(out / self.dt).astype(int)

    def generate(self, n, rng, *, split):
        fix, stim, dec = (_steps(p, self.dt) for p in (self.fixation, self.stimulus, self.decision))
        n_steps = fix + stim + _steps(self.delay_max, self.dt) + dec
        x, target, mask = empty_trials(n, n_steps, self.n_in)
        delays = self._delays(n, rng)
        context = rng.integers(2, size=n)
        choices = rng.integers(2, size=(n, 2))
        cohs = rng.choice(np.asarray(self.coherences, float), size=(n, 2))
        ring = _ring(2)
        steps = np.arange(n_steps)[None, :]
        decision_start = (fix + stim + delays)[:, None]
        x[:, :, 0] = steps < decision_start
        for m in range(2):
            bump = _bump(ring[choices[:, m]], cohs[:, m] / 200.0, 2)
            noise = self.sigma / np.sqrt(self.dt) * rng.standard_normal((n, stim, 2))
            x[:, fix : fix + stim, 1 + 2 * m : 3 + 2 * m] = bump[:, None, :] + noise
        in_trial = steps < decision_start + dec
        x[:, :, 5] = in_trial * (context == 0)[:, None]
        x[:, :, 6] = in_trial * (context == 1)[:, None]
        deciding = (steps >= decision_start) & in_trial
        answer = 1 + choices[np.arange(n), context]
        target[:] = np.where(deciding, answer[:, None], 0)
        mask[:] = in_trial if self.score_fixation else deciding
        return Batch(x, target, mask)

    def shifts(self):
        longest = self.delay_max + 1000.0
        return {
            "noise x2": dataclasses.replace(self, sigma=2 * self.sigma),
            "unseen coherences": dataclasses.replace(self, coherences=(10.0, 30.0)),
            "long delay": dataclasses.replace(self, delay_min=longest, delay_max=longest, delay_mean=longest),
        }
