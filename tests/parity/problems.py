"""The small fixed problems of the parity fixtures (NumPy only: data, initial parameters).

Parameters are in Flax layout (a kernel's output units on its LAST axis) under flat names
``"layer/kernel"``, ``"layer/bias"``; ``to_torch`` / ``from_torch`` convert a kernel to and
from PyTorch's layout (output units FIRST: Linear ``(out, in)``, Conv2d ``(out, in, kh, kw)``).

Two problems, each a loss written twice, in PyTorch (``make_fixtures.py``) and in JAX
(``test_parity.py``); every fixture stores the reference's gradient at the initial point and
the test checks that the JAX loss gives the same one:

- ``"normalised"``: a per-unit weight-normalised network (scale-invariant kernels, so the
  projections of SGDP/AdamP and the rotations of Nero/REQ all matter): a 3x3 VALID
  convolution on 4x4x2 images (weights shared over the 2x2 output positions), ReLU, a dense
  layer, ReLU, a softmax head (not normalised); mean cross-entropy. Kernels start with a
  non-zero mean (0.5, so centring and balancing change them) and the conv bias starts at
  zero (Nero's 0.01 bias scale).
- ``"relu"``: the plain ReLU network of Path-SGD: a 3x3 VALID convolution on 3x3x2 images
  (one output position, so no weight sharing), ReLU, dense, ReLU, a head without bias;
  half the mean squared error.
"""

from __future__ import annotations

import numpy as np

#: Steps run by every reference, and the steps whose parameters a fixture stores.
STEPS = 30
SAVED_STEPS = (1, 2, 3, 5, 8, 12, 20, 30)

SHAPES = {
    "normalised": {
        "conv/kernel": (3, 3, 2, 4),
        "conv/bias": (4,),
        "dense/kernel": (16, 5),
        "dense/bias": (5,),
        "head/kernel": (5, 3),
        "head/bias": (3,),
    },
    "relu": {
        "conv/kernel": (3, 3, 2, 4),
        "conv/bias": (4,),
        "dense/kernel": (4, 5),
        "dense/bias": (5,),
        "head/kernel": (5, 3),
    },
}
IMAGE = {"normalised": (4, 4, 2), "relu": (3, 3, 2)}
BATCH = 16
CLASSES = 3


def initial_params(problem: str) -> dict[str, np.ndarray]:
    """The starting point, float64, Flax layout."""
    rng = np.random.default_rng(0)
    p = {}
    for name, shape in SHAPES[problem].items():
        if name.endswith("kernel"):
            p[name] = rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
            if problem == "normalised":
                p[name] = p[name] + 0.5  # unbalanced: non-zero mean per unit
        else:
            p[name] = 0.1 * rng.normal(size=shape)
    if problem == "normalised":
        p["conv/bias"][:] = 0.0
    return p


def data(problem: str) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ``(BATCH, h, w, c)`` and targets: class labels (``normalised``) or
    ``(BATCH, 3)`` regression targets (``relu``)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(BATCH, *IMAGE[problem]))
    if problem == "normalised":
        return x, rng.integers(0, CLASSES, size=BATCH)
    return x, rng.normal(size=(BATCH, CLASSES))


def to_torch(name: str, w: np.ndarray) -> np.ndarray:
    """A Flax-layout leaf in PyTorch's layout (units first)."""
    if w.ndim == 4:  # (kh, kw, in, out) -> (out, in, kh, kw)
        return np.transpose(w, (3, 2, 0, 1))
    if w.ndim == 2:  # (in, out) -> (out, in)
        return w.T
    return w


def from_torch(name: str, w: np.ndarray) -> np.ndarray:
    """The inverse of :func:`to_torch`."""
    if w.ndim == 4:
        return np.transpose(w, (2, 3, 1, 0))
    if w.ndim == 2:
        return w.T
    return w
