"""The recurrent network: configuration, parameters, structure, initialization and forward pass.

Two discretizations share one parameter set θ = {W_in (N×n_in), W_rec (N×N), b (N), W_out
(n_out×N), b_out (n_out), s0 (N)}; weights are indexed post × pre.

* ``form="voltage"`` (e-prop / LSNN convention, the paper's released code)::

      u_t = W_rec r_{t-1} + W_in x_t + b + ξ_t
      v_t = α v_{t-1} + (1-α) u_t,      r_t = φ(v_t),      state s_t = v_t

* ``form="rate"`` (Murray's RFLO / Marschall et al. convention)::

      u_t = W_rec r_{t-1} + W_in x_t + b + ξ_t
      r_t = α r_{t-1} + (1-α) φ(u_t),                      state s_t = r_t

* ``form="lif"`` and ``form="alif"`` (spiking; Bellec et al. 2020, with the leak convention of the
  voltage form)::

      u_t = W_rec z_{t-1} + W_in x_t + b + ξ_t
      v_t = α v_{t-1} + (1-α) u_t − v_th z_{t-1}             (soft reset; "hard": α (1 − z_{t-1}) v_{t-1} + (1-α) u_t)
      a_t = ρ a_{t-1} + (1-ρ) z_{t-1}                         (ALIF only; A_t = v_th + β a_t, LIF: A_t = v_th)
      z_t = H((v_t − A_t)/v_th) · [no spike in the last ``refractory`` steps]
      r̄_t = κ r̄_{t-1} + (1-κ) z_t                            (readout filter, κ = ``readout_decay``)

  The activity is the spike train z; the readout reads r̄ (z itself when κ = 0). H's derivative is
  the pseudo-derivative ψ(x) (:func:`pseudo_derivative`), in every order of differentiation; the
  reset's derivative is dropped (the spike in the reset term is a constant to every derivative,
  as in Bellec et al. 2020 and Zenke & Vogels 2021). The state stacks [v, a, refractory counter,
  r̄] (the parts a form has, :func:`state_parts`) along its last axis: (B, P·N).

Without spikes, both rate-model forms reduce to r_t = φ(W_rec r_{t-1} + W_in x_t + b) when α = 0. The readout is
y_t = W_out r_t + b_out (at every step, or at the last ``readout_steps`` steps only). ξ_t is
optional recurrent noise (σ_rec · standard normal); input noise is
added to x_t before the step. The initial state s_0 is zero, or the learned vector ``s0``.

**Heterogeneous time constants.** With ``leak_spread`` σ > 0 every unit i has its own leak α_i
(drawn once from the seed, a non-trained part of the structure) in place of α, multiplying its
own state: v_{t,i} = α_i v_{t-1,i} + (1-α_i) u_{t,i} (likewise r_t in the rate form). The time
constants are log-normal around τ: τ_i = τ·exp(σ z_i), z_i ~ N(0, 1), so α_i = α^{exp(−σ z_i)}
(the median unit keeps α).

**Axis order.** Every public array is batch-major: inputs ``(B, T, n_in)``, activities
``(B, T, N)``, outputs ``(B, T, n_out)``. The time loop is a ``lax.scan`` over a time-major view
(:func:`time_scan`: unrolled on a GPU while training).

**Structure.** Non-trainable arrays drawn from the seed live in :class:`Structure`: the
connectivity mask of W_rec (no self-connections, sparsity), the presynaptic sign of every unit
(Dale's law) and its cell type. The forward pass always uses ``W_rec ⊙ mask``, so every gradient
(exact or approximate) vanishes on absent connections.

**Dale's law** is kept by projection: after every optimizer update, :func:`project` sets to zero
each entry of W_rec whose sign disagrees with its presynaptic unit's sign (column j of W_rec has
the sign of unit j). Gradients are taken with respect to the weights themselves, so every rule
computes the same quantity with or without Dale's law; only the update is projected.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from creditscape import prng

FORMS = ("voltage", "rate", "lif", "alif")
SPIKING = ("lif", "alif")
RESETS = ("soft", "hard")
SURROGATES = ("piecewise_linear", "superspike")
ACTIVATIONS = {"relu": jax.nn.relu, "tanh": jnp.tanh, "softplus": jax.nn.softplus}
LOSSES = ("xent", "mse")
INITS = ("paper", "identity")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static description of an RNN (hashable: it is a static argument of compiled functions).

    Args:
        n_in, n_rec, n_out: input, recurrent and output sizes.
        form: ``"voltage"`` or ``"rate"`` (see the module docstring).
        alpha: leak α ∈ [0, 1); ``alpha = exp(-dt/tau)``, see :meth:`from_tau`.
        activation: ``"relu"``, ``"tanh"`` or ``"softplus"``.
        loss: per-step loss, ``"xent"`` (softmax cross-entropy on integer targets) or ``"mse"``
            (½‖y − y*‖² on real targets).
        bias: whether the recurrent layer has a trained bias b (the paper's network has none).
        self_connections: allow the diagonal of W_rec (the paper's network has none).
        connectivity: probability that a recurrent connection exists (1 = dense).
        dale_exc_fraction: if given, Dale's law with this fraction of excitatory units (the first
            ``round(f·N)`` units are excitatory).
        cell_types: number of cell types, assigned in contiguous equal blocks. With Dale's law and
            ``cell_types=1`` the types are excitatory and inhibitory (two types). Used by MDGL.
        input_noise: standard deviation of Gaussian noise added to every input at every step.
        rec_noise: standard deviation of Gaussian noise added to the recurrent drive u_t.
        learn_init_state: learn the initial state s0 (else s0 = 0, not a parameter).
        init: ``"paper"`` (W_in, W_rec He-normal; W_out Glorot-uniform; biases 0) or
            ``"identity"`` (as ``"paper"`` but W_rec = I masked, Le et al. 2015).
        leak_spread: σ of the log-normal spread of per-unit time constants (module docstring); 0:
            every unit has the leak α.
        readout_steps: the network has a readout at its last K steps only (None: at every step),
            as the paper's sequential-MNIST network, read out once at the end. Earlier steps are
            never scored, whatever a batch's mask says there; an experiment takes K from the task.

    Spiking forms only (``"lif"``, ``"alif"``; ``activation`` does not apply to them):

    Args:
        threshold: v_th > 0, the firing threshold (and the reset's size).
        reset: ``"soft"`` (subtract v_th after a spike) or ``"hard"`` (set v to 0 before the next input).
        refractory: steps after a spike during which a unit cannot spike (its ψ is 0 there too).
        adapt_decay: ρ ∈ [0, 1) of the adaptive threshold (``"alif"``); ρ = exp(−dt/τ_a).
        adapt_strength: β ≥ 0, the threshold's increase per unit of adaptation a (``"alif"``).
        adaptive_fraction: the fraction of units that adapt (``"alif"``): the last round(f·N) units
            have β, the others β = 0 (LIF units), as the LSNNs of Bellec et al. (1: all adapt).
        surrogate: the pseudo-derivative ψ of the spike (:func:`pseudo_derivative`).
        dampening: γ, ψ's height (0.3 in Bellec et al. 2020).
        readout_decay: κ ∈ [0, 1) of the readout's low-pass filter of the spikes (0: no filter).
        rate_regularization: c ≥ 0 of the firing-rate regularizer c Σ_i (f̄_i − f₀)² added to the
            loss (Bellec et al. 2020), f̄_i unit i's mean spike count per step over the batch.
        target_rate: f₀, its target in spikes per step (0.01 = 10 Hz at dt = 1 ms).
    """

    n_in: int
    n_rec: int
    n_out: int
    form: str = "voltage"
    alpha: float = 0.0
    activation: str = "relu"
    loss: str = "xent"
    bias: bool = True
    self_connections: bool = False
    connectivity: float = 1.0
    dale_exc_fraction: float | None = None
    cell_types: int = 1
    input_noise: float = 0.0
    rec_noise: float = 0.0
    learn_init_state: bool = False
    init: str = "paper"
    leak_spread: float = 0.0
    readout_steps: int | None = None
    threshold: float = 1.0
    reset: str = "soft"
    refractory: int = 0
    adapt_decay: float = 0.95
    adapt_strength: float = 1.8
    adaptive_fraction: float = 1.0
    surrogate: str = "piecewise_linear"
    dampening: float = 0.3
    readout_decay: float = 0.0
    rate_regularization: float = 0.0
    target_rate: float = 0.01

    def __post_init__(self):
        def bad(field, value, expected):
            raise ValueError(f"ModelConfig.{field}: expected {expected}, got {value!r}.")

        for f in ("n_in", "n_rec", "n_out"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                bad(f, getattr(self, f), "a positive integer")
        if self.form not in FORMS:
            bad("form", self.form, f"one of {FORMS}")
        if not 0.0 <= self.alpha < 1.0:
            bad("alpha", self.alpha, "a leak in [0, 1) (alpha = exp(-dt/tau))")
        if self.activation not in ACTIVATIONS:
            bad("activation", self.activation, f"one of {tuple(ACTIVATIONS)}")
        if self.loss not in LOSSES:
            bad("loss", self.loss, f"one of {LOSSES}")
        if not 0.0 < self.connectivity <= 1.0:
            bad("connectivity", self.connectivity, "a probability in (0, 1]")
        if self.dale_exc_fraction is not None and not 0.0 < self.dale_exc_fraction < 1.0:
            bad("dale_exc_fraction", self.dale_exc_fraction, "a fraction in (0, 1), or None")
        if not 1 <= self.cell_types <= self.n_rec:
            bad("cell_types", self.cell_types, f"an integer in [1, n_rec={self.n_rec}]")
        if not (0 <= self.input_noise < math.inf and 0 <= self.rec_noise < math.inf):
            bad("input_noise/rec_noise", (self.input_noise, self.rec_noise), "non-negative values")
        if not 0 <= self.leak_spread < math.inf:
            bad("leak_spread", self.leak_spread, "a non-negative spread of log time constants")
        if self.leak_spread and self.alpha == 0:
            bad("leak_spread", self.leak_spread, "0 when alpha = 0 (without a leak every unit's α is 0); set alpha > 0")
        if self.init not in INITS:
            bad("init", self.init, f"one of {INITS}")
        if self.readout_steps is not None and (not isinstance(self.readout_steps, int) or self.readout_steps < 1):
            bad("readout_steps", self.readout_steps, "a positive integer, or None (a readout at every step)")
        if not self.spiking:
            for f in ("readout_decay", "rate_regularization"):
                if getattr(self, f):
                    bad(f, getattr(self, f), f"0 for form={self.form!r} (it acts on spikes: forms {SPIKING})")
            return
        if not 0 < self.threshold < math.inf:
            bad("threshold", self.threshold, "a positive firing threshold")
        if self.reset not in RESETS:
            bad("reset", self.reset, f"one of {RESETS}")
        if not isinstance(self.refractory, int) or self.refractory < 0:
            bad("refractory", self.refractory, "a number of steps >= 0")
        if not (0 <= self.adapt_decay < 1 and 0 <= self.adapt_strength < math.inf):
            bad("adapt_decay/adapt_strength", (self.adapt_decay, self.adapt_strength), "ρ in [0, 1) and β >= 0")
        if not 0 < self.adaptive_fraction <= 1:
            bad("adaptive_fraction", self.adaptive_fraction, "a fraction in (0, 1]")
        if self.surrogate not in SURROGATES:
            bad("surrogate", self.surrogate, f"one of {SURROGATES}")
        if not 0 < self.dampening < math.inf:
            bad("dampening", self.dampening, "a positive height of the pseudo-derivative")
        if not 0 <= self.readout_decay < 1:
            bad("readout_decay", self.readout_decay, "a filter decay κ in [0, 1)")
        if not (0 <= self.rate_regularization < math.inf and 0 <= self.target_rate <= 1):
            bad("rate_regularization/target_rate", (self.rate_regularization, self.target_rate),
                "c >= 0 and a target in [0, 1] spikes per step")
        if self.learn_init_state or self.leak_spread:
            bad("learn_init_state/leak_spread", (self.learn_init_state, self.leak_spread),
                f"off for spiking forms (not built for form={self.form!r}): set learn_init_state = false, leak_spread = 0")

    @staticmethod
    def from_tau(tau: float, dt: float, **kwargs) -> "ModelConfig":
        """Build a config whose leak is α = exp(−dt/τ)."""
        return ModelConfig(alpha=math.exp(-dt / tau), **kwargs)

    @property
    def phi(self) -> Callable:
        return ACTIVATIONS[self.activation]

    @property
    def spiking(self) -> bool:
        return self.form in SPIKING

    @property
    def n_exc(self) -> int:
        if self.dale_exc_fraction is None:
            return self.n_rec
        return max(1, min(self.n_rec - 1, round(self.dale_exc_fraction * self.n_rec)))


class Params(NamedTuple):
    """Trainable parameters (a pytree). ``b`` and ``s0`` are ``None`` when not trained."""

    w_in: jax.Array  # (N, n_in)
    w_rec: jax.Array  # (N, N)
    b: jax.Array | None  # (N,)
    w_out: jax.Array  # (n_out, N)
    b_out: jax.Array  # (n_out,)
    s0: jax.Array | None  # (N,)


class Structure(NamedTuple):
    """Non-trainable arrays of one network, drawn once from its seed."""

    rec_mask: jax.Array  # (N, N) 1.0 where a connection exists
    sign: jax.Array  # (N,) presynaptic sign: +1 excitatory, -1 inhibitory (all +1 without Dale)
    cell_type: jax.Array  # (N,) integer cell type in [0, n_types)
    leak: jax.Array | None = None  # (N,) per-unit α_i with ``leak_spread`` > 0; None: every unit has α


def cell_type_count(cfg: ModelConfig) -> int:
    """Number of distinct cell types of ``cfg`` (2 with Dale's law and ``cell_types=1``)."""
    if cfg.dale_exc_fraction is not None and cfg.cell_types == 1:
        return 2
    return cfg.cell_types


def init_structure(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> Structure:
    """Draw the connectivity mask (and the per-unit leaks), fix signs and cell types."""
    n = cfg.n_rec
    mask = jnp.ones((n, n), dtype)
    if cfg.connectivity < 1.0:
        mask = (prng.uniform(key, (n, n), dtype) < cfg.connectivity).astype(dtype)  # dtype fixed: same draws in 64-bit mode
    if not cfg.self_connections:
        mask = mask * (1 - jnp.eye(n, dtype=dtype))
    idx = jnp.arange(n)
    sign = jnp.where(idx < cfg.n_exc, 1.0, -1.0).astype(dtype)
    if cfg.dale_exc_fraction is not None and cfg.cell_types == 1:
        cell_type = (idx >= cfg.n_exc).astype(jnp.int32)
    else:
        cell_type = (idx * cfg.cell_types // n).astype(jnp.int32)
    leaks = None
    if cfg.leak_spread:  # (a key of its own: the mask draws stay those of a homogeneous network)
        z = prng.normal(jax.random.fold_in(key, 1), (n,), dtype)
        leaks = jnp.asarray(cfg.alpha, dtype) ** jnp.exp(-cfg.leak_spread * z)
    return Structure(mask, sign, cell_type, leaks)


def leak(cfg: ModelConfig, struct: Structure) -> float | jax.Array:
    """Every unit's α: the scalar ``cfg.alpha``, or the per-unit (N,) leaks of heterogeneous time
    constants. Either broadcasts over a batch's (B, N) states."""
    return cfg.alpha if struct.leak is None else struct.leak


def init_params(cfg: ModelConfig, struct: Structure, key: jax.Array, dtype=jnp.float32) -> Params:
    """Initialize parameters.

    ``"paper"``: W_in ~ N(0, 2/n_in), W_rec ~ N(0, 2/N) (He-normal), W_out ~ Glorot-uniform,
    b = b_out = s0 = 0. With Dale's law, W_rec takes the magnitudes of the He-normal draw with the
    presynaptic signs, inhibitory columns scaled by n_exc/n_inh so that the expected input to a unit
    is balanced, and the whole matrix scaled so that the mean squared weight stays He's 2/N (without
    that rescaling, 20 % inhibitory units at 4× the weight give 4× the variance: twice the gain,
    and exploding ReLU activity on long trials). The result is masked and satisfies :func:`project`.
    """
    k_in, k_rec, k_out = jax.random.split(key, 3)
    n = cfg.n_rec
    w_in = prng.normal(k_in, (n, cfg.n_in), dtype) * math.sqrt(2.0 / cfg.n_in)
    if cfg.init == "identity":
        w_rec = jnp.eye(n, dtype=dtype)
    else:
        w_rec = prng.normal(k_rec, (n, n), dtype) * math.sqrt(2.0 / n)
    if cfg.dale_exc_fraction is not None:
        ratio = cfg.n_exc / (n - cfg.n_exc)
        balance = jnp.where(struct.sign > 0, 1.0, ratio).astype(dtype)
        variance = math.sqrt(n / (cfg.n_exc + (n - cfg.n_exc) * ratio**2))
        w_rec = jnp.abs(w_rec) * struct.sign[None, :] * balance[None, :] * variance
    w_rec = w_rec * struct.rec_mask
    limit = math.sqrt(6.0 / (n + cfg.n_out))
    w_out = prng.uniform(k_out, (cfg.n_out, n), dtype, -limit, limit)
    zeros = jnp.zeros((n,), dtype)
    return Params(
        w_in=w_in,
        w_rec=w_rec,
        b=zeros if cfg.bias else None,
        w_out=w_out,
        b_out=jnp.zeros((cfg.n_out,), dtype),
        s0=zeros if cfg.learn_init_state else None,
    )


def init(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> tuple[Params, Structure]:
    """Draw structure and parameters of one network from ``key``."""
    k_struct, k_params = jax.random.split(key)
    struct = init_structure(cfg, k_struct, dtype)
    return init_params(cfg, struct, k_params, dtype), struct


def project(cfg: ModelConfig, params: Params, struct: Structure) -> Params:
    """Keep W_rec on its constraint set: zero outside the mask, and Dale's signs (by clipping)."""
    w_rec = params.w_rec * struct.rec_mask
    if cfg.dale_exc_fraction is not None:
        w_rec = struct.sign[None, :] * jnp.maximum(struct.sign[None, :] * w_rec, 0.0)
    return params._replace(w_rec=w_rec)


# ----------------------------------------------------------------------------------------------
# Forward pass


def state_parts(cfg: ModelConfig) -> tuple[str, ...]:
    """The parts of the state, each N wide, in their order along its last axis: ``("s",)`` for the
    rate-model forms; v, then a (ALIF), the refractory counter and the readout trace r̄ where the
    spiking network has them."""
    if not cfg.spiking:
        return ("s",)
    return (("v",) + (("a",) if cfg.form == "alif" else ()) + (("ref",) if cfg.refractory else ())
            + (("trace",) if cfg.readout_decay else ()))


def state_size(cfg: ModelConfig) -> int:
    """Width of the state s_t: N, or N times the number of a spiking network's parts."""
    return cfg.n_rec * len(state_parts(cfg))


def state_part(cfg: ModelConfig, s: jax.Array, name: str) -> jax.Array:
    """One part (B, N) of the state (:func:`state_parts`)."""
    i = state_parts(cfg).index(name) * cfg.n_rec
    return s[..., i : i + cfg.n_rec]


def initial_state(cfg: ModelConfig, params: Params, batch_size: int) -> jax.Array:
    """s_0 for a batch, shape (B, :func:`state_size`)."""
    if params.s0 is None:
        return jnp.zeros((batch_size, state_size(cfg)), params.w_rec.dtype)
    return jnp.broadcast_to(params.s0, (batch_size, cfg.n_rec))


def pseudo_derivative(x: jax.Array, surrogate: str, dampening: float) -> jax.Array:
    """ψ(x), the derivative given to the spike H(x) at x = (v − A)/v_th:

    * ``"piecewise_linear"`` (Bellec et al. 2020): γ max(0, 1 − |x|);
    * ``"superspike"`` (Zenke & Ganguli 2018, the fast sigmoid's derivative): γ / (1 + 10|x|)².
    """
    if surrogate == "piecewise_linear":
        return dampening * jnp.maximum(0.0, 1.0 - jnp.abs(x))
    return dampening / (1.0 + 10.0 * jnp.abs(x)) ** 2


def _pseudo_antiderivative(x: jax.Array, surrogate: str, dampening: float) -> jax.Array:
    """Ψ with Ψ' = ψ (:func:`pseudo_derivative`)."""
    if surrogate == "piecewise_linear":
        c = jnp.clip(x, -1.0, 1.0)
        return dampening * (c - c * jnp.abs(c) / 2)
    return dampening * x / (1.0 + 10.0 * jnp.abs(x))


def spike(x: jax.Array, surrogate: str, dampening: float) -> jax.Array:
    """H(x) = 1 if x > 0 else 0, whose derivatives are those of Ψ, ∫ψ: ψ(x), then ψ'(x).

    Written H(x) + Ψ(x) − Ψ(x)|_constant rather than as a ``jax.custom_jvp``: its value is exactly
    H(x), and every transformation sees ordinary operations. (A custom JVP rule is lost when reverse
    mode through ``lax.scan`` is differentiated again: in jax 0.10 the forward pass's spikes then
    count as constants there, and the Hessian of the surrogate loss came out asymmetric.)
    """
    smooth = _pseudo_antiderivative(x, surrogate, dampening)
    return (x > 0).astype(x.dtype) + (smooth - jax.lax.stop_gradient(smooth))


def spikes(cfg: ModelConfig, s: jax.Array) -> jax.Array:
    """z_t = H((v_t − A_t)/v_th), zero while refractory, from a spiking network's state."""
    parts = {k: state_part(cfg, s, k) for k in state_parts(cfg)}
    return _fire(cfg, parts["v"], parts.get("a"), parts.get("ref"))


def adaptation_strength(cfg: ModelConfig) -> float | jax.Array:
    """β of every unit of an ALIF network: the scalar β, or (N,) with zeros on the first
    N − round(f·N) units (LIF) when only a fraction f adapts."""
    if cfg.adaptive_fraction == 1:
        return cfg.adapt_strength
    n_adaptive = round(cfg.adaptive_fraction * cfg.n_rec)
    return jnp.where(jnp.arange(cfg.n_rec) >= cfg.n_rec - n_adaptive, cfg.adapt_strength, 0.0)


def _fire(cfg: ModelConfig, v, a, ref) -> jax.Array:
    """z = H((v − v_th − β a)/v_th) · [ref = 0] from the parts of the state (a, ref: None if absent)."""
    gap = v - cfg.threshold if a is None else v - cfg.threshold - adaptation_strength(cfg) * a
    z = spike(gap / cfg.threshold, cfg.surrogate, cfg.dampening)
    return z if ref is None else z * (ref == 0)


def activity(cfg: ModelConfig, s: jax.Array) -> jax.Array:
    """r from the state: φ(v) for the voltage form, the state itself for the rate form, the spikes
    z for the spiking forms."""
    if cfg.spiking:
        return spikes(cfg, s)
    return cfg.phi(s) if cfg.form == "voltage" else s


def readout_input(cfg: ModelConfig, s: jax.Array, r: jax.Array) -> jax.Array:
    """What the readout reads at a step with state s and activity r: r itself, or a spiking
    network's filtered spike train r̄ (``readout_decay`` > 0), part of s."""
    return state_part(cfg, s, "trace") if cfg.readout_decay else r


def step(
    cfg: ModelConfig,
    params: Params,
    struct: Structure,
    s_prev: jax.Array,
    x_t: jax.Array,
    xi_t: jax.Array | None,
    recurrent_input: Callable[[jax.Array], jax.Array] = lambda r: r,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One time step on a batch: returns (s_t, r_t, u_t), each (B, N).

    ``recurrent_input`` transforms r_{t-1} where (and only where) it enters the recurrent drive
    W_rec r_{t-1}; learning rules use it to hold r_{t-1} at a precomputed value there, which cuts
    the recurrent path from the gradient graph (e-prop's graph).
    """
    w_eff = params.w_rec * struct.rec_mask
    return _recur(cfg, params, w_eff, leak(cfg, struct), s_prev, activity(cfg, s_prev), x_t, xi_t, recurrent_input)


def input_drive(params: Params, x: jax.Array) -> jax.Array:
    """W_in x + b on any leading axes: the part of the drive u that does not depend on the state."""
    d = x @ params.w_in.T
    return d if params.b is None else d + params.b


def _recur(cfg, params, w_eff, alpha, s_prev, r_prev, x_t, xi_t, recurrent_input):
    """One step given the masked W_rec, the leak(s) α and r_{t-1} = activity(s_{t-1}) (shared by
    :func:`step` and :func:`run`)."""
    u = recurrent_input(r_prev) @ w_eff.T + input_drive(params, x_t)
    if xi_t is not None:
        u = u + xi_t
    if cfg.spiking:
        return (*_spiking_step(cfg, alpha, s_prev, r_prev, u), u)
    new = u if cfg.form == "voltage" else cfg.phi(u)
    # Without a leak the state is the new value: skip 0·s_prev + 1·new, which XLA cannot drop
    # (0·inf is NaN) and which would cost two element-wise passes per step and their backward.
    s = new if cfg.alpha == 0 else alpha * s_prev + (1 - alpha) * new
    r = cfg.phi(s) if cfg.form == "voltage" else s
    return s, r, u


def _spiking_step(cfg, alpha, s_prev, z_prev, u):
    """(s_t, z_t) of a spiking network from s_{t-1}, its spikes z_{t-1} and the drive u_t (module
    docstring). The reset's spike is a constant to every derivative; the adaptation's is not."""
    part = lambda name: state_part(cfg, s_prev, name)
    fired = jax.lax.stop_gradient(z_prev)
    if cfg.reset == "soft":
        v = alpha * part("v") + (1 - alpha) * u - cfg.threshold * fired
    else:
        v = alpha * (1 - fired) * part("v") + (1 - alpha) * u
    new = {"v": v}
    if cfg.form == "alif":
        new["a"] = cfg.adapt_decay * part("a") + (1 - cfg.adapt_decay) * z_prev
    if cfg.refractory:
        new["ref"] = jax.lax.stop_gradient(jnp.where(fired > 0, float(cfg.refractory), jnp.maximum(part("ref") - 1, 0.0)))
    z = _fire(cfg, v, new.get("a"), new.get("ref"))
    if cfg.readout_decay:
        new["trace"] = cfg.readout_decay * part("trace") + (1 - cfg.readout_decay) * z
    return jnp.concatenate([new[k] for k in state_parts(cfg)], axis=-1), z


def run(
    cfg: ModelConfig,
    params: Params,
    struct: Structure,
    x: jax.Array,
    xi: jax.Array | None = None,
    recurrent_input: Callable[[jax.Array], jax.Array] = lambda r: r,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Run the network on a batch.

    Args:
        x: inputs (B, T, n_in), input noise already added.
        xi: recurrent noise (B, T, N) or ``None``.
        recurrent_input: see :func:`step`.

    Returns:
        (states s (B, T, state_size), activities r and drives u (B, T, N)).
    """
    return _scan(cfg, params, struct, x, xi, recurrent_input, lambda s, r, u: (s, r, u))


def outputs(cfg: ModelConfig, params: Params, struct: Structure, x: jax.Array,
            xi: jax.Array | None = None) -> jax.Array:
    """The readouts y_t = W_out r_t + b_out of the steps that have one, (B, K, n_out): the last
    K = ``cfg.readout_steps`` steps (all T if None or K ≥ T).

    Taken inside the time loop, so that the loop stores n_out numbers per step instead of
    (s, r, u): the exact loss, its gradient (BPTT) and evaluations of large sets need that much
    less memory; steps without a readout cost no readout at all (with one readout at the end of
    28 steps, a quarter of a BPTT step's time on CPU).
    """
    silent = steps_without_readout(cfg, x.shape[1])
    return _scan(cfg, params, struct, x, xi, lambda r: r, lambda s, r, u: readout(params, readout_input(cfg, s, r)), silent)


def steps_without_readout(cfg: ModelConfig, n_steps: int) -> int:
    """How many of ``n_steps`` steps come before the first readout (0 with a readout everywhere)."""
    return 0 if cfg.readout_steps is None else max(n_steps - cfg.readout_steps, 0)


# On a GPU every iteration of a compiled loop costs a round of kernel launches and a check of its
# condition, and one step of these networks is too small to hide them. Unrolled, the BPTT training
# step at T = 28 was 1.58x faster at one seed and 1.14x at 128 seeds on an H200; at T = 224, 8 steps
# per iteration beat 4 and 16. Only the training iteration is unrolled: it runs thousands of times,
# while the measurement programs (Hessian-vector products through the loop, Lanczos, sharpness),
# run a few times, took more than twice as long to compile unrolled. On a CPU unrolling measured
# slower (docs/performance.md). The arithmetic is the same either way (the order XLA fuses it in
# may differ in the last bits).
GPU_FULL_UNROLL = 32  # sequences up to this long are unrolled completely
GPU_PARTIAL_UNROLL = 8  # longer ones this many steps per iteration
_UNROLLING = contextvars.ContextVar("creditscape_unrolling", default=False)


@contextlib.contextmanager
def unrolled_time_loops():
    """Within this context, time loops traced on a GPU are unrolled (:func:`time_unroll`);
    :func:`creditscape.train.make_chunk` traces the training iteration so."""
    token = _UNROLLING.set(True)
    try:
        yield
    finally:
        _UNROLLING.reset(token)


def time_unroll(n_steps: int) -> int:
    """Steps per iteration of a compiled time loop of ``n_steps`` steps: 1, except inside
    :func:`unrolled_time_loops` on a GPU (all of them up to ``GPU_FULL_UNROLL`` steps, else
    ``GPU_PARTIAL_UNROLL``)."""
    if not _UNROLLING.get() or jax.default_backend() != "gpu":
        return 1
    return max(n_steps, 1) if n_steps <= GPU_FULL_UNROLL else GPU_PARTIAL_UNROLL


def time_scan(f: Callable, init, xs, reverse: bool = False):
    """``jax.lax.scan(f, init, xs, reverse=reverse)`` over time-major ``xs`` (time the leading axis
    of every leaf), unrolled as :func:`time_unroll` says: every time loop of the models and the
    rules goes through here."""
    n_steps = jax.tree.leaves(xs)[0].shape[0]
    return jax.lax.scan(f, init, xs, reverse=reverse, unroll=time_unroll(n_steps))


def _scan(cfg, params, struct, x, xi, recurrent_input, emit, silent=0):
    """The time loop; ``emit(s_t, r_t, u_t)`` of every step after the first ``silent`` ones,
    stacked batch-major."""
    s_init = initial_state(cfg, params, x.shape[0])
    # The masked W_rec is hoisted out of the time loop. The input drive W_in x_t is not: one
    # (T·B × n_in) product before the loop measured 9% slower per BPTT step on CPU than a small
    # product per step (its backward pass stores and multiplies T × B × N gradients). The loop
    # carries r_t beside s_t so that φ(s_t) is computed once per step, not again by the next step.
    w_eff = params.w_rec * struct.rec_mask
    alpha = leak(cfg, struct)
    xs = jnp.swapaxes(x, 0, 1)
    xis = None if xi is None else jnp.swapaxes(xi, 0, 1)

    def body(carry, inp):
        s, r, u = _recur(cfg, params, w_eff, alpha, *carry, *inp, recurrent_input)
        return (s, r), emit(s, r, u)

    carry = (s_init, activity(cfg, s_init))
    if silent:  # the steps before the emitted ones, in a loop that stores nothing
        carry, _ = time_scan(lambda c, inp: (body(c, inp)[0], None), carry,
                             jax.tree.map(lambda a: a[:silent], (xs, xis)))
    _, out = time_scan(body, carry, jax.tree.map(lambda a: a[silent:], (xs, xis)))
    return jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), out)


def readout(params: Params, r: jax.Array) -> jax.Array:
    """y = W_out r + b_out on any leading axes."""
    return r @ params.w_out.T + params.b_out
