"""benchmarks.plot_study: the study's figures are drawn from a results folder's records."""

import json

import numpy as np
import pytest

from benchmarks import plot_study

matplotlib = pytest.importorskip("matplotlib")

STEPS = [0, 10, 20]


def _task(best_lr: float) -> dict:
    row = {
        "val_by_lr": {"0.1": 0.5, "0.3": 0.6},
        "val_spread_by_lr": {"0.1": [0.5, 0.45, 0.55], "0.3": [0.6, 0.58, 0.62]},
        "best_lr": best_lr,
        "val_mean": 0.6,
    }
    return {"metric": "accuracy", "optimizers": {"sgd+wd": row, "adamw": dict(row)}}


def _record(optimizer: str, seed: int, angles: list[list]) -> dict:
    return {
        "config": {
            "task": "t",
            "optimizer": optimizer,
            "schedule": "constant",
            "learning_rate": 0.3,
            "seed": seed,
            "hparams": {"momentum": 0.9, "weight_decay": 5e-4},
        },
        "final": {"val_metric": 0.6},
        "curves": {"step": STEPS, "train_loss": [None, 1.0, 0.5]},
        "diagnostics": {
            "curves": {f"g{i}": {"angular_update": a} for i, a in enumerate(angles)}
            | {"head": {"charge": [0.1, 0.1, 0.1]}}  # a translation: no angle
        },
    }


@pytest.fixture
def folder(tmp_path):
    summary = {"arms": {"constant": {"t": _task(0.3)}, "cosine": {"t": _task(0.1)}}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    runs = tmp_path / "runs"
    runs.mkdir()
    recs = {
        "a.json": _record("sgd+wd", 0, [[None, 1e-2, 2e-2], [None, 3e-2, 4e-2]]),
        "b.json": _record("sgd+wd", 1, [[None, 1e-2, 2e-2]]),
        "c.json": _record("adamw", 0, []),
    }
    for name, rec in recs.items():
        (runs / name).write_text(json.dumps(rec))
    return tmp_path


def test_angles_are_the_mean_over_the_groups_that_turn(folder):
    rec = json.loads((folder / "runs" / "a.json").read_text())
    np.testing.assert_allclose(plot_study._angles(rec), [np.nan, 2e-2, 3e-2])
    assert plot_study._angles(json.loads((folder / "runs" / "c.json").read_text())) is None


def test_writes_one_sensitivity_figure_per_task_and_the_angles_asked_for(folder, capsys):
    plot_study.main([str(folder), "--angles", "constant:0.3"])
    made = capsys.readouterr().out.split()
    assert [m.rsplit("/", 1)[-1] for m in made] == [
        "arms_t.png",
        "angles_t_constant_lr0.3.png",
    ]
    for m in made:
        with open(m, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_angles_figure_draws_each_optimizer_and_its_equilibrium(folder, monkeypatch):
    import matplotlib.pyplot as plt

    drawn = {}
    real_subplots = plt.subplots

    def spy(*a, **k):
        fig, axes = real_subplots(*a, **k)
        drawn["axes"] = axes
        return fig, axes

    monkeypatch.setattr(plt, "subplots", spy)
    style = plot_study.plots.styles(["adamw", "sgd+wd"])
    plot_study.angles_figure(plt, plot_study._records(folder), "t", "constant", 0.3, style, folder)
    ax_angles, ax_loss = drawn["axes"]
    labels = [line.get_label() for line in ax_angles.lines]
    assert labels.count("sgd+wd") == 1 and "adamw" not in labels  # adamw records no angle
    a_star = np.sqrt(2 * 0.3 * 5e-4 / 1.9)
    assert any(np.allclose(line.get_ydata(), a_star) for line in ax_angles.lines)
    # the mean over seeds of the per-record group means: (2e-2 + 1e-2) / 2 at step 10
    sgd = next(line for line in ax_angles.lines if line.get_label() == "sgd+wd")
    np.testing.assert_allclose(sgd.get_ydata()[1:], [1.5e-2, 2.5e-2])
    assert {line.get_label() for line in ax_loss.lines} == {"sgd+wd", "adamw"}
