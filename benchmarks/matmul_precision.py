"""How far float32 rule gradients move from float64 under each matrix-product precision.

    python benchmarks/matmul_precision.py [--json OUT.json]

On a GPU, JAX's ``jax_default_matmul_precision`` decides how float32 matrix products are done:
``"highest"`` in full float32, ``"tensorfloat32"`` with TF32's 10-bit mantissas on the tensor
cores, ``"default"`` the backend's choice (TF32 on NVIDIA GPUs; JAX's "bfloat16" setting is the
same one, so it is not listed: bfloat16 products would need bfloat16 operands). For each setting, every
rule's float32 gradient (each form) on a small sequential-MNIST-like network is compared with the
same rule's float64 gradient, and the exact rules with float64 BPTT: the normwise relative error
‖ĝ₃₂ − ĝ₆₄‖_∞ / ‖ĝ₆₄‖_∞. The float32 tolerance asked of an equivalence here is 1e-4 (a few hundred
float32 roundings over T = 28 steps of N = 32 sums); the float64 tests hold 1e-10. On a CPU the
settings change nothing (XLA's CPU products are float32 throughout) and every row is float32's.
benchmarks/gpu.py times the same settings.
"""

from __future__ import annotations

import argparse
import json

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from creditscape import model as M  # noqa: E402
from creditscape.objective import Batch  # noqa: E402
from creditscape.rules import get_rule, rule_gradient  # noqa: E402

PRECISIONS = ("highest", "tensorfloat32", "default")
TOLERANCE = 1e-4
N_IN, N_REC, N_OUT, T, B = 28, 32, 10, 28, 16
# (rule, options, form): every kind of computation once (the online forms' traces, RTRL's B × N × P).
CASES = [("bptt", {}, "offline"), ("rtrl", {}, "online"), ("tbptt", {"k": 5}, "offline"), ("eprop", {}, "offline"),
         ("eprop", {}, "online"), ("eprop_random", {}, "online"), ("mdgl", {"allow_single_type": True}, "offline"),
         ("mdgl", {"allow_single_type": True}, "online")]
EXACT = ("bptt", "rtrl")


def problem(dtype):
    """The network and a batch of random images (rows as inputs, the label read at the last step),
    drawn in float64 and rounded to ``dtype``: both precisions see the same numbers."""
    cfg = M.ModelConfig(N_IN, N_REC, N_OUT, form="rate", activation="relu", bias=False, readout_steps=1)
    params, struct = M.init(cfg, jax.random.PRNGKey(0), jnp.float64)
    k = jax.random.split(jax.random.PRNGKey(1), 2)
    x = jax.random.uniform(k[0], (B, T, N_IN), jnp.float64)
    target = jnp.zeros((B, T), jnp.int32).at[:, -1].set(jax.random.randint(k[1], (B,), 0, N_OUT, jnp.int32))
    mask = jnp.zeros((B, T), jnp.float64).at[:, -1].set(1)
    return cfg, cast(params, dtype), cast(struct, dtype), Batch(cast(x, dtype), target, cast(mask, dtype))


def cast(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in jax.tree.leaves(tree)])


def gradients(dtype) -> dict[str, np.ndarray]:
    cfg, params, struct, batch = problem(dtype)
    out = {}
    for name, opts, form in CASES:
        rule = get_rule(name, **opts)
        state = cast(rule.init(cfg, cast(params, jnp.float64), cast(struct, jnp.float64), key=jax.random.PRNGKey(2)),
                     dtype)  # random feedback drawn once, in float64
        fn = jax.jit(lambda p, s, b, rule=rule, form=form: rule_gradient(rule, cfg, p, struct, s, b, form=form)[1])
        out[f"{name} ({form})"] = flat(fn(params, state, batch))
    return out


def relative_error(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write results here")
    args = parser.parse_args()
    with jax.default_matmul_precision("highest"):
        reference = gradients(jnp.float64)
    print(f"device {jax.devices()[0]}; float32 gradients against float64 (tolerance {TOLERANCE:g})")
    results = {"device": str(jax.devices()[0]), "tolerance": TOLERANCE, "errors": {}, "passes": {}}
    for precision in PRECISIONS:
        with jax.default_matmul_precision(precision):
            single = gradients(jnp.float32)
        errors = {}
        for case, g in single.items():
            errors[case] = relative_error(g, reference[case])
            if case.split()[0] in EXACT:  # an exact rule against float64 BPTT as well
                errors[f"{case} vs bptt"] = relative_error(g, reference["bptt (offline)"])
        worst = max(errors, key=errors.get)
        results["errors"][precision] = errors
        results["passes"][precision] = errors[worst] <= TOLERANCE
        print(f"  {precision:14s} worst {errors[worst]:.2e} ({worst}); "
              f"{'every equivalence within' if errors[worst] <= TOLERANCE else 'FAILS'} {TOLERANCE:g}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
