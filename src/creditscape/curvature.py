"""Curvature of the exact loss: Hessian-vector products on a parameter block, and Lanczos.

Everything is a pure JAX function of (parameters, structure, batch), so ``jax.vmap`` measures a
whole ensemble in one compiled call.

Blocks: ``"all"`` (every parameter), ``"recurrent"`` (W_in, W_rec, b, s0) or ``"w_rec"`` (W_rec
alone, what the paper's released code measured). The loss is the exact loss L(θ) of a fixed
batch without noise, plus the L2 term λ·½‖W‖² when ``l2`` is given (it shifts every eigenvalue of
a block made of penalized weights by λ).

Structurally absent recurrent weights (the diagonal without self-connections, a sparse mask) are
not weights of the network: the loss does not depend on them, and neither does the L2 term here,
so they are directions of zero curvature that add nothing to a trace (rather than eigenvalues
equal to the L2 coefficient).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from creditscape import prng
from creditscape.model import ModelConfig, Params, Structure
from creditscape.objective import Batch, exact_loss, l2_penalty

HIGHEST = jax.lax.Precision.HIGHEST  # the basis's own products: full float32 on a GPU too

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
        return loss + l2 * l2_penalty(existing_weights(p, struct)) if l2 else loss

    return f, x0


def existing_weights(params: Params, struct: Structure) -> Params:
    """``params`` with W_rec ⊙ mask: the absent recurrent weights set to zero."""
    return params._replace(w_rec=params.w_rec * struct.rec_mask)


def hvp(f: Callable[[jax.Array], jax.Array], x: jax.Array, v: jax.Array) -> jax.Array:
    """H v by forward-over-reverse: the directional derivative of ∇f along v."""
    return jax.jvp(jax.grad(f), (x,), (v,))[1]


class Eigen(NamedTuple):
    values: jax.Array  # (k,) signed, descending
    vectors: jax.Array  # (k, dim)
    steps: jax.Array | None = None  # mat-vecs the Lanczos iteration took (its Krylov dimension)


def lanczos_tridiagonal(matvec: Callable, v0: jax.Array, steps: int, *, tol: float | None = None, k: int = 1):
    """Lanczos with full re-orthogonalization: (T, Q) with T the (steps × steps) tridiagonal
    matrix and Q (steps, dim) the orthonormal Krylov basis, so that Q A Qᵀ = T.

    Two Gram–Schmidt passes per step keep Q orthogonal to machine precision, so no spurious
    copies of converged eigenvalues appear (its products in full precision: with a GPU's default
    TF32 products Q is orthogonal to 1e-3 only, and copies appear). A start vector need not be
    normalized. ``matvec``'s own precision is the caller's: the experiment measures in full
    precision (:func:`creditscape.train.full_precision`).

    If the Krylov space is exhausted (an invariant subspace: the new residual is at rounding
    level, ‖w‖ ≤ 100·eps·‖Aq‖), the iteration stops there: later rows of Q and T are zero.
    Continuing from a rounding-noise direction would break Q A Qᵀ = T and produce Ritz values
    outside the spectrum. With ``tol``, it also stops (the same way) after the first step m ≥ k
    at which none of the k largest Ritz values moved by more than tol·|θ₁| from step m − 1: a warm
    start near the top eigenvector then costs a few mat-vecs instead of ``steps``.
    """
    dim = v0.shape[0]
    if not 1 <= steps <= dim:
        raise ValueError(f"lanczos: need 1 <= steps ({steps}) <= dim ({dim}).")
    if tol is not None and not 0 < tol < 1:
        raise ValueError(f"lanczos: tol must be in (0, 1) (or None for all {steps} steps), got {tol!r}.")
    basis = jnp.zeros((steps, dim), v0.dtype).at[0].set(v0 / jnp.linalg.norm(v0))
    alphas = jnp.zeros((steps,), v0.dtype)
    betas = jnp.zeros((steps,), v0.dtype)

    def body(carry):
        basis, alphas, betas, i, top, _ = carry
        q = basis[i]
        w = matvec(q)
        a = jnp.vdot(q, w, precision=HIGHEST)
        scale = jnp.linalg.norm(w)
        mask = (jnp.arange(steps) <= i).astype(v0.dtype)[:, None]
        for _ in range(2):
            w = w - jnp.matmul((mask * basis).T, jnp.matmul(mask * basis, w, precision=HIGHEST), precision=HIGHEST)
        b = jnp.linalg.norm(w)
        alphas = alphas.at[i].set(a)
        # (a non-finite operator stops too: under vmap one diverged member would otherwise keep
        # every member's loop running to ``steps``)
        stop = (b <= 100 * jnp.finfo(v0.dtype).eps * scale) | ~jnp.isfinite(a + b)
        if tol is not None:  # the Ritz values of T's leading (i+1) × (i+1) block, which β_i does not enter
            new_top = top_tridiagonal_eigenvalues(alphas, betas, i + 1, k)
            stop = stop | ((i + 1 >= k) & jnp.all(jnp.abs(new_top - top) <= tol * jnp.abs(new_top[0])))
            top = new_top
        b = jnp.where(stop, 0.0, b)
        nxt = jnp.where(stop, 0.0, w / jnp.where(stop, 1.0, b))
        basis = jnp.where(i + 1 < steps, basis.at[jnp.minimum(i + 1, steps - 1)].set(nxt), basis)
        return basis, alphas, betas.at[i].set(b), i + 1, top, stop

    # Stopped (exhausted, non-finite or converged), the loop ends: no mat-vecs of zero vectors.
    carry = (basis, alphas, betas, jnp.zeros((), jnp.int32), jnp.full((k,), jnp.inf, v0.dtype), jnp.zeros((), bool))
    basis, alphas, betas, *_ = jax.lax.while_loop(lambda c: (c[3] < steps) & ~c[5], body, carry)
    tri = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
    return tri, basis


def top_tridiagonal_eigenvalues(alphas: jax.Array, betas: jax.Array, size, k: int, iterations: int = 60) -> jax.Array:
    """The k largest eigenvalues (descending; −inf beyond ``size``) of the leading ``size`` × ``size``
    block of the symmetric tridiagonal matrix with diagonal ``alphas`` and off-diagonal ``betas``
    (β_j couples j and j + 1), by bisection on Sturm counts: the number of eigenvalues below x is
    the number of negative pivots d_j = α_j − x − β_{j−1}²/d_{j−1}. Arithmetic only, no
    eigensolver call (two eigensolvers in one compiled program deadlocked XLA's CPU runtime,
    docs/measurements.md); each value to 2^−iterations of the Gershgorin interval."""
    n = alphas.shape[0]
    live = jnp.arange(n) < size
    a = jnp.where(live, alphas, 0.0)
    b = jnp.where(jnp.arange(n) < size - 1, betas, 0.0)
    radius = jnp.abs(b) + jnp.abs(jnp.concatenate([jnp.zeros((1,), b.dtype), b[:-1]]))
    lo = jnp.full((k,), jnp.min(a - radius)) - 1
    hi = jnp.full((k,), jnp.max(a + radius)) + 1
    pivot_floor = jnp.finfo(a.dtype).tiny * jnp.maximum(1.0, jnp.max(b * b))

    def below(x):  # eigenvalues of the block below each x
        def pivot(d, j):
            d = a[j] - x - jnp.where(j > 0, b[j - 1] ** 2, 0.0) / d
            d = jnp.where(jnp.abs(d) < pivot_floor, -pivot_floor, d)
            return d, (d < 0) & live[j]
        return jnp.sum(jax.lax.scan(pivot, jnp.ones_like(x), jnp.arange(n))[1], axis=0)

    rank = jnp.arange(1, k + 1)  # the m-th largest: the largest x with at least m eigenvalues ≥ x

    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) / 2
        above = size - below(mid) >= rank
        return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

    lo, hi = jax.lax.fori_loop(0, iterations, halve, (lo, hi))
    return jnp.where(rank <= size, (lo + hi) / 2, -jnp.inf)


def lanczos(matvec: Callable, v0: jax.Array, steps: int, k: int = 1, *, tol: float | None = None) -> Eigen:
    """Top-k (largest algebraic, signed) eigenpairs of a symmetric operator from ``steps``
    Lanczos iterations (``steps`` mat-vecs; with ``tol``, fewer once the top k Ritz values stop
    moving, :func:`lanczos_tridiagonal`). A warm start ``v0`` (e.g. the previous top eigenvector)
    converges faster. Values beyond the dimension of an exhausted Krylov space are NaN."""
    if not 1 <= k <= steps:
        raise ValueError(f"lanczos: need 1 <= k ({k}) <= steps ({steps}).")
    tri, basis = lanczos_tridiagonal(matvec, v0, steps, tol=tol, k=k)
    # LAPACK's eigensolver can loop forever on NaN input: a non-finite operator gives NaN instead.
    finite = jnp.all(jnp.isfinite(tri))
    vals, vecs = jnp.linalg.eigh(jnp.where(finite, tri, 0.0))
    vals = jnp.where(finite, vals, jnp.nan)
    # After an exhausted Krylov space T is block diagonal with a zero block; its eigenvalues
    # (zeros) are not Ritz values and rank last.
    live = jnp.linalg.norm(basis, axis=1) > 0
    ritz = jnp.sum(jnp.where(live[:, None], vecs**2, 0.0), axis=0) > 0.5
    order = jnp.argsort(-jnp.where(ritz, vals, -jnp.inf))[:k]
    # Fewer than k Ritz values (an exhausted space): the missing ones are unknown, not zero.
    return Eigen(jnp.where(ritz[order], vals[order], jnp.nan),
                 jnp.matmul(vecs[:, order].T, basis, precision=HIGHEST), jnp.sum(live))


def top_ritz_value(tri: np.ndarray, krylov_dim: int) -> float:
    """The largest Ritz value of a Lanczos tridiagonal matrix (:func:`lanczos_tridiagonal`) whose
    Krylov space has ``krylov_dim`` dimensions, computed on the host with NumPy; NaN when it is
    not finite or empty."""
    tri = np.asarray(tri)[:krylov_dim, :krylov_dim]
    if not krylov_dim or not np.isfinite(tri).all():
        return float("nan")
    return float(np.linalg.eigvalsh(tri)[-1])


class PowerResult(NamedTuple):
    value: jax.Array  # signed Rayleigh quotient vᵀAv of the final unit vector
    vector: jax.Array
    iterations: jax.Array


def power_iteration(matvec: Callable, v0: jax.Array, *, rtol: float = 1e-6, max_iter: int = 500) -> PowerResult:
    """The eigenvalue of largest magnitude, reported as the signed Rayleigh quotient.

    Iterates v ← Av/‖Av‖ until successive Rayleigh quotients differ by at most rtol·|λ| (or
    ``max_iter``). Unlike ‖Av‖ (what the paper's code reported) it keeps the sign, so a negative
    dominant eigenvalue is not mistaken for a sharp positive one. Converges at rate |λ₂/λ₁|.
    """

    def cond(c):
        _, lam, prev, i = c
        return (i < max_iter) & (jnp.abs(lam - prev) > rtol * jnp.abs(lam))

    def body(c):
        v, lam, _, i = c
        w = matvec(v)
        v_new = w / jnp.linalg.norm(w)
        return v_new, jnp.vdot(v_new, matvec(v_new)), lam, i + 1

    v = v0 / jnp.linalg.norm(v0)
    lam0 = jnp.vdot(v, matvec(v))
    v, lam, _, i = jax.lax.while_loop(cond, body, (v, lam0, lam0 + 1 + jnp.abs(lam0), 0))
    return PowerResult(lam, v, i)


class TraceEstimate(NamedTuple):
    value: jax.Array
    stderr: jax.Array  # standard error of the estimate


def _probe_signs(key: jax.Array, shape, dtype) -> jax.Array:
    """The trace estimators' ±1 probes. Drawn through int32 so that the draws do not depend on
    whether JAX's 64-bit mode is on (``prng.rademacher``, like ``jax.random.rademacher``, goes
    through a default-precision float; the rules keep those bits)."""
    return (2 * prng.randint(key, shape, 0, 2, dtype=jnp.int32) - 1).astype(dtype)


def hutchinson(matvec: Callable, dim: int, n: int, key: jax.Array, dtype=jnp.float64) -> TraceEstimate:
    """tr(A) ≈ (1/n) Σ zᵀAz with Rademacher z (unbiased: E[zzᵀ] = I); n mat-vecs.

    References: Hutchinson, "A stochastic estimator of the trace of the influence matrix for
    Laplacian smoothing splines", 1989.
    """
    z = _probe_signs(key, (n, dim), dtype)
    samples = jax.vmap(lambda v: jnp.vdot(v, matvec(v)))(z)
    return TraceEstimate(samples.mean(), samples.std(ddof=1) / jnp.sqrt(n))


def hutch_plus_plus(matvec: Callable, dim: int, n: int, key: jax.Array, dtype=jnp.float64) -> TraceEstimate:
    """Hutch++: exact trace on a sketched top subspace plus Hutchinson on the rest; n mat-vecs
    (n/3 sketch, n/3 projection, n/3 residual). The error is that of the residual part.

    References: Meyer, Musco, Musco & Woodruff, "Hutch++: optimal stochastic trace estimation",
    SOSA 2021. https://arxiv.org/abs/2010.09649
    """
    m = max(n // 3, 2)
    mv = jax.vmap(matvec, in_axes=1, out_axes=1)
    sketch, g = _probe_signs(key, (2, dim, m), dtype)
    q, _ = jnp.linalg.qr(mv(sketch))
    g = g - q @ (q.T @ g)
    # the projection's and the probes' products in one batch: one copy of the mat-vec in the program, not two
    products = mv(jnp.concatenate([q, g], axis=1))
    aq, ag = products[:, : q.shape[1]], products[:, q.shape[1]:]
    top = jnp.trace(q.T @ aq)
    samples = jnp.sum(g * (ag - q @ (q.T @ ag)), axis=0)
    return TraceEstimate(top + samples.mean(), samples.std(ddof=1) / jnp.sqrt(m))


class SpectralDensity(NamedTuple):
    nodes: jax.Array  # (n_vectors, steps) Ritz values
    weights: jax.Array  # (n_vectors, steps) Gauss quadrature weights, each row sums to 1

    def moment(self, p: int) -> jax.Array:
        """∫ λ^p dμ ≈ tr(A^p) / dim."""
        return jnp.mean(jnp.sum(self.weights * self.nodes**p, axis=1))


def spectral_density(matvec: Callable, dim: int, steps: int, n_vectors: int, key: jax.Array,
                     dtype=jnp.float64) -> SpectralDensity:
    """Stochastic Lanczos quadrature: for each random unit vector v, the Ritz values θ_k of a
    ``steps``-step Lanczos run from v and weights τ_k = (first component of the k-th Ritz
    vector)², so that Σ_k τ_k f(θ_k) ≈ vᵀ f(A) v (exact for polynomials of degree < 2·steps).

    References: Lin, Saad & Yang, "Approximating spectral densities of large matrices", SIAM
    Review 2016; Ghorbani, Krishnan & Xiao, "An investigation into neural net optimization via
    Hessian eigenvalue density", ICML 2019.
    """

    def one(k):
        tri, _ = lanczos_tridiagonal(matvec, prng.normal(k, (dim,), dtype), steps)
        theta, vecs = jnp.linalg.eigh(tri)
        return theta, vecs[0] ** 2

    nodes, weights = jax.vmap(one)(jax.random.split(key, n_vectors))
    return SpectralDensity(nodes, weights)


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
    v0 = prng.normal(key, x0.shape, x0.dtype)
    return lanczos(lambda v: hvp(f, x0, v), v0, min(steps, x0.shape[0]), k)


def dense_hessian(cfg, params, struct, batch, block: str = "all", l2: float = 0.0) -> jax.Array:
    """The full Hessian of the block (small models only; the reference for every estimator).
    Compiled: run op by op, the Hessian of a ``scan`` costs many times more."""
    f, x0 = block_loss(cfg, params, struct, batch, block, l2)
    return jax.jit(jax.hessian(f))(x0)
