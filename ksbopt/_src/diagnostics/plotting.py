"""Matplotlib figures of recorded Noether diagnostics (optional dependency: ksbopt[plot]).

Every function takes a :class:`~ksbopt._src.diagnostics.recorder.History`
(``recorder.history()``) or a :class:`~ksbopt._src.diagnostics.recorder.Recorder`, returns a
``matplotlib.figure.Figure`` (built without pyplot, so no display is needed) and, given
``path``, saves it as a PNG.

- :func:`plot_charges`: charges observed vs predicted per symmetry (layer);
- :func:`plot_effective_learning_rate`: ``eta / |w|^2`` of scale groups over time;
- :func:`plot_angular_update`: the angular update per step against its P7a equilibrium;
- :func:`plot_decomposition`: the per-step change of a charge, stacked by source;
- :func:`plot_prediction_error`: ``|observed - predicted| / scale`` over time.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ksbopt._src.diagnostics.recorder import History, Recorder

__all__ = [
    "plot_angular_update",
    "plot_charges",
    "plot_decomposition",
    "plot_effective_learning_rate",
    "plot_prediction_error",
]


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - exercised by test_plotting with a fake import
        raise ImportError(
            "ksbopt.plotting needs matplotlib, an optional dependency: pip install ksbopt[plot]"
        ) from e
    return Figure


def _history(history: History | Recorder) -> History:
    if isinstance(history, Recorder):
        return history.history()
    if isinstance(history, History):
        return history
    raise TypeError(
        f"history={history!r} must be a ksbopt History (recorder.history()) or a Recorder."
    )


def _selected(h: History, symmetries, need: str | None = None) -> list[int]:
    idx = (
        list(range(len(h.labels)))
        if symmetries is None
        else ([symmetries] if isinstance(symmetries, (int, str)) else list(symmetries))
    )
    out = []
    for s in idx:
        if isinstance(s, str):
            if s not in h.labels:
                raise ValueError(f"symmetry={s!r} is not one of the labels {h.labels}.")
            s = h.labels.index(s)
        if not 0 <= s < len(h.labels):
            raise ValueError(
                f"symmetry={s} is out of range for {len(h.labels)} symmetries; give an index "
                f"in [0, {len(h.labels)}) or one of the labels {h.labels}."
            )
        if need is None or h[need][s] is not None:
            out.append(s)
    return out


def _grid(n: int, width: float = 4.0, height: float = 2.8):
    fig = _figure_class()(
        figsize=(width * min(n, 3), height * ((n + 2) // 3)), layout="constrained"
    )
    axes = fig.subplots((n + 2) // 3, min(n, 3), squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes


def _per_record(a: np.ndarray, reduce: str) -> np.ndarray:
    flat = a.reshape(a.shape[0], -1)
    if reduce == "sum":
        return flat.sum(1)
    if reduce == "mean":
        return flat.mean(1)
    raise ValueError(f"reduce={reduce!r} must be 'sum' or 'mean'.")


def _save(fig, path):
    if path is not None:
        fig.savefig(path, dpi=90)
    return fig


def _empty(message: str, path):
    fig = _figure_class()(figsize=(4, 1.5))
    fig.text(0.5, 0.5, message, ha="center", va="center")
    return _save(fig, path)


def plot_charges(
    history: History | Recorder,
    symmetries=None,
    *,
    reduce: str = "sum",
    metric: bool | None = None,
    path: str | None = None,
):
    r"""Charges observed (solid) vs predicted (dashed), one panel per symmetry.

    The observed curve is :math:`\sum_g Q_g` (or the mean over groups) after every recorded
    step; the predicted one is the open-loop exact recursion of the monitor's dynamics, e.g.
    :math:`x_{k+1} = (1 - \eta\lambda)^2 x_k + \eta^2 \lVert g_k \rVert^2` for SGD on a
    scale group ([derived] :ref:`P1 <p1>`). The two coincide for a true symmetry.

    Args:
      history: a :class:`~ksbopt.History` (``recorder.history()``) or a
        :class:`~ksbopt.Recorder`.
      symmetries: indices or labels of the symmetries to show (default: all).
      reduce: ``"sum"`` (the layer's total charge) or ``"mean"`` over groups.
      metric: plot the metric-weighted charges (RMSProp/Adam, P6) instead of the Euclidean
        ones; default: where the Euclidean charge has no prediction and the metric one has.
      path: save the figure as a PNG there (default: do not save).

    Returns:
      A ``matplotlib.figure.Figure`` (built without pyplot: no display needed).

    Example:
      >>> import jax.numpy as jnp, optax, ksbopt, ksbopt.plotting
      >>> params, sym = {"w": jnp.array([3.0, 4.0])}, ksbopt.Scale("w", axis=None)
      >>> tx = ksbopt.monitor(optax.sgd(0.1), sym, dynamics=ksbopt.dynamics.sgd(0.1))
      >>> state, rec = tx.init(params), ksbopt.Recorder(sym)
      >>> for step in range(3):
      ...     u, state = tx.update({"w": jnp.array([4.0, -3.0])}, state, params)
      ...     params = optax.apply_updates(params, u)
      ...     _ = rec.record(step, state)
      >>> fig = ksbopt.plotting.plot_charges(rec)
      >>> [ax.get_title() for ax in fig.axes]
      ['scale:w']

    References:
      Tanaka, Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
      Networks", NeurIPS 2021, https://arxiv.org/abs/2105.02716
    """
    h = _history(history)
    sel = _selected(h, symmetries)
    fig, axes = _grid(len(sel))
    for ax, i in zip(axes, sel, strict=False):
        use_metric = (
            metric
            if metric is not None
            else (
                h["predicted_charges"][i] is None and h["predicted_metric_charges"][i] is not None
            )
        )
        obs_name, pred_name = (
            ("metric_charges", "predicted_metric_charges")
            if use_metric
            else ("charges", "predicted_charges")
        )
        obs = h[obs_name][i]
        if obs is None:
            ax.set_title(f"{h.labels[i]}: no {obs_name}")
            continue
        ax.plot(h.steps, _per_record(obs, reduce), lw=1.5, label="observed")
        if h[pred_name][i] is not None:
            ax.plot(h.steps, _per_record(h[pred_name][i], reduce), "--", lw=1.5, label="predicted")
        ax.set_title(h.labels[i] + (" (metric)" if use_metric else ""), fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel(f"{reduce} of charges")
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_effective_learning_rate(
    history: History | Recorder, symmetries=None, *, path: str | None = None
):
    r"""The effective learning rate of scale groups over time: median and range over groups.

    SGD with weight decay on a scale group turns its direction with the step size
    ([derived] :ref:`P2 <p2>`)

    .. math::

        \eta_{\mathrm{eff}} = \frac{\eta}{(1 - \eta\lambda) \lVert w \rVert^2},

    so a growing norm is a decaying learning rate (the implicit RMSProp of normalisation).

    Args:
      history: a :class:`~ksbopt.History` (``recorder.history()``) or a
        :class:`~ksbopt.Recorder`.
      symmetries: indices or labels of the symmetries to show (default: all).
      path: save the figure as a PNG there (default: do not save).

    Returns:
      A ``matplotlib.figure.Figure`` (a note if no scale group has a known learning rate).

    Example:
      >>> import jax.numpy as jnp, optax, ksbopt, ksbopt.plotting
      >>> params, sym = {"w": jnp.array([3.0, 4.0])}, ksbopt.Scale("w", axis=None)
      >>> tx = ksbopt.monitor(optax.sgd(0.1), sym, dynamics=ksbopt.dynamics.sgd(0.1))
      >>> state, rec = tx.init(params), ksbopt.Recorder(sym)
      >>> for step in range(3):
      ...     u, state = tx.update({"w": jnp.array([4.0, -3.0])}, state, params)
      ...     params = optax.apply_updates(params, u)
      ...     _ = rec.record(step, state)
      >>> fig = ksbopt.plotting.plot_effective_learning_rate(rec)
      >>> fig.axes[0].get_yscale()
      'log'

    References:
      Tanaka, Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
      Networks", NeurIPS 2021, https://arxiv.org/abs/2105.02716
    """
    h = _history(history)
    sel = _selected(h, symmetries, need="effective_learning_rate")
    if not sel:
        return _empty("no effective learning rate recorded\n(scale groups, known eta)", path)
    fig = _figure_class()(figsize=(6, 3.5), layout="constrained")
    ax = fig.subplots()
    for i in sel:
        a = h["effective_learning_rate"][i].reshape(len(h), -1)
        (line,) = ax.plot(h.steps, np.median(a, 1), label=h.labels[i])
        ax.fill_between(h.steps, a.min(1), a.max(1), color=line.get_color(), alpha=0.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("effective learning rate")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_angular_update(history: History | Recorder, symmetries=None, *, path: str | None = None):
    r"""Angular update per step (median and range over groups) and its P7a equilibrium.

    The angle between a group's vector before and after the step, and, for SGD with coupled
    weight decay, the equilibrium it approaches ([derived] :ref:`P7a <p7a>`):

    .. math::

        \angle(w, w + u) = \arccos \frac{\langle w, w + u \rangle}
        {\lVert w \rVert \lVert w + u \rVert}, \qquad
        A^* = \sqrt{2 \eta \lambda / (1 + \beta)} .

    Args:
      history: a :class:`~ksbopt.History` (``recorder.history()``) or a
        :class:`~ksbopt.Recorder`.
      symmetries: indices or labels of the symmetries to show (default: all).
      path: save the figure as a PNG there (default: do not save).

    Returns:
      A ``matplotlib.figure.Figure``.

    Example:
      >>> import jax.numpy as jnp, optax, ksbopt, ksbopt.plotting
      >>> params, sym = {"w": jnp.array([3.0, 4.0])}, ksbopt.Scale("w", axis=None)
      >>> tx = ksbopt.monitor(optax.sgd(0.1), sym, dynamics=ksbopt.dynamics.sgd(0.1))
      >>> state, rec = tx.init(params), ksbopt.Recorder(sym)
      >>> for step in range(3):
      ...     u, state = tx.update({"w": jnp.array([4.0, -3.0])}, state, params)
      ...     params = optax.apply_updates(params, u)
      ...     _ = rec.record(step, state)
      >>> fig = ksbopt.plotting.plot_angular_update(rec)
      >>> fig.axes[0].get_ylabel()
      'angle per step (rad)'

    References:
      Kosson, Messmer, Jaggi, "Rotational Equilibrium: How Weight Decay Balances Learning
      Across Neural Networks", ICML 2024, https://arxiv.org/abs/2305.17212
    """
    h = _history(history)
    sel = _selected(h, symmetries)
    fig, axes = _grid(len(sel))
    for ax, i in zip(axes, sel, strict=False):
        a = h["angular_update"][i].reshape(len(h), -1)
        (line,) = ax.plot(h.steps, np.median(a, 1), label="median over groups")
        ax.fill_between(h.steps, a.min(1), a.max(1), color=line.get_color(), alpha=0.2)
        eq = h["equilibrium_angular_update"][i]
        if eq is not None:
            ax.plot(h.steps, np.asarray(eq).reshape(len(h)), "k--", label="equilibrium (P7a)")
        ax.set_yscale("log")
        ax.set_title(h.labels[i], fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("angle per step (rad)")
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_decomposition(history: History | Recorder, symmetry=0, *, path: str | None = None):
    r"""The change of one symmetry's total charge per recorded step, stacked by source.

    Bars: the two terms of the exact decomposition ([derived] :ref:`charge-decomposition`)

    .. math::

        Q(w + u) - Q(w) = \langle \xi(w), u \rangle + Q(u),

    the first-order (metric, momentum, weight decay) and the second-order (finite-step)
    kinetic symmetry breaking, summed over groups; their sum is the observed change (line).
    The weight decay's own share, when the dynamics are known, is drawn as a dotted line.

    Args:
      history: a :class:`~ksbopt.History` (``recorder.history()``) or a
        :class:`~ksbopt.Recorder`.
      symmetry: the index or label of the one symmetry to show (default: the first).
      path: save the figure as a PNG there (default: do not save).

    Returns:
      A ``matplotlib.figure.Figure``.

    Example:
      >>> import jax.numpy as jnp, optax, ksbopt, ksbopt.plotting
      >>> params, sym = {"w": jnp.array([3.0, 4.0])}, ksbopt.Scale("w", axis=None)
      >>> tx = ksbopt.monitor(optax.sgd(0.1), sym, dynamics=ksbopt.dynamics.sgd(0.1))
      >>> state, rec = tx.init(params), ksbopt.Recorder(sym)
      >>> for step in range(3):
      ...     u, state = tx.update({"w": jnp.array([4.0, -3.0])}, state, params)
      ...     params = optax.apply_updates(params, u)
      ...     _ = rec.record(step, state)
      >>> fig = ksbopt.plotting.plot_decomposition(rec, 0)
      >>> fig.axes[0].get_ylabel()
      'change of total charge'

    References:
      Tanaka, Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
      Networks", NeurIPS 2021, https://arxiv.org/abs/2105.02716
    """
    h = _history(history)
    (i,) = _selected(h, symmetry)
    first = _per_record(h["first_order"][i], "sum")
    second = _per_record(h["second_order"][i], "sum")
    change = _per_record(h["charges"][i], "sum") - _per_record(h["charges_before"][i], "sum")
    fig = _figure_class()(figsize=(6, 3.5), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(h))
    pos = lambda v: np.maximum(v, 0)
    neg = lambda v: np.minimum(v, 0)
    ax.bar(x, pos(first), color="tab:blue", label="first order <xi, u>")
    ax.bar(x, pos(second), bottom=pos(first), color="tab:orange", label="second order Q(u)")
    ax.bar(x, neg(first), color="tab:blue")
    ax.bar(x, neg(second), bottom=neg(first), color="tab:orange")
    ax.plot(x, change, "k.-", lw=1, ms=3, label="observed change")
    if h["weight_decay_term"][i] is not None:
        ax.plot(
            x,
            _per_record(h["weight_decay_term"][i], "sum"),
            ":",
            color="tab:red",
            label="weight decay share",
        )
    ticks = np.linspace(0, len(h) - 1, min(len(h), 6)).astype(int)
    ax.set_xticks(ticks, [str(h.steps[t]) for t in ticks])
    ax.axhline(0, color="gray", lw=0.5)
    ax.set_xlabel("step")
    ax.set_ylabel("change of total charge")
    ax.set_title(h.labels[i], fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_prediction_error(history: History | Recorder, symmetries=None, *, path: str | None = None):
    r"""Largest normalised residual over groups, per record, for each predicted charge.

    The residual of group g is :math:`(Q_g - \hat Q_g) / s_g` with :math:`\hat Q_g` the
    prediction of the exact recursion and :math:`s_g` the charge's natural size (see
    :class:`~ksbopt.NoetherDiagnostics`); for a true symmetry it stays at rounding level
    (about 1e-7 in float32, 1e-15 in float64).

    Args:
      history: a :class:`~ksbopt.History` (``recorder.history()``) or a
        :class:`~ksbopt.Recorder`.
      symmetries: indices or labels of the symmetries to show (default: all).
      path: save the figure as a PNG there (default: do not save).

    Returns:
      A ``matplotlib.figure.Figure`` (a note if nothing was predicted).

    Example:
      >>> import jax.numpy as jnp, optax, ksbopt, ksbopt.plotting
      >>> params, sym = {"w": jnp.array([3.0, 4.0])}, ksbopt.Scale("w", axis=None)
      >>> tx = ksbopt.monitor(optax.sgd(0.1), sym, dynamics=ksbopt.dynamics.sgd(0.1))
      >>> state, rec = tx.init(params), ksbopt.Recorder(sym)
      >>> for step in range(3):
      ...     u, state = tx.update({"w": jnp.array([4.0, -3.0])}, state, params)
      ...     params = optax.apply_updates(params, u)
      ...     _ = rec.record(step, state)
      >>> fig = ksbopt.plotting.plot_prediction_error(rec)
      >>> fig.axes[0].get_yscale()
      'log'

    References:
      Tanaka, Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
      Networks", NeurIPS 2021, https://arxiv.org/abs/2105.02716
    """
    h = _history(history)
    series: list[tuple[str, Any]] = []
    for i in _selected(h, symmetries):
        for name, tag in (("prediction_error", ""), ("metric_prediction_error", " (metric)")):
            if h[name][i] is not None:
                series.append((h.labels[i] + tag, h[name][i]))
    if not series:
        return _empty("no predictions recorded\n(give ksbopt.monitor dynamics=...)", path)
    fig = _figure_class()(figsize=(6, 3.5), layout="constrained")
    ax = fig.subplots()
    for label, a in series:
        err = np.abs(a.reshape(len(h), -1)).max(1)
        ax.plot(h.steps, np.maximum(err, 1e-17), label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("|observed - predicted| / scale")
    ax.legend(fontsize=7)
    return _save(fig, path)
