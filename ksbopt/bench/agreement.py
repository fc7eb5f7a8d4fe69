"""Do two suites agree where they overlap? (Is the quick suite a faithful subset of the full one?)

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
    """One suite's paired verdict on an entry: ``better``, ``tie``, ``worse`` against the
    reference ``vs`` with the mean paired difference, or ``reference`` for the reference."""

    verdict: str
    vs: str | None
    mean: float | None

    def __str__(self) -> str:
        return self.verdict if self.vs is None else f"{self.verdict} vs {self.vs}"


@dataclass(frozen=True)
class Pair:
    """One (task, optimizer) that both suites ran, with both suites' choices and verdicts."""

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
    """Every (task, optimizer) of ``small``'s main arm that ``large`` also ran.

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
    """The comparison as a Markdown table and a one-line tally."""
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
