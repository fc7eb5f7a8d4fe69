"""Detect the symmetries of a Flax CNN, print the report, train with what was found.

The model is a small NNX CNN on scikit-learn's 8x8 digits: two 3x3 convolutions, each
followed by BatchNorm and ReLU, global average pooling and a softmax head. ``ksbopt.detect``
reads its symmetries off the computation graph and verifies each one on two batches:

- a Scale group per output channel of each convolution (BatchNorm: approximate, because of
  its epsilon);
- a Rescale between each BatchNorm's scale/bias and the next layer's input rows (ReLU is
  positively homogeneous);
- a Translation of the head along the class axis (softmax).

A deliberately wrong declaration is then checked with ``ksbopt.verify``, and the model is
trained with SGD + momentum, once plain and once followed by ``ksbopt.retract`` built from
the detected declarations: the Noether charges then stay where they started (:ref:`P3 <p3>`:
without it, momentum and finite steps move them).

Run:  python examples/detect_and_train.py [--steps 400]     (about a minute on 2 CPU cores)
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
import ksbopt.flax


class CNN(nnx.Module):
    """Conv -> BatchNorm -> ReLU, twice; global average pooling; a Dense head."""

    def __init__(self, rngs: nnx.Rngs, width: int = 16):
        self.conv1 = nnx.Conv(1, width, (3, 3), use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(width, rngs=rngs)
        self.conv2 = nnx.Conv(width, 2 * width, (3, 3), use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(2 * width, rngs=rngs)
        self.head = nnx.Linear(2 * width, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean((1, 2)))


def load_data(seed: int = 0):
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]  # (n, 8, 8, 1)
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    return (x[360:], y[360:]), (x[:360], y[:360])


def cross_entropy(model, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def train(model, tx, data, symmetries, steps: int = 400, batch: int = 64, seed: int = 0):
    (x_tr, y_tr), (x_te, y_te) = data
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, xb, yb):
        loss, grads = nnx.value_and_grad(lambda m: cross_entropy(m, (xb, yb)))(model)
        optimizer.update(model, grads)
        return loss

    @nnx.jit
    def accuracy(model, x, y):
        model.eval()
        acc = jnp.mean(jnp.argmax(model(x), -1) == y)
        model.train()
        return acc

    rng = np.random.default_rng(seed)
    q0 = ksbopt.charges(nnx.state(model, nnx.Param), symmetries)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = rng.integers(0, len(x_tr), batch)
        loss = step(model, optimizer, x_tr[idx], y_tr[idx])
    q = ksbopt.charges(nnx.state(model, nnx.Param), symmetries)
    drift = max(
        float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-12))
        for a, b in zip(q, q0, strict=True)
    )
    print(
        f"  loss {float(loss):.4f}  test accuracy {float(accuracy(model, x_te, y_te)):.3f}  "
        f"largest relative charge change {drift:.1e}  ({time.perf_counter() - t0:.1f} s)"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--steps", type=int, default=400, help="training steps of each run")
    args = parser.parse_args(argv)
    data = load_data()
    (x_tr, y_tr), _ = data
    model = CNN(nnx.Rngs(0))
    model.train()

    # 1. Detect: a loss_fn(params, batch) closing over the model (BatchNorm in training mode
    #    uses the batch statistics; the model's running averages are not touched).
    loss_fn, params = ksbopt.flax.nnx_loss(model, cross_entropy)
    batches = [(x_tr[:64], y_tr[:64]), (x_tr[64:128], y_tr[64:128])]
    t0 = time.perf_counter()
    symmetries, report = ksbopt.detect(loss_fn, params, *batches)
    print(f"detect: {time.perf_counter() - t0:.1f} s")
    print(report)

    # 2. Verify catches a declaration that is not a symmetry: the head is not scale invariant.
    wrong = ksbopt.Scale(["head/kernel", "head/bias"], axis=-1)
    print(ksbopt.verify(wrong, loss_fn, params, *batches))

    # 3. Train with and without a ksbopt transform built from the detected declarations.
    sgd = optax.sgd(0.05, momentum=0.9)
    print("SGD + momentum 0.9")
    train(CNN(nnx.Rngs(0)), sgd, data, symmetries, steps=args.steps)
    print("SGD + momentum 0.9 + ksbopt.retract(detected symmetries)")
    train(
        CNN(nnx.Rngs(0)),
        optax.chain(sgd, ksbopt.retract(symmetries)),
        data,
        symmetries,
        steps=args.steps,
    )


if __name__ == "__main__":
    main()
