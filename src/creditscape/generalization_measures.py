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
from creditscape.curvature import block_loss, existing_weights, hutch_plus_plus, hvp
from creditscape.model import ModelConfig, Params, Structure
from creditscape.objective import Batch, loss_from_outputs


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
    xi = jax.random.normal(key, (draws, theta.shape[0]), theta.dtype)
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


def spectral_norm_product(*matrices: jax.Array) -> jax.Array:
    """∏_k ‖W_k‖₂, the product of the largest singular values (the spectral complexity's core)."""
    return jnp.prod(jnp.stack([jnp.linalg.norm(w, 2) for w in matrices]))


def distance_from_initialization(theta: jax.Array, theta_init: jax.Array) -> jax.Array:
    """‖θ − θ₀‖₂, how far training moved the parameters."""
    return jnp.linalg.norm(theta - theta_init)


MEASURES = ("pac_bayes_sigma", "pac_bayes_sigma_stderr_increase", "pac_bayes_sigma_capped", "pac_bayes_sigma_magnitude",
            "pac_bayes_sigma_magnitude_capped", "relative_flatness", "relative_flatness_stderr", "fisher_rao_norm",
            "spectral_norm_product", "distance_from_init")  # what :func:`network_measures` returns


def network_measures(cfg: ModelConfig, params: Params, struct: Structure, batch: Batch, params_init: Params,
                     key: jax.Array, *, bound: float, draws: int, probes: int) -> dict[str, jax.Array]:
    """Every measure above for one trained network on ``batch`` (vmap it over an ensemble):
    PAC-Bayes σ of all parameters, isotropic and magnitude-aware (loss-increase ``bound``,
    ``draws`` Monte Carlo draws); relative flatness of W_rec; the Fisher–Rao norm over the batch's
    sequences; ∏‖W‖₂ of W_in, W_rec and W_out; ‖θ − θ₀‖ from the network's initialization
    ``params_init``. Absent recurrent connections count as zeros everywhere (the model's own)."""
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
    return {
        "pac_bayes_sigma": isotropic.sigma, "pac_bayes_sigma_stderr_increase": isotropic.stderr,
        "pac_bayes_sigma_capped": isotropic.capped,
        "pac_bayes_sigma_magnitude": magnitude.sigma, "pac_bayes_sigma_magnitude_capped": magnitude.capped,
        "relative_flatness": kappa, "relative_flatness_stderr": kappa_stderr,
        "fisher_rao_norm": fisher_rao_norm(per_sequence_losses, flat),
        "spectral_norm_product": spectral_norm_product(trained.w_in, trained.w_rec, trained.w_out),
        "distance_from_init": distance_from_initialization(ravel_pytree(trained)[0], ravel_pytree(initial)[0]),
    }
