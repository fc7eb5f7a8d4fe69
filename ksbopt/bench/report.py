"""Markdown report, summary JSON and PNG plots from the per-run records.

The numbers come from :func:`ksbopt.bench.summary.summarize` (the grid experiment's per schedule
arm, task and optimizer: the setting chosen on the VALIDATION split, TEST metric at that setting
over its seeds, sensitivity, good band, targets, paired-bootstrap verdicts; the NLD control; the
published baselines). :func:`write_report` writes them to ``summary.json`` and ``report.md``:
protocol, the four questions (:mod:`ksbopt.bench.questions`), whether a kinetic energy pays
(:mod:`ksbopt.bench.advantage`), overview, one section per task
and arm (:mod:`ksbopt.bench.tables`), with the figures of :func:`ksbopt.bench.plots.write`.
"""

from __future__ import annotations

import collections
import datetime
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from ksbopt.bench import advantage, profiles, questions, tables
from ksbopt.bench import plots as figures
from ksbopt.bench.summary import summarize
from ksbopt.bench.tables import fmt

__all__ = ["fmt", "summarize", "write_report"]


def write_report(
    out: str | os.PathLike,
    records: Sequence[dict],
    meta: Mapping,
    *,
    published: Mapping[str, float] | None = None,
    plots: bool = True,
) -> Path:
    """Writes ``report.md``, ``summary.json`` and ``plots/*.png`` under ``out``."""
    out = Path(out)
    summary = summarize(records, published)
    by_id = {r["id"]: r for r in records}
    nld_records = [r for r in records if r["config"]["experiment"] == "nld"]
    made = figures.write(out, summary, by_id, nld_records) if plots and records else {}
    L = _header(records, meta)
    L += ["", *tables.protocol_lines(meta.get("protocol"), summary.get("grid_arm")), ""]
    L += questions.lines(summary)
    L += advantage.markdown(summary["grid"], _headline_first(summary["grid"]))
    L += tables.overview(summary["grid"])
    L += _task_sections(summary, by_id, made)
    if summary["nld"]:
        L += tables.nld_section(summary["nld"], made.get("nld", []))
    if summary["baselines"]:
        L += tables.baselines_section(summary["baselines"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({"meta": dict(meta), **summary}, indent=1))
    path = out / "report.md"
    path.write_text("\n".join(L) + "\n")
    return path


def _headline_first(grid: Mapping) -> list[str]:
    """The headline tasks of the run if it has any (the question is asked of them), else all."""
    from ksbopt.bench.tasks import HEADLINE_TASKS

    return [t for t in HEADLINE_TASKS if t in grid] or list(grid)


def _header(records: Sequence[dict], meta: Mapping) -> list[str]:
    """Title, command, date, devices, machine, runs and notes of the invocation."""
    env = records[0]["env"] if records else {}
    L = [f"# ksbopt benchmark report: suite `{meta.get('suite')}`", ""]
    L += [
        f"- command: `{meta.get('command', '')}`",
        f"- date: {meta.get('date', datetime.datetime.now().isoformat(timespec='seconds'))}",
        f"- devices: {meta.get('devices', '')}",
        f"- machine: {env.get('machine', '?')}, {env.get('cpu_count', '?')} CPUs visible; "
        f"python {env.get('python', '?')}, jax {env.get('jax', '?')}, "
        f"optax {env.get('optax', '?')}; allocator {env.get('allocator', 'default')}",
        f"- scale: `{meta.get('scale')}`; runs: {len(records)} "
        f"({meta.get('trained', '?')} trained now, {meta.get('reused', '?')} reused from "
        "earlier records)",
    ]
    side = collections.Counter(r["env"].get("jobs", 1) for r in records)
    for jobs, n in sorted((j, n) for j, n in side.items() if j > 1):
        L.append(
            f"- {n} of the runs were trained {jobs} at a time, each pinned to one CPU core "
            "(`--jobs`): their times per step and to target include their neighbours' share of "
            "the machine"
        )
    if meta.get("wall_s") is not None:
        L.append(f"- wall time of this invocation: {meta['wall_s']:.1f} s")
    for note in meta.get("notes", []):
        L.append(f"- note: {note}")
    return L


def _task_sections(summary: Mapping, by_id: Mapping[str, dict], made: Mapping) -> list[str]:
    """One section per task of the main arm (with its symmetry profile and figures), then
    the other arms' tables."""
    L = []
    for task, t in summary["grid"].items():
        L += tables.task_section(task, t, summary.get("grid_arm"))
        L += profiles.report_lines(
            task,
            {
                o: [by_id[i].get("profile") for i in r["runs"] if i in by_id]
                for o, r in t["optimizers"].items()
            },
        )
        for name in made.get(task, []):
            L += [f"![{name}](plots/{name})", ""]
    for arm, tasks in list(summary.get("arms", {}).items())[1:]:
        L += [f"## Schedule arm `{arm}`", ""]
        for task, t in tasks.items():
            L += tables.task_section(task, t, arm, level="###")
    return L
