"""Curvature of the exact loss: Hessian-vector products on a parameter block, and Lanczos.

Everything is a pure JAX function of (parameters, structure, batch), so ``jax.vmap`` measures a
whole ensemble in one compiled call.

Blocks: ``"all"`` (every parameter), ``"recurrent"`` (W_in, W_rec, b, s0) or ``"w_rec"`` (W_rec
alone, what the paper's released code measured). The loss is the exact loss L(θ) of a fixed
batch without noise, plus the L2 term λ·½‖W‖² when ``l2`` is given (it shifts every eigenvalue of
a block made of penalized weights by λ).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from creditscape.model import ModelConfig, Params, Structure
from creditscape.objective import Batch, exact_loss, l2_penalty

BLOCKS = ("all", "recurrent", "w_rec")


def _select(params: Params, block: str):
    if block == "w_rec":
        return params.w_rec
    if block == "recurrent":
        return (params.w_in, params.w_rec, params.b, params.s0)
    if block == "all":
        return params
    raise ValueError(f"Unknown curvature block {block!r}; expected one of {BLOCKS}.")


def _insert(params: Params, block: str, value) -> Params:
    if block == "w_rec":
        return params._replace(w_rec=value)
    if block == "recurrent":
        w_in, w_rec, b, s0 = value
        return params._replace(w_in=w_in, w_rec=w_rec, b=b, s0=s0)
    return value


def block_loss(
    cfg: ModelConfig, params: Params, struct: Structure, batch: Batch, block: str = "all", l2: float = 0.0
) -> tuple[Callable[[jax.Array], jax.Array], jax.Array]:
    """(f, x0): the exact loss as a function of the flattened ``block``, and the block's value."""
    x0, unravel = ravel_pytree(_select(params, block))

    def f(x):
        p = _insert(params, block, unravel(x))
        loss = exact_loss(cfg, p, struct, batch)
        return loss + l2 * l2_penalty(p) if l2 else loss

    return f, x0


def hvp(f: Callable[[jax.Array], jax.Array], x: jax.Array, v: jax.Array) -> jax.Array:
    """H v by forward-over-reverse: the directional derivative of ∇f along v."""
    return jax.jvp(jax.grad(f), (x,), (v,))[1]


class Eigen(NamedTuple):
    values: jax.Array  # (k,) signed, descending
    vectors: jax.Array  # (k, dim)


def lanczos(matvec: Callable, v0: jax.Array, steps: int, k: int = 1) -> Eigen:
    """Top-k (largest algebraic) eigenpairs of a symmetric operator by Lanczos with full
    re-orthogonalization (two Gram–Schmidt passes per step keep the basis orthogonal to machine
    precision, so no spurious copies of converged eigenvalues appear).

    Args:
        matvec: v ↦ A v.
        v0: start vector (dim,), need not be normalized; a warm start from the previous top
            eigenvector converges faster.
        steps: Krylov dimension m (≤ dim); cost m mat-vecs.
        k: number of eigenpairs returned (≤ steps).
    """
    dim = v0.shape[0]
    if not 1 <= k <= steps <= dim:
        raise ValueError(f"lanczos: need 1 <= k ({k}) <= steps ({steps}) <= dim ({dim}).")
    basis = jnp.zeros((steps, dim), v0.dtype).at[0].set(v0 / jnp.linalg.norm(v0))
    alphas = jnp.zeros((steps,), v0.dtype)
    betas = jnp.zeros((steps,), v0.dtype)

    def body(i, carry):
        basis, alphas, betas = carry
        q = basis[i]
        w = matvec(q)
        a = jnp.vdot(q, w)
        mask = (jnp.arange(steps) <= i).astype(v0.dtype)[:, None]
        for _ in range(2):
            w = w - (mask * basis).T @ ((mask * basis) @ w)
        b = jnp.linalg.norm(w)
        nxt = jnp.where(b > 1e-30, w / jnp.maximum(b, 1e-30), 0.0)
        basis = jnp.where(i + 1 < steps, basis.at[jnp.minimum(i + 1, steps - 1)].set(nxt), basis)
        return basis, alphas.at[i].set(a), betas.at[i].set(b)

    basis, alphas, betas = jax.lax.fori_loop(0, steps, body, (basis, alphas, betas))
    tri = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
    vals, vecs = jnp.linalg.eigh(tri)
    order = jnp.argsort(-vals)[:k]
    return Eigen(vals[order], (vecs[:, order].T @ basis))


def top_eigenvalues(
    cfg: ModelConfig,
    params: Params,
    struct: Structure,
    batch: Batch,
    *,
    key: jax.Array,
    block: str = "w_rec",
    l2: float = 0.0,
    steps: int = 30,
    k: int = 1,
) -> Eigen:
    """Top-k signed Hessian eigenpairs of the exact loss on ``block`` (Lanczos, ``steps`` HVPs)."""
    f, x0 = block_loss(cfg, params, struct, batch, block, l2)
    v0 = jax.random.normal(key, x0.shape, x0.dtype)
    return lanczos(lambda v: hvp(f, x0, v), v0, min(steps, x0.shape[0]), k)


def dense_hessian(cfg, params, struct, batch, block: str = "all", l2: float = 0.0) -> jax.Array:
    """The full Hessian of the block (small models only; the reference for every estimator)."""
    f, x0 = block_loss(cfg, params, struct, batch, block, l2)
    return jax.hessian(f)(x0)
