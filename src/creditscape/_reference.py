"""Dense, brute-force references for tests and examples (small models only, slow on purpose).

Each rule's gradient is transcribed from its definition in DESIGN.md §3 with explicit matrices,
one sequence at a time, in numpy float64: per-step Jacobians J_t = ∂s_t/∂s_{t-1} and immediate
terms I_t = ∂s_t/∂θ|_{s_{t-1} fixed} (taken with ``jax.jacobian`` of the model's single step),
then sums over paths. Nothing here shares code with the rules' implementations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from creditscape import model as _model
from creditscape.objective import loss_weights, step_losses


def _pieces(cfg, params, struct, x, xi, target, weights, feedback, rate_signal=None):
    """Per-step dense quantities of one sequence (x: (T, n_in)); ``rate_signal`` (N,): the firing-rate
    regularizer's ∂R/∂z_t (the same at every step), None without one."""
    rate_signal = np.zeros(cfg.n_rec) if rate_signal is None else rate_signal
    rec = params._replace(w_out=None, b_out=None)
    theta, unravel = ravel_pytree(rec)
    full = lambda th: unravel(th)._replace(w_out=params.w_out, b_out=params.b_out)

    def one_step(th, s_prev, x_t, xi_t):
        return _model.step(cfg, full(th), struct, s_prev[None], x_t[None], None if xi_t is None else xi_t[None])[0][0]

    s0_fn = lambda th: _model.initial_state(cfg, full(th), 1)[0]
    s = np.asarray(s0_fn(theta))
    ds0 = np.asarray(jax.jacobian(s0_fn)(theta))
    out = {"J": [], "I": [], "c": [], "L": [], "drds": [], "s_prev": [], "s": [], "D": [], "dzds": [],
           "ds0": ds0, "n_par": theta.shape[0]}
    for t in range(x.shape[0]):
        xi_t = None if xi is None else xi[t]
        args = (theta, jnp.asarray(s), x[t], xi_t)
        out["J"].append(np.asarray(jax.jacobian(one_step, argnums=1)(*args)))
        out["I"].append(np.asarray(jax.jacobian(one_step, argnums=0)(*args)))
        if cfg.spiking:  # the unit's own dynamics: ∂s_t/∂s_{t-1} with the recurrent spikes held
            held = _model.activity(cfg, jnp.asarray(s)[None])
            own = lambda s_prev: _model.step(cfg, full(theta), struct, s_prev[None], x[t][None],
                                             None if xi_t is None else xi_t[None], recurrent_input=lambda _: held)[0][0]
            out["D"].append(np.asarray(jax.jacobian(own)(jnp.asarray(s))))
        out["s_prev"].append(s)
        s = np.asarray(one_step(*args))
        out["s"].append(s)
        read = lambda s_: _model.readout_input(cfg, s_, _model.activity(cfg, s_))
        y = _model.readout(params, read(jnp.asarray(s)))
        e = np.asarray(jax.grad(lambda y_: weights[t] * step_losses(cfg, y_[None, None], target[t][None, None])[0, 0])(y))
        signal = np.asarray(feedback).T @ e  # learning signal w.r.t. what readout t reads
        drds = np.asarray(jax.jacobian(read)(jnp.asarray(s)))
        out["dzds"].append(np.asarray(jax.jacobian(lambda s_: _model.activity(cfg, s_))(jnp.asarray(s))))
        out["c"].append(signal @ drds + rate_signal @ out["dzds"][-1])  # w.r.t. s_t
        out["L"].append(signal)
        out["drds"].append(drds)
    return out, unravel


def _leaks(cfg, struct):
    """diag(α_1 … α_N): each unit's leak as a matrix."""
    return np.diag(np.full(cfg.n_rec, cfg.alpha) if struct.leak is None else np.asarray(struct.leak))


def _recurrent_hop(cfg, struct, s_prev_next, s_next, u_next, w_bar):
    """R̄_{t+1} = ∂s_{t+1}/∂s_t through the recurrent path with W̄, written out."""
    dphi = lambda z: np.asarray(jax.vmap(jax.grad(cfg.phi))(jnp.asarray(z)))
    one_minus = np.eye(cfg.n_rec) - _leaks(cfg, struct)
    if cfg.form == "voltage":
        return one_minus @ w_bar @ np.diag(dphi(s_prev_next))
    return one_minus @ np.diag(dphi(u_next)) @ w_bar


def _snap_pattern(cfg, struct, pc, n):
    """SnAp-n's pattern from its definition: parameter p acts on the unit its immediate terms touch
    (over the whole sequence); entry (k, p) is kept when k is reachable from that unit in at most
    n − 1 steps along existing recurrent connections (i → k where W_rec[k, i] exists)."""
    touched = np.abs(np.asarray(pc["ds0"])) + sum(np.abs(i_t) for i_t in pc["I"])
    owner = np.argmax(touched, axis=0)  # parameters touching no unit (absent weights) keep a zero column
    mask = np.asarray(struct.rec_mask)
    reach = np.zeros((cfg.n_rec, cfg.n_rec), bool)
    for start in range(cfg.n_rec):
        frontier = {start}
        seen = {start}
        for _ in range(n - 1):
            frontier = {k for i in frontier for k in range(cfg.n_rec) if mask[k, i]} - seen
            seen |= frontier
        reach[sorted(seen), start] = True
    return reach[:, owner].astype(float)


