"""NumPy references of the peer optimizers, written from their papers.

Independent of ksbopt and of any published code: plain float64 NumPy, explicit loops over
output units, one function per update rule, following the pseudo-code of each paper (the
line numbers below refer to the papers' algorithm boxes). Where a paper leaves a detail
open, the choice made by ksbopt's docstrings is written out here again, explicitly.

Parameters are flat dicts ``name -> ndarray``; a leaf with two or more dimensions is a
kernel in Flax layout, its output units on the LAST axis.

Papers:
- SGDP/AdamP: Heo et al., ICLR 2021, https://arxiv.org/abs/2006.08217 (Alg. 1 and 2).
- Nero: Liu et al., ICML 2021, https://arxiv.org/abs/2102.07227 (Alg. 1).
- Rotational equilibrium: Kosson et al., ICML 2024, https://arxiv.org/abs/2305.17212.
- Path-SGD: Neyshabur et al., NeurIPS 2015, https://arxiv.org/abs/1506.02617 (Alg. 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

Params = dict[str, np.ndarray]
GradFn = Callable[[Params, int], Params]
LR = float | Callable[[int], float]


def lr_at(lr: LR, t: int) -> float:
    """The learning rate of step ``t`` (0-based): a constant or a function of ``t``."""
    return float(lr(t)) if callable(lr) else float(lr)


# --------------------------------------------------------------------------- units


def units_of(w: np.ndarray) -> np.ndarray:
    """Rows of the returned (units, entries) matrix are the units ``w[..., j]``."""
    return np.stack([w[..., j].ravel() for j in range(w.shape[-1])])


def from_units(rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    out = np.empty(shape)
    for j in range(shape[-1]):
        out[..., j] = rows[j].reshape(shape[:-1])
    return out


def _norm(x: np.ndarray) -> float:
    return math.sqrt(float(np.sum(x * x)))


# ----------------------------------------------------------------------- SGDP / AdamP


def _cosine(a: np.ndarray, b: np.ndarray, eps: float) -> float:
    den = _norm(a) * _norm(b) + eps
    return abs(float(a @ b)) / den if den > 0 else 0.0


def _drop_radial(x: np.ndarray, w: np.ndarray, eps: float = 0.0) -> np.ndarray:
    """Pi_w(x) = x - <w_hat, x> w_hat with w_hat = w / (|w| + eps) (the authors' SGDP/AdamP
    code adds eps to the norm); a zero w leaves x unchanged."""
    n = _norm(w)
    if n == 0:
        return x.copy()
    w_hat = w / (n + eps)
    return x - float(w_hat @ x) * w_hat


def adamp_projection(
    p: np.ndarray, g: np.ndarray, w: np.ndarray, delta: float, eps: float
) -> tuple[np.ndarray, str]:
    """Heo et al. Sec. 3.2: channel view first, then layer view. Returns (q, view)."""
    if w.ndim < 2:
        return p.copy(), "none"
    P, G, W = units_of(p), units_of(g), units_of(w)
    d_unit = W.shape[1]
    if max(_cosine(G[j], W[j], eps) for j in range(len(W))) < delta / math.sqrt(d_unit):
        rows = np.stack([_drop_radial(P[j], W[j], eps) for j in range(len(W))])
        return from_units(rows, w.shape), "unit"
    if _cosine(g.ravel(), w.ravel(), eps) < delta / math.sqrt(w.size):
        return _drop_radial(p.ravel(), w.ravel(), eps).reshape(w.shape), "layer"
    return p.copy(), "none"


def sgdp_run(
    params: Params,
    grad_fn: GradFn,
    steps: int,
    *,
    lr: LR,
    momentum: float,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    eps: float = 1e-8,
    delta: float = 0.1,
    wd_ratio: float = 0.1,
    project_momentum: bool | None = None,
) -> tuple[list[Params], list[dict[str, str]]]:
    """SGDP (Alg. 1) with decoupled decay weight_decay / (1 - momentum), scaled by wd_ratio.

    The buffer: ``project_momentum=None`` as the authors' code (the projected step replaces
    the buffer without Nesterov), ``False`` as Alg. 1 (never), ``True`` always.
    """
    project = (not nesterov) if project_momentum is None else project_momentum
    w = {k: np.array(v, np.float64) for k, v in params.items()}
    buf = {k: np.zeros_like(v) for k, v in w.items()}
    trajectory, views = [], []
    for t in range(steps):
        g = grad_fn(w, t)
        eta = lr_at(lr, t)
        new, view_t = {}, {}
        for k in w:
            buf[k] = momentum * buf[k] + (1 - dampening) * g[k]
            p = g[k] + momentum * buf[k] if nesterov else buf[k]
            q, view_t[k] = adamp_projection(p, g[k], w[k], delta, eps)
            if project:
                buf[k] = adamp_projection(buf[k], g[k], w[k], delta, eps)[0]
            ratio = wd_ratio if view_t[k] != "none" else 1.0
            new[k] = w[k] - eta * q - eta * weight_decay * ratio / (1 - momentum) * w[k]
        w = new
        trajectory.append({k: v.copy() for k, v in w.items()})
        views.append(view_t)
    return trajectory, views


def adamp_run(
    params: Params,
    grad_fn: GradFn,
    steps: int,
    *,
    lr: LR,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    delta: float = 0.1,
    wd_ratio: float = 0.1,
    nesterov: bool = False,
) -> tuple[list[Params], list[dict[str, str]]]:
    """AdamP (Alg. 2) with Adam's bias correction and decoupled (AdamW) decay."""
    w = {k: np.array(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in w.items()}
    v2 = {k: np.zeros_like(v) for k, v in w.items()}
    trajectory, views = [], []
    for t in range(1, steps + 1):
        g = grad_fn(w, t - 1)
        eta = lr_at(lr, t - 1)
        new, view_t = {}, {}
        for k in w:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v2[k] = b2 * v2[k] + (1 - b2) * g[k] ** 2
            first = b1 * m[k] + (1 - b1) * g[k] if nesterov else m[k]
            m_hat = first / (1 - b1**t)
            v_hat = v2[k] / (1 - b2**t)
            p = m_hat / (np.sqrt(v_hat) + eps)
            q, view_t[k] = adamp_projection(p, g[k], w[k], delta, eps)
            ratio = wd_ratio if view_t[k] != "none" else 1.0
            new[k] = w[k] - eta * q - eta * weight_decay * ratio * w[k]
        w = new
        trajectory.append({k: val.copy() for k, val in w.items()})
        views.append(view_t)
    return trajectory, views


# ------------------------------------------------------------------------------ Nero


def balance(w: np.ndarray) -> np.ndarray:
    """Nero's constraint, per unit: subtract the mean, divide by the norm (0 stays 0)."""
    rows = units_of(w)
    out = []
    for r in rows:
        c = r - r.mean()
        n = _norm(c)
        out.append(c / n if n > 0 else np.zeros_like(c))
    return from_units(np.stack(out), w.shape)


def nero_run(
    params: Params,
    grad_fn: GradFn,
    steps: int,
    *,
    lr: LR,
    beta: float = 0.999,
    constraints: bool = True,
    debias: bool = True,
    step_scale: str = "initial_mean",
) -> list[Params]:
    """Nero (Liu et al. Alg. 1), loop over neurons.

    Kernels: per unit, g_bar^2 <- beta g_bar^2 + (1 - beta)|g_w|^2, w <- w - lr s g_w / g_bar,
    then w <- w - mean(w), w <- w / |w| with constraints. s = 1 under constraints; without,
    the mean of the kernel's initial unit norms (0.01 if 0; the authors' code) or, with
    step_scale="unit_norm", the unit's current norm |w|. 1-D leaves: each entry is a neuron
    bias b with b <- b - lr sigma_b g_b / g_bar_b, sigma_b = mean |b(0)| of the leaf, or 0.01
    if that is zero. With constraints, kernels are put on the constraint set at the start.
    """
    w = {k: np.array(v, np.float64) for k, v in params.items()}
    if constraints:
        w = {k: balance(v) if v.ndim >= 2 else v for k, v in w.items()}
    ms = {k: np.zeros(v.shape[-1]) if v.ndim >= 2 else np.zeros(v.shape) for k, v in w.items()}
    sigma = {}
    for k, v in params.items():
        v = np.asarray(v, np.float64)
        if v.ndim < 2:
            s = float(np.mean(np.abs(v)))
        else:
            s = 1.0 if constraints else float(np.mean([_norm(r) for r in units_of(v)]))
        sigma[k] = s if s > 0 else 0.01
    trajectory = []
    for t in range(1, steps + 1):
        g = grad_fn(w, t - 1)
        eta = lr_at(lr, t - 1)
        bc = 1 - beta**t if debias else 1.0
        new = {}
        for k in w:
            if w[k].ndim >= 2:
                W, G = units_of(w[k]), units_of(g[k])
                rows = []
                for j in range(len(W)):
                    ms[k][j] = beta * ms[k][j] + (1 - beta) * float(G[j] @ G[j])
                    g_bar = math.sqrt(ms[k][j] / bc)
                    unit_norm = step_scale == "unit_norm" and not constraints
                    scale = _norm(W[j]) if unit_norm else sigma[k]
                    step = scale * G[j] / g_bar if g_bar > 0 else np.zeros_like(G[j])
                    rows.append(W[j] - eta * step)
                new[k] = from_units(np.stack(rows), w[k].shape)
                if constraints:
                    new[k] = balance(new[k])
            else:
                flat_w, flat_g = w[k].ravel(), g[k].ravel()
                flat_m = ms[k].reshape(-1)
                out = np.empty_like(flat_w)
                for i in range(flat_w.size):
                    flat_m[i] = beta * flat_m[i] + (1 - beta) * flat_g[i] ** 2
                    g_bar = math.sqrt(flat_m[i] / bc)
                    step = sigma[k] * flat_g[i] / g_bar if g_bar > 0 else 0.0
                    out[i] = flat_w[i] - eta * step
                new[k] = out.reshape(w[k].shape)
        w = new
        trajectory.append({k: v.copy() for k, v in w.items()})
    return trajectory


# ------------------------------------------------------------ rotational equilibrium


def equilibrium_rate(lr: float, weight_decay: float, momentum: float, kind: str) -> float:
    """Kosson et al. Table 1: SGDM sqrt(2 eta lambda/(1+beta)); AdamW times (1-beta)."""
    rate = 2 * lr * weight_decay / (1 + momentum)
    if kind == "adamw":
        rate *= 1 - momentum
    return math.sqrt(rate)


def rotational_run(
    params: Params,
    grad_fn: GradFn,
    steps: int,
    *,
    lr: LR,
    weight_decay: float,
    momentum: float = 0.9,
    rms_decay: float = 0.9,
    kind: str = "sgdm",
    eps: float = 1e-8,
    zero_mean: bool = True,
    b2: float = 0.999,
    adam_eps: float = 1e-8,
) -> list[Params]:
    """Rotational wrapper around heavy ball (kind="sgdm") or Adam (kind="adamw"), per neuron.

    Base directions: heavy ball ``b <- momentum b + g`` (with coupled decay on 1-D leaves),
    or Adam ``m_hat / (sqrt(v_hat) + eps)``. With weight_decay != 0 kernel units keep their
    initial norm n_j: the unit and its base step are centred (zero_mean), the step made
    tangential, and the unit turned by eta_r n_j times the step over (RMS + eps). Other
    leaves, and every leaf at weight_decay = 0, take the base step with the learning rate
    (and decoupled decay for AdamW).
    """
    w = {k: np.array(v, np.float64) for k, v in params.items()}
    target = {k: np.array([_norm(r) for r in units_of(v)]) for k, v in w.items() if v.ndim >= 2}
    nu = {k: np.zeros(v.shape[-1]) for k, v in w.items() if v.ndim >= 2}
    m = {k: np.zeros_like(v) for k, v in w.items()}
    v2 = {k: np.zeros_like(v) for k, v in w.items()}
    trajectory = []
    for t in range(1, steps + 1):
        g = grad_fn(w, t - 1)
        eta = lr_at(lr, t - 1)
        eta_r = equilibrium_rate(eta, weight_decay, momentum, kind)
        new = {}
        for k in w:
            gk = g[k]
            if kind == "sgdm":
                if w[k].ndim < 2:
                    gk = gk + weight_decay * w[k]
                m[k] = momentum * m[k] + gk
                u = m[k]
            else:
                m[k] = momentum * m[k] + (1 - momentum) * gk
                v2[k] = b2 * v2[k] + (1 - b2) * gk**2
                u = (m[k] / (1 - momentum**t)) / (np.sqrt(v2[k] / (1 - b2**t)) + adam_eps)
            if w[k].ndim < 2 or weight_decay == 0:
                step = u if kind == "sgdm" else u + weight_decay * w[k]
                new[k] = w[k] - eta * step
                continue
            W, U = units_of(w[k]), units_of(u)
            rows = []
            for j in range(len(W)):
                wj, uj = (W[j] - W[j].mean(), U[j] - U[j].mean()) if zero_mean else (W[j], U[j])
                tangent = _drop_radial(uj, wj)
                nu[k][j] = rms_decay * nu[k][j] + (1 - rms_decay) * float(tangent @ tangent)
                rms = math.sqrt(nu[k][j] / (1 - rms_decay**t))
                n = target[k][j]
                moved = wj - eta_r * n * (tangent / (rms + eps) if rms + eps > 0 else 0 * tangent)
                nm = _norm(moved)
                rows.append(n * moved / nm if nm > 0 else np.zeros_like(moved))
            new[k] = from_units(np.stack(rows), w[k].shape)
        w = new
        trajectory.append({k: v.copy() for k, v in w.items()})
    return trajectory


def center(w: np.ndarray) -> np.ndarray:
    """REQ's construction-time centring, per unit: w_j - mean(w_j), rescaled to |w_j|."""
    rows = []
    for r in units_of(w):
        c = r - r.mean()
        n = _norm(c)
        rows.append(_norm(r) * c / n if n > 0 else np.zeros_like(c))
    return from_units(np.stack(rows), w.shape)


# ---------------------------------------------------------------------------- Path-SGD


def conv_mlp_kappa(w: Params) -> Params:
    """Path-SGD's kappa for the net conv(3x3 VALID on a 3x3 image) -> ReLU -> dense -> ReLU
    -> head, from the paper's recursions: gamma_in forward from the inputs (and from the
    constant bias unit, gamma_in = 1), gamma_out backward from the outputs (gamma_out = 1),
    kappa(u -> v) = gamma_in(u) * gamma_out(v).

    Keys: conv/kernel (3,3,c,h1), conv/bias (h1,), dense/kernel (h1,h2), dense/bias (h2,),
    head/kernel (h2,o).
    """
    K, bK, D, bD, H = (
        w["conv/kernel"],
        w["conv/bias"],
        w["dense/kernel"],
        w["dense/bias"],
        w["head/kernel"],
    )
    h1, h2, o = K.shape[-1], D.shape[-1], H.shape[-1]
    # forward: gamma_in of every hidden unit (each of the 3*3*c inputs has gamma_in = 1)
    gin1 = np.array([np.sum(K[..., a] ** 2) + bK[a] ** 2 for a in range(h1)])
    gin2 = np.array(
        [sum(gin1[a] * D[a, b] ** 2 for a in range(h1)) + bD[b] ** 2 for b in range(h2)]
    )
    # backward: gamma_out
    gout2 = np.array([sum(H[b, c] ** 2 for c in range(o)) for b in range(h2)])
    gout1 = np.array([sum(D[a, b] ** 2 * gout2[b] for b in range(h2)) for a in range(h1)])
    kappa = {
        "conv/kernel": np.empty_like(K),
        "conv/bias": np.empty_like(bK),
        "dense/kernel": np.empty_like(D),
        "dense/bias": np.empty_like(bD),
        "head/kernel": np.empty_like(H),
    }
    for a in range(h1):
        kappa["conv/kernel"][..., a] = 1.0 * gout1[a]  # input unit -> hidden unit a
        kappa["conv/bias"][a] = 1.0 * gout1[a]  # constant unit -> hidden unit a
        for b in range(h2):
            kappa["dense/kernel"][a, b] = gin1[a] * gout2[b]
    for b in range(h2):
        kappa["dense/bias"][b] = 1.0 * gout2[b]
        for c in range(o):
            kappa["head/kernel"][b, c] = gin2[b] * 1.0
    return kappa


def conv_mlp_loss_grad(w: Params, x: np.ndarray, y: np.ndarray) -> tuple[float, Params]:
    """Mean squared error 0.5 |f(x) - y|^2 of the conv MLP and its gradient, by hand."""
    K, bK, D, bD, H = (
        w["conv/kernel"],
        w["conv/bias"],
        w["dense/kernel"],
        w["dense/bias"],
        w["head/kernel"],
    )
    n = x.shape[0]
    z1 = np.einsum("nijc,ijca->na", x, K) + bK
    a1 = np.maximum(z1, 0)
    z2 = a1 @ D + bD
    a2 = np.maximum(z2, 0)
    out = a2 @ H
    r = out - y
    loss = 0.5 * float(np.sum(r * r)) / n
    d_out = r / n
    g_H = a2.T @ d_out
    d_z2 = (d_out @ H.T) * (z2 > 0)
    g_D, g_bD = a1.T @ d_z2, d_z2.sum(0)
    d_z1 = (d_z2 @ D.T) * (z1 > 0)
    g_K = np.einsum("nijc,na->ijca", x, d_z1)
    g_bK = d_z1.sum(0)
    return loss, {
        "conv/kernel": g_K,
        "conv/bias": g_bK,
        "dense/kernel": g_D,
        "dense/bias": g_bD,
        "head/kernel": g_H,
    }


def path_sgd_run(params: Params, grad_fn: GradFn, steps: int, *, lr: LR) -> list[Params]:
    """Path-SGD (Alg. 1): w_e <- w_e - lr g_e / kappa_e(w) (zero step where kappa_e = 0)."""
    w = {k: np.array(v, np.float64) for k, v in params.items()}
    trajectory = []
    for t in range(steps):
        g = grad_fn(w, t)
        eta = lr_at(lr, t)
        kappa = conv_mlp_kappa(w)
        new = {}
        for k in w:
            step = np.zeros_like(w[k])
            pos = kappa[k] > 0
            step[pos] = g[k][pos] / kappa[k][pos]
            new[k] = w[k] - eta * step
        w = new
        trajectory.append({k: v.copy() for k, v in w.items()})
    return trajectory
