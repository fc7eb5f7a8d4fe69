"""The criteria of ``ksbopt.bench.advantage`` on task summaries with known answers."""

from __future__ import annotations

import math

from ksbopt.bench import advantage
from ksbopt.bench.advantage import advantages


def _row(val, steps=None, secs=None, band=(0.1, 0.1, 0.0), band_open=(False, False), test=None):
    test = test if test is not None else [val] * 5
    return {
        "val_mean": val,
        "steps_to_practitioners_target": steps,
        "time_to_practitioners_target": secs,
        "band": list(band),
        "band_open": list(band_open),
        "test_by_seed": {str(s): v for s, v in enumerate(test)},
    }


SEEDS = [0.90, 0.91, 0.89, 0.90, 0.92]


def test_only_kinetic_energies_are_judged():
    assert advantage.is_kinetic_energy("noether_rmsprop")
    assert advantage.is_kinetic_energy("sgd+steer_eq")
    for name in ("sgd+wd", "adamw", "rmsprop", "lion", "sgdp", "nero", "rotational", "unknown"):
        assert not advantage.is_kinetic_energy(name), name
    task = {
        "higher_is_better": True,
        "optimizers": {
            "sgd+wd": _row(0.9, 900, 90, test=SEEDS),
            "nero": _row(0.95, 100, 10, test=[v + 0.05 for v in SEEDS]),
            "noether_rmsprop": _row(0.9, 900, 90, test=SEEDS),
        },
    }
    assert [a.optimizer for a in advantages(task)] == ["noether_rmsprop"]


def test_faster_needs_1_3x_fewer_steps_than_the_fastest_practitioner_and_less_time():
    def judge(steps, secs):
        task = {
            "higher_is_better": True,
            "optimizers": {
                "sgd+wd": _row(0.9, 900, 90, test=SEEDS),
                "adamw": _row(0.89, 1300, 130, test=SEEDS),
                "noether_rmsprop": _row(0.9, steps, secs, test=SEEDS),
            },
        }
        (a,) = advantages(task)
        return a

    a = judge(690, 60)  # 900 / 690 = 1.304
    assert a.reference == "sgd+wd" and a.faster and a.pays and a.verdict == "tie"
    assert not judge(700, 60).faster  # 1.29x
    assert not judge(600, 95).faster  # fewer steps but more seconds (a costly step)
    unreached = judge(None, None)
    assert unreached.steps_ratio is None and not unreached.faster


def test_only_the_entry_reaching_the_target_counts_as_faster():
    task = {
        "higher_is_better": True,
        "optimizers": {
            "sgd+wd": _row(0.9, None, None, test=SEEDS),
            "noether_rmsprop": _row(0.9, 500, 50, test=SEEDS),
        },
    }
    (a,) = advantages(task)
    assert a.steps_ratio == math.inf and a.faster


def test_wider_needs_3x_the_widest_band_at_lattice_resolution_and_closed_bands():
    def judge(width, practitioner_open=(False, False)):
        task = {
            "higher_is_better": True,
            "optimizers": {
                "sgd+wd": _row(0.9, band=(0.1, 0.1, 0.0), test=SEEDS),
                "rmsprop": _row(
                    0.88, band=(0.001, 0.003, 0.5), band_open=practitioner_open, test=SEEDS
                ),
                "noether_rmsprop": _row(0.9, band=(0.01, 1.0, width), test=SEEDS),
            },
        }
        (a,) = advantages(task)
        return a

    # widest practitioner band: 0.5 + 0.5 = 1.0 decade at lattice resolution
    assert judge(2.5).wider and judge(2.5).band_ratio == 3.0
    assert not judge(2.0).wider
    open_band = judge(2.5, practitioner_open=(False, True))
    assert not open_band.bands_closed and not open_band.wider


def test_a_worse_final_metric_never_pays():
    task = {
        "higher_is_better": True,
        "optimizers": {
            "sgd+wd": _row(0.9, 900, 90, test=SEEDS),
            "noether_rmsprop": _row(0.88, 300, 30, test=[v - 0.02 for v in SEEDS]),
        },
    }
    (a,) = advantages(task)
    assert a.faster and a.verdict == "worse" and not a.pays