def reference_gradient(cfg, params, struct, batch, rule: str, *, k: int | None = None, feedback=None,
                       w_bar=None, xi=None, n: int | None = None, slope: float | None = None, sensitivity=None,
                       decay=None, synthetic=None):
    """Recurrent-layer gradient (as a pytree like ``params`` with readout ``None``) of ``rule`` ∈
    {"exact", "tbptt", "eprop", "mdgl", "modprop", "snap", "kernl", "dni"} by explicit path sums
    (SnAp: the masked recursion written out; KeRNL with its ``sensitivity`` A and ``decay`` κ, DNI
    with its ``synthetic`` A). ``feedback`` (n_out × N) replaces W_out in the learning signal;
    ``w_bar`` is MDGL's and ModProp's modulatory matrix; ``k`` the tbptt window; ``n`` SnAp's number
    of steps or ModProp's number of hops; ``slope`` ModProp's μ (None: each unit's φ')."""
    feedback = params.w_out if feedback is None else feedback
    weights = np.asarray(loss_weights(cfg, batch.mask))
    rate_signal = np.zeros(cfg.n_rec)
    if cfg.rate_regularization:  # R = c Σ_i (f̄_i − f₀)²: ∂R/∂z_{b,t,i} = 2c (f̄_i − f₀) / (B·T)
        z = np.asarray(_model.run(cfg, params, struct, batch.x, xi)[1])
        rate_signal = 2 * cfg.rate_regularization * (z.mean(axis=(0, 1)) - cfg.target_rate) / (z.shape[0] * z.shape[1])
    total, unravel = None, None
    for b in range(batch.x.shape[0]):
        xb = None if xi is None else xi[b]
        pc, unravel = _pieces(cfg, params, struct, batch.x[b], xb, batch.target[b], weights[b], feedback, rate_signal)
        pc["rate"] = rate_signal
        n_steps, n_par = len(pc["J"]), pc["n_par"]
        g = np.zeros(n_par)
        # Immediate term of step t (1-based); step 1 includes the path through a learned s0.
        imm = [None] + [pc["I"][t] for t in range(n_steps)]
        imm[1] = imm[1] + pc["J"][0] @ pc["ds0"]
        J = [None] + pc["J"]
        c = [None] + pc["c"]
        if rule in ("exact", "tbptt"):
            window = n_steps if rule == "exact" else k
            for t in range(1, n_steps + 1):
                for tau in range(max(1, t - window + 1), t + 1):
                    m = imm[tau]
                    for step in range(tau + 1, t + 1):
                        m = J[step] @ m
                    g += c[t] @ m
        elif cfg.spiking and rule in ("eprop", "mdgl"):
            g = _spiking_trace_rule(cfg, pc, rule, w_bar)
        elif rule in ("eprop", "mdgl"):
            elig = [pc["ds0"]]  # leak-only eligibility, e_t = diag(α) e_{t-1} + I_t
            for t in range(1, n_steps + 1):
                elig.append(_leaks(cfg, struct) @ elig[-1] + pc["I"][t - 1])
            for t in range(1, n_steps + 1):
                g += c[t] @ elig[t]
                if rule == "mdgl" and t < n_steps:
                    x_next = batch.x[b][t]
                    u_next = _u(cfg, params, struct, pc["s"][t - 1], x_next, None if xb is None else xb[t])
                    hop = _recurrent_hop(cfg, struct, pc["s"][t - 1], pc["s"][t], u_next, np.asarray(w_bar))
                    g += c[t + 1] @ hop @ elig[t]
        elif rule == "modprop":  # Σ_t Σ_s L_{t+s} H_{t+s} ⋯ H_{t+1} (∂r_t/∂s_t) e_t, s ≤ n hops, in activities
            elig = [pc["ds0"]]
            for t in range(1, n_steps + 1):
                elig.append(_leaks(cfg, struct) @ elig[-1] + pc["I"][t - 1])
            dphi = lambda z: np.asarray(jax.vmap(jax.grad(cfg.phi))(jnp.asarray(z))) if slope is None else np.full(len(z), slope)
            hop = [None, None]  # hop[t + 1] = ∂r_{t+1}/∂r_t through W̄ (1-based t)
            for t in range(1, n_steps):
                u_next = _u(cfg, params, struct, pc["s"][t - 1], batch.x[b][t], None if xb is None else xb[t])
                receiving = dphi(pc["s"][t] if cfg.form == "voltage" else u_next)
                hop.append((np.eye(cfg.n_rec) - _leaks(cfg, struct)) @ np.diag(receiving) @ np.asarray(w_bar))
            for t in range(1, n_steps + 1):
                carried = pc["drds"][t - 1] @ elig[t]
                for s_ in range(0, min(n, n_steps - t) + 1):
                    if s_:
                        carried = hop[t + s_] @ carried
                    g += pc["L"][t + s_ - 1] @ carried
        elif rule == "kernl":  # Σ_t c_t A B_t, B_t = diag(κ) B_{t-1} + I_t (no learned s0)
            elig = np.zeros_like(pc["I"][0])
            for t in range(1, n_steps + 1):
                elig = np.diag(np.asarray(decay)) @ elig + pc["I"][t - 1]
                g += c[t] @ np.asarray(sensitivity) @ elig
        elif rule == "dni":  # (1/B) Σ_t (A ã_t) I_t, ã_t = [s_t, y*_t, 1] (no learned s0)
            for t in range(1, n_steps + 1):
                scored = weights[b][t - 1] > 0
                label = (np.eye(cfg.n_out)[int(batch.target[b][t - 1])] if cfg.loss == "xent"
                         else np.asarray(batch.target[b][t - 1])) * scored
                a_tilde = np.concatenate([pc["s"][t - 1], label, [1.0]])
                g += (np.asarray(synthetic) @ a_tilde) @ pc["I"][t - 1] / batch.x.shape[0]
        elif rule == "snap":
            pattern = _snap_pattern(cfg, struct, pc, n)
            m = pc["ds0"]
            for t in range(1, n_steps + 1):
                m = pattern * (J[t] @ m + pc["I"][t - 1])
                g += c[t] @ m
        else:
            raise ValueError(f"no reference for {rule!r}")
        total = g if total is None else total + g
    return unravel(jnp.asarray(total))


