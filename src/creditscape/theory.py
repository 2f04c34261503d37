"""The linear-stability check of DESIGN.md §5: the rule's update-map Jacobian Ĵ and its gain.

Gradient descent θ ← θ − η ĝ(θ) near a fixed point has Jacobian I − η Ĵ with Ĵ = ∂ĝ/∂θ. For the
exact gradient Ĵ = H (symmetric) and stability requires λ_max(H) < 2/η. An approximate rule has a
non-symmetric Ĵ; if it shrinks the update along the sharpest direction v₁ of H, i.e. the gain

    ρ = v₁ᵀ Ĵ v₁ / λ₁   (λ₁, v₁ the top eigenpair of H)

is below 1, the rule can settle where λ_max(H) ≈ 2/(η ρ) > 2/η: in sharper minima.

Ĵ-vector products are ``jax.jvp`` through the rule's gradient estimate on a parameter block with
the others held fixed, on a fixed batch without noise; the L2 term adds λ·v.

Offline forms hold their cut quantities (r_{t-1} in the recurrent drive, s_{t-K}, the learning
signal) as values computed outside the differentiated function instead of with
``jax.lax.stop_gradient``, which would also zero their forward-mode tangents and make Ĵ wrong
(DESIGN.md §5's "jvp through the offline gradient" holds only with this construction).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse.linalg as spla
from jax.flatten_util import ravel_pytree

from creditscape.curvature import _insert, _select, existing_weights
from creditscape.model import ModelConfig, Params, Structure
from creditscape.objective import Batch, l2_gradient
from creditscape.rules import Rule, expected_gradient


def estimate_on_block(
    rule: Rule, cfg: ModelConfig, params: Params, struct: Structure, rule_state, batch: Batch,
    block: str = "w_rec", l2: float = 0.0, *, form: str | None = None, key: jax.Array | None = None,
    draws: int = 1,
) -> tuple[Callable[[jax.Array], jax.Array], jax.Array]:
    """(ĝ_block as a function of the flattened block, the block's value); L2 gradient included.
    A stochastic rule's ĝ is its mean over ``draws`` fixed keys split from ``key``: the Jacobian
    of that mean estimates the Jacobian of the expected update, E[Ĵ] = ∂E[ĝ]/∂θ (the draws' law
    does not depend on θ)."""
    x0, unravel = ravel_pytree(_select(params, block))

    def g(x):
        p = _insert(params, block, unravel(x))
        _, grads = expected_gradient(rule, cfg, p, struct, rule_state, batch, form=form, key=key, draws=draws)
        if l2:
            grads = jax.tree.map(lambda a, b: a + l2 * b, grads, l2_gradient(existing_weights(p, struct)))
        return ravel_pytree(_select(grads, block))[0]

    return g, x0


def jacobian_vector_product(g: Callable, x: jax.Array, v: jax.Array) -> jax.Array:
    """Ĵ v = d/dε ĝ(x + εv) at ε = 0 (forward mode through the rule's estimate)."""
    return jax.jvp(g, (x,), (v,))[1]


def dense_update_jacobian(g: Callable, x: jax.Array) -> jax.Array:
    """Ĵ as a dense matrix (small models; the reference for the Arnoldi eigenvalues). Compiled:
    run op by op, the forward-mode sweep through a ``scan`` costs many times more."""
    return jax.jit(jax.jacfwd(g))(x)


def leading_eigenvalues(matvec: Callable, dim: int, k: int = 6, *, seed: int = 0) -> np.ndarray:
    """The k eigenvalues of largest real part of a non-symmetric operator by implicitly restarted
    Arnoldi (``scipy.sparse.linalg.eigs`` on a ``LinearOperator``), sorted by real part, descending.
    For dim ≤ k + 1 (too small for Arnoldi) the dense matrix is built from dim mat-vecs instead."""
    mv = jax.jit(matvec)
    if dim <= k + 1:
        dense = np.stack([np.asarray(mv(jnp.eye(dim)[i])) for i in range(dim)], axis=1)
        vals = np.linalg.eigvals(dense)
    else:
        op = spla.LinearOperator((dim, dim), matvec=lambda v: np.asarray(mv(jnp.asarray(v.ravel()))), dtype=np.float64)
        v0 = np.random.default_rng(seed).standard_normal(dim)
        vals = spla.eigs(op, k=k, which="LR", v0=v0, return_eigenvectors=False, tol=1e-10)
    return vals[np.argsort(-vals.real)][:k]


def arnoldi(matvec: Callable, v0: jax.Array, steps: int) -> jax.Array:
    """The (steps × steps) upper Hessenberg matrix Qᵀ A Q of ``steps`` Arnoldi iterations (full
    re-orthogonalization, two passes), in JAX so that ``vmap`` runs it for a whole ensemble. Its
    eigenvalues (:func:`ritz_values`) approximate the outermost eigenvalues of A; with ``steps``
    equal to the dimension they are all of them. An exhausted Krylov space stops the iteration:
    later rows and columns are zero."""
    dim = v0.shape[0]
    if not 1 <= steps <= dim:
        raise ValueError(f"arnoldi: need 1 <= steps ({steps}) <= dim ({dim}).")
    basis = jnp.zeros((steps + 1, dim), v0.dtype).at[0].set(v0 / jnp.linalg.norm(v0))
    hess = jnp.zeros((steps + 1, steps), v0.dtype)

    def body(j, carry):
        basis, hess = carry
        w = matvec(basis[j])
        scale = jnp.linalg.norm(w)
        mask = (jnp.arange(steps + 1) <= j).astype(v0.dtype)[:, None]
        h = jnp.zeros((steps + 1,), v0.dtype)
        for _ in range(2):
            c = (mask * basis) @ w
            w = w - (mask * basis).T @ c
            h = h + c
        b = jnp.linalg.norm(w)
        broken = (b <= 100 * jnp.finfo(v0.dtype).eps * scale) | (jnp.linalg.norm(basis[j]) == 0)
        hess = hess.at[:, j].set(jnp.where(jnp.linalg.norm(basis[j]) == 0, 0.0, h.at[j + 1].set(jnp.where(broken, 0.0, b))))
        basis = basis.at[j + 1].set(jnp.where(broken, 0.0, w / jnp.where(broken, 1.0, b)))
        return basis, hess

    _, hess = jax.lax.fori_loop(0, steps, body, (basis, hess))
    return hess[:steps]


def ritz_values(hessenberg: np.ndarray) -> np.ndarray:
    """Eigenvalues of an Arnoldi Hessenberg matrix over its live part (before an exhausted Krylov
    space), by decreasing modulus."""
    h = np.asarray(hessenberg, float)
    live = len(h)
    for j in range(len(h) - 1):
        if h[j + 1, j] == 0:
            live = j + 1
            break
    vals = np.linalg.eigvals(h[:live, :live])
    return vals[np.argsort(-np.abs(vals))]


class StabilityCheck(NamedTuple):
    lambda_max: float  # top eigenvalue of H (exact loss, same block and L2)
    rho: float  # v₁ᵀ Ĵ v₁ / λ₁
    bound_gd: float  # 2/η
    bound_rule: float  # 2/(η ρ): the sharpness up to which the rule's dynamics can be stable


def stability_check(jvp_rule: Callable, lambda_1: float, v_1: jax.Array, learning_rate: float) -> StabilityCheck:
    """The gain ρ of a rule along the top Hessian eigenvector and the predicted bounds."""
    v = v_1 / jnp.linalg.norm(v_1)
    rho = float(jnp.vdot(v, jvp_rule(v)) / lambda_1)
    bound_rule = 2.0 / (learning_rate * rho) if rho > 0 else float("inf")
    return StabilityCheck(float(lambda_1), rho, 2.0 / learning_rate, bound_rule)
