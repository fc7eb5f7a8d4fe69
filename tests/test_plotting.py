"""ksbopt.plotting: every figure builds from a recorded history and saves a PNG."""

from __future__ import annotations

import sys

import jax
import optax
import pytest
import support

import ksbopt
import ksbopt.plotting as plotting
from ksbopt import Recorder, monitor
from ksbopt import dynamics as D

matplotlib = pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def history():
    """A short run on BatchNorm-like scale groups plus a softmax head (float32)."""
    case = support.CASES_BY_NAME["scale_batchnorm"]
    sym = [*case.symmetries, ksbopt.Translation(["out/kernel", "out/bias"])]
    tx = monitor(
        optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(0.1, momentum=0.9)),
        sym,
        dynamics=D.sgd(0.1, 0.9, 1e-2),
        every=2,
    )
    params = case.params()
    state = tx.init(params)
    update, grad = jax.jit(tx.update), jax.jit(jax.grad(case.loss))
    recorder = Recorder(sym)
    for k in range(12):
        u, state = update(grad(params), state, params)
        params = optax.apply_updates(params, u)
        recorder.record(k, state)
    return recorder.history()


CASES = {
    "charges": lambda h, p: plotting.plot_charges(h, path=p),
    "effective_lr": lambda h, p: plotting.plot_effective_learning_rate(h, path=p),
    "angular": lambda h, p: plotting.plot_angular_update(h, path=p),
    "decomposition": lambda h, p: plotting.plot_decomposition(h, 0, path=p),
    "error": lambda h, p: plotting.plot_prediction_error(h, path=p),
}


@pytest.mark.parametrize("name", CASES)
def test_figures_build_and_save_png(history, tmp_path, name):
    path = tmp_path / f"{name}.png"
    fig = CASES[name](history, str(path))
    assert isinstance(fig, matplotlib.figure.Figure)
    assert path.read_bytes()[:8] == PNG_MAGIC
    lines = [line for ax in fig.axes for line in ax.get_lines()]
    assert lines, f"{name}: nothing drawn"
    assert history.steps.tolist() == [0, 2, 4, 6, 8, 10]


def test_charges_plot_draws_observed_and_predicted(history):
    fig = plotting.plot_charges(history)
    first = fig.axes[0]
    assert [t.get_text() for t in first.get_legend().get_texts()] == ["observed", "predicted"]
    observed, predicted = first.get_lines()
    assert observed.get_ydata() == pytest.approx(predicted.get_ydata(), rel=1e-4)


def test_angular_plot_shows_the_equilibrium(history):
    fig = plotting.plot_angular_update(history, symmetries=0)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "equilibrium (P7a)" in labels


def test_bad_selection(history):
    with pytest.raises(ValueError, match="not one of the labels"):
        plotting.plot_charges(history, symmetries="nope")
    with pytest.raises(TypeError, match="must be a ksbopt History"):
        plotting.plot_charges({"charges": []})


def test_missing_matplotlib_names_the_extra(history, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import now fails
    with pytest.raises(ImportError, match=r"pip install ksbopt\[plot\]"):
        plotting.plot_charges(history)
