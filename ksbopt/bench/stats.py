"""Statistics of the benchmark report: paired bootstrap, good-band width, targets, sampling error.

Everything here is plain NumPy on lists of numbers (no JAX), so the report's verdicts can be
recomputed from the committed records alone. See :doc:`/howto/protocol` for how the report
uses them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["band", "in_band", "paired_bootstrap", "sampling_error", "target_value"]

# The target of steps-/wall-clock-to-target: this fraction of the best final validation metric
# of the task (any optimizer, same schedule arm); for a lower-is-better metric, best / fraction.
TARGET_FRACTION = 0.95
# A learning rate is in the "good band" when its validation metric is within 1 point (0.01,
# an accuracy) of the best, or within 1% of it for a lower-is-better metric (a loss).
BAND_TOLERANCE = {"higher": 0.01, "lower_relative": 0.01}
# Fewest shared seeds for a verdict: with two, the bootstrap interval is the range of two
# differences, far too narrow to be a 95% interval.
MIN_PAIRS = 3


class Paired(tuple):
    """``(mean, low, high, n)``: mean paired difference, its bootstrap interval, shared seeds.

    Example:
      >>> Paired(0.02, 0.01, 0.03, 5).verdict(), Paired(-0.01, -0.03, 0.01, 5).verdict()
      ('better', 'tie')
    """

    __slots__ = ()

    def __new__(cls, mean, low, high, n):
        return super().__new__(cls, (mean, low, high, n))

    mean = property(lambda self: self[0])
    low = property(lambda self: self[1])
    high = property(lambda self: self[2])
    n = property(lambda self: self[3])

    def verdict(self, higher_is_better: bool = True) -> str:
        """``better`` / ``worse`` when the interval excludes 0, else ``tie``; ``-`` with fewer
        than :data:`MIN_PAIRS` shared seeds.

        ``better`` means the first sample of :func:`paired_bootstrap` beats the second.
        """
        if self.n < MIN_PAIRS or self.low is None:
            return "-"
        if self.low > 0:
            return "better" if higher_is_better else "worse"
        if self.high < 0:
            return "worse" if higher_is_better else "better"
        return "tie"


def paired_bootstrap(
    a: Mapping[int, float],
    b: Mapping[int, float],
    *,
    level: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> Paired:
    r"""Mean of ``a[s] - b[s]`` over the seeds both hold, with a percentile bootstrap interval.

    With :math:`S` the shared seeds (:math:`n = |S|`) and :math:`d_s = a_s - b_s`, each of the
    :math:`B` = ``resamples`` bootstrap replicates draws :math:`n` indices uniformly with
    replacement, and the interval is the percentile interval of the replicate means:

    .. math::

        \bar d = \frac{1}{n} \sum_{s \in S} d_s, \qquad
        \bar d^{*}_b = \frac{1}{n} \sum_{i=1}^{n} d_{s_{b,i}}, \qquad
        [\mathrm{low}, \mathrm{high}] = \Bigl[\hat q_{(1-\alpha)/2},\,
        \hat q_{(1+\alpha)/2}\Bigr]\bigl(\{\bar d^{*}_b\}_{b=1}^{B}\bigr)

    with :math:`\alpha` = ``level`` and :math:`\hat q` NumPy's (linearly interpolated)
    empirical quantile. Pairing removes what the seed does to both optimizers alike
    (initialisation, batch order). A seed missing or non-finite (diverged) in either sample
    is left out; with fewer than :data:`MIN_PAIRS` shared seeds :meth:`Paired.verdict` gives
    no verdict (a percentile interval from one or two differences is their range, not a 95%
    interval).

    Args:
      a, b: seed -> metric.
      level: coverage of the interval.
      resamples: bootstrap resamples.
      seed: NumPy seed of the resampling (fixed: the report is reproducible).

    Returns:
      ``Paired`` ``(mean, low, high, n)``, a tuple with those attributes and a ``verdict``
      method (``better`` / ``worse`` when the interval excludes 0, else ``tie``);
      ``(None, None, None, 0)`` with no shared seed.

    Example:
      >>> p = paired_bootstrap({0: 0.9, 1: 0.8, 2: 0.85}, {0: 0.8, 1: 0.7, 2: 0.75})
      >>> round(p.mean, 6), round(p.low, 6), round(p.high, 6), p.n, p.verdict()
      (0.1, 0.1, 0.1, 3, 'better')

    References:
      Efron, "Bootstrap Methods: Another Look at the Jackknife", Annals of Statistics 7(1),
      1979, https://doi.org/10.1214/aos/1176344552; Efron, Tibshirani, "An Introduction to the
      Bootstrap", Chapman & Hall, 1993, ch. 13 (the percentile interval),
      https://doi.org/10.1201/9780429246593.
    """
    if not 0 < level < 1:
        raise ValueError(f"level={level!r} must be in (0, 1), e.g. 0.95")
    if resamples < 1:
        raise ValueError(f"resamples={resamples!r} must be a positive integer, e.g. 10000")
    shared = sorted(s for s in set(a) & set(b) if _finite(a[s]) and _finite(b[s]))
    if not shared:
        return Paired(None, None, None, 0)
    d = np.array([a[s] - b[s] for s in shared], dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return Paired(float(d.mean()), float(lo), float(hi), len(shared))


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


def in_band(value: float | None, best: float, higher_is_better: bool = True) -> bool:
    r"""Whether a validation metric is in the good band of the best one, ``best``.

    Finite and within :data:`BAND_TOLERANCE`: :math:`v \ge v^* - 0.01` (higher is better),
    :math:`v \le 1.01\, v^*` (lower is better, :math:`v^* \ge 0`; :math:`v \le v^*` for a
    negative best). A diverged (None) or non-finite value is never in the band.

    Args:
      value: the validation metric of a learning rate (None: diverged).
      best: the best validation metric of the curve.
      higher_is_better: the direction of the metric.

    Returns:
      True when ``value`` is in the good band of ``best``.

    References:
      Schmidt, Schneider, Hennig, "Descending through a Crowded Valley - Benchmarking Deep
      Learning Optimizers", https://arxiv.org/abs/2007.01547 (an optimizer's sensitivity to
      its learning rate, reported beside its best result).

    Example:
      >>> in_band(0.895, 0.90), in_band(0.88, 0.90), in_band(None, 0.90)
      (True, False, False)
      >>> in_band(1.005, 1.0, higher_is_better=False), in_band(1.02, 1.0, False)
      (True, False)
    """
    if not _finite(value):
        return False
    if higher_is_better:
        return value >= best - BAND_TOLERANCE["higher"]
    if best >= 0:
        return value <= best * (1 + BAND_TOLERANCE["lower_relative"])
    return value <= best


def band(
    scores: Mapping[float, float | None], higher_is_better: bool = True
) -> tuple[float, float, float] | None:
    r"""The good band of a learning-rate sensitivity curve: ``(low lr, high lr, width in decades)``.

    With :math:`v(\eta)` the validation metric at learning rate :math:`\eta` and
    :math:`\eta^*` the rate of the best one (the lowest such rate on a tie), a rate is good
    when its metric is finite and within ``BAND_TOLERANCE`` of the best,

    .. math::

        v(\eta) \ge v(\eta^*) - 0.01 \ \text{(higher is better)}, \qquad
        v(\eta) \le 1.01\, v(\eta^*) \ \text{(lower is better, } v(\eta^*) \ge 0\text{)},

    (:math:`v(\eta) \le v(\eta^*)` for a negative lower-is-better best). The band
    :math:`[\eta_{\rm lo}, \eta_{\rm hi}]` is the run of consecutive rates of ``scores``
    (sorted) around :math:`\eta^*` that are all good; a diverged or bad rate ends it. Its
    width is :math:`\log_{10}(\eta_{\rm hi} / \eta_{\rm lo})` decades, rounded to 6 digits, 0
    when only the best rate qualifies. A wide band is an optimizer that forgives a mistuned
    learning rate.

    Args:
      scores: learning rate -> validation metric (None or non-finite: diverged).
      higher_is_better: the direction of the metric (True for an accuracy, False for a loss).

    Returns:
      ``(low lr, high lr, width in decades)``, or None when no rate has a finite metric.

    Example:
      >>> band({0.01: 0.80, 0.03: 0.895, 0.1: 0.90, 0.3: 0.893, 1.0: 0.5})
      (0.03, 0.3, 1.0)
      >>> band({0.01: None, 0.1: None}) is None
      True

    References:
      Schmidt, Schneider, Hennig, "Descending through a Crowded Valley - Benchmarking Deep
      Learning Optimizers", https://arxiv.org/abs/2007.01547 (how sensitive an optimizer is
      to its tuning, reported beside its best result); Choi et al., "On Empirical Comparisons
      of Optimizers for Deep Learning", https://arxiv.org/abs/1910.05446.
    """
    lrs = sorted(scores)
    ok = [lr for lr in lrs if _finite(scores[lr])]
    if not ok:
        return None
    best = (max if higher_is_better else min)(ok, key=lambda lr: scores[lr])
    top = scores[best]

    def good(lr):
        return in_band(scores[lr], top, higher_is_better)

    i = j = lrs.index(best)
    while i > 0 and good(lrs[i - 1]):
        i -= 1
    while j < len(lrs) - 1 and good(lrs[j + 1]):
        j += 1
    lo, hi = lrs[i], lrs[j]
    return lo, hi, round(math.log10(hi / lo), 6)


def target_value(best: float, higher_is_better: bool, fraction: float = TARGET_FRACTION) -> float:
    r"""The target metric of steps-to-target and wall-clock-to-target.

    With :math:`m^*` the best final validation metric of the task (any optimizer, same
    schedule arm) and :math:`f` = ``fraction``:

    .. math::

        \tau = f\, m^* \ \text{(higher is better)}, \qquad
        \tau = m^* / f \ \text{(lower is better)},

    so the target is a fixed relative distance from the best, on the worse side.

    Args:
      best: the best metric :math:`m^*`.
      higher_is_better: the direction of the metric.
      fraction: :math:`f \in (0, 1]` (default ``TARGET_FRACTION``, 0.95).

    Returns:
      The target :math:`\tau` as a float.

    Example:
      >>> target_value(0.9, True), round(target_value(1.9, False), 4)
      (0.855, 2.0)

    References:
      Dahl et al., "Benchmarking Neural Network Training Algorithms",
      https://arxiv.org/abs/2306.07179 (speed measured as time to reach a fixed validation
      target; their targets come from tuned baselines rather than a fraction of the best).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction!r} must be in (0, 1], e.g. 0.95")
    return fraction * best if higher_is_better else best / fraction


