"""SnAp-n: RTRL restricted to the sparsity pattern of the influence matrix after n steps."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from creditscape.model import ModelConfig, Params, Structure
from creditscape.rules._base import Rule, register
from creditscape.rules._core import forward_sensitivity, recurrent_part
from creditscape.rules._eprop import EProp


def snap_pattern(cfg: ModelConfig, params: Params, struct: Structure, n: int) -> jax.Array:
    """The (N × P) 0/1 pattern of SnAp-n: entry (k, θ_p) is kept when unit k can be reached from
    the unit θ_p acts on (i for W_rec[i, j], W_in[i, j], b[i], s0[i]) in at most n − 1 steps
    through existing recurrent connections, i.e. ((I + A)^(n−1))_{k,i} ≠ 0 with A_{ki} = 1 where
    W_rec[k, i] exists. It is the set of entries of M_t that n steps of the exact recursion can
    make non-zero (Menick et al. 2021, §3)."""
    adjacency = (struct.rec_mask != 0) | jnp.eye(cfg.n_rec, dtype=bool)
    reach = jnp.eye(cfg.n_rec, dtype=bool)
    for _ in range(n - 1):
        reach = (adjacency.astype(jnp.int32) @ reach.astype(jnp.int32)) > 0
    units = jnp.arange(cfg.n_rec)
    rec = recurrent_part(params)
    owner = jax.tree.map(lambda a: jnp.broadcast_to(units.reshape((-1,) + (1,) * (a.ndim - 1)), a.shape), rec)
    owner_flat = jnp.concatenate([jnp.ravel(a) for a in jax.tree.leaves(owner)])  # ravel_pytree's order
    return reach[:, owner_flat].astype(params.w_rec.dtype)


@register
@dataclasses.dataclass(frozen=True)
class SnAp(Rule):
    r"""SnAp-n: the RTRL recursion, with the influence matrix kept on a fixed sparsity pattern.

    .. math:: M_t = P_n \odot \big(J_t M_{t-1} + I_t\big),\qquad
              \hat g = \sum_t \frac{\partial \ell_t}{\partial s_t} M_t

    P_n keeps entry (k, θ) when unit k is reachable in at most n − 1 steps of the recurrent
    connectivity from the unit θ acts on (:func:`snap_pattern`). SnAp-1 keeps the immediate
    influence only (unit i for W_ij), carried by the diagonal J_t[i, i]: the leak plus the
    self-connection's term. Without self-connections (the default) J_t[i, i] = α_i and SnAp-1 is
    e-prop exactly (tested); with them it is e-prop plus each unit's recurrence onto itself. On a
    dense network SnAp-2's pattern is full and SnAp-2 = RTRL; on a sparse one, SnAp-n = RTRL once
    (I + A)^(n−1) is full.

    Cost: this implementation runs RTRL's dense recursion under the mask, O(N·P) memory and
    O(N²·P) time per step and sequence (P ≈ N(N + n_in + 1)): small networks. A sparse one
    stores only the pattern (O(P) for SnAp-1, with O(P) time per step).

    References: Menick, Elsen, Evci, Osindero, Simonyan & Graves, "Practical real time recurrent
    learning with a sparse approximation", ICLR 2021. https://openreview.net/forum?id=q3KSThy2GwB
    """

    name = "snap"
    per_sequence = True
    formula = "M_t = P_n ⊙ (J_t M_{t-1} + I_t), P_n: units reachable in n-1 steps;  g = Σ_t dℓ_t/ds_t · M_t"
    forms = ("online",)
    n: int = 1

    def __post_init__(self):
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"snap: n must be an integer >= 1 (steps of the sparsity pattern), got {self.n!r}.")

    def computation(self, cfg):
        if self.n == 1 and not cfg.self_connections:
            return EProp().computation(cfg)  # J_t[i, i] = α_i: e-prop's eligibility
        # On a fully connected network the 2-step pattern is already full: RTRL, the exact gradient.
        return ("bptt",) if self.n >= 2 and cfg.connectivity == 1 else super().computation(cfg)

    def gradient(self, cfg, params, struct, state, batch, noise, *, form):
        self.check_form(form)
        pattern = snap_pattern(cfg, params, struct, self.n)
        return forward_sensitivity(cfg, params, struct, batch, noise, window=None, pattern=pattern)
