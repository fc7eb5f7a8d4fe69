"""Mixed precision: how exactly ``ksbopt.retract`` holds Noether charges with bfloat16 weights.

ksbopt computes charges, projections and retractions in float32 whatever the parameter
dtype; only the final update is rounded to the parameter dtype. With bfloat16 *storage*
(parameters and optimizer state in bfloat16) every step therefore ends with two roundings:
of the update, and of ``params + update`` in ``optax.apply_updates``. A bfloat16 number
has 8 significant bits, so each stored entry is off by at most u = 2^-8 of its size (the unit
roundoff; ``jnp.finfo(jnp.bfloat16).eps`` = 2^-7 is the spacing). The retraction aims at
the charge of ``init`` (not of the previous step), so this error does not accumulate: it is
bounded by ONE rounding of the stored weights at every step, step 10 as step 10000.

Relative to the natural size S of a group (1/2 |w|^2 for scale, 1/2 (|w_in|^2 + |w_out|^2)
for rescale, sum |w| for translation, |A|^2 + |B|^2 per head for linear) the bound is

    |Q_k - Q_0| / S <= c (1 + rho),  c = 2u = 2^-7 (quadratic charges), c = u = 2^-8 (translation),

with rho = |update| / |w| of the group in that step (docs/howto/mixed_precision.md derives it).
The float32 master-weights pattern (float32 parameters in the optimizer, a bfloat16 copy for
the forward pass) keeps the master charges at float32 level (~1e-7), and the bfloat16 copy
within one rounding (rho = 0) of them.

The model is a sum of four exactly symmetric sub-networks in Flax layout, one per symmetry
kind: Dense -> BatchNorm (epsilon 0) -> tanh (scale), Dense -> ReLU -> Dense (rescale), a
softmax head (translation) and a deep linear net x A B (linear). Minibatches are Gaussian.

Run:  python examples/mixed_precision.py [--steps 1000] [--lr 0.05]   (about 50 s of CPU time)
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ksbopt

EPS_BF16 = float(jnp.finfo(jnp.bfloat16).eps)  # 2^-7
U_BF16 = EPS_BF16 / 2  # 2^-8, unit roundoff of round-to-nearest

SYMMETRIES = {
    "scale": ksbopt.Scale(["bn/kernel", "bn/bias"], axis=-1),
    "rescale": ksbopt.Rescale(incoming=["mlp0/kernel", "mlp0/bias"], outgoing="mlp1/kernel"),
    "translation": ksbopt.Translation(["head/kernel", "head/bias"]),
    "linear": ksbopt.Linear(left="A/kernel", right="B/kernel"),
}
# c in the bound c (1 + rho) of each kind (see the module docstring).
BOUND_FACTOR = {"scale": 2 * U_BF16, "rescale": 2 * U_BF16, "translation": U_BF16}
BOUND_FACTOR["linear"] = 2 * U_BF16


def init_params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def dense(n_in, n_out, gain=1.0, bias=True):
        p = {"kernel": gain * rng.normal(size=(n_in, n_out)) / np.sqrt(n_in)}
        if bias:
            p["bias"] = 0.1 * rng.normal(size=(n_out,))
        return p

    return {
        "bn": dense(16, 32, gain=2.0),
        "bn_out": dense(32, 4),
        "mlp0": dense(16, 32, gain=2.0),
        "mlp1": dense(32, 4),
        "head": dense(16, 10),
        "A": dense(16, 8, bias=False),
        "B": dense(8, 4, bias=False),
    }


def _f32(x):
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def loss_fn(p, x, y, labels):
    """Sum of four exactly symmetric losses; computed in float32 for bfloat16 weights."""

    def dense(q, h):
        out = h @ _f32(q["kernel"])
        return out + _f32(q["bias"]) if "bias" in q else out

    def mse(pred):
        return jnp.mean(jnp.square(pred - y))

    h = dense(p["bn"], x)
    h = (h - h.mean(0)) / jnp.sqrt(jnp.mean(jnp.square(h - h.mean(0)), axis=0))  # BatchNorm
    scale_loss = mse(dense(p["bn_out"], jnp.tanh(h)))
    rescale_loss = mse(dense(p["mlp1"], jax.nn.relu(dense(p["mlp0"], x))))
    logits = dense(p["head"], jnp.tanh(x))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    linear_loss = mse(dense(p["B"], dense(p["A"], x)))
    return scale_loss + rescale_loss + jnp.mean(ce) + linear_loss


def batch(key):
    kx, ky, kl = jax.random.split(key, 3)
    x = jax.random.normal(kx, (32, 16))
    return x, jax.random.normal(ky, (32, 4)), jax.random.randint(kl, (32,), 0, 10)


def rounding_scale(kind: str, p: dict) -> jax.Array:
    """S per group (per head for linear): the size bfloat16 rounding errors are relative to."""
    if kind == "scale":  # 1/2 |w|^2
        return ksbopt.charges(p, SYMMETRIES["scale"])[0]
    if kind == "rescale":  # 1/2 (|w_in|^2 + |w_out|^2)
        w_in = ksbopt.charges(p, ksbopt.Scale(["mlp0/kernel", "mlp0/bias"], axis=-1))[0]
        return w_in + ksbopt.charges(p, ksbopt.Scale("mlp1/kernel", axis=-2))[0]
    if kind == "translation":  # sum |w|
        return ksbopt.charges(jax.tree.map(jnp.abs, p), SYMMETRIES["translation"])[0]
    both = ksbopt.charges(p, [ksbopt.Scale("A/kernel", axis=None), ksbopt.Scale("B/kernel", None)])
    return (2 * (both[0] + both[1]))[:, None, None]  # |A|^2 + |B|^2, per head


def update_ratio(kind: str, u: dict, p: dict) -> jax.Array:
    """rho: the group's update relative to its weights (L1 for translation, L2 otherwise)."""
    r = rounding_scale(kind, u) / rounding_scale(kind, p)
    return jnp.max(r if kind == "translation" else jnp.sqrt(r))