def first_reach(
    xs: Sequence[float], values: Sequence[float | None], target: float, higher_is_better: bool
) -> float | None:
    """The first ``xs[i]`` (a step or a time) at which ``values[i]`` reaches ``target``.

    Example:
      >>> first_reach([0, 10, 20], [0.1, 0.86, 0.9], 0.855, True)
      10
      >>> first_reach([0, 10], [3.0, 2.5], 2.0, False) is None
      True
    """
    for x, v in zip(xs, values):
        if _finite(v) and (v >= target if higher_is_better else v <= target):
            return x
    return None


def sampling_error(accuracy: float | None, n: int | None) -> float | None:
    r"""Standard error of an accuracy ``p`` measured on ``n`` test examples.

    .. math::

        \mathrm{SE}(p) = \sqrt{\frac{p\,(1 - p)}{n}}

    The binomial error of the test set alone (a fixed model evaluated on a random test sample);
    differences smaller than about twice this cannot be told apart by that test set.

    Args:
      accuracy: the measured accuracy :math:`p \in [0, 1]` (None: not measured).
      n: the number of test examples (None or 0: unknown).

    Returns:
      :math:`\mathrm{SE}(p)` as a float, or None when ``accuracy`` is None or outside
      :math:`[0, 1]`, or ``n`` is None or 0.

    Example:
      >>> round(sampling_error(0.9, 10000), 4)
      0.003

    References:
      None: the standard error of a binomial proportion is a textbook result, with no
      single paper to cite.
    """
    if accuracy is None or not n or not 0 <= accuracy <= 1:
        return None
    return math.sqrt(accuracy * (1 - accuracy) / n)
