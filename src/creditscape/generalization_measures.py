"""Generalization measures beside λ_max and the trace, from the flatness literature the paper cites
and from Jiang et al. (ICLR 2020, "Fantastic generalization measures and where to find them").

Every function is pure and works on flat parameters θ ∈ ℝⁿ and a loss of them (as
:func:`creditscape.curvature.block_loss` gives), so it vmaps over the members of an ensemble and is
checked on quadratics, where the answers have closed forms (tests/test_generalization_measures.py).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from creditscape import model as _model
from creditscape import prng
from creditscape.curvature import block_loss, existing_weights, hutch_plus_plus, hvp
from creditscape.model import ModelConfig, Params, Structure
from creditscape.objective import Batch, exact_loss, loss_from_outputs


class Flatness(NamedTuple):
    sigma: jax.Array  # the largest noise scale whose expected loss increase stays within the bound
    increase: jax.Array  # the Monte Carlo estimate of that increase at ``sigma``
    stderr: jax.Array  # its standard error over the draws
    capped: jax.Array  # True when even ``sigma_max`` stays within the bound (sigma is then a lower bound)


def pac_bayes_flatness(f: Callable[[jax.Array], jax.Array], theta: jax.Array, key: jax.Array, *, bound: float,
                       draws: int = 64, magnitude_aware: bool = False, sigma_max: float = 1.0,
                       iterations: int = 40) -> Flatness:
    r"""PAC-Bayes flatness: the largest σ such that

    .. math:: \Delta(\sigma) = \mathbb E_\xi\,[f(\theta + \sigma\, s \odot \xi)] - f(\theta) \le \text{bound},
              \quad \xi \sim \mathcal N(0, I),

    with s = 1 (isotropic) or s = |θ| (``magnitude_aware``: each weight perturbed in proportion to
    its size). Δ is estimated from ``draws`` fixed draws (common random numbers: the same ξ for
    every σ, so that the estimate is a smooth function of σ), and σ found by ``iterations`` steps
    of bisection on log σ in [sigma_max·1e-9, sigma_max]. A larger σ means a flatter minimum: the
    PAC-Bayes bound on the generalization gap shrinks as 1/σ² (Jiang et al. 2020, §C)."""
    xi = prng.normal(key, (draws, theta.shape[0]), theta.dtype)
    scale = jnp.abs(theta) if magnitude_aware else jnp.ones_like(theta)
    base = f(theta)

    def increases(sigma):
        return jax.vmap(lambda x: f(theta + sigma * scale * x))(xi) - base

    def bisect(_, bounds):
        lo, hi = bounds
        mid = jnp.sqrt(lo * hi)
        inside = jnp.mean(increases(mid)) <= bound
        return jnp.where(inside, mid, lo), jnp.where(inside, hi, mid)

    capped = jnp.mean(increases(sigma_max)) <= bound
    lo, _ = jax.lax.fori_loop(0, iterations, bisect, (jnp.asarray(sigma_max * 1e-9, theta.dtype),
                                                     jnp.asarray(sigma_max, theta.dtype)))
    sigma = jnp.where(capped, sigma_max, lo)
    d = increases(sigma)
    return Flatness(sigma, jnp.mean(d), jnp.std(d, ddof=1) / jnp.sqrt(draws), capped)


def relative_flatness(f: Callable[[jax.Array], jax.Array], w: jax.Array, key: jax.Array, probes: int = 30):
    r"""Relative flatness of one layer (after Petzka et al. 2021, in the simplified form of its
    trace): κ = ‖w‖² · Tr(∇²_w f), the Hessian trace of the layer's flattened weights ``w`` weighted
    by their squared norm, which makes it invariant to rescaling the layer by λ and the next by
    1/λ. The trace by Hutch++ with ``probes`` Hessian-vector products; returns (κ, its standard
    error)."""
    trace = hutch_plus_plus(lambda v: hvp(f, w, v), w.shape[0], probes, key, w.dtype)
    norm2 = jnp.sum(w**2)
    return norm2 * trace.value, norm2 * trace.stderr


def fisher_rao_norm(per_example_loss: Callable[[jax.Array], jax.Array], theta: jax.Array) -> jax.Array:
    r"""Fisher–Rao norm (Liang et al. 2019), in its loss form:

    .. math:: \|\theta\|_{fr} = \sqrt{\tfrac1B \sum_b \langle \theta, \nabla_\theta \ell_b(\theta)\rangle^2},

    ``per_example_loss(θ)`` returning the B examples' losses ℓ_b. One forward-mode product gives
    every ⟨θ, ∇ℓ_b⟩ (the derivative of ℓ_b along θ itself)."""
    along_theta = jax.jvp(per_example_loss, (theta,), (theta,))[1]
    return jnp.sqrt(jnp.mean(along_theta**2))


def normalized_sharpness(w: jax.Array, h_diag: jax.Array, iterations: int = 100) -> jax.Array:
    r"""Normalized sharpness of one weight matrix W (m × n) (Tsuzuku, Sato & Sugiyama, ICML 2020):

    .. math:: \min_{\sigma \in \mathbb R^m_{>0},\ \sigma' \in \mathbb R^n_{>0}}
              \sum_{ij} \Big[ h_{ij}\, (\sigma_i \sigma'_j)^2 + \frac{w_{ij}^2}{(\sigma_i \sigma'_j)^2} \Big],

    with h_ij = ∂²L/∂w_ij² the Hessian's diagonal (``h_diag``, negative entries counted as 0). It
    is the second-order PAC-Bayes trade-off between the loss increase under a Gaussian weight
    perturbation of standard deviation σ_i σ'_j and its KL term, minimized over row and column
    scales, and so unchanged when a row (or column) of W is scaled by λ and the loss
    reparameterized to match (h by 1/λ²).

    Solved by block coordinate descent, exact in each block: for fixed a = σ'², the best
    σ_i² = √(Q_i / P_i) with P_i = Σ_j h_ij a_j, Q_i = Σ_j w_ij² / a_j, where the objective is
    2 Σ_i √(P_i Q_i); then the same for σ' given σ. The objective is convex in (log σ, log σ'),
    so the ``iterations`` alternations converge to the minimum, returned as 2 Σ_i √(P_i Q_i)."""
    # A floor of one rounding unit of the largest curvature (and weight) keeps every scale finite
    # where a row or column has none; it moves the value by a relative ~1e-16 (float64).
    h = jnp.maximum(h_diag, 0.0)
    h = h + jnp.finfo(w.dtype).eps * jnp.max(h)
    w2 = w**2 + jnp.finfo(w.dtype).eps * jnp.max(w**2)

    def best(h_, w2_, other):  # the optimal squared scales of the rows of (h_, w2_) given the columns'
        return jnp.sqrt((w2_ @ (1 / other)) / (h_ @ other))

    def alternate(_, col):
        return best(h.T, w2.T, best(h, w2, col))

    col = jax.lax.fori_loop(0, iterations, alternate, jnp.ones(w.shape[1], w.dtype))
    return 2 * jnp.sum(jnp.sqrt((h @ col) * (w2 @ (1 / col))))


def hessian_diagonal(f: Callable[[jax.Array], jax.Array], x: jax.Array, chunk: int = 64) -> jax.Array:
    """The exact diagonal of ∇²f at ``x``: one Hessian-vector product per coordinate, ``chunk``
    at a time (small blocks only: it costs dim(x) products)."""
    rows = jax.lax.map(lambda e: hvp(f, x, e), jnp.eye(x.shape[0], dtype=x.dtype), batch_size=chunk)
    return jnp.diagonal(rows)


def log_path_norm(cfg: ModelConfig, params: Params, struct: Structure, n_steps: int) -> jax.Array:
    r"""log of the ℓ2 path norm (Neyshabur et al. 2015; Jiang et al. 2020's "path.norm") of the
    network unrolled over ``n_steps`` steps:

    .. math:: \tfrac12 \log \sum_{\text{paths } p} \prod_{c \in p} c^2,

    the sum over every path from an input, a bias or the initial state to a scored output,
    through units and steps, of the product of its squared coefficients (weights, biases, and the
    leak's α and 1−α). With a ReLU network and α = 0 this is Jiang et al.'s formula: run the
    network with every parameter squared on an all-ones input and sum the outputs. Here the
    activation counts as the identity (a path's coefficient), so the measure is defined for every
    activation. The sum grows geometrically with the steps, so it is carried as a normalized
    vector and its log scale."""
    p = existing_weights(params, struct)
    a2, c2 = cfg.alpha**2, (1 - cfg.alpha) ** 2
    w_rec2, w_out2 = p.w_rec**2, p.w_out**2
    drive = c2 * jnp.sum(p.w_in**2, axis=1) + (0.0 if p.b is None else c2 * p.b**2)  # all-ones input
    v0 = jnp.zeros(cfg.n_rec, p.w_rec.dtype) if p.s0 is None else p.s0**2
    first_read = _model.steps_without_readout(cfg, n_steps)

    def step(carry, t):
        v_hat, log_scale = carry  # the path sums into each unit at step t-1: exp(log_scale) · v_hat
        new = a2 * v_hat + c2 * (w_rec2 @ v_hat) + jnp.exp(-log_scale) * drive
        top = jnp.maximum(jnp.max(new), jnp.finfo(new.dtype).tiny)
        read = jnp.log(jnp.sum(w_out2 @ (new / top))) + jnp.log(top) + log_scale
        read = jnp.logaddexp(read, jnp.log(jnp.sum(p.b_out**2)))  # paths from b_out itself
        return (new / top, log_scale + jnp.log(top)), jnp.where(t >= first_read, read, -jnp.inf)

    _, reads = jax.lax.scan(step, (v0, jnp.zeros((), v0.dtype)), jnp.arange(n_steps))
    return 0.5 * jax.scipy.special.logsumexp(reads)


def spectral_norm_product(*matrices: jax.Array) -> jax.Array:
    """∏_k ‖W_k‖₂, the product of the largest singular values (the spectral complexity's core)."""
    return jnp.prod(jnp.stack([jnp.linalg.norm(w, 2) for w in matrices]))


def distance_from_initialization(theta: jax.Array, theta_init: jax.Array) -> jax.Array:
    """‖θ − θ₀‖₂, how far training moved the parameters."""
    return jnp.linalg.norm(theta - theta_init)


MEASURES = ("pac_bayes_sigma", "pac_bayes_sigma_stderr_increase", "pac_bayes_sigma_capped", "pac_bayes_sigma_magnitude",
            "pac_bayes_sigma_magnitude_capped", "relative_flatness", "relative_flatness_stderr", "normalized_sharpness",
            "fisher_rao_norm", "log_path_norm", "spectral_norm_product", "distance_from_init")  # what :func:`network_measures` returns


def network_measures(cfg: ModelConfig, params: Params, struct: Structure, batch: Batch, params_init: Params,
                     key: jax.Array, *, bound: float, draws: int, probes: int) -> dict[str, jax.Array]:
    """Every measure above for one trained network on ``batch`` (vmap it over an ensemble):
    PAC-Bayes σ of all parameters, isotropic and magnitude-aware (loss-increase ``bound``,
    ``draws`` Monte Carlo draws); relative flatness of W_rec; the normalized sharpness summed over
    W_in, W_rec and W_out (exact Hessian diagonals: one Hessian-vector product per weight); the
    Fisher–Rao norm over the batch's sequences; the log path norm over the batch's length;
    ∏‖W‖₂ of W_in, W_rec and W_out; ‖θ − θ₀‖ from the network's initialization ``params_init``.
    Absent recurrent connections count as zeros everywhere (the model's own)."""
    k_iso, k_mag, k_rel = jax.random.split(key, 3)
    f_all, theta = block_loss(cfg, params, struct, batch, "all")
    isotropic = pac_bayes_flatness(f_all, theta, k_iso, bound=bound, draws=draws)
    magnitude = pac_bayes_flatness(f_all, theta, k_mag, bound=bound, draws=draws, magnitude_aware=True)
    f_rec, w_rec = block_loss(cfg, params, struct, batch, "w_rec")
    kappa, kappa_stderr = relative_flatness(f_rec, w_rec, k_rel, probes)
    flat, unravel = ravel_pytree(existing_weights(params, struct))

    def per_sequence_losses(t):
        y = _model.outputs(cfg, unravel(t), struct, batch.x)
        return jax.vmap(lambda yb, b: loss_from_outputs(cfg, yb[None], jax.tree.map(lambda a: a[None], b)))(y, batch)

    trained, initial = existing_weights(params, struct), existing_weights(params_init, struct)

    def sharpness_of(name):
        w = getattr(trained, name)
        f = lambda v: exact_loss(cfg, trained._replace(**{name: v.reshape(w.shape)}), struct, batch)
        return normalized_sharpness(w, hessian_diagonal(f, w.ravel()).reshape(w.shape))

    return {
        "pac_bayes_sigma": isotropic.sigma, "pac_bayes_sigma_stderr_increase": isotropic.stderr,
        "pac_bayes_sigma_capped": isotropic.capped,
        "pac_bayes_sigma_magnitude": magnitude.sigma, "pac_bayes_sigma_magnitude_capped": magnitude.capped,
        "relative_flatness": kappa, "relative_flatness_stderr": kappa_stderr,
        "normalized_sharpness": sum(sharpness_of(name) for name in ("w_in", "w_rec", "w_out")),
        "fisher_rao_norm": fisher_rao_norm(per_sequence_losses, flat),
        "log_path_norm": log_path_norm(cfg, params, struct, batch.x.shape[1]),
        "spectral_norm_product": spectral_norm_product(trained.w_in, trained.w_rec, trained.w_out),
        "distance_from_init": distance_from_initialization(ravel_pytree(trained)[0], ravel_pytree(initial)[0]),
    }
