"""Sphinx extension: the benchmark tables of the docs, generated from ``benchmarks/results/``.

A page asks for them with a fenced block, replaced by Markdown before MyST parses the page::

    ```{bench-tables} full-cpu
    ```

The argument is a folder of ``benchmarks/results/`` (or ``all``: every folder, in name order,
so a folder committed later appears without editing the docs); a second one picks one table of
a suite with the facts of its run (``{bench-tables} full-cpu nld``). What a folder holds decides
what is rendered:

- ``summary.json`` (a suite written by the benchmark harness): the date, command and devices
  of the run, the machine from the ``env`` of the per-run records in ``runs/``, the overview
  table (test metric at the learning rate chosen on validation, best of each row in bold),
  the NLD control and the published baselines; asked for by name (``{bench-tables} FOLDER
  advantage``), whether a ksbopt kinetic energy pays against the practitioners' optimizers
  per schedule arm (``ksbopt.bench.advantage``);
- any other ``*.json`` with a ``results`` list: a per-step record, rendered by the module
  that wrote it (its ``command``): ``bench_models``' tables, or for ``bench_transforms --json``
  the tables of ``benchmarks.tables`` (per size and layout: time, ratios to the optax base
  and to the hand-written floor, compile seconds, peak memory and optimizer state), the
  same as the results README's.

A JSON file that does not parse or lacks a field its kind needs stops the build with an
error naming the file and the field; a JSON file of no known kind is named on the page as not
rendered. Nothing is copied by hand: rebuilding the docs after a new run updates the page.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from sphinx.errors import ExtensionError

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
_BLOCK = re.compile(r"^```\{bench-tables\}[ \t]*(\S*)[ \t]*(\S*)[ \t]*\n```[ \t]*$", re.MULTILINE)


class _Json:
    """A JSON document and its file, whose lookups name the file and field when they fail."""

    def __init__(self, path: Path, data=None, where: str = ""):
        self.path, self.where = path, where
        if data is None:
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ExtensionError(f"{self._name()}: not readable JSON: {e}") from e
        self.data = data

    def _name(self) -> str:
        try:
            return str(self.path.relative_to(RESULTS.parent.parent))
        except ValueError:
            return str(self.path)

    def __getitem__(self, key):
        where = f"{self.where}[{key!r}]"
        try:
            value = self.data[key]
        except (KeyError, IndexError, TypeError):
            raise ExtensionError(
                f"{self._name()}: field {where} is missing; rerun the benchmark that wrote "
                f"this file or remove the file"
            ) from None
        return _Json(self.path, value, where) if isinstance(value, dict | list) else value

    def __contains__(self, key) -> bool:
        return isinstance(self.data, dict) and key in self.data

    def __len__(self) -> int:  # an empty list or object is false
        return len(self.data)

    def get(self, key, default=None):
        return self[key] if isinstance(self.data, dict) and key in self.data else default

    def items(self):
        return [(k, self[k]) for k in self._typed(dict)]

    def __iter__(self):
        return iter([self[i] for i in range(len(self._typed(list)))])

    def _typed(self, kind):
        if not isinstance(self.data, kind):
            raise ExtensionError(
                f"{self._name()}: field {self.where or 'top level'} must be a "
                f"{kind.__name__}, got {type(self.data).__name__}"
            )
        return self.data

    def number(self, key) -> float:
        value = self[key]
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ExtensionError(
                f"{self._name()}: field {self.where}[{key!r}] must be a number, got {value!r}"
            )
        return float(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _machine(folder: Path) -> str:
    envs = set()
    for path in sorted((folder / "runs").glob("*.json")):
        env = _Json(path)["env"]
        envs.add(
            f"{env['machine']}, {env['cpu_count']} CPU cores, {env['device_count']} "
            f"{env['platform']} device(s); python {env['python']}, jax {env['jax']}, "
            f"optax {env['optax']}"
        )
    if not envs:
        return "not recorded (no run records in runs/)"
    return "; ".join(sorted(envs))


def _mean_std(entry: _Json) -> str:
    return f"{entry.number('test_mean'):.4f} ± {entry.number('test_std'):.4f}"


def _facts(folder: Path, meta: _Json) -> list[str]:
    if meta.get("made_by"):  # a report rebuilt from the records (--report-only)
        made = meta.get("made_in_s")
        how = [
            f"- last training command: `{meta['made_by']}`"
            + ("" if made is None else f" (its wall time {meta.number('made_in_s'):.0f} s)")
            + f"; report rebuilt from the folder's {meta['reused']} records on {meta['date']}",
            f"- machine: {_machine(folder)}; devices `{meta['devices']}`",
            f"- scale: `{meta['scale']}`",
        ]
    else:
        how = [
            f"- date: {meta['date']}",
            f"- command: `{meta['command']}`",
            f"- machine: {_machine(folder)}; devices `{meta['devices']}`",
            f"- scale: `{meta['scale']}`; {meta['trained']} runs trained, {meta['reused']} "
            f"reused from earlier records; wall time of the invocation "
            f"{meta.number('wall_s'):.0f} s",
        ]
    return [
        *how,
        f"- generated from `benchmarks/results/{folder.name}/summary.json` by this build; "
        f"the per-task tables and plots are in `benchmarks/results/{folder.name}/report.md`",
        "",
    ]


def _overview(summary: _Json) -> list[str]:
    grid = summary["grid"]
    names = sorted({name for _, task in grid.items() for name, _ in task["optimizers"].items()})
    rows = []
    for task_name, task in grid.items():
        results = dict(task["optimizers"].items())
        finite = {
            n: r.number("test_mean") for n, r in results.items() if r.get("test_mean") is not None
        }
        pick = max if task["higher_is_better"] else min
        best = pick(finite.values()) if finite else None
        cells = []
        for name in names:
            if name not in results:
                cells.append("n/a")
            elif name not in finite:
                cells.append("diverged")
            else:
                text = f"{finite[name]:.4f}"
                cells.append(f"**{text}**" if finite[name] == best else text)
        rows.append([f"{task_name} ({task['metric']})", *cells])
    return [
        "Test metric at the learning rate chosen on validation, mean over seeds; **bold**: best "
        "of the row; `n/a`: the task lacks the symmetry the optimizer needs (not run); "
        "`diverged`: every learning rate diverged.",
        "",
        _table(["task (metric)", *names], rows),
        "",
    ]


def _nld(summary: _Json) -> list[str]:
    rows = [
        [
            f"{r.number('learning_rate'):g}",
            f"{r.number('momentum'):g}",
            f"{r.number('weight_decay'):g}",
            _mean_std(r["free"]),
            _mean_std(r["constrained"]),
            f"{r.number('free_minus_constrained'):+.4f}",
        ]
        for r in summary.get("nld", [])
    ]
    header = ["lr", "momentum", "weight decay", "free", "constrained", "free - constrained"]
    return [
        "Test accuracy, mean ± std over seeds; `free`: SGD with momentum, `constrained`: the "
        "same followed by `ksbopt.retract` on every filter.",
        "",
        _table(header, rows),
        "",
    ]


def _baselines(summary: _Json) -> list[str]:
    rows = [
        [
            f"{r['task']}",
            f"{r['steps']}",
            f"{r.number('learning_rate'):g}",
            _mean_std(r),
            f"{r.number('published'):g}",
        ]
        for r in summary.get("baselines", [])
    ]
    return [_table(["task", "steps", "lr", "ours (test)", "published"], rows), ""]


def _advantage(summary: _Json) -> list[str]:
    """Does a ksbopt kinetic energy pay (``ksbopt.bench.advantage``), per schedule arm."""
    from ksbopt.bench import advantage

    out = []
    for arm, tasks in summary.get("arms", {}).items():
        # the section's own heading gives way to the arm's (the page has its own title)
        lines = [x for x in advantage.markdown(tasks.data) if not x.startswith("#")]
        if lines:
            out += [f"Schedule arm `{arm}`:", *lines]
    return out or ["No task of this run has a practitioner's optimizer to compare with.", ""]


# The parts of a suite a page may ask for: ``{bench-tables} full-cpu nld``.
_PARTS = {
    "overview": _overview,
    "nld": _nld,
    "baselines": _baselines,
    "advantage": _advantage,
}
_TITLES = {
    "overview": "Overview",
    "nld": "NLD control: free vs constrained filter norm",
    "baselines": "Published baselines",
    "advantage": "Does engineering the kinetic energy pay?",
}


def _suite(folder: Path, part: str | None = None) -> str:
    summary = _Json(folder / "summary.json")
    meta = summary["meta"]
    if part is not None:
        return "\n".join([*_facts(folder, meta), *_PARTS[part](summary)])
    out = [f"## Suite `{meta['suite']}` (`{folder.name}/`)", "", *_facts(folder, meta)]
    for key, make in _PARTS.items():
        if key == "overview" or summary.get(key):
            out += [f"### {_TITLES[key]}", "", *make(summary)]
    return "\n".join(out)


# Row fields of a bench_transforms record that are text; every other one is a number or null.
_TEXT_FIELDS = {"variant", "baseline", "group", "floor"}


def _transforms(path: Path, doc: _Json) -> str:
    """A ``bench_transforms --json`` record: ``benchmarks.tables.full`` (the tables the
    results README carries too: per size and layout, ratios to base and floor, compile
    seconds, peak memory and state), after checking that every figure is a number."""
    from benchmarks import tables

    for res in doc["results"]:
        for row in res["rows"]:
            for key, value in row.items():
                if key not in _TEXT_FIELDS and value is not None:
                    row.number(key)
    return "\n".join([f"### `{path.parent.name}/{path.name}`", "", *tables.full([(path, doc)])])


def _models(path: Path, doc: _Json) -> str:
    """A ``bench_models`` record: the tables ``benchmarks.bench_models.markdown`` writes."""
    from benchmarks import bench_models

    shown = f"benchmarks/results/{path.parent.name}/{path.name}"
    return "\n".join(
        [f"### `{path.parent.name}/{path.name}`", "", bench_models.markdown(doc, shown)]
    )


def _task_costs(path: Path, doc: _Json) -> str:
    """A ``bench_task_costs`` record: per task and optimizer, the measured step, evaluation and
    compile costs and the projected seconds of one run (what the suites' budget prices)."""
    rows = []
    for r in doc["results"]:
        rows.append(
            [
                f"`{r['task']}`",
                f"`{r['optimizer']}`",
                f"{int(r.number('n_params')):,}",
                str(int(r.number("steps"))),
                f"{r.number('step_ms_median'):.1f}",
                f"{r.number('eval_s_each'):.2f}",
                f"{r.number('compile_s'):.1f}",
                f"{r.number('projected_run_s'):.0f}",
            ]
        )
    header = ["task", "optimizer", "parameters", "steps", "ms/step", "s/eval", "compile s"]
    header.append("projected s/run")
    load = ", ".join(f"{x:.1f}" for x in doc.data.get("load_average", []))
    return "\n".join(
        [
            f"### `{path.parent.name}/{path.name}`",
            "",
            f"`{doc['command']}` (load average {load})",
            "",
            _table(header, rows),
        ]
    )


def _micro(path: Path, doc: _Json) -> str:
    """A per-step micro-benchmark record (a JSON object with a ``results`` list), rendered by
    the module that wrote it, as its ``command`` names it."""
    command = str(doc.data.get("command"))
    if "bench_task_costs" in command:
        render_record = _task_costs
    elif "bench_models" in command:
        render_record = _models
    else:
        render_record = _transforms
    try:
        return render_record(path, doc)
    except (TypeError, ValueError) as e:
        raise ExtensionError(f"{doc._name()}: a field has the wrong type: {e}") from e


def render(name: str, part: str | None = None) -> str:
    """The Markdown of ``{bench-tables} name [part]``.

    ``name``: a folder of benchmarks/results/, or ``all``; ``part``: one table of a suite
    (``overview``, ``nld``, ``baselines``, ``advantage``) with the facts of its run, instead of
    everything.
    """
    if name == "all":
        folders = sorted(p for p in RESULTS.iterdir() if p.is_dir())
    else:
        folders = [RESULTS / name]
        if not folders[0].is_dir():
            raise ExtensionError(f"bench-tables {name!r}: no folder benchmarks/results/{name}")
    if part is not None:
        if part not in _PARTS or name == "all":
            raise ExtensionError(
                f"bench-tables {name} {part}: a part is one of {sorted(_PARTS)} of one suite"
            )
        if not (folders[0] / "summary.json").exists():
            raise ExtensionError(f"bench-tables {name} {part}: {name} has no summary.json")
        return _suite(folders[0], part)
    parts = []
    for folder in folders:
        if (folder / "summary.json").exists():
            parts.append(_suite(folder))
        micro, unknown = [], []
        for path in sorted(folder.glob("*.json")):
            if path.name == "summary.json":
                continue
            doc = _Json(path)
            if isinstance(doc.data, dict) and "results" in doc.data:
                micro.append(_micro(path, doc))
            else:
                unknown.append(f"`{path.name}`")
        if micro:
            parts.append(f"## Micro-benchmarks (`{folder.name}/`)\n\n" + "\n".join(micro))
        if unknown:
            parts.append(
                f"Not rendered (a format docs/_ext/benchtables.py does not know): "
                f"{', '.join(unknown)} in `{folder.name}/`.\n"
            )
    return "\n".join(parts)


def sources(name: str) -> list[Path]:
    """The files ``render(name)`` reads (for Sphinx to rebuild the page when they change)."""
    root = RESULTS if name == "all" else RESULTS / name
    return sorted(root.rglob("*.json")) if root.is_dir() else []


def _source_read(app, docname, source) -> None:
    def replace(match):
        for path in sources(match[1] or "all"):
            app.env.note_dependency(str(path))
        return render(match[1] or "all", match[2] or None)

    source[0] = _BLOCK.sub(replace, source[0])


def setup(app):
    app.connect("source-read", _source_read)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
