"""Whether two suites agree where they overlap, such as the quick suite and the full one.

The quick suite runs the full suite's protocol on fewer tasks and seeds, so on every task they
share it should choose the same settings and never reach the opposite verdict. This module
checks that from the two ``summary.json`` files, per shared (task, optimizer) on the grid's
main schedule arm:

- **setting**: the chosen learning rate and hyperparameters are the same;
- **verdict**: the paired verdicts against each suite's reference (see
  :mod:`ksbopt.bench.summary`) are the same; or the smaller suite calls a tie that the larger
  one resolves, with a mean difference of the same sign (more seeds give a narrower interval:
  *resolved*); or one says better where the other says worse, or the two references differ
  (*contradiction*).

Usage::

    python -m ksbopt.bench.agreement benchmarks/results/quick-cpu benchmarks/results/full-cpu-v2

prints the table and exits with status 1 when any pair contradicts.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Pair", "Verdict", "compare", "main", "markdown"]


@dataclass(frozen=True)
class Verdict:
    """One suite's paired verdict on an entry.

    Attributes:
      verdict: ``better``, ``tie`` or ``worse`` against ``vs`` (the paired 95% interval of
        :mod:`ksbopt.bench.summary`), ``-`` with too few shared seeds, or ``reference`` for the
        suite's reference itself.
      vs: the reference's registry name (None for the reference).
      mean: the mean paired difference entry - reference (None for the reference).

    Example:
      >>> str(Verdict("tie", "adamw", 0.001)), str(Verdict("reference", None, None))
      ('tie vs adamw', 'reference')

    References:
      Schmidt et al., "Descending through a Crowded Valley", https://arxiv.org/abs/2007.01547
      (see :func:`compare`).
    """

    verdict: str
    vs: str | None
    mean: float | None

    def __str__(self) -> str:
        return self.verdict if self.vs is None else f"{self.verdict} vs {self.vs}"


@dataclass(frozen=True)
class Pair:
    r"""One (task, optimizer) that both suites ran, with both suites' choices and verdicts.

    With :math:`v_s, v_l` the verdicts of the smaller and the larger suite, :math:`m_s, m_l`
    their mean paired differences and :math:`r_s, r_l` their references, :attr:`status` is

    .. math::

        \text{same} \iff r_s = r_l \wedge v_s = v_l, \qquad
        \text{resolved} \iff r_s = r_l \wedge v_s = \text{tie} \wedge
        v_l \in \{\text{better}, \text{worse}\} \wedge m_s m_l > 0,

    and ``contradiction`` otherwise.

    Attributes:
      task: the task's name.
      optimizer: the registry name.
      small_setting: the smaller suite's chosen ``(learning rate, sorted hyperparameters)``.
      large_setting: the larger suite's.
      small: the smaller suite's :class:`Verdict`.
      large: the larger suite's.

    Example:
      >>> s = ((0.1, ()), (0.1, ()))
      >>> Pair("t", "mine", *s, Verdict("tie", "adamw", -0.01),
      ...      Verdict("worse", "adamw", -0.02)).status
      'resolved'

    References:
      Schmidt et al., "Descending through a Crowded Valley", https://arxiv.org/abs/2007.01547
      (see :func:`compare`).
    """

    task: str
    optimizer: str
    small_setting: tuple
    large_setting: tuple
    small: Verdict
    large: Verdict

    @property
    def same_setting(self) -> bool:
        return self.small_setting == self.large_setting

    @property
    def status(self) -> str:
        """``same``, ``resolved`` (a tie the larger suite resolves, same sign) or
        ``contradiction`` (opposite verdicts, or verdicts against different references)."""
        a, b = self.small, self.large
        if a.vs != b.vs:
            return "contradiction"
        if a.verdict == b.verdict:
            return "same"
        if a.verdict == "tie" and b.verdict in ("better", "worse") and _same_sign(a.mean, b.mean):
            return "resolved"
        return "contradiction"


def _same_sign(x: float | None, y: float | None) -> bool:
    return x is not None and y is not None and x * y > 0


def _arm(summary: Mapping) -> Mapping:
    arm = summary.get("grid_arm")
    return (summary.get("arms") or {}).get(arm) or summary.get("grid") or {}


def _setting(row: Mapping) -> tuple:
    return row.get("best_lr"), tuple(sorted((row.get("hparams") or {}).items()))


def _verdict(row: Mapping) -> Verdict:
    p = row.get("paired")
    if not p:
        return Verdict("reference", None, None)
    return Verdict(p.get("verdict"), p.get("vs"), p.get("mean"))


def compare(small: Mapping, large: Mapping) -> list[Pair]:
    r"""Every (task, optimizer) of ``small``'s main arm that ``large`` also ran.

    Each is a :class:`Pair` whose status follows its rule: with :math:`v` the verdicts and
    :math:`m` the mean paired differences, the suites agree when :math:`v_s = v_l`, or when
    :math:`v_s` is a tie that the larger suite resolves with :math:`m_s m_l > 0`.

    Args:
      small: the smaller suite's ``summary.json`` contents
        (:func:`ksbopt.bench.summary.summarize`).
      large: the larger suite's, the same way.

    Returns:
      One :class:`Pair` per shared (task, optimizer), in ``small``'s order.

    Example:
      >>> row = {"best_lr": 0.1, "hparams": {}, "paired": None}
      >>> s = {"grid": {"t": {"reference": "sgd", "optimizers": {"sgd": row}}}}
      >>> [p.status for p in compare(s, s)]
      ['same']

    References:
      Schmidt, Schneider, Hennig, "Descending through a Crowded Valley - Benchmarking Deep
      Learning Optimizers", https://arxiv.org/abs/2007.01547 (one protocol for every
      optimizer); Dahl et al., "Benchmarking Neural Network Training Algorithms",
      https://arxiv.org/abs/2306.07179 (results that hold across reruns).
    """
    a, b = _arm(small), _arm(large)
    pairs = []
    for task, ta in a.items():
        rows_b = (b.get(task) or {}).get("optimizers", {})
        for opt, ra in ta["optimizers"].items():
            if opt in rows_b:
                rb = rows_b[opt]
                pairs.append(
                    Pair(task, opt, _setting(ra), _setting(rb), _verdict(ra), _verdict(rb))
                )
    return pairs


def _setting_text(s: tuple) -> str:
    lr, hp = s
    return f"lr {lr:g}" + "".join(f", {k} {v:g}" for k, v in hp if isinstance(v, (int, float)))


def markdown(pairs: list[Pair]) -> list[str]:
    """The comparison as a Markdown table and a one-line tally.

    Args:
      pairs: the result of :func:`compare`.

    Returns:
      Lines of Markdown: one table row per pair (both chosen settings, both verdicts, the
      status), then the counts of same settings and of each status.

    Example:
      >>> v = Verdict("tie", "adamw", 0.0)
      >>> markdown([Pair("t", "mine", (0.1, ()), (0.1, ()), v, v)])[2]
      '| t | mine | lr 0.1 (both) | tie vs adamw / tie vs adamw | same |'

    References:
      Schmidt et al., "Descending through a Crowded Valley", https://arxiv.org/abs/2007.01547
      (see :func:`compare`).
    """
    lines = [
        "| task | optimizer | chosen setting (small / large) | verdict (small / large) | "
        "agreement |",
        "|---|---|---|---|---|",
    ]
    for p in pairs:
        setting = (
            f"{_setting_text(p.small_setting)} (both)"
            if p.same_setting
            else f"{_setting_text(p.small_setting)} / {_setting_text(p.large_setting)}"
        )
        lines.append(
            f"| {p.task} | {p.optimizer} | {setting} | {p.small} / {p.large} | {p.status} |"
        )
    counts = {s: sum(p.status == s for p in pairs) for s in ("same", "resolved", "contradiction")}
    lines += [
        "",
        f"{len(pairs)} shared pairs: {sum(p.same_setting for p in pairs)} with the same chosen "
        f"setting; verdicts {counts['same']} the same, {counts['resolved']} a tie the larger "
        f"suite resolves, {counts['contradiction']} contradicting.",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    """The command line: ``python -m ksbopt.bench.agreement SMALL_FOLDER LARGE_FOLDER``.

    Args:
      argv: the arguments (default: the process's): two suite output folders, each with a
        ``summary.json``.

    Returns:
      The exit status: 0 when no pair contradicts, 1 otherwise (the table is printed either
      way).

    Example:
      >>> import json, pathlib, tempfile
      >>> root = pathlib.Path(tempfile.mkdtemp())
      >>> row = {"best_lr": 0.1, "hparams": {}, "paired": None}
      >>> for name in ("quick", "full"):
      ...     (root / name).mkdir()
      ...     _ = (root / name / "summary.json").write_text(
      ...         json.dumps({"grid": {"t": {"optimizers": {"sgd": row}}}}))
      >>> main([str(root / "quick"), str(root / "full")])  # doctest: +ELLIPSIS
      | task | optimizer | ...
      | t | sgd | lr 0.1 (both) | reference / reference | same |
      <BLANKLINE>
      1 shared pairs: 1 with the same chosen setting; ... 0 contradicting.
      0

    References:
      Schmidt et al., "Descending through a Crowded Valley", https://arxiv.org/abs/2007.01547
      (see :func:`compare`).
    """
    p = argparse.ArgumentParser(prog="python -m ksbopt.bench.agreement", description=__doc__)
    p.add_argument("small", help="the smaller suite's output folder (e.g. the quick suite's)")
    p.add_argument("large", help="the larger suite's output folder (e.g. the full suite's)")
    a = p.parse_args(argv)
    summaries = []
    for folder in (a.small, a.large):
        path = Path(folder) / "summary.json"
        try:
            summaries.append(json.loads(path.read_text()))
        except (OSError, ValueError) as e:
            p.error(f"{path}: cannot read the summary ({e}); run the suite into {folder} first")
    pairs = compare(*summaries)
    if not pairs:
        p.error(f"{a.small} and {a.large} share no (task, optimizer) on their main arm")
    print("\n".join(markdown(pairs)))
    return 1 if any(x.status == "contradiction" for x in pairs) else 0


if __name__ == "__main__":
    sys.exit(main())