def drift(kind: str, q, q0, p) -> jax.Array:
    """max over groups of |Q - Q_0| / S."""
    return jnp.max(jnp.abs(q - q0) / rounding_scale(kind, p))


def run(mode: str, steps: int, lr: float, seed: int = 0, excess_precision: bool = False):
    """Train with heavy ball + retract; return per-step drifts and update ratios per kind.

    mode: "bfloat16" (parameters and optimizer state stored in bfloat16), "master" (float32
    master weights, bfloat16 copy for the forward pass; also reports the copy's drift) or
    "float32".

    The steps run in one ``lax.scan``. XLA may then keep the bfloat16 carry in float32
    between steps ("excess precision", on by default): the weights are then NOT rounded to
    bfloat16 at every step, unlike a loop that calls a jitted step and stores its bfloat16
    outputs. ``excess_precision=False`` (the default here) turns that off for this program
    so that the scan rounds exactly like such a loop.
    """
    kinds = list(SYMMETRIES)
    sym = list(SYMMETRIES.values())
    tx = optax.chain(optax.sgd(lr, momentum=0.9), ksbopt.retract(sym))
    store = jnp.bfloat16 if mode == "bfloat16" else jnp.float32
    params = jax.tree.map(lambda x: jnp.asarray(x, store), init_params(seed))
    q0 = ksbopt.charges(params, sym)

    def step(carry, key):
        p, s = carry
        forward = jax.tree.map(lambda x: x.astype(jnp.bfloat16), p) if mode == "master" else p
        loss, g = jax.value_and_grad(loss_fn)(forward, *batch(key))
        g = jax.tree.map(lambda a, b: a.astype(b.dtype), g, p)  # bfloat16 grads -> master
        u, s = tx.update(g, s, p)
        p = optax.apply_updates(p, u)
        q = ksbopt.charges(p, sym)
        out = {
            "loss": loss,
            "drift": jnp.stack([drift(k, a, b, p) for k, a, b in zip(kinds, q, q0)]),
            "rho": jnp.stack([update_ratio(k, u, p) for k in kinds]),
        }
        if mode == "master":
            copy = jax.tree.map(lambda x: x.astype(jnp.bfloat16), p)
            qc = ksbopt.charges(copy, sym)
            out["copy_drift"] = jnp.stack([drift(k, a, b, p) for k, a, b in zip(kinds, qc, q0)])
        return (p, s), out

    keys = jax.random.split(jax.random.key(seed), steps)
    options = {"xla_allow_excess_precision": excess_precision}
    train = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), keys), compiler_options=options)
    _, out = train(params)
    return jax.tree.map(np.asarray, out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args(argv)
    marks = sorted({min(100, args.steps), args.steps})
    t0 = time.perf_counter()
    results = {m: run(m, args.steps, args.lr) for m in ("bfloat16", "master", "float32")}
    excess = run("bfloat16", args.steps, args.lr, excess_precision=True)
    print(f"max |Q_k - Q_0| / S over steps 1..k; heavy ball (lr {args.lr}, momentum 0.9) + retract")
    for m in marks:
        print(f"\nk = {m}")
        print(
            f"{'symmetry':<12}{'bound c(1+rho)':>15}{'bf16 storage':>14}{'f32 master':>12}"
            f"{'its bf16 copy':>15}{'float32':>10}"
        )
        for i, kind in enumerate(SYMMETRIES):
            rho = float(np.max(results["bfloat16"]["rho"][:m, i]))
            print(
                f"{kind:<12}{BOUND_FACTOR[kind] * (1 + rho):>15.2e}"
                f"{np.max(results['bfloat16']['drift'][:m, i]):>14.2e}"
                f"{np.max(results['master']['drift'][:m, i]):>12.2e}"
                f"{np.max(results['master']['copy_drift'][:m, i]):>15.2e}"
                f"{np.max(results['float32']['drift'][:m, i]):>10.2e}"
            )
    print()
    print(
        "bf16 storage with XLA's default excess precision in the scan (weights not rounded "
        "at every step): "
        + ", ".join(f"{k} {np.max(excess['drift'][:, i]):.1e}" for i, k in enumerate(SYMMETRIES))
    )
    for m, out in results.items():
        loss = out["loss"]
        print(f"loss {m:<9} first {loss[0]:.4f}  last 100 mean {np.mean(loss[-100:]):.4f}")
    print(f"({time.perf_counter() - t0:.1f} s, {jax.devices()[0].platform}, jax {jax.__version__})")


if __name__ == "__main__":
    main()
