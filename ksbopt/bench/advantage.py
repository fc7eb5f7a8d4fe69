"""Does an engineered kinetic energy pay on a task? Three criteria against the practitioners.

A ksbopt kinetic energy (a registry entry built from ksbopt's own parts: not a baseline, not a
peer reproduced from a paper) *pays* on a task, in one schedule arm, when against the
practitioners' baselines :data:`PRACTITIONERS` (normalisation + SGD, RMSProp, AdamW), each at
its own tuned setting:

- **faster**: it reaches the practitioners' validation target (a fixed fraction of the best of
  their final validation metrics, :func:`ksbopt.bench.stats.target_value`: the task's own
  target is set by the best optimizer of all, which on some tasks no other reaches) in at
  least :data:`FEWER_STEPS` times fewer steps than the fastest of them, and in less training
  time than the fastest of them in time (CPU seconds to the target, steps times CPU seconds
  per step, when every run timed them: wall-clock on a shared machine measures the other jobs
  too; otherwise wall-clock, and the result says which); or
- **wider**: its good learning-rate band (:func:`ksbopt.bench.stats.band`) is at least
  :data:`WIDER_BAND` times as wide as the widest of theirs, widths counted at the lattice's
  resolution (a band of one lattice point is :data:`LATTICE_DECADES` wide), and the
  practitioners' bands are closed (followed until they end) so the ratio is not a guess;

and its final test metric is not worse than the best of them on validation (paired by seed,
95% bootstrap interval, :func:`ksbopt.bench.stats.paired_bootstrap`).

The numbers come from :func:`ksbopt.bench.summary.grid_summary`; nothing is trained here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from ksbopt.bench import stats
from ksbopt.bench.summary import PRACTITIONERS, is_baseline

__all__ = [
    "FEWER_STEPS",
    "LATTICE_DECADES",
    "PRACTITIONERS",
    "WIDER_BAND",
    "Advantage",
    "advantages",
    "is_kinetic_energy",
    "markdown",
]

FEWER_STEPS = 1.3
WIDER_BAND = 3.0
LATTICE_DECADES = 0.5  # the protocol's lattice: neighbours a factor sqrt(10) apart


def is_kinetic_energy(optimizer: str) -> bool:
    """Whether a registry entry is one of ksbopt's own kinetic energies.

    It needs a ksbopt feature and none of ``ksbopt.peers`` (the published peers are
    reproductions, not ksbopt's designs).

    Args:
      optimizer: a registry name (an unknown name is not a kinetic energy).

    Returns:
      True for the entries :func:`advantages` judges.

    Example:
      >>> is_kinetic_energy("noether_rmsprop"), is_kinetic_energy("nero")
      (True, False)

    References:
      Tanaka, Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
      Networks", NeurIPS 2021, https://arxiv.org/abs/2105.02716 (the learning rule as a
      kinetic energy).
    """
    from ksbopt.bench.registry import REGISTRY

    spec = REGISTRY.get(optimizer)
    return (
        spec is not None
        and not is_baseline(optimizer)
        and not any(n.startswith("peers.") for n in spec.needs)
    )


@dataclasses.dataclass(frozen=True)
class Advantage:
    r"""One kinetic energy on one task against :data:`PRACTITIONERS` (see :func:`advantages`).

    With the ratios of :func:`advantages`, it pays when

    .. math::

        \text{not worse} \;\wedge\; \big[(r_{\rm steps} \ge 1.3 \wedge r_{\rm time} > 1)
        \;\vee\; (r_{\rm band} \ge 3 \wedge \text{their bands closed})\big].

    Attributes:
      optimizer: the kinetic energy's registry name.
      reference: the practitioner with the best validation metric (the final-metric check).
      steps_ratio: fastest practitioner's steps to target / the entry's (``inf``: only the
        entry reached it; None: the entry did not reach it).
      time_ratio: the same for training seconds (``time_basis``).
      time_basis: ``"cpu"`` (CPU seconds to the target) or ``"wall"`` (wall-clock seconds).
      band_ratio: the entry's band width over the widest practitioner's, each plus
        :data:`LATTICE_DECADES`; None without a band.
      bands_closed: every practitioner's band was followed to its end on both sides.
      final: the paired test difference entry - reference: ``(mean, low, high, n)``.
      verdict: ``better`` / ``tie`` / ``worse`` / ``-`` of ``final``.

    Example:
      >>> a = Advantage("noether_rmsprop", "sgd+wd", steps_ratio=1.5, time_ratio=1.2,
      ...               time_basis="cpu", band_ratio=1.0, bands_closed=True,
      ...               final=(0.002, -0.001, 0.005, 5), verdict="tie")
      >>> a.faster, a.wider, a.pays
      (True, False, True)

    References:
      Dahl et al., "Benchmarking Neural Network Training Algorithms",
      https://arxiv.org/abs/2306.07179 (time to a validation target as the measure of a
      training algorithm).
    """

    optimizer: str
    reference: str
    steps_ratio: float | None
    time_ratio: float | None
    time_basis: str
    band_ratio: float | None
    bands_closed: bool
    final: tuple
    verdict: str

    @property
    def not_worse(self) -> bool:
        return self.verdict in ("better", "tie")

    @property
    def faster(self) -> bool:
        return (
            self.steps_ratio is not None
            and self.steps_ratio >= FEWER_STEPS
            and self.time_ratio is not None
            and self.time_ratio > 1.0
        )

    @property
    def wider(self) -> bool:
        return self.bands_closed and self.band_ratio is not None and self.band_ratio >= WIDER_BAND

    @property
    def pays(self) -> bool:
        return self.not_worse and (self.faster or self.wider)


def _ratio(theirs: list[float | None], ours: float | None) -> float | None:
    if ours is None:
        return None
    reached = [t for t in theirs if t is not None]
    return min(reached) / ours if reached and ours > 0 else (math.inf if not reached else None)


def _width(row) -> float | None:
    return None if row.get("band") is None else row["band"][2] + LATTICE_DECADES


def advantages(task: Mapping) -> list[Advantage]:
    r"""The criteria of the module for every kinetic energy of one task's summary.

    With :math:`P` the practitioners present, :math:`s`, :math:`t` the steps and seconds to
    the practitioners' target and :math:`w` a good band's width in decades,

    .. math::

        r_{\rm steps} = \frac{\min_{p \in P} s_p}{s}, \qquad
        r_{\rm time} = \frac{\min_{p \in P} t_p}{t}, \qquad
        r_{\rm band} = \frac{w + 0.5}{\max_{p \in P} w_p + 0.5},

    and the final check is the paired test difference against the practitioner of best mean
    validation metric (its 95% bootstrap interval must not lie below 0).

    Args:
      task: one task of one arm of :func:`ksbopt.bench.summary.grid_summary`.

    Returns:
      One :class:`Advantage` per kinetic energy in ``task`` (empty when no practitioner
      finished with a finite metric).

    Example:
      >>> row = lambda val, steps, band, seeds: {"val_mean": val,
      ...     "steps_to_practitioners_target": steps,
      ...     "time_to_practitioners_target": steps / 10, "band": band, "band_open": [False, False],
      ...     "test_by_seed": {str(s): v for s, v in enumerate(seeds)}}
      >>> task = {"higher_is_better": True, "optimizers": {
      ...     "sgd+wd": row(0.90, 900, [0.1, 0.1, 0.0], [0.90, 0.91, 0.89, 0.90, 0.92]),
      ...     "adamw": row(0.89, 1000, [0.001, 0.003, 0.477], [0.89, 0.90, 0.88, 0.90, 0.91]),
      ...     "noether_rmsprop": row(0.90, 600, [0.01, 1.0, 2.0],
      ...                            [0.90, 0.915, 0.89, 0.905, 0.92])}}
      >>> a, = advantages(task)
      >>> a.reference, round(a.steps_ratio, 2), round(a.band_ratio, 2), a.verdict, a.pays
      ('sgd+wd', 1.5, 2.56, 'tie', True)

    References:
      Schmidt, Schneider, Hennig, "Descending through a Crowded Valley - Benchmarking Deep
      Learning Optimizers", https://arxiv.org/abs/2007.01547 (compare against tuned
      baselines under one protocol); Dahl et al., https://arxiv.org/abs/2306.07179 (time to
      target).
    """
    higher = task["higher_is_better"]
    rows = task["optimizers"]
    practitioners = {
        o: r for o, r in rows.items() if o in PRACTITIONERS and r.get("val_mean") is not None
    }
    if not practitioners:
        return []
    ref = max(practitioners, key=lambda o: practitioners[o]["val_mean"] * (1 if higher else -1))
    widths = [_width(r) for r in practitioners.values()]
    closed = all(
        r.get("band_open") is not None and not any(r["band_open"]) for r in practitioners.values()
    )
    ke = [o for o in rows if is_kinetic_energy(o)]
    timed = [r for o, r in rows.items() if o in practitioners or o in ke]
    cpu = all(
        r.get("steps_to_practitioners_target") is None
        or r.get("cpu_to_practitioners_target") is not None
        for r in timed
    )
    time_key = "cpu_to_practitioners_target" if cpu else "time_to_practitioners_target"
    out = []
    for opt in ke:
        row = rows[opt]
        width = _width(row)
        known = [w for w in widths if w is not None]
        p = stats.paired_bootstrap(_by_seed(row), _by_seed(rows[ref]))
        out.append(
            Advantage(
                optimizer=opt,
                reference=ref,
                steps_ratio=_ratio(
                    [r.get("steps_to_practitioners_target") for r in practitioners.values()],
                    row.get("steps_to_practitioners_target"),
                ),
                time_ratio=_ratio(
                    [r.get(time_key) for r in practitioners.values()], row.get(time_key)
                ),
                time_basis="cpu" if cpu else "wall",
                band_ratio=width / max(known) if width is not None and known else None,
                bands_closed=closed,
                final=tuple(p),
                verdict=p.verdict(higher),
            )
        )
    return out


def _by_seed(row) -> dict[int, float]:
    return {int(s): v for s, v in (row.get("test_by_seed") or {}).items()}


def _times(x: float | None) -> str:
    if x is None:
        return "-"
    return "only it" if math.isinf(x) else f"{x:.2f}x"


def markdown(arm: Mapping[str, Mapping], tasks: list[str] | None = None) -> list[str]:
    """The criteria as a Markdown section: one row per (task, kinetic energy).

    Args:
      arm: one schedule arm of :func:`ksbopt.bench.summary.grid_summary` (task -> summary).
      tasks: the tasks to show, in order (default: every task of ``arm``).

    Returns:
      Lines of Markdown (empty when no task has a practitioner to compare with); below the
      table, every kinetic energy that pays on at least three of the tasks shown, or a line
      saying that none does.

    Example:
      >>> markdown({})
      []

    References:
      Schmidt, Schneider, Hennig, "Descending through a Crowded Valley - Benchmarking Deep
      Learning Optimizers", https://arxiv.org/abs/2007.01547.
    """
    rows, pays = [], {}
    for t in tasks if tasks is not None else list(arm):
        if t not in arm:
            continue
        for a in advantages(arm[t]):
            mean, low, high, _ = a.final
            final = "-" if low is None else f"{mean:+.4f} [{low:+.4f}, {high:+.4f}] {a.verdict}"
            band = "-" if a.band_ratio is None else f"{a.band_ratio:.2f}x"
            if not a.bands_closed and a.band_ratio is not None:
                band += " (their band open)"
            rows.append(
                f"| {t} | `{a.optimizer}` | `{a.reference}` | {_times(a.steps_ratio)} | "
                f"{_times(a.time_ratio)} ({a.time_basis}) | {band} | {final} | "
                f"{'**yes**' if a.pays else 'no'} |"
            )
            if a.pays:
                pays.setdefault(a.optimizer, []).append(t)
    if not rows:
        return []
    winners = {o: ts for o, ts in pays.items() if len(ts) >= 3}
    verdict = (
        "; ".join(f"`{o}` pays on {len(ts)} tasks ({', '.join(ts)})" for o, ts in winners.items())
        if winners
        else "No kinetic energy pays on three or more of these tasks."
    )
    return [
        "## Does engineering the kinetic energy pay?",
        "",
        f"Each ksbopt kinetic energy against {', '.join(f'`{p}`' for p in PRACTITIONERS)} at "
        f"their own tuned settings: fewer steps to their target ({stats.TARGET_FRACTION:g} x "
        f"the best of their validation metrics; fastest of them / it; it pays "
        f"at >= {FEWER_STEPS}x with less time: CPU or wall-clock seconds, as marked), wider "
        f"good band (it / the widest of theirs, "
        f"each plus {LATTICE_DECADES} decade; it pays at >= {WIDER_BAND}x when their bands "
        "are closed), and its test metric minus the reference's (best of them on validation; "
        "paired by seed, 95% bootstrap interval), which must not be worse.",
        "",
        "| task | kinetic energy | reference | fewer steps | less time | wider band "
        "| test difference | pays |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        verdict,
        "",
    ]