def test_reference_of_a_loss_is_the_lowest_and_no_practitioner_means_no_verdict():
    task = {
        "higher_is_better": False,
        "optimizers": {
            "sgd+wd": _row(2.1, test=[2.1] * 5),
            "adamw": _row(2.0, test=[2.0] * 5),
            "noether_rmsprop": _row(2.0, test=[2.0] * 5),
        },
    }
    assert advantages(task)[0].reference == "adamw"
    only_ke = {"higher_is_better": True, "optimizers": {"noether_rmsprop": _row(0.9)}}
    assert advantages(only_ke) == []


def test_markdown_lists_every_pair_and_names_an_entry_paying_on_three_tasks():
    def task(steps):
        return {
            "higher_is_better": True,
            "optimizers": {
                "sgd+wd": _row(0.9, 900, 90, test=SEEDS),
                "noether_rmsprop": _row(0.9, steps, steps / 10, test=SEEDS),
                "sgd+steer_eq": _row(0.9, 900, 90, test=SEEDS),
            },
        }

    arm = {"a": task(600), "b": task(600), "c": task(600), "d": task(900)}
    lines = advantage.markdown(arm, ["a", "b", "c", "d", "missing"])
    table = [ln for ln in lines if ln.startswith("| ") and "`" in ln and "task" not in ln]
    assert len(table) == 8  # 4 tasks x 2 kinetic energies; the missing task is skipped
    assert sum(ln.endswith("| **yes** |") for ln in table) == 3
    assert "`noether_rmsprop` pays on 3 tasks (a, b, c)" in lines[-2]
    two = advantage.markdown({"a": task(600), "b": task(600)})
    assert two[-2] == "No kinetic energy pays on three or more of these tasks."


def test_time_is_cpu_seconds_when_every_run_timed_them_else_wall_clock():
    def task(entry_cpu):
        rows = {
            "sgd+wd": {**_row(0.9, 900, 90, test=SEEDS), "cpu_to_practitioners_target": 180.0},
            # more wall-clock (the machine was busy during its runs) but less CPU time
            "noether_rmsprop": {
                **_row(0.9, 600, 120, test=SEEDS),
                "cpu_to_practitioners_target": entry_cpu,
            },
        }
        return {"higher_is_better": True, "optimizers": rows}

    (a,) = advantages(task(150.0))
    assert a.time_basis == "cpu" and a.time_ratio == 1.2 and a.faster
    (b,) = advantages(task(None))
    assert b.time_basis == "wall" and b.time_ratio == 0.75 and not b.faster


def test_readme_advantage_block_is_the_tables_of_the_grid_arm(tmp_path):
    import json

    from ksbopt.bench import readme

    task = {
        "higher_is_better": True,
        "optimizers": {
            "sgd+wd": _row(0.9, 900, 90, test=SEEDS),
            "noether_rmsprop": _row(0.9, 600, 60, test=SEEDS),
        },
    }
    summary = {"meta": {"suite": "s", "date": "d"}, "grid_arm": "cosine"}
    summary["arms"] = {"cosine": {"t": task}, "constant": {"t": _slow(task)}}
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "summary.json").write_text(json.dumps(summary))
    doc = tmp_path / "README.md"
    doc.write_text("<!-- bench-results mine advantage -->\nold\n<!-- /bench-results -->\n")
    assert readme.main(["--readme", str(doc), "--results", str(tmp_path)]) == 0
    text = doc.read_text()
    # the cosine arm's row (900 / 600 steps), not the constant arm's, and no stale text
    assert "| t | `noether_rmsprop` | `sgd+wd` | 1.50x | 1.50x" in text and "old" not in text
    assert "schedule arm `cosine`" in text and "**yes**" in text


def _slow(task):
    rows = dict(task["optimizers"], noether_rmsprop=_row(0.9, 1800, 180, test=SEEDS))
    return dict(task, optimizers=rows)


def test_readme_tells_an_inapplicable_entry_from_one_the_suite_left_out():
    from ksbopt.bench import readme

    row = {"test_mean": 0.9, "seeds": 5}
    grid = {
        "mnist1d_cnn": {"metric": "accuracy", "optimizers": {"sgd": row}},
        "mnist1d_cnn_bn": {"metric": "accuracy", "optimizers": {"sgd+retract": row}},
    }
    text = readme.render({"grid": grid}, "mine")
    # sgd+retract needs a scale symmetry, which the unnormalised CNN lacks; sgd applies to both
    assert "| mnist1d_cnn (accuracy, 5) | 0.9000 | n/a |" in text
    assert "| mnist1d_cnn_bn (accuracy, 5) | not run | 0.9000 |" in text
