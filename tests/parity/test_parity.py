"""ksbopt's peers at their defaults reproduce the reference implementations' trajectories.

Every fixture written by ``make_fixtures.py`` (the authors' code, ``pytorch-optimizer``, and
a Path-SGD written from the paper; CPU PyTorch, float64) is replayed here in float64 with the
ksbopt call listed in ``CASES``, from the same initial point (after ``balance_params`` /
``center_params`` where the reference balances or centres the weights when it is created),
with gradients of the same loss written in JAX, and compared at every stored step.

Tolerance: 1e-6 relative (max |ksbopt - reference| / max |reference| per leaf, worst stored
step). Both sides are float64 and do the same arithmetic in a different order and layout;
measured after 30 steps: at most 6e-15, except ``rotational_adamw`` (8e-12). The margin is
for other BLAS/XLA builds and for the cosine tests of SGDP/AdamP, whose ``eps`` PyTorch
places slightly differently. A wrong rule differs by far more: projecting only SGDP's step
against the authors' code 2.6e-2, Nero's current-norm scale 1.3e-1, REQ without centring
5.1e-1, REQ's averaging decay 0.99 for 0.9 4.6e-2.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ksbopt

from . import problems

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
RTOL = 1e-6


# -------------------------------------------------------------------------- JAX losses
# The same functions as ``make_fixtures.loss_fn``, on Flax-layout parameters.


def _patches(x):
    n, h, w, _ = x.shape
    rows = [
        jnp.stack([x[:, i : i + 3, j : j + 3, :].reshape(n, -1) for j in range(w - 2)], 1)
        for i in range(h - 2)
    ]
    return jnp.stack(rows, 1).reshape(n, -1, 18)


def _unit_normalise(k):
    return k / jnp.sqrt(jnp.sum(k * k, axis=tuple(range(k.ndim - 1))))


def make_loss(problem: str):
    x_np, y_np = problems.data(problem)
    x = jnp.asarray(x_np)
    patches, y = _patches(x), jnp.asarray(y_np)
    n = x.shape[0]

    def loss(p):
        conv, dense = p["conv/kernel"], p["dense/kernel"]
        if problem == "normalised":
            conv, dense = _unit_normalise(conv), _unit_normalise(dense)
        a = jax.nn.relu(patches @ conv.reshape(18, -1) + p["conv/bias"]).reshape(n, -1)
        a = jax.nn.relu(a @ dense + p["dense/bias"])
        out = a @ p["head/kernel"]
        if problem == "normalised":
            logp = jax.nn.log_softmax(out + p["head/bias"])
            return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))
        return 0.5 * jnp.sum((out - y) ** 2) / n

    return loss


def relu_path_norm(sq):
    """Squared path norm of the ``relu`` net: itself without ReLUs, squared weights, ones."""
    ones = jnp.ones((1, 18), sq["conv/kernel"].dtype)
    a = ones @ sq["conv/kernel"].reshape(18, -1) + sq["conv/bias"]
    a = a @ sq["dense/kernel"] + sq["dense/bias"]
    return jnp.sum(a @ sq["head/kernel"])


# ------------------------------------------------------------ ksbopt call per fixture

centred_layers = functools.partial(ksbopt.peers.center_params, per_neuron=False)
ADAM = functools.partial(optax.scale_by_adam, b1=0.9, b2=0.999, eps=1e-8)


def lr_schedule(count):
    """The fixture's ``LambdaLR``: ``3e-3 (1 - 0.5 t / STEPS)`` at 0-based step ``t``, in
    float64 (``optax.linear_schedule`` returns float32 here, 1e-8 off)."""
    return 3e-3 * (1 - 0.5 * jnp.asarray(count, jnp.float64) / problems.STEPS)


# name -> (the ksbopt optimizer at its defaults where the reference is at its defaults,
#          the init helper that stands for the reference's construction, or None)
CASES = {
    "sgdp_momentum": (lambda: ksbopt.peers.sgdp(0.1, momentum=0.9, weight_decay=1e-2), None),
    "sgdp_nesterov": (
        lambda: ksbopt.peers.sgdp(0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
        None,
    ),
    "sgdp_dampening": (
        lambda: ksbopt.peers.sgdp(
            0.2, momentum=0.8, dampening=0.2, weight_decay=0.0, delta=0.2, wd_ratio=0.3
        ),
        None,
    ),
    "sgdp_no_momentum": (lambda: ksbopt.peers.sgdp(0.3, momentum=0.0, weight_decay=5e-3), None),
    "sgdp_step_projection": (
        lambda: ksbopt.peers.sgdp(0.1, momentum=0.9, weight_decay=1e-2, project_momentum=False),
        None,
    ),
    "adamp_default": (lambda: ksbopt.peers.adamp(1e-2, weight_decay=1e-2), None),
    "adamp_nesterov": (
        lambda: ksbopt.peers.adamp(1e-2, b1=0.8, b2=0.99, nesterov=True, weight_decay=0.0),
        None,
    ),
    "nero_constraints": (lambda: ksbopt.peers.nero(0.01), ksbopt.peers.balance_params),
    "nero_unconstrained": (lambda: ksbopt.peers.nero(0.01, constraints=False), None),
    "nero_unconstrained_beta": (lambda: ksbopt.peers.nero(0.03, 0.99, constraints=False), None),
    "nero_pytorch_optimizer": (lambda: ksbopt.peers.nero(0.01, constraints=False), None),
    "rotational_sgd": (
        lambda: ksbopt.peers.rotational(optax.trace(0.9), 0.1, 5e-3, momentum=0.9),
        ksbopt.peers.center_params,
    ),
    "rotational_sgd_nesterov_layer": (
        lambda: ksbopt.peers.rotational(
            optax.trace(0.9, nesterov=True), 0.1, 5e-3, momentum=0.9, per_neuron=False
        ),
        centred_layers,
    ),
    "rotational_sgd_no_weight_decay": (
        lambda: ksbopt.peers.rotational(optax.trace(0.9), 0.1, 0.0, momentum=0.9),
        None,
    ),
    "rotational_sgd_options": (
        lambda: ksbopt.peers.rotational(
            optax.trace(0.5), 0.05, 1e-2, 0.5, 0.99, eps=1e-3, zero_mean=False
        ),
        None,
    ),
    "rotational_adamw": (
        lambda: ksbopt.peers.rotational(ADAM(), 3e-3, 0.1, momentum=0.9, kind="adamw"),
        ksbopt.peers.center_params,
    ),
    "rotational_adamw_layer": (
        lambda: ksbopt.peers.rotational(
            ADAM(b1=0.8, b2=0.99),
            3e-3,
            0.05,
            momentum=0.8,
            kind="adamw",
            per_neuron=False,
            zero_mean=False,
        ),
        None,
    ),
    "rotational_adamw_no_weight_decay": (
        lambda: ksbopt.peers.rotational(ADAM(), 3e-3, 0.0, momentum=0.9, kind="adamw"),
        None,
    ),
    "rotational_adamw_schedule": (
        lambda: ksbopt.peers.rotational(
            ADAM(),
            lr_schedule,
            0.1,
            momentum=0.9,
            kind="adamw",
        ),
        ksbopt.peers.center_params,
    ),
    "path_sgd": (lambda: ksbopt.peers.path_sgd(0.05, path_norm_fn=relu_path_norm), None),
}


def load(name: str) -> tuple[str, dict[str, dict[str, np.ndarray]], np.ndarray]:
    with np.load(FIXTURES / f"{name}.npz") as f:
        source = str(f["source"])
        parts: dict[str, dict[str, np.ndarray]] = {}
        for key in f.files:
            if "/" in key:
                part, leaf = key.split("/", 1)
                parts.setdefault(part, {})[leaf] = f[key]
        return source, parts, f["steps"]


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_every_fixture_has_a_case():
    assert sorted(p.stem for p in FIXTURES.glob("*.npz")) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_reference(name, x64):
    make_tx, init = CASES[name]
    source, f, steps = load(name)
    problem = "relu" if name.startswith("path") else "normalised"
    loss = make_loss(problem)
    p0 = {k: jnp.asarray(v) for k, v in f["p0"].items()}

    # The JAX loss is the reference's loss: same gradient at the initial point.
    grad0 = jax.grad(loss)(p0)
    for k, g in f["grad0"].items():
        assert rel_err(np.asarray(grad0[k]), g) < 1e-12, (k, source)

    # The init helper puts the weights where the reference's constructor put them.
    params = init(p0) if init else p0
    for k, w in f["start"].items():
        np.testing.assert_allclose(np.asarray(params[k]), w, rtol=1e-12, atol=1e-14)

    tx = make_tx()

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    worst = 0.0
    for t in range(1, int(steps.max()) + 1):
        params, state = step(params, state)
        if t in steps:
            i = int(np.flatnonzero(steps == t)[0])
            for k, traj in f["traj"].items():
                worst = max(worst, rel_err(np.asarray(params[k]), traj[i]))
    assert worst <= RTOL, f"{name}: {source}: relative error {worst:.3g}"