def _spiking_trace_rule(cfg, pc, rule, w_bar):
    """e-prop on a spiking network: Σ_t c_t E_t, E_t = D_t E_{t-1} + I_t with D_t the unit's own
    dynamics (the filtered eligibility sits in E's readout-trace rows). MDGL: in spike space,
    Σ_t (L^z_t + L^z_{t+1} H_{t+1}) (∂z_t/∂s_t) E_t with L^z_t = Σ_{t'≥t} L_{t'} ∂ρ_{t'}/∂z_t through the
    readout filter ρ and the hop H_{t+1} = ∂z_{t+1}/∂z_t through W̄, (1-α) diag(ψ_{t+1}) W̄."""
    n_steps, n = len(pc["J"]), cfg.n_rec
    elig, e_list = np.zeros_like(pc["I"][0]), []
    for t in range(n_steps):
        elig = pc["D"][t] @ elig + pc["I"][t]
        e_list.append(elig)
    if rule == "eprop":
        return sum(pc["c"][t] @ e_list[t] for t in range(n_steps))
    kappa = cfg.readout_decay
    filt = lambda lag: (1 - kappa) * kappa**lag if kappa else float(lag == 0)  # ∂ρ_{t+lag}/∂z_t
    lz = [pc["rate"] + sum(pc["L"][tp] * filt(tp - t) for tp in range(t, n_steps)) for t in range(n_steps)]
    psi = [np.diag(pc["dzds"][t][:, :n]) for t in range(n_steps)]
    g = 0.0
    for t in range(n_steps):
        ez = pc["dzds"][t] @ e_list[t]
        g = g + lz[t] @ ez
        if t + 1 < n_steps:
            g = g + lz[t + 1] @ ((1 - cfg.alpha) * np.diag(psi[t + 1]) @ np.asarray(w_bar)) @ ez
    return g


def modulatory_weights(w_rec, mask, cell_type, kind: str) -> np.ndarray:
    """MDGL's W̄ entry by entry (DESIGN.md §3): ``"cell_type"`` averages each type pair over its
    existing connections and keeps W̄ on existing connections; ``"cell_type_all_pairs"`` averages
    over all pairs (absent ones as zeros) and fills every pair; ``"exact"`` is W_rec ⊙ mask."""
    w, mask, types = (np.asarray(a) for a in (w_rec, mask, cell_type))
    w = w * mask
    if kind == "exact":
        return w
    n = w.shape[0]
    out = np.zeros_like(w)
    for i in range(n):
        for j in range(n):
            pairs = [(k, l) for k in range(n) for l in range(n) if types[k] == types[i] and types[l] == types[j]]
            if kind == "cell_type":
                if mask[i, j]:
                    existing = [w[k, l] for k, l in pairs if mask[k, l]]
                    out[i, j] = sum(existing) / len(existing)
            else:
                out[i, j] = sum(w[k, l] for k, l in pairs) / len(pairs)
    return out


def _u(cfg, params, struct, s_prev, x_t, xi_t):
    return np.asarray(_model.step(cfg, params, struct, jnp.asarray(s_prev)[None], jnp.asarray(x_t)[None],
                                  None if xi_t is None else jnp.asarray(xi_t)[None])[2][0])
