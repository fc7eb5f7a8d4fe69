"""Write the per-step cost tables into the results README and the how-to, from the JSON.

Every table between a pair of markers ``<!-- bench_transforms:NAME begin -->`` and
``<!-- bench_transforms:NAME end -->`` is regenerated from the ``bench_transforms --json``
files given (one per size), so no figure is copied by hand:

- ``summary``: per size, one row per transform: its ratio to its optax base and, in
  parentheses, to its hand-written floor, on every layout;
- ``full``: per size and layout, every row with milliseconds, ratios, compile seconds, peak
  memory of one step and optimizer state size (both as ratios to the base).

Run:  python -m benchmarks.tables benchmarks/results/transforms-cpu/bench_transforms_10m.json \\
          benchmarks/results/transforms-cpu/bench_transforms_50m.json
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = (ROOT / "benchmarks" / "results" / "README.md", ROOT / "docs" / "howto" / "benchmarks.md")
_MARKER = re.compile(
    r"(<!-- bench_transforms:(\w+) begin -->\n)(.*?)(<!-- bench_transforms:\2 end -->)", re.DOTALL
)


def _num(x, fmt=".2f") -> str:
    return "" if x is None else format(x, fmt)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def _source(path: Path, doc: dict) -> str:
    try:
        shown = path.resolve().relative_to(ROOT)
    except ValueError:
        shown = path
    loads = sorted(x for res in doc["results"] for x in res["load_average"])
    load = f"{loads[0]:.1f}-{loads[-1]:.1f}" if loads else "not recorded"
    return (
        f"`{shown}`: `{doc['command']}`, {doc['date']}, {doc['machine']} with "
        f"{doc['cpu_count']} CPU cores, jax {doc['jax']}, optax {doc['optax']}, allocator "
        f"{doc.get('allocator', 'default')}; load average during the run {load}."
    )


def _size_label(doc: dict) -> str:
    sizes = sorted({res["size"] for res in doc["results"]})
    return ", ".join(f"{s:g}M" for s in sizes)


def summary(docs: list[tuple[Path, dict]]) -> list[str]:
    """Per size: transform x layout, ``ratio to base (ratio to floor)``."""
    out = []
    for path, doc in docs:
        layouts = [res["layout"] for res in doc["results"]]
        variants: dict[str, dict[str, str]] = {}
        for res in doc["results"]:
            for row in res["rows"]:
                name = row["variant"]
                if name == row["baseline"] or name.startswith(("floor:", "copy ")):
                    continue
                cell = f"{row['ratio']:.2f}"
                if row.get("ratio_floor") is not None:
                    cell += f" ({row['ratio_floor']:.2f})"
                variants.setdefault(f"`{name}` / `{row['baseline']}`", {})[res["layout"]] = cell
        out += [f"**{_size_label(doc)} parameters.** " + _source(path, doc), ""]
        out += _table(
            ["transform / base", *layouts],
            [[name, *(cells.get(lay, "") for lay in layouts)] for name, cells in variants.items()],
        )
        out.append("")
    return out


def full(docs: list[tuple[Path, dict]]) -> list[str]:
    """Per size and layout: every row of the run."""
    out = []
    header = [
        "variant",
        "ms/step",
        "ratio to base",
        "ratio to floor",
        "compile s",
        "peak memory / base",
        "state / base",
    ]
    for path, doc in docs:
        out += [f"**{_size_label(doc)} parameters.** " + _source(path, doc), ""]
        for res in doc["results"]:
            loads = ", ".join(f"{x:.1f}" for x in res["load_average"])
            out += [
                f"`{res['layout']}`: {res['params'] / 1e6:.1f}M parameters in {res['leaves']} "
                f"leaves (load average {loads})",
                "",
            ]
            rows = []
            for row in res["rows"]:
                base = row["variant"] == row["baseline"]
                rows.append(
                    [
                        f"**{row['variant']}**" if base else row["variant"],
                        _num(row["median_ms"]),
                        _num(row["ratio"]),
                        _num(row.get("ratio_floor")),
                        _num(row["compile_s"]),
                        _num(row.get("peak_ratio")),
                        _num(row.get("state_ratio")),
                    ]
                )
            out += [*_table(header, rows), ""]
    return out


BLOCKS = {"summary": summary, "full": full}


def render(text: str, docs: list[tuple[Path, dict]], *, where: str) -> str:
    """``text`` with every marked block regenerated."""

    def block(m: re.Match) -> str:
        name = m.group(2)
        if name not in BLOCKS:
            raise ValueError(
                f"{where}: marker bench_transforms:{name} is unknown; use one of {sorted(BLOCKS)}."
            )
        return m.group(1) + "\n".join(BLOCKS[name](docs)) + "\n" + m.group(4)

    return _MARKER.sub(block, text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("json", nargs="+", help="bench_transforms --json files, one per size")
    parser.add_argument(
        "--targets", nargs="*", default=[str(t) for t in TARGETS], help="Markdown files to update"
    )
    args = parser.parse_args(argv)
    docs = [(Path(p), json.loads(Path(p).read_text())) for p in args.json]
    for target in map(Path, args.targets):
        text = target.read_text()
        new = render(text, docs, where=str(target))
        if new == text and "<!-- bench_transforms:" not in text:
            raise SystemExit(f"{target}: no <!-- bench_transforms:NAME begin --> marker found.")
        target.write_text(new)
        print(f"updated {target}")


if __name__ == "__main__":
    main()
