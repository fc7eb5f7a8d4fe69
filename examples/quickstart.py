"""Quick start: a BatchNorm MLP on scikit-learn's digits, with and without ksbopt.retract.

BatchNorm after a Dense layer makes the loss invariant under scaling each output unit's
incoming weights (a Scale symmetry, one group per unit). Plain SGD + momentum lets the
Noether charge Q = |w|^2 / 2 of every unit drift (kinetic symmetry breaking: :ref:`P3 <p3>`);
``ksbopt.retract`` keeps it exactly where it started (the NLD constrained-norm control).

Run:  python examples/quickstart.py [--steps 1200]     (about half a minute on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import time

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

import ksbopt


class MLP(nnx.Module):
    """Dense -> BatchNorm -> ReLU, twice, then a Dense head."""

    def __init__(self, rngs: nnx.Rngs, width: int = 128):
        self.Dense_0 = nnx.Linear(64, width, rngs=rngs)
        self.BatchNorm_0 = nnx.BatchNorm(width, rngs=rngs)
        self.Dense_1 = nnx.Linear(width, width, rngs=rngs)
        self.BatchNorm_1 = nnx.BatchNorm(width, rngs=rngs)
        self.head = nnx.Linear(width, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.BatchNorm_0(self.Dense_0(x)))
        x = nnx.relu(self.BatchNorm_1(self.Dense_1(x)))
        return self.head(x)


# One Scale group per output unit of each Dense layer that feeds a BatchNorm.
SYMMETRIES = [
    ksbopt.Scale(["Dense_0/kernel", "Dense_0/bias"], axis=-1),
    ksbopt.Scale(["Dense_1/kernel", "Dense_1/bias"], axis=-1),
]


def load_data(seed: int = 0):
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    n_test = 360
    return (x[n_test:], y[n_test:]), (x[:n_test], y[:n_test])


def train(
    tx: optax.GradientTransformation,
    steps: int = 1200,
    batch: int = 64,
    report_every: int = 300,
    seed: int = 0,
) -> None:
    (x_tr, y_tr), (x_te, y_te) = load_data()
    model = MLP(nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, xb, yb):
        def loss_fn(model):
            logits = model(xb)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    @nnx.jit
    def accuracy(model, x, y):
        model.eval()
        acc = jnp.mean(jnp.argmax(model(x), -1) == y)
        model.train()
        return acc

    rng = np.random.default_rng(seed)
    q0 = ksbopt.charges(nnx.state(model, nnx.Param), SYMMETRIES)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        idx = rng.integers(0, len(x_tr), batch)
        loss = train_step(model, optimizer, x_tr[idx], y_tr[idx])
        if step % report_every == 0 or step == 1:
            q = ksbopt.charges(nnx.state(model, nnx.Param), SYMMETRIES)
            charges = "  ".join(
                f"Dense_{i}: mean Q {float(c.mean()):6.3f}, max |Q/Q0 - 1| "
                f"{float(jnp.max(jnp.abs(c / c0 - 1))):.1e}"
                for i, (c, c0) in enumerate(zip(q, q0))
            )
            print(
                f"  step {step:5d}  loss {float(loss):.4f}  test acc "
                f"{float(accuracy(model, x_te, y_te)):.3f}  {charges}"
            )
    print(f"  ({time.perf_counter() - t0:.1f} s)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--steps", type=int, default=1200, help="training steps of each run")
    args = parser.parse_args(argv)
    sgd = optax.sgd(0.1, momentum=0.9)
    print("SGD + momentum 0.9 (the charges drift: kinetic symmetry breaking)")
    train(sgd, steps=args.steps)
    print("SGD + momentum 0.9 + ksbopt.retract (the charges stay at their initial values)")
    train(optax.chain(sgd, ksbopt.retract(SYMMETRIES)), steps=args.steps)


if __name__ == "__main__":
    main()
