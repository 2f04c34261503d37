"""Sequential MNIST, row-wise (T = 28, 28 inputs) or pixel-wise (T = 784, 1 input)."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from creditscape.objective import Batch
from creditscape.tasks._base import Task, register_task
from creditscape.tasks._mnist_files import load_mnist

ENCODINGS = ("analog", "poisson", "threshold")
VALIDATION = 5000  # TF1's split: the first 5,000 training images are validation, 55,000 remain


@functools.lru_cache(maxsize=2)
def _cached(directory):
    return load_mnist(directory)


@register_task
@dataclasses.dataclass(frozen=True)
class SequentialMNIST(Task):
    """Classify an MNIST digit presented one row (or one pixel) per step; loss at the last step.

    Pixels scaled to [0, 1]. Training examples come from the 55,000 training images left after
    TF1's 5,000-image validation split (the first 5,000), test examples from the 10,000 test
    images; a set of n examples is a random subset (without replacement) chosen by the seed.
    ``pixel=True`` gives T = 784 steps of 1 input (``permute=True`` applies a fixed random pixel
    permutation drawn from ``permutation_seed``). Perturbed test: Gaussian pixel noise σ, clipped
    to [0, 1] (the paper's σ = 0.2). Files are read with
    :func:`creditscape.tasks.load_mnist` from ``mnist_dir`` or the standard places.

    Encodings for spiking networks (``encoding``): ``"analog"`` (the pixels themselves),
    ``"poisson"`` (each input a spike with probability equal to its pixel, drawn once per set), or
    ``"threshold"`` (threshold crossings, after the LSNN pixel-wise MNIST of Bellec et al. 2018: for each of
    ``levels`` thresholds θ_l = (l + ½)/levels, one input spikes when the pixel sequence of its
    channel crosses θ_l upwards and another when it crosses downwards, the sequence starting from 0:
    2·levels inputs per channel, 80 for pixel-wise MNIST at the default 40 levels). With an encoding
    the shift ``"pixel noise"`` adds the paper's Gaussian noise (σ = 0.2, clipped) to the pixels
    before they are encoded (the ``noise=σ`` sets add it to the encoded inputs).
    """

    name = "smnist"
    summary = "Sequential MNIST, row-wise (T=28) or pixel-wise (T=784); needs local MNIST files"
    input_range = (0.0, 1.0)
    pixel: bool = False
    permute: bool = False
    permutation_seed: int = 0
    mnist_dir: str | None = None
    encoding: str = "analog"
    levels: int = 40
    pixel_noise: float = 0.0

    def __post_init__(self):
        if self.encoding not in ENCODINGS:
            raise ValueError(f"{self.name}: encoding must be one of {ENCODINGS}, got {self.encoding!r}.")
        if not isinstance(self.levels, int) or self.levels < 1:
            raise ValueError(f"{self.name}: levels must be a positive integer, got {self.levels!r}.")

    @property
    def n_in(self):
        channels = 1 if self.pixel else 28
        return channels * 2 * self.levels if self.encoding == "threshold" else channels

    def shifts(self):
        return {} if self.encoding == "analog" else {"pixel noise": dataclasses.replace(self, pixel_noise=0.2)}

    @property
    def n_out(self):
        return 10

    @property
    def readout_steps(self):
        return 1  # scored at the last pixel row only

    def check(self):
        _cached(self.mnist_dir)

    def generate(self, n, rng, *, split):
        data = _cached(self.mnist_dir)
        if split == "train":
            images, labels = data.train_images[VALIDATION:], data.train_labels[VALIDATION:]
        else:
            images, labels = data.test_images, data.test_labels
        if n > len(images):
            raise ValueError(f"smnist: asked for {n} {split} examples; only {len(images)} exist.")
        idx = rng.choice(len(images), size=n, replace=False)
        x = images[idx].astype(np.float32) / 255.0
        if self.pixel:
            x = x.reshape(n, 784, 1)
            if self.permute:
                x = x[:, np.random.default_rng(self.permutation_seed).permutation(784)]
        if self.pixel_noise:
            x = np.clip(x + self.pixel_noise * rng.standard_normal(x.shape), 0.0, 1.0).astype(np.float32)
        x = self._encode(x, rng)
        n_steps = x.shape[1]
        target = np.zeros((n, n_steps), np.int32)
        target[:, -1] = labels[idx]
        mask = np.zeros((n, n_steps), np.float32)
        mask[:, -1] = 1.0
        return Batch(x, target, mask)

    def _encode(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The pixels x (n, T, channels) in ``self.encoding`` (class docstring)."""
        if self.encoding == "poisson":
            return (rng.random(x.shape) < x).astype(np.float32)
        if self.encoding == "analog":
            return x
        theta = (np.arange(self.levels) + 0.5) / self.levels
        now = x[..., None]
        before = np.concatenate([np.zeros_like(x[:, :1]), x[:, :-1]], axis=1)[..., None]
        up, down = (before < theta) & (now >= theta), (before >= theta) & (now < theta)
        return np.concatenate([up, down], axis=-1).reshape(x.shape[0], x.shape[1], -1).astype(np.float32)
