"""The symmetry profile of every run: per-step ratios, the record's summary, the report table.

Each training step measures, for every declared symmetry of the task, the ratios of
:func:`ksbopt._src.diagnostics.symmetry_profile.step_ratios` (``<xi, u>``, ``Q(u)``, the charge
change and ``<xi, g>`` relative to their natural sizes); a record keeps their median over all
steps and per chunk, and the report classifies each (task, optimizer) with
:func:`ksbopt.profile`'s rule (``exact`` / ``second order`` / ``first order``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np

from ksbopt._src.diagnostics.symmetry_profile import RATIOS, classify

__all__ = ["PROFILE_BLOCKS", "of_runs", "report_lines", "step_ratios", "summary"]

# The record keeps the median ratios of at most this many consecutive blocks of the run (each
# about a tenth of it), besides the median over all steps: one row per evaluation chunk made
# a record about 35 KB, for a trend no table reads at that resolution.
PROFILE_BLOCKS = 10


def step_ratios(symmetries, params, grads, updates):
    """``(len(symmetries), 7)`` ratios of one step (an empty array when none is declared)."""
    import jax.numpy as jnp

    from ksbopt._src.diagnostics.symmetry_profile import step_ratios as ratios

    if not symmetries:
        return jnp.zeros((0, 7), jnp.float32)
    return ratios(symmetries, params, grads, updates).astype(jnp.float32)


def summary(labels: Sequence[str], chunks: Sequence[np.ndarray], params) -> dict | None:
    """The record's ``profile``: median ratios over all steps and over each of at most
    :data:`PROFILE_BLOCKS` consecutive blocks of chunks (``blocks``, with the ``block_chunks``
    each covers), and the floor."""
    import jax

    from ksbopt._src.diagnostics.symmetry_profile import tolerance

    if not labels or not chunks:
        return None
    steps = np.concatenate([np.asarray(c, np.float64) for c in chunks])  # (steps, n, 4)
    blocks = [list(b) for b in np.array_split(np.arange(len(chunks)), PROFILE_BLOCKS) if len(b)]
    blocks = [[chunks[i] for i in b] for b in blocks]
    dtype = np.result_type(np.float32, *(x.dtype for x in jax.tree.leaves(params)))

    def med(a):
        # a diverged run has all-NaN columns: their median is NaN (recorded as None), silently
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            m = np.nanmedian(a, axis=0) if np.isfinite(a).any() else np.full(a.shape[1:], np.nan)
        return [[None if not np.isfinite(x) else float(x) for x in row] for row in m]

    return {
        "labels": list(labels),
        "ratios": list(RATIOS),
        "tol": tolerance(dtype),
        "median": med(steps),
        "block_chunks": [len(b) for b in blocks],
        "blocks": [med(np.concatenate([np.asarray(c, np.float64) for c in b])) for b in blocks],
    }


def of_runs(profiles: Sequence[Mapping | None], label: str) -> tuple[str, np.ndarray] | None:
    """(class, median ratios over the runs) of one symmetry; None if no run recorded it.

    The class is ``"diverged"`` when the runs recorded no finite ratio."""
    # a record made with other columns (an older harness) has no comparable profile
    got = [r for r in profiles if r and label in r["labels"] and r["ratios"] == list(RATIOS)]
    if not got:
        return None
    vals = np.array(
        [[np.nan if x is None else x for x in r["median"][r["labels"].index(label)]] for r in got]
    )
    with np.errstate(all="ignore"):
        finite = np.isfinite(vals).any()
        med = np.nanmedian(vals, axis=0) if finite else np.full(vals.shape[1], np.nan)
    if not np.isfinite(med).all():
        return "diverged", med
    return classify(med[5], med[6]), med


def _cell(profiles: Sequence[Mapping | None], label: str) -> str:
    got = of_runs(profiles, label)
    if got is None:
        return "-"
    c, med = got
    short = {"exact": "exact", "second order": "2nd", "first order": "1st"}.get(c, c)
    return short if c == "diverged" else f"{short} ({med[0]:.0e}, {med[1]:.0e})"


def report_lines(task: str, rows: Mapping[str, Sequence[Mapping]]) -> list[str]:
    """The report's symmetry-profile table of one task: optimizer -> profiles of its runs."""
    labels = [lab for rs in rows.values() for r in rs if r for lab in r["labels"]]
    labels = list(dict.fromkeys(labels))
    if not labels:
        return []
    tol = next(r["tol"] for rs in rows.values() for r in rs if r)
    L = [
        f"Symmetry profile on `{task}` (runs at the chosen learning rate): per declared "
        "symmetry, whether the optimizer's step preserves the charge exactly, changes it only "
        "at second order (Q(u), the finite step) or at first order (<xi, u>: a metric, "
        "momentum, weight decay); in brackets the medians over steps and seeds of "
        "|<xi, u>| / (|xi| |u|) and |Q(u)| / (|xi| |u|), largest over the groups. Floor: "
        f"max({tol:.1e} = sqrt(eps) of the compute dtype, 10 |<xi, g>| / (|xi| |g|), "
        "eps |w| / |u|) per group: exact when no group's charge change exceeds its floor, "
        "first order when some group's <xi, u> does; see ksbopt.profile.",
        "",
        "| optimizer | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for opt, rs in rows.items():
        L.append(f"| {opt} | " + " | ".join(_cell(rs, lab) for lab in labels) + " |")
    return [*L, ""]
