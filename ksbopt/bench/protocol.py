"""The tuning protocol: one learning-rate lattice, self-extending search, seeds, schedule arms.

Every optimizer is tuned the same way (the full account is :doc:`/howto/protocol`):

1. **Lattice.** Learning rates live on the half-decade lattice ``..., 0.01, 0.03, 0.1, 0.3,
   1, ...`` (index k -> ``1e{k//2}`` or ``3e{k//2}``, a ratio of about sqrt(10) between
   neighbours), the same points for every optimizer and every suite, so a quick run and a full
   run of the same task train exactly the same configurations.
2. **Start.** A window of :attr:`Protocol.window` lattice points centred on the geometric
   centre of the entry's registry grid, at the entry's default weight decay.
3. **Search.** With the score of a point the mean final validation metric over the tuning
   seeds (a point where any seed diverged scores worst), the best point's neighbours are
   evaluated: its two learning-rate neighbours and, for an entry whose default weight decay is
   positive, its two neighbours on the weight-decay grid ``default x`` :attr:`Protocol.wd_factors`.
   This repeats until the best point's neighbours are all evaluated and none is better. A
   learning rate outside the starting window is an *extension*; at most
   :attr:`Protocol.max_extensions` of them per entry, task and schedule arm. An optimum
   whose learning-rate neighbours are not both evaluated and worse is flagged ``edge``.
   Entries whose default weight decay is 0 are the registry's no-decay controls (``sgd``
   beside ``sgd+wd``, ``adam`` beside ``adamw``) and keep it at 0.
4. **Band.** Once the optimum is interior, the learning-rate sensitivity curve is walked
   outwards from it at the chosen weight decay, one lattice point at a time on each side,
   while the last point is still in the good band (:func:`ksbopt.bench.stats.in_band`), at
   most :attr:`Protocol.band_reach` points from the optimum: a hill climb stops at the first
   worse neighbour, which may still be good, so without this step the width of the good band
   would be cut at one lattice point for every optimizer. These points are not extensions;
   if one of them scores better than the optimum, the search goes on from it.
5. **Seeds.** The search uses the first :attr:`Protocol.tuning_seeds` seeds; the chosen
   point is then trained on every seed of the suite. Seeds are shared by all optimizers
   (same initialisation and batch order), so differences can be paired.
6. **Schedule arms.** ``cosine`` (linear warm-up over :data:`WARMUP_FRACTION` of the steps,
   then cosine decay to 0) and ``constant`` (no warm-up, no decay), tuned separately, the
   same for every optimizer.

The search is a pure function of the scores (:func:`search`): the harness recomputes it from
the records on disk at every round, so an interrupted suite resumes where it stopped and a
rerun of a finished suite trains nothing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

from ksbopt.bench.stats import in_band

__all__ = ["Protocol", "Search", "lattice_lr", "schedule_factor", "search"]

SCHEDULES = ("cosine", "constant")
WARMUP_FRACTION = 0.05


def lattice_lr(k: int) -> float:
    r"""The learning rate of lattice index ``k`` on the half-decade lattice of the protocol.

    .. math::

        \eta_k = c_k \, 10^{\lfloor k/2 \rfloor}, \qquad
        c_k = \begin{cases} 1 & k \text{ even} \\ 3 & k \text{ odd} \end{cases}

    so two steps of the index are one decade and neighbours differ by a factor 3 or 10/3
    (about :math:`\sqrt{10}` on a log scale). The value is built from its decimal text
    (``float("3e-2")``), so lattice rates are exactly the round numbers ``0.03``, ``0.1``, ...
    with no accumulated floating-point error.

    Args:
      k: the lattice index (any integer; 0 is learning rate 1).

    Returns:
      The learning rate :math:`\eta_k` as a Python float.

    Example:
      >>> [lattice_lr(k) for k in (-4, -3, -2, -1, 0, 1)]
      [0.01, 0.03, 0.1, 0.3, 1.0, 3.0]

    References:
      None: the 1-3-10 lattice is this package's fixed grid convention; the papers behind
      the tuning protocol that uses it are cited by :func:`search`.
    """
    return float(f"{3 if k % 2 else 1}e{k // 2}")


def lattice_index(lr: float) -> int:
    """The index of the lattice point nearest to ``lr`` on a log scale.

    Example:
      >>> lattice_index(0.03), lattice_index(0.0316), lattice_index(0.1)
      (-3, -3, -2)
    """
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"learning rate {lr!r} must be a positive finite number, e.g. 0.01")
    k = round(2 * math.log10(lr))
    return min((k - 1, k, k + 1), key=lambda j: abs(math.log10(lattice_lr(j) / lr)))


def start_window(grid: Sequence[float], size: int) -> tuple[int, ...]:
    """``size`` consecutive lattice indices centred on the geometric centre of ``grid``.

    Example:
      >>> start_window((0.001, 0.003, 0.01, 0.03, 0.1), 3)
      (-5, -4, -3)
    """
    if not grid:
        raise ValueError("an optimizer's learning-rate grid is empty; give at least one rate")
    centre = lattice_index(math.exp(sum(math.log(x) for x in grid) / len(grid)))
    first = centre - (size - 1) // 2
    return tuple(range(first, first + size))


def wd_grid(default: float, factors: Sequence[float]) -> tuple[float, ...]:
    """The weight decays tried for an entry whose default is ``default`` (none if it is 0).

    Example:
      >>> wd_grid(5e-4, (0.1, 1.0, 10.0))
      (5e-05, 0.0005, 0.005)
      >>> wd_grid(0.0, (0.1, 1.0, 10.0))
      ()
    """
    if not default:
        return ()
    return tuple(float(f"{default * f:.6g}") for f in sorted(factors))


def schedule_definition(schedule: str) -> dict | None:
    """What a run's record stores of its schedule (None for ``constant``): a changed definition
    changes the record's configuration, so old records of that arm are not reused.

    Example:
      >>> schedule_definition("cosine")
      {'warmup_fraction': 0.05, 'decay': 'cosine, (1 + cos(pi (t - w) / (T - w))) / 2'}
    """
    if schedule == "constant":
        return None
    if schedule != "cosine":
        raise ValueError(f"schedule={schedule!r} is not one of {SCHEDULES}")
    return {
        "warmup_fraction": WARMUP_FRACTION,
        "decay": "cosine, (1 + cos(pi (t - w) / (T - w))) / 2",
    }


def schedule_factor(schedule: str, step, steps: int, xp=math):
    r"""Multiplier of the peak learning rate at ``step`` (0-based) of a ``steps``-step run.

    ``constant`` is 1 at every step. ``cosine`` is a linear warm-up over the first
    :math:`w` steps followed by a cosine decay; with :math:`t` the step, :math:`T` the number
    of steps and :math:`f` the warm-up fraction ``WARMUP_FRACTION`` (0.05):

    .. math::

        w = \max(1, \lceil f T \rceil), \qquad
        s(t) = \begin{cases}
            \dfrac{t + 1}{w} & t < w, \\[4pt]
            \dfrac{1}{2}\Bigl(1 + \cos\dfrac{\pi (t - w)}{\max(1, T - w)}\Bigr) & t \ge w.
        \end{cases}

    The warm-up reaches 1 at :math:`t = w - 1`; the decay starts from 1 at :math:`t = w` and
    would reach 0 at :math:`t = T`, the step after the last, so every step taken has a
    positive rate.

    Args:
      schedule: ``"cosine"`` or ``"constant"`` (anything else raises ``ValueError``).
      step: the 0-based step :math:`t`: a Python number, or a traced integer array when
        ``xp`` is ``jax.numpy``.
      steps: the run's number of steps :math:`T`.
      xp: the array namespace: ``math`` for Python numbers, ``jax.numpy`` for a traced step.

    Returns:
      The factor :math:`s(t)` that multiplies the peak learning rate: a Python float with
      ``xp=math`` (and always ``1.0`` for ``constant``), else a float32 array of ``step``'s
      shape.

    Example:
      >>> [round(schedule_factor("cosine", s, 100), 3) for s in (0, 4, 5, 52, 99)]
      [0.2, 1.0, 1.0, 0.508, 0.0]

    References:
      Loshchilov, Hutter, "SGDR: Stochastic Gradient Descent with Warm Restarts", ICLR 2017,
      https://arxiv.org/abs/1608.03983 (the cosine decay, here a single cycle without
      restarts); Goyal et al., "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour",
      https://arxiv.org/abs/1706.02677 (the linear warm-up).
    """
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"schedule={schedule!r} is not one of {SCHEDULES}")
    w = max(1, math.ceil(WARMUP_FRACTION * steps))
    if xp is math:
        if step < w:
            return (step + 1) / w
        return (1 + math.cos(math.pi * (step - w) / max(1, steps - w))) / 2
    step = xp.asarray(step, xp.float32)
    warm = (step + 1) / w
    decay = (1 + xp.cos(math.pi * (step - w) / max(1, steps - w))) / 2
    return xp.where(step < w, warm, decay)


@dataclasses.dataclass(frozen=True)
class Protocol:
    r"""The knobs of the tuning protocol (one instance per suite; see the module docstring).

    A point :math:`p = (k, \lambda)` is a lattice index (learning rate
    :math:`\eta_k`, :func:`lattice_lr`) and a weight decay. Its score is the mean final
    validation metric over the first ``tuning_seeds`` seeds, the worst possible when any of
    them diverged:

    .. math::

        \operatorname{score}(p) = \frac{1}{n_{\rm tune}} \sum_{s=0}^{n_{\rm tune}-1}
        \operatorname{val}(p, s), \qquad
        \lambda \in \{\, c \, \lambda_0 : c \in \texttt{wd\_factors} \,\}

    with :math:`\lambda_0` the entry's default weight decay (not tuned when it is 0).

    Attributes:
      tuning_seeds: how many of the suite's seeds (the first ones) the search uses.
      window: lattice points of the starting window.
      max_extensions: learning rates outside the starting window, at most.
      wd_factors: the weight-decay grid, as multiples of the entry's positive default.
      band_reach: how far (lattice points from the optimum, each side) the good band is
        followed; a band still good at this distance is reported open on that side.

    Example:
      >>> Protocol().tuning_seeds, Protocol(window=5).window
      (2, 5)

    References:
      The self-extending grid follows the advice of Choi et al., "On Empirical Comparisons of
      Optimizers for Deep Learning", https://arxiv.org/abs/1910.05446 (tune every optimizer's
      search space until the optimum is inside it), and Schmidt, Schneider, Hennig,
      "Descending through a Crowded Valley - Benchmarking Deep Learning Optimizers", ICML 2021,
      https://arxiv.org/abs/2007.01547 (one tuning budget and protocol for every optimizer).
    """

    tuning_seeds: int = 2
    window: int = 3
    max_extensions: int = 4
    wd_factors: tuple[float, ...] = (0.1, 1.0, 10.0)
    band_reach: int = 3

    def __post_init__(self):
        if self.tuning_seeds < 1 or self.window < 1 or self.max_extensions < 0:
            raise ValueError(
                f"Protocol({self}): tuning_seeds and window must be >= 1, max_extensions >= 0"
            )
        if self.band_reach < 1:
            raise ValueError(
                f"Protocol(band_reach={self.band_reach}): must be >= 1 (the optimum's "
                "neighbours are always evaluated)"
            )
        if 1.0 not in self.wd_factors:
            raise ValueError(f"wd_factors={self.wd_factors} must contain 1.0 (the default)")


Point = tuple[int, float | None]  # (lattice index, weight decay or None: the entry's own)


@dataclasses.dataclass(frozen=True)
class Search:
    r"""Where the search of one (task, schedule arm, optimizer) stands.

    Once every needed point is scored, ``best`` is the evaluated point :math:`p^* = (k^*,
    \lambda^*)` of best score (ties: the lower learning rate, then the lower weight decay),
    and

    .. math::

        \texttt{edge} \iff \operatorname{score}(p^*) \text{ diverged} \;\lor\;
        \exists\, k \in \{k^* - 1, k^* + 1\}:\;
        (k, \lambda^*) \text{ unevaluated or not worse than } p^*.

    Attributes:
      needed: points to train next on the tuning seeds (empty once the search is over).
      best: the chosen point (None while points are missing).
      scores: every evaluated point -> its score (None: diverged or non-finite).
      edge: the chosen learning rate lacks a worse evaluated neighbour on some side.
      exhausted: the extension budget stopped the search.

    The property ``done`` is true when ``needed`` is empty.

    Example:
      >>> s = search((0, 1, 2), (), lambda p: -abs(p[0] - 1), higher_is_better=True,
      ...            max_extensions=4)
      >>> s.done, s.best, s.edge
      (True, (1, None), False)

    References:
      Choi et al., "On Empirical Comparisons of Optimizers for Deep Learning",
      https://arxiv.org/abs/1910.05446 (an optimum on the edge of its search space means the
      space was too small: ``edge`` flags it).
    """

    needed: tuple[Point, ...]
    best: Point | None
    scores: Mapping[Point, float | None]
    edge: bool = False
    exhausted: bool = False

    @property
    def done(self) -> bool:
        return not self.needed


MISSING = object()  # what ``score`` returns for a point some tuning seed has not run yet


def search(
    window: Sequence[int],
    wds: Sequence[float],
    score: Callable[[Point], float | object | None],
    *,
    higher_is_better: bool,
    max_extensions: int,
    wd0: float | None = None,
    band_reach: int = 1,
) -> Search:
    r"""Runs the search of the module docstring as far as the known scores allow.

    With :math:`E` the evaluated points (first the ``window`` at weight decay
    :math:`\lambda_0` = ``wd0``), each round takes the best evaluated point :math:`p^* = (k^*,
    \lambda_i)` and evaluates its neighbours

    .. math::

        N(p^*) = \{(k^* \pm 1, \lambda_i)\} \cup \{(k^*, \lambda_{i \pm 1})\}, \qquad
        E \leftarrow E \cup N(p^*),

    (weight-decay neighbours only when ``wds`` is not empty, and only inside it) until
    :math:`N(p^*) \subseteq E`, i.e. no neighbour of the best is unevaluated. A lattice index
    outside ``window`` is an extension; once ``max_extensions`` distinct ones are used, a
    neighbour needing another is skipped and the result is marked ``exhausted``. The result
    depends only on the scores, so calling it again with more scores known continues the same
    search (this is how the harness resumes).

    Then the good band is followed: with :math:`v^*` the best score, the next lattice point
    :math:`(k^* \pm (i + 1), \lambda^*)` is evaluated while :math:`(k^* \pm i, \lambda^*)` is
    in the band (:func:`ksbopt.bench.stats.in_band`) and :math:`i <` ``band_reach``; these
    points do not count as extensions, and a better one restarts the neighbour search from it.

    Args:
      window: the starting lattice indices.
      wds: the weight-decay grid (empty: the entry's own weight decay, not tuned).
      score: point -> mean validation metric over the tuning seeds, None if any seed
        diverged, or :data:`MISSING` if some seed has not run yet.
      higher_is_better: the direction of the metric.
      max_extensions: learning rates outside ``window``, at most.
      wd0: the weight decay the search starts from (default: the middle of ``wds``).
      band_reach: lattice points from the optimum up to which the good band is followed
        (1: only the neighbours, the plain hill climb).

    Returns:
      A :class:`Search`: the points still ``needed`` (the search stops at the first round
      with a :data:`MISSING` score), or, once every needed point is scored, the ``best``
      point with its ``edge`` and ``exhausted`` flags; ``scores`` holds every known score.

    Example:
      >>> curve = {k: -abs(k + 5) for k in range(-12, 3)}  # best at index -5 (lr 0.003)
      >>> s = search((-2, -1, 0), (), lambda p: curve[p[0]], higher_is_better=True,
      ...            max_extensions=4)
      >>> s.best, s.edge, s.exhausted, sorted(k for k, _ in s.scores)
      ((-5, None), False, False, [-6, -5, -4, -3, -2, -1, 0])

    References:
      Choi et al., "On Empirical Comparisons of Optimizers for Deep Learning",
      https://arxiv.org/abs/1910.05446 (extend the search space until the optimum is
      interior); Schmidt, Schneider, Hennig, "Descending through a Crowded Valley -
      Benchmarking Deep Learning Optimizers", https://arxiv.org/abs/2007.01547, and Dahl et
      al., "Benchmarking Neural Network Training Algorithms", https://arxiv.org/abs/2306.07179
      (the same tuning protocol and budget for every optimizer).
    """
    wds = tuple(wds)
    if wd0 is not None and wd0 not in wds:
        raise ValueError(f"wd0={wd0!r} is not on the weight-decay grid {wds}")
    w0 = (wd0 if wd0 is not None else wds[len(wds) // 2]) if wds else None
    known: dict[Point, float | None] = {}
    evaluated: list[Point] = [(k, w0) for k in window]
    inside = set(window)
    band_ks: set[int] = set()  # learning rates evaluated only to follow the good band

    def rank(p: Point):
        v = known[p]
        worst = -math.inf
        s = worst if v is None else (v if higher_is_better else -v)
        return (s, -p[0], -(p[1] or 0.0))  # ties: the lower rate, then the lower decay

    while True:
        missing = []
        for p in evaluated:
            if p not in known:
                v = score(p)
                if v is MISSING:
                    missing.append(p)
                else:
                    known[p] = v if v is None or math.isfinite(v) else None
        if missing:
            return Search(tuple(missing), None, dict(known))
        best = max(evaluated, key=rank)
        k, w = best
        extensions = {q for q, _ in evaluated} - inside - band_ks
        around = [(k - 1, w), (k + 1, w)]
        if wds:
            i = wds.index(w)
            around += [(k, wds[j]) for j in (i - 1, i + 1) if 0 <= j < len(wds)]
        new, blocked = [], False
        for p in around:
            if p in evaluated:
                continue
            if p[0] not in inside and p[0] not in extensions:
                if len(extensions) >= max_extensions:
                    blocked = True
                    continue
                extensions.add(p[0])
            new.append(p)
        if not new:
            new = _band_frontier(best, evaluated, known, higher_is_better, band_reach)
            band_ks.update(q for q, _ in new if q not in inside and q not in extensions)
        if not new:
            lr_nbrs = [(k - 1, w), (k + 1, w)]
            edge = known[best] is None or not all(
                p in known and rank(p) < rank(best) for p in lr_nbrs
            )
            return Search((), best, dict(known), edge=edge, exhausted=blocked)
        evaluated += new


def _band_frontier(
    best: Point, evaluated, known, higher_is_better: bool, reach: int
) -> list[Point]:
    """The unevaluated learning rates next to the good band of ``best``, within ``reach``
    (a neighbour the extension budget left unevaluated stays so: that side is an edge)."""
    k, w = best
    top = known[best]
    out = []
    if top is None:
        return out
    for step in (-1, 1):
        for i in range(1, reach + 1):
            p = (k + step * i, w)
            if p not in evaluated:
                if i > 1:
                    out.append(p)
                break
            if not in_band(known[p], top, higher_is_better):
                break
    return out
