"""benchmarks.tables: the cost tables are generated from the JSON between markers."""

from pathlib import Path

import pytest

from benchmarks import tables

ROW = {
    "median_ms": 3.0,
    "min_ms": 2.5,
    "compile_s": 1.5,
    "peak_ratio": 1.0,
    "state_ratio": 1.0,
    "copies": None,
}
DOC = {
    "command": "python -m benchmarks.bench_transforms --sizes 10",
    "date": "2026-12-06 20:00:00 UTC",
    "machine": "x86_64",
    "cpu_count": 2,
    "jax": "0.10.2",
    "optax": "0.2.8",
    "results": [
        {
            "layout": "cnn",
            "size": 10.0,
            "params": 10_000_000,
            "leaves": 20,
            "bytes": 40_000_000,
            "load_average": [1.0, 1.5],
            "rows": [
                {**ROW, "variant": "sgd", "baseline": "sgd", "ratio": 1.0, "ratio_floor": None},
                {
                    **ROW,
                    "variant": "+ ksbopt.retract",
                    "baseline": "sgd",
                    "ratio": 1.61,
                    "ratio_floor": 1.07,
                    "floor": "floor: exact retraction",
                },
                {
                    **ROW,
                    "variant": "floor: exact retraction",
                    "baseline": "sgd",
                    "ratio": 1.5,
                    "ratio_floor": None,
                },
            ],
        }
    ],
}


def test_blocks_are_regenerated_between_markers():
    text = (
        "before\n<!-- bench_transforms:summary begin -->\nold\n"
        "<!-- bench_transforms:summary end -->"
        "\nmiddle\n<!-- bench_transforms:full begin -->\n<!-- bench_transforms:full end -->\nafter"
    )
    out = tables.render(text, [(Path("x.json"), DOC)], where="t.md")
    assert "old" not in out and out.startswith("before\n") and out.endswith("after")
    assert "| `+ ksbopt.retract` / `sgd` | 1.61 (1.07) |" in out  # summary: floors left out
    assert "`floor: exact retraction` /" not in out
    assert "| + ksbopt.retract | 3.00 | 1.61 | 1.07 | 1.50 | 1.00 | 1.00 |" in out  # full
    assert "allocator default; load average during the run 1.0-1.5" in out  # not recorded
    assert "`python -m benchmarks.bench_transforms --sizes 10`" in out
    reused = tables.render(
        text, [(Path("x.json"), {**DOC, "allocator": "glibc, large blocks reused"})], where="t.md"
    )
    assert "allocator glibc, large blocks reused; load average" in reused


def test_unknown_marker_is_an_error():
    text = "<!-- bench_transforms:nope begin -->\n<!-- bench_transforms:nope end -->"
    with pytest.raises(ValueError, match="marker bench_transforms:nope is unknown"):
        tables.render(text, [(Path("x.json"), DOC)], where="t.md")
