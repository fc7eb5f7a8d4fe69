"""Normalisation + SGD is an RMSProp in disguise: make it explicit, then use it without BatchNorm.

As :doc:`/concepts/implicit_rmsprop` shows (after Tanaka & Kunin, NLD Eq. 15-18): on a
BatchNorm layer, SGD with weight decay trains each filter's unit direction with the
effective learning rate eta / ((1 - eta lambda) |w|^2), and |w|^2 is an accumulator of
squared gradients that weight decay discounts: an RMSProp with ONE scalar accumulator per
filter. ``ksbopt.noether_rmsprop`` carries that accumulator in its state and holds the
weights' norms fixed.

Part 1 (float64, BatchNorm CNN on MNIST-1D): SGD + weight decay and noether_rmsprop in exact
mode, from the same initialisation and the same minibatches, give the same filter directions
step after step (to rounding), and the same effective learning rates, although only the
first run lets the norms move.

Part 2 (float32, the same CNN WITHOUT normalisation): the mechanism switched on where no
normalisation layer provides it, beside RMSProp and heavy-ball SGD (three learning rates
each, chosen on a validation split, test accuracy reported).

Run:  python examples/implicit_adaptive.py [--steps 1500] [--out examples/figures]
      (about two minutes on 2 CPU cores; writes examples/figures/implicit_adaptive.png)
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import ksbopt

WIDTH = 32


class CNN(nnx.Module):
    """Three 1-D convolutions (+ BatchNorm) with ReLU, global average pooling, a Dense head."""

    def __init__(self, rngs: nnx.Rngs, *, norm: bool, dtype=jnp.float32):
        kw = {"param_dtype": dtype, "dtype": dtype, "rngs": rngs}
        self.conv0 = nnx.Conv(1, WIDTH, (5,), **kw)
        self.conv1 = nnx.Conv(WIDTH, WIDTH, (3,), strides=(2,), **kw)
        self.conv2 = nnx.Conv(WIDTH, WIDTH, (3,), strides=(2,), **kw)
        # epsilon = 0: the scale symmetry is then exact (docs/concepts/symmetries.md)
        self.norm = norm
        if norm:
            self.bn0, self.bn1, self.bn2 = (
                nnx.BatchNorm(WIDTH, epsilon=0.0, **kw) for _ in range(3)
            )
        self.head = nnx.Linear(WIDTH, 10, **kw)

    def __call__(self, x):
        h = x[..., None]
        for i, conv in enumerate((self.conv0, self.conv1, self.conv2)):
            h = conv(h)
            if self.norm:
                h = getattr(self, f"bn{i}")(h)
            h = nnx.relu(h)
        return self.head(h.mean(axis=1))


# One Scale group per output channel of each convolution (kernel[..., j] with bias[j]):
# exact symmetries after BatchNorm, plain unit declarations without it.
SYMMETRIES = [ksbopt.Scale([f"conv{i}/kernel", f"conv{i}/bias"], axis=-1) for i in range(3)]


def load_mnist1d():
    """MNIST-1D generated offline (the standard configuration, 4000/1000 split)."""
    from mnist1d.data import make_dataset
    from mnist1d.utils import ObjectView

    cfg = {
        "num_samples": 5000,
        "train_split": 0.8,
        "template_len": 12,
        "padding": [36, 60],
        "scale_coeff": 0.4,
        "max_translation": 48,
        "corr_noise_scale": 0.25,
        "iid_noise_scale": 2e-2,
        "shear_scale": 0.75,
        "shuffle_seq": False,
        "final_seq_length": 40,
        "seed": 42,
    }
    state = np.random.get_state()  # noqa: NPY002 - make_dataset reseeds the global RNG
    try:
        d = make_dataset(ObjectView(cfg))
    finally:
        np.random.set_state(state)  # noqa: NPY002
    x, y = np.asarray(d["x"], np.float32), np.asarray(d["y"], np.int32)
    return (
        (x[:3500], y[:3500]),
        (x[3500:], y[3500:]),
        (np.asarray(d["x_test"], np.float32), np.asarray(d["y_test"], np.int32)),
    )


def make_loss(graphdef):
    def loss_fn(params, stats, xb, yb):
        # fresh Variables at this trace level (BatchNorm updates its running statistics)
        stats = jax.tree.map(jnp.asarray, stats)
        model = nnx.merge(graphdef, params, stats)
        logits = model(xb)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
        return loss, nnx.state(model, nnx.BatchStat)

    return jax.value_and_grad(loss_fn, has_aux=True)


def make_step(graphdef, tx):
    """A jitted training step on pure (params, batch_stats) trees.

    (A Python loop over jitted steps: on XLA's CPU backend a convolution inside a
    ``lax.scan`` runs about 10x slower than the same step called from Python.)
    """
    value_and_grad = make_loss(graphdef)

    @jax.jit
    def step(params, stats, opt_state, xb, yb):
        (loss, stats), grads = value_and_grad(params, stats, xb, yb)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    return step


def make_accuracy(graphdef):
    @jax.jit
    def accuracy(params, stats, x, y):
        model = nnx.merge(graphdef, params, jax.tree.map(jnp.asarray, stats))
        model.eval()
        return jnp.mean(jnp.argmax(model(x), -1) == y)

    return lambda *args: float(accuracy(*args))


def batches(x, y, steps, batch, seed):
    idx = np.random.default_rng(seed).integers(0, len(x), size=(steps, batch))
    return x[idx], y[idx]


def groups(params, layer: int) -> jax.Array:
    """The Scale groups of one convolution as columns: kernel[..., j] stacked on bias[j]."""
    conv = params[f"conv{layer}"]
    k = conv["kernel"]
    return jnp.concatenate([k.reshape(-1, k.shape[-1]), conv["bias"][None]], axis=0)


def unit_directions(params) -> list[jax.Array]:
    return [g / jnp.linalg.norm(g, axis=0) for g in (groups(params, i) for i in range(3))]


def part1(data, steps: int, eta: float = 0.3, lam: float = 5e-3):
    """Same directions: SGD + weight decay vs noether_rmsprop (exact mode), float64."""
    (x_tr, y_tr), _, _ = data
    with jax.enable_x64(True), warnings.catch_warnings():
        # Flax keeps BatchNorm's running statistics in float32; they are not used in training
        warnings.filterwarnings("ignore", "scatter inputs have incompatible types")
        graphdef, params, stats = nnx.split(
            CNN(nnx.Rngs(0), norm=True, dtype=jnp.float64), nnx.Param, nnx.BatchStat
        )
        xs, ys = batches(x_tr.astype(np.float64), y_tr, steps, 128, seed=1)
        sgd = optax.chain(optax.add_decayed_weights(lam), optax.sgd(eta))
        nr = ksbopt.noether_rmsprop(SYMMETRIES, eta, lam)
        value_and_grad = make_loss(graphdef)

        @jax.jit
        def step(carry, xb, yb):
            out, probes = [], []
            for (p, s, o), tx in zip(carry, (sgd, nr)):
                (loss, s), g = value_and_grad(p, s, xb, yb)
                u, o = tx.update(g, o, p)
                out.append((optax.apply_updates(p, u), s, o))
                probes.append((loss, unit_directions(p)))
            (loss_a, dir_a), (loss_b, dir_b) = probes
            diff = jnp.max(jnp.stack([jnp.max(jnp.abs(a - b)) for a, b in zip(dir_a, dir_b)]))
            x_sgd = jnp.sum(jnp.square(groups(carry[0][0], 1)), axis=0)[:4]
            x_nr = carry[1][2].accumulator[1][:4]
            return tuple(out), (diff, jnp.abs(loss_a - loss_b), loss_a, x_sgd, x_nr)

        carry = tuple((params, stats, tx.init(params)) for tx in (sgd, nr))
        trace = []
        for k in range(steps):
            carry, probe = step(carry, xs[k], ys[k])
            trace.append(probe)
        diff, loss_gap, loss, x_sgd, x_nr = (np.stack(v) for v in zip(*jax.device_get(trace)))
        scale = eta / (1 - eta * lam)
        return {
            "diff": diff,
            "loss_gap": float(loss_gap.max()),
            "loss": loss,
            "eff_sgd": scale / x_sgd,
            "eff_nr": scale / x_nr,
        }


def part2(data, steps: int, every: int = 100):
    """Without normalisation: noether_rmsprop beside RMSProp and heavy-ball SGD."""
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = data
    graphdef, params, stats = nnx.split(CNN(nnx.Rngs(0), norm=False), nnx.Param, nnx.BatchStat)
    lam = 5e-4
    families = {
        "noether_rmsprop": (
            lambda lr: ksbopt.noether_rmsprop(SYMMETRIES, lr, lam, 0.9),
            (0.03, 0.1, 0.3),
        ),
        "rmsprop": (lambda lr: optax.rmsprop(lr), (1e-3, 3e-3, 1e-2)),
        "sgd": (
            lambda lr: optax.chain(optax.add_decayed_weights(lam), optax.sgd(lr, momentum=0.9)),
            (0.03, 0.1, 0.3),
        ),
    }
    xs, ys = batches(x_tr, y_tr, steps, 128, seed=2)
    accuracy = make_accuracy(graphdef)
    results = {}
    for name, (make, lrs) in families.items():
        tx = optax.inject_hyperparams(make)(lr=lrs[0])  # one compilation for the whole grid
        step = make_step(graphdef, tx)
        best = None
        for lr in lrs:
            p, s, o = params, stats, tx.init(params)
            o.hyperparams["lr"] = jnp.asarray(lr, jnp.float32)
            curve = []
            for k in range(steps):
                p, s, o, _ = step(p, s, o, xs[k], ys[k])
                if (k + 1) % every == 0:
                    curve.append(accuracy(p, s, x_te, y_te))
            val = accuracy(p, s, x_va, y_va)
            if best is None or val > best["val"]:
                best = {"lr": lr, "val": val, "test": curve[-1], "curve": curve}
        results[name] = best
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--steps", type=int, default=1500, help="training steps of part 2")
    parser.add_argument("--steps1", type=int, default=300, help="training steps of part 1")
    here = pathlib.Path(sys.argv[0]).resolve().parent  # the folder of this script
    parser.add_argument("--out", default=str(here / "figures"))
    args = parser.parse_args()
    t0 = time.perf_counter()
    data = load_mnist1d()

    r1 = part1(data, args.steps1)
    print(
        f"Part 1 (BatchNorm CNN, float64, {args.steps1} steps): max direction difference "
        f"SGD+wd vs noether_rmsprop {r1['diff'].max():.1e}, max loss difference "
        f"{r1['loss_gap']:.1e}; effective learning rate of 4 conv1 filters, step 0 -> "
        f"last: SGD {np.round(r1['eff_sgd'][0], 4)} -> {np.round(r1['eff_sgd'][-1], 4)}, "
        f"noether_rmsprop {np.round(r1['eff_nr'][0], 4)} -> {np.round(r1['eff_nr'][-1], 4)}"
    )

    r2 = part2(data, args.steps)
    print(f"Part 2 (no normalisation, float32, {args.steps} steps, lr chosen on validation):")
    for name, r in r2.items():
        print(f"  {name:16s} lr {r['lr']:<7g} val acc {r['val']:.3f}  test acc {r['test']:.3f}")
    print(f"({time.perf_counter() - t0:.0f} s)")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        print("matplotlib is not installed: no figure")
        return
    fig, ax = plt.subplots(1, 3, figsize=(14, 3.8))
    ax[0].semilogy(np.maximum(r1["diff"], 1e-17))
    ax[0].set(
        xlabel="step",
        ylabel="max |u_sgd - u_noether|",
        title="(a) BatchNorm CNN: same filter directions",
    )
    ax[1].plot(r1["eff_sgd"], lw=2.5, alpha=0.4)
    ax[1].set_prop_cycle(None)
    ax[1].plot(r1["eff_nr"], "--", lw=1)
    ax[1].plot([], [], "k-", lw=2.5, alpha=0.4, label="SGD + wd: eta / ((1 - eta lam) |w|^2)")
    ax[1].plot([], [], "k--", lw=1, label="noether_rmsprop: eta / ((1 - eta lam) x)")
    ax[1].set(
        xlabel="step",
        ylabel="effective learning rate",
        title="(b) the accumulator is |w|^2 (4 conv1 filters)",
    )
    ax[1].legend(fontsize=7)
    steps_axis = np.arange(1, len(next(iter(r2.values()))["curve"]) + 1) * 100
    for name, r in r2.items():
        ax[2].plot(steps_axis, r["curve"], label=f"{name} (lr {r['lr']:g})")
    ax[2].set(xlabel="step", ylabel="test accuracy", title="(c) same CNN without normalisation")
    ax[2].legend(fontsize=8)
    fig.tight_layout()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "implicit_adaptive.png", dpi=120)
    print(f"figure: {out / 'implicit_adaptive.png'}")


if __name__ == "__main__":
    main()
