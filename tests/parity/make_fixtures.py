"""Writes the parity fixtures: trajectories of the reference implementations of the peers.

Not run by the test suite (it needs PyTorch and the authors' repositories); run it again when
a reference or a problem changes, and commit the ``.npz`` files it writes. The references:

- SGDP and AdamP: the authors' package ``adamp`` (https://github.com/clovaai/AdamP, from
  PyPI), and ``pytorch-optimizer``'s SGDP (the paper's step-only projection).
- Nero: the authors' ``nero.py`` (https://github.com/jxbz/nero), from a checkout given with
  ``--nero``, and ``pytorch-optimizer``'s Nero (with its extra ``eps`` set to 0).
- Rotational SGD / AdamW: the authors' ``RotationalSGD`` and ``RotationalAdamW``
  (https://github.com/epfml/REQ, ``shared/optimizers``), from a checkout given with
  ``--req``.
- Path-SGD: no public implementation of the authors exists, so :class:`PathSGD` below is
  written here from the paper (Neyshabur, Salakhutdinov, Srebro, "Path-SGD:
  Path-Normalized Optimization in Deep Neural Networks", NeurIPS 2015,
  https://arxiv.org/abs/1506.02617, Alg. 1 and the forward/backward recursions of
  ``gamma_in``, ``gamma_out`` in Sec. 4), in NumPy; biases are edges from a constant unit.

The authors' code is imported from the given folders, never copied into this project.
Setup and run (CPU PyTorch, float64; a minute on two cores)::

    pip install torch --index-url https://download.pytorch.org/whl/cpu
    pip install adamp pytorch-optimizer
    git clone https://github.com/jxbz/nero /tmp/nero
    git clone https://github.com/epfml/REQ /tmp/REQ
    python tests/parity/make_fixtures.py --nero /tmp/nero --req /tmp/REQ

Each fixture ``fixtures/NAME.npz`` holds, per parameter ``P`` (Flax layout): ``p0/P`` the
initial point, ``grad0/P`` the reference's gradient there (so the test can check that its
JAX loss is this one), ``start/P`` the parameters after the reference optimizer was created
(the authors' Nero and REQ balance or centre them then), ``traj/P`` the parameters after
each step of ``steps``; and ``source``, the call that made it.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys
from collections.abc import Callable

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import problems  # noqa: E402

# ---------------------------------------------------------------------------- losses


def _patches(torch, x):
    """3x3 VALID patches of ``x (N, H, W, C)``: ``(N, H-2, W-2, 9 C)``, order (kh, kw, c)."""
    n, h, w, _ = x.shape
    rows = [
        torch.stack([x[:, i : i + 3, j : j + 3, :].reshape(n, -1) for j in range(w - 2)], 1)
        for i in range(h - 2)
    ]
    return torch.stack(rows, 1)


def _flax(torch, name, t):
    """A PyTorch-layout parameter viewed in Flax layout (differentiable)."""
    if t.dim() == 4:
        return t.permute(2, 3, 1, 0)
    if t.dim() == 2:
        return t.t()
    return t


def _unit_normalise(k):
    axes = tuple(range(k.dim() - 1))
    return k / (k * k).sum(dim=axes, keepdim=True).sqrt()


def loss_fn(torch, problem: str) -> Callable:
    """The problem's loss of a dict of PyTorch-layout tensors (see ``problems.py``)."""
    x_np, y_np = problems.data(problem)
    x = torch.tensor(x_np)
    patches = _patches(torch, x).reshape(x.shape[0], -1, 18)

    def loss(tp):
        p = {k: _flax(torch, k, v) for k, v in tp.items()}
        conv = p["conv/kernel"]
        if problem == "normalised":
            conv = _unit_normalise(conv)
        z = patches @ conv.reshape(18, -1) + p["conv/bias"]
        a = torch.relu(z).reshape(x.shape[0], -1)
        dense = _unit_normalise(p["dense/kernel"]) if problem == "normalised" else p["dense/kernel"]
        a = torch.relu(a @ dense + p["dense/bias"])
        out = a @ p["head/kernel"]
        if problem == "normalised":
            logits = out + p["head/bias"]
            return torch.nn.functional.cross_entropy(logits, torch.tensor(y_np))
        return 0.5 * ((out - torch.tensor(y_np)) ** 2).sum() / x.shape[0]

    return loss


# -------------------------------------------------------------------- Path-SGD (paper)


