"""Reading Noether diagnostics out of an optimizer state: a host-side recorder and a summary.

:class:`Recorder` copies the :class:`~ksbopt._src.diagnostics.monitor.NoetherDiagnostics` of a
monitored optimizer to the host every ``every`` steps, with one ``jax.device_get`` per record
(the only synchronisation it adds), and stacks them into a :class:`History`.
:func:`summarize` turns one record into a flat ``{name: float}`` dict (mean / min / max over
the groups of each symmetry) that any metrics writer or logger accepts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np
import optax

from ksbopt._src.diagnostics.monitor import MonitorState, NoetherDiagnostics, symmetry_labels

__all__ = ["History", "Recorder", "find_diagnostics", "summarize"]

#: Fields with one value per group (or per head): summarised by mean, min and max.
PER_GROUP_FIELDS = tuple(f for f in NoetherDiagnostics._fields if f != "step")


def find_diagnostics(state: Any) -> NoetherDiagnostics:
    """The :class:`NoetherDiagnostics` inside any optimizer state (chains, wrappers, nnx).

    Raises:
      ValueError: if ``state`` holds none or several (nest ``ksbopt.monitor`` once, or pass
        the monitor's own state).
    """
    if isinstance(state, NoetherDiagnostics):
        return state
    if isinstance(state, MonitorState):
        return state.diagnostics
    found = [v for _, v in optax.tree.get_all_with_path(state, "NoetherDiagnostics")]
    if len(found) != 1:
        raise ValueError(
            f"the state holds {len(found)} NoetherDiagnostics; it must hold exactly one. Wrap "
            "the optimizer once with ksbopt.monitor(tx, symmetries), or pass the "
            "MonitorState itself (e.g. optax.tree.get(state, 'MonitorState'))."
        )
    return found[0]


def _to_host(diag: NoetherDiagnostics) -> NoetherDiagnostics:
    """One ``jax.device_get`` of the whole record; flax Variable wrappers become arrays."""
    diag = jax.device_get(diag)
    return jax.tree.map(
        lambda x: np.asarray(x[...] if hasattr(x, "get_value") else x),
        diag,
        is_leaf=lambda x: hasattr(x, "get_value"),
    )


def _labels(symmetries: Any, n: int) -> list[str]:
    if symmetries is None:
        return [f"sym{i}" for i in range(n)]
    if isinstance(symmetries, (list, tuple)) and all(isinstance(s, str) for s in symmetries):
        labels = list(symmetries)
    else:
        labels = symmetry_labels(symmetries)
    if len(labels) != n:
        raise ValueError(
            f"{len(labels)} labels for {n} monitored symmetries; give one per "
            "declaration, in the order passed to ksbopt.monitor."
        )
    return labels


def summarize(
    state: Any,
    symmetries: Any = None,
    *,
    prefix: str = "noether",
    fields: Iterable[str] | None = None,
) -> dict[str, float]:
    """Flat scalars of one record: ``{prefix}/{label}/{field}/{mean,min,max}``.

    Args:
      state: an optimizer state holding a monitor, a :class:`MonitorState` or a
        :class:`NoetherDiagnostics` (on device or host).
      symmetries: the declarations given to the monitor (for labels such as
        ``"scale:conv1/kernel"``), a list of label strings, or None (``"sym0"``, ...).
      prefix: the first part of every key.
      fields: the diagnostics to include (default: all that apply).

    Returns:
      A dict of Python floats, plus ``{prefix}/step``. Fields that do not apply to a
      symmetry (None) are left out.

    Example:
      >>> import jax.numpy as jnp, optax, ksbopt
      >>> params = {"w": jnp.array([3.0, 4.0])}
      >>> tx = ksbopt.monitor(optax.sgd(0.1), ksbopt.Scale("w", axis=None))
      >>> s = ksbopt.summarize(tx.init(params), ["w"])
      >>> s["noether/w/charges/mean"]
      12.5

    References:
      None: it flattens recorded numbers for a logger; :class:`NoetherDiagnostics` defines
      them and cites the papers.
    """
    diag = _to_host(find_diagnostics(state))
    labels = _labels(symmetries, len(diag.charges))
    names = PER_GROUP_FIELDS if fields is None else tuple(fields)
    out = {f"{prefix}/step": float(diag.step)}
    for name in names:
        if name not in PER_GROUP_FIELDS:
            raise ValueError(f"field={name!r} is not a diagnostic; choose from {PER_GROUP_FIELDS}.")
        for label, value in zip(labels, getattr(diag, name), strict=True):
            if value is None:
                continue
            a = np.asarray(value, np.float64)
            key = f"{prefix}/{label}/{name}"
            if a.ndim == 0:
                out[key] = float(a)
            else:
                out[f"{key}/mean"] = float(a.mean())
                out[f"{key}/min"] = float(a.min())
                out[f"{key}/max"] = float(a.max())
    return out


@dataclasses.dataclass
class History:
    """Stacked records: ``fields[name][i]`` has shape ``(records, *group_shape)`` or is None.

    Attributes:
      steps: the step index of each record.
      labels: one name per symmetry.
      fields: diagnostic name -> list (one entry per symmetry) of arrays or None.

    Example:
      >>> import jax.numpy as jnp, optax, ksbopt
      >>> params, sym = {"w": jnp.array([3.0, 4.0])}, ksbopt.Scale("w", axis=None)
      >>> tx, rec = ksbopt.monitor(optax.sgd(0.1), sym), ksbopt.Recorder(sym)
      >>> state = tx.init(params)
      >>> for step in range(2):
      ...     u, state = tx.update({"w": jnp.array([4.0, -3.0])}, state, params)
      ...     _ = rec.record(step, state)
      >>> h = rec.history()
      >>> h.steps.tolist(), h["charges"][0].shape
      ([0, 1], (2, 1))

    References:
      None: a table of recorded numbers; :class:`NoetherDiagnostics` defines them and cites
      the papers.
    """

    steps: np.ndarray
    labels: list[str]
    fields: dict[str, list]

    def __getitem__(self, name: str) -> list:
        return self.fields[name]

    def __len__(self) -> int:
        return len(self.steps)


class Recorder:
    """Collect monitored diagnostics on the host, every ``every`` steps.

    Each :meth:`record` that falls on a recorded step makes one ``jax.device_get`` of the
    small per-group arrays (no other synchronisation); a record whose diagnostics were
    already taken (the monitor computes them every N steps) is skipped.

    Args:
      symmetries: the declarations given to :func:`ksbopt.monitor` (or label strings), for
        names in summaries and plots.
      every: record when ``step % every == 0``.

    Example:
      >>> import jax.numpy as jnp, optax, ksbopt
      >>> params = {"w": jnp.array([3.0, 4.0])}
      >>> sym = ksbopt.Scale("w", axis=None)
      >>> tx = ksbopt.monitor(optax.sgd(0.1), sym)
      >>> state, rec = tx.init(params), ksbopt.Recorder(sym)
      >>> for step in range(3):
      ...     u, state = tx.update({"w": jnp.array([4.0, -3.0])}, state, params)
      ...     params = optax.apply_updates(params, u)
      ...     _ = rec.record(step, state)
      >>> rec.history()["charges"][0].shape
      (3, 1)

    References:
      None: host-side bookkeeping; :func:`monitor` computes the diagnostics and cites the
      papers.
    """

    def __init__(self, symmetries: Any = None, *, every: int = 1):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(
                f"{every=} must be a positive int (keep one record every `every` calls of "
                "record), e.g. every=10."
            )
        self.symmetries = symmetries
        self.every = every
        self._records: list[NoetherDiagnostics] = []

    def record(self, step: int, state: Any) -> bool:
        """Copy the diagnostics in ``state`` if ``step % every == 0``; True if recorded."""
        if int(step) % self.every:
            return False
        diag = _to_host(find_diagnostics(state))
        if int(diag.step) < 0 or (self._records and int(self._records[-1].step) == int(diag.step)):
            return False
        self._records.append(diag)
        return True

    __call__ = record

    def __len__(self) -> int:
        return len(self._records)

    @property
    def labels(self) -> list[str]:
        """One label per symmetry (e.g. ``"scale:conv1/kernel"``), as summaries and plots show."""
        n = len(self._records[0].charges) if self._records else 0
        return _labels(self.symmetries, n)

    def history(self) -> History:
        """All records stacked along a leading axis."""
        if not self._records:
            raise ValueError(
                "nothing recorded yet: call recorder.record(step, state) in the "
                "training loop first."
            )
        fields = {}
        for name in PER_GROUP_FIELDS:
            per_sym = list(zip(*(getattr(r, name) for r in self._records), strict=True))
            fields[name] = [
                None if vals[0] is None else np.stack([np.asarray(v) for v in vals])
                for vals in per_sym
            ]
        steps = np.asarray([int(r.step) for r in self._records])
        return History(steps, self.labels, fields)

    def summary(self, index: int = -1, **kwargs) -> dict[str, float]:
        """:func:`summarize` of one record (default: the latest)."""
        if not self._records:
            raise ValueError(
                "nothing recorded yet: call recorder.record(step, state) in the training loop "
                "before asking for a summary."
            )
        return summarize(self._records[index], self.labels, **kwargs)

    def max_abs(self, name: str) -> float:
        """The largest ``|value|`` of one diagnostic over all records, groups and symmetries."""
        vals: Sequence = [v for v in self.history()[name] if v is not None]
        return max((float(np.max(np.abs(v))) for v in vals), default=0.0)
