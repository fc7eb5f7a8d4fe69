"""Noether diagnostics of a BatchNorm CNN on MNIST-1D, trained with SGD and with Adam.

Every convolution is followed by BatchNorm, so each output channel of its kernel is a scale
group (charge 1/2 |w|^2), and the softmax head's rows and bias are translation groups
(charge <1, w>). ``ksbopt.monitor`` records, inside the jitted train step, every charge, its
per-step change split into first- and second-order terms, the angular update, the effective
learning rate, and what the exact recursions (:ref:`exact-identities`) predict:

- SGD + momentum 0.9 + (coupled) weight decay: P3 for the scale groups, P4 for the head, and
  the P7a equilibrium angular update sqrt(2 eta lam / (1 + beta));
- Adam: the metric-weighted charges 1/2 w^T P w of P6 (with Adam's momentum term).

BatchNorm keeps Flax's default epsilon = 1e-5, so the scale symmetry holds up to about
epsilon / variance: the residuals printed at the end show how far this real model is from
the exact identities (they are ~1e-15 on exactly symmetric losses in float64).

Data: MNIST-1D (Greydanus, "Scaling down deep learning with MNIST-1D", arXiv 2011.14439)
generated locally by ``mnist1d.data.make_dataset`` with its default arguments; nothing is
downloaded. Runs in a few minutes on 2 CPU cores and writes its figures to
``examples/figures/``.

Run:  python examples/noether_diagnostics.py [--steps 2000] [--out examples/figures]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import ksbopt
import ksbopt.dynamics
import ksbopt.plotting


def mnist1d_arrays(seed: int = 42):
    """MNIST-1D with the package's default arguments, generated offline."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    rng_state = np.random.get_state()  # noqa: NPY002  (make_dataset reseeds the global RNG)
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(rng_state)  # noqa: NPY002
    return (
        np.asarray(d["x"], np.float32),
        np.asarray(d["y"], np.int32),
        np.asarray(d["x_test"], np.float32),
        np.asarray(d["y_test"], np.int32),
    )


class CNN(nnx.Module):
    """MNIST-1D's CNN (three strided 1-D convolutions) with BatchNorm after each."""

    def __init__(self, channels: int = 25, *, rngs: nnx.Rngs):
        sizes = [(1, 5), (channels, 3), (channels, 3)]
        length = 40
        for i, (cin, k) in enumerate(sizes, start=1):
            setattr(
                self,
                f"conv{i}",
                nnx.Conv(cin, channels, (k,), strides=2, padding=1, use_bias=False, rngs=rngs),
            )
            setattr(self, f"bn{i}", nnx.BatchNorm(channels, momentum=0.9, rngs=rngs))
            length = (length + 2 - k) // 2 + 1
        self.head = nnx.Linear(channels * length, 10, rngs=rngs)

    def __call__(self, x):
        h = x[..., None]
        for i in (1, 2, 3):
            h = jax.nn.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(h)))
        return self.head(h.reshape(h.shape[0], -1))


SYMMETRIES = [ksbopt.Scale(f"conv{i}/kernel", axis=-1) for i in (1, 2, 3)] + [
    ksbopt.Translation(["head/kernel", "head/bias"])
]


def train(name, tx, data, *, steps, batch, every, seed=0):
    """Train with ``tx`` wrapped in the monitor; returns the recorder and test accuracy."""
    x, y, x_test, y_test = data
    model = CNN(rngs=nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))

    def loss_fn(m, xb, yb):
        return optax.softmax_cross_entropy_with_integer_labels(m(xb), yb).mean()

    @jax.jit
    def chunk(state, xb, yb):  # ``every`` steps in one scan, then one record
        def body(state, batch):
            m, opt = nnx.merge(graphdef, state)
            loss, grads = nnx.value_and_grad(loss_fn)(m, *batch)
            opt.update(m, grads)
            return nnx.state((m, opt)), loss

        return jax.lax.scan(body, state, (xb, yb))

    rng = np.random.default_rng(seed)
    recorder = ksbopt.Recorder(SYMMETRIES, every=every)
    start = time.perf_counter()
    for k in range(0, steps, every):
        idx = rng.integers(0, len(y), size=(every, batch))
        state, losses = chunk(state, x[idx], y[idx])
        _, opt = nnx.merge(graphdef, state)
        recorder.record(k, opt.opt_state)  # the diagnostics of step k (monitor every=N)
    m, _ = nnx.merge(graphdef, state)
    m.eval()
    acc = float(jnp.mean(jnp.argmax(m(x_test), -1) == y_test))
    print(
        f"{name}: {steps} steps in {time.perf_counter() - start:.1f} s, final loss "
        f"{float(losses[-1]):.3f}, test accuracy {acc:.3f}"
    )
    return recorder, acc


def report(name, recorder):
    """The largest normalised residual of every predicted quantity."""
    h = recorder.history()
    for field in ("prediction_error", "metric_prediction_error"):
        for label, err in zip(h.labels, h[field], strict=True):
            if err is not None:
                print(
                    f"  {name} {field:24s} {label:28s} max |residual| = {np.max(np.abs(err)):.2e}"
                )
    worst = max(recorder.max_abs("prediction_error"), recorder.max_abs("metric_prediction_error"))
    print(
        f"  {name}: largest residual {worst:.2e}; largest violation cosine "
        f"{recorder.max_abs('violation'):.2e}"
    )
    return worst


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--every", type=int, default=10, help="diagnostics every N steps")
    parser.add_argument("--out", default=str(Path(sys.argv[0]).resolve().parent / "figures"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = mnist1d_arrays()
    print(f"MNIST-1D: {len(data[1])} train, {len(data[3])} test examples (generated offline)")

    lr, momentum, wd = 0.05, 0.9, 5e-4
    sgd = ksbopt.monitor(
        optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum=momentum)),
        SYMMETRIES,
        dynamics=ksbopt.dynamics.sgd(lr, momentum, wd),
        every=args.every,
    )
    adam = ksbopt.monitor(
        optax.adam(1e-2), SYMMETRIES, dynamics=ksbopt.dynamics.adam(1e-2), every=args.every
    )
    runs = {}
    for name, tx in (("sgd", sgd), ("adam", adam)):
        rec, _ = train(name, tx, data, steps=args.steps, batch=args.batch, every=args.every)
        runs[name] = rec
    print("residuals (observed - predicted) / charge scale, over all recorded steps:")
    worst = max(report(name, rec) for name, rec in runs.items())

    p = ksbopt.plotting
    p.plot_charges(runs["sgd"], path=out / "sgd_charges.png")
    p.plot_effective_learning_rate(runs["sgd"], path=out / "sgd_effective_lr.png")
    p.plot_angular_update(runs["sgd"], [0, 1, 2], path=out / "sgd_angular_update.png")
    p.plot_decomposition(runs["sgd"], 1, path=out / "sgd_decomposition_conv2.png")
    p.plot_charges(runs["adam"], path=out / "adam_metric_charges.png")
    p.plot_decomposition(runs["adam"], 1, path=out / "adam_decomposition_conv2.png")
    p.plot_prediction_error(runs["sgd"], path=out / "sgd_prediction_error.png")
    print(f"figures written to {out}; largest residual over both runs: {worst:.2e}")
    return worst


if __name__ == "__main__":
    main()