def path_kappa(w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``kappa_e = gamma_in(u) gamma_out(v)`` for every edge ``u -> v`` of the ``relu`` net.

    Paper, Sec. 4: ``gamma_in(v) = sum_u gamma_in(u) w_{u->v}^2`` forward from the inputs
    (``gamma_in = 1``; here also for the constant unit feeding the biases) and
    ``gamma_out(u) = sum_v w_{u->v}^2 gamma_out(v)`` backward from the outputs
    (``gamma_out = 1``). The conv covers its whole 3x3 input: a dense layer from the 18
    inputs to its units, no weight sharing.
    """
    conv = w["conv/kernel"].reshape(18, -1)
    dense, head = w["dense/kernel"], w["head/kernel"]
    g_in1 = np.sum(conv**2, axis=0) + w["conv/bias"] ** 2
    g_in2 = g_in1 @ dense**2 + w["dense/bias"] ** 2
    g_out2 = np.sum(head**2, axis=1)
    g_out1 = dense**2 @ g_out2
    return {
        "conv/kernel": np.broadcast_to(g_out1, conv.shape).reshape(w["conv/kernel"].shape),
        "conv/bias": g_out1,
        "dense/kernel": np.outer(g_in1, g_out2),
        "dense/bias": g_out2,
        "head/kernel": np.broadcast_to(g_in2[:, None], head.shape).copy(),
    }


class PathSGD:
    """Path-SGD (paper, Alg. 1): ``w_e <- w_e - lr g_e / kappa_e(w)`` (0 where ``kappa_e = 0``).

    Works on a dict of PyTorch-layout tensors, through their Flax-layout NumPy values.
    """

    def __init__(self, params: dict, lr: float):
        import torch

        self.torch, self.params, self.lr = torch, params, lr

    def step(self):
        w = {k: problems.from_torch(k, v.detach().numpy()) for k, v in self.params.items()}
        kappa = path_kappa(w)
        with self.torch.no_grad():
            for k, t in self.params.items():
                g = problems.from_torch(k, t.grad.numpy())
                step = np.divide(g, kappa[k], out=np.zeros_like(g), where=kappa[k] > 0)
                t -= self.lr * self.torch.tensor(problems.to_torch(k, step))

    def zero_grad(self):
        for t in self.params.values():
            t.grad = None


# ----------------------------------------------------------------------------- runner


def run(torch, problem: str, make: Callable, schedule: Callable | None = None) -> dict:
    """Runs ``make(params_dict)`` for ``problems.STEPS`` steps; returns the fixture arrays."""
    p0 = problems.initial_params(problem)
    tp = {
        k: torch.tensor(problems.to_torch(k, v).copy(), requires_grad=True) for k, v in p0.items()
    }
    loss = loss_fn(torch, problem)
    out = {f"p0/{k}": v for k, v in p0.items()}
    for k, g in zip(tp, torch.autograd.grad(loss(tp), list(tp.values())), strict=True):
        out[f"grad0/{k}"] = problems.from_torch(k, g.numpy())
    opt = make(tp)
    out.update(
        {f"start/{k}": problems.from_torch(k, v.detach().numpy()).copy() for k, v in tp.items()}
    )
    sched = schedule(opt) if schedule else None
    traj = {k: [] for k in tp}
    for t in range(1, problems.STEPS + 1):
        opt.zero_grad()
        loss(tp).backward()
        opt.step()
        if sched is not None:
            sched.step()
        if t in problems.SAVED_STEPS:
            for k, v in tp.items():
                traj[k].append(problems.from_torch(k, v.detach().numpy().copy()))
    out.update({f"traj/{k}": np.stack(v) for k, v in traj.items()})
    out["steps"] = np.asarray(problems.SAVED_STEPS)
    return out


def _load_file(path: pathlib.Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def references(torch, nero_dir: pathlib.Path, req_dir: pathlib.Path) -> dict:
    """Fixture name -> (problem, optimizer class, its keyword arguments, lr multiplier or None).

    The lr multiplier ``f(t)`` (``t`` the 0-based step) drives a ``LambdaLR`` schedule.
    """
    import adamp
    import pytorch_optimizer as po

    nero = _load_file(nero_dir / "nero.py", "authors_nero").Nero
    sys.path.insert(0, str(req_dir))
    from shared.optimizers.rotational_adamw import RotationalAdamW
    from shared.optimizers.rotational_sgd import RotationalSGD

    def decay(t):
        return 1 - 0.5 * t / problems.STEPS

    n = "normalised"
    return {
        # SGDP / AdamP: the authors' package, and pytorch-optimizer's SGDP.
        "sgdp_momentum": (n, adamp.SGDP, dict(lr=0.1, momentum=0.9, weight_decay=1e-2), None),
        "sgdp_nesterov": (
            n,
            adamp.SGDP,
            dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
            None,
        ),
        "sgdp_dampening": (
            n,
            adamp.SGDP,
            dict(lr=0.2, momentum=0.8, dampening=0.2, weight_decay=0.0, delta=0.2, wd_ratio=0.3),
            None,
        ),
        "sgdp_no_momentum": (n, adamp.SGDP, dict(lr=0.3, momentum=0.0, weight_decay=5e-3), None),
        "sgdp_step_projection": (
            n,
            po.SGDP,
            dict(lr=0.1, momentum=0.9, weight_decay=1e-2),
            None,
        ),
        "adamp_default": (n, adamp.AdamP, dict(lr=1e-2, weight_decay=1e-2), None),
        "adamp_nesterov": (
            n,
            adamp.AdamP,
            dict(lr=1e-2, betas=(0.8, 0.99), nesterov=True, weight_decay=0.0),
            None,
        ),
        # Nero: the authors' nero.py and pytorch-optimizer's Nero.
        "nero_constraints": (n, nero, dict(lr=0.01), None),
        "nero_unconstrained": (n, nero, dict(lr=0.01, constraints=False), None),
        "nero_unconstrained_beta": (n, nero, dict(lr=0.03, beta=0.99, constraints=False), None),
        # pytorch-optimizer adds an eps (default 1e-8) to the root of the average, which the
        # authors' code does not have; 0 compares the rest.
        "nero_pytorch_optimizer": (n, po.Nero, dict(lr=0.01, constraints=False, eps=0.0), None),
        # REQ: the authors' rotational optimizers.
        "rotational_sgd": (n, RotationalSGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-3), None),
        "rotational_sgd_nesterov_layer": (
            n,
            RotationalSGD,
            dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-3, per_neuron=False),
            None,
        ),
        "rotational_sgd_no_weight_decay": (
            n,
            RotationalSGD,
            dict(lr=0.1, momentum=0.9, weight_decay=0.0),
            None,
        ),
        "rotational_sgd_options": (
            n,
            RotationalSGD,
            dict(
                lr=0.05,
                momentum=0.5,
                weight_decay=1e-2,
                zero_mean=False,
                update_norm_decay_factor=0.99,
                rotational_eps=1e-3,
            ),
            None,
        ),
        "rotational_adamw": (n, RotationalAdamW, dict(lr=3e-3, weight_decay=0.1), None),
        "rotational_adamw_layer": (
            n,
            RotationalAdamW,
            dict(lr=3e-3, betas=(0.8, 0.99), weight_decay=0.05, per_neuron=False, zero_mean=False),
            None,
        ),
        "rotational_adamw_no_weight_decay": (
            n,
            RotationalAdamW,
            dict(lr=3e-3, weight_decay=0.0),
            None,
        ),
        "rotational_adamw_schedule": (n, RotationalAdamW, dict(lr=3e-3, weight_decay=0.1), decay),
        # Path-SGD: written here from the paper.
        "path_sgd": ("relu", PathSGD, dict(lr=0.05), None),
    }


def describe(cls, kwargs: dict, multiplier: Callable | None) -> str:
    """The call that made a fixture, e.g. ``adamp.sgdp.SGDP(lr=0.1, momentum=0.9)``."""
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    where = "make_fixtures (from the paper)" if cls is PathSGD else cls.__module__
    text = f"{where}.{cls.__qualname__}({args})"
    if multiplier is not None:
        text += f" with LambdaLR(lr_lambda=lambda t: 1 - 0.5 * t / {problems.STEPS})"
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nero", type=pathlib.Path, required=True, help="checkout of jxbz/nero")
    parser.add_argument("--req", type=pathlib.Path, required=True, help="checkout of epfml/REQ")
    parser.add_argument("--out", type=pathlib.Path, default=HERE / "fixtures")
    parser.add_argument("--only", nargs="*", help="fixture names to write (default: all)")
    args = parser.parse_args(argv)

    import torch

    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, (problem, cls, kwargs, multiplier) in references(torch, args.nero, args.req).items():
        if args.only and name not in args.only:
            continue

        def make(ps, cls=cls, kwargs=kwargs):
            return cls(ps if cls is PathSGD else list(ps.values()), **kwargs)

        def schedule(opt, multiplier=multiplier):
            return torch.optim.lr_scheduler.LambdaLR(opt, multiplier)

        arrays = run(torch, problem, make, schedule if multiplier else None)
        source = describe(cls, kwargs, multiplier)
        np.savez_compressed(args.out / f"{name}.npz", source=np.asarray(source), **arrays)
        print(f"{name}: {source}")


if __name__ == "__main__":
    main()
