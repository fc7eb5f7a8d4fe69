"""The recorder module: finding the monitor's diagnostics in a state, the host-side Recorder
and History, and summarize (flat scalars for loggers).

The monitor's numbers themselves are tested in test_monitor.py; here, in float64, that
what the recorder stores and summarises is exactly what the monitor's state held.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import support

import ksbopt
from ksbopt import MonitorState, NoetherDiagnostics, Recorder, summarize
from ksbopt._src.diagnostics.recorder import PER_GROUP_FIELDS, find_diagnostics

CASE = support.CASES_BY_NAME["relu_softmax"]  # a Rescale and a Translation (overlapping)
SYM = list(CASE.symmetries)


def _run(steps: int, *, every: int = 1, recorders=()):
    """``steps`` monitored heavy-ball steps; every state, and each recorder fed each step."""
    tx = ksbopt.monitor(optax.sgd(0.1, momentum=0.9), SYM, learning_rate=0.1, every=every)
    update, grad = support.jit(tx.update), support.jit(jax.grad(CASE.loss))
    params = CASE.params()
    state = tx.init(params)
    states = []
    for k in range(steps):
        u, state = update(grad(params), state, params)
        params = optax.apply_updates(params, u)
        states.append(state)
        for rec in recorders:
            rec.record(k, state)
    return states


def test_find_diagnostics_in_any_wrapping(x64):
    (state,) = _run(1)
    diag = state.diagnostics
    assert find_diagnostics(state) is diag
    assert find_diagnostics(diag) is diag
    # Inside a chain, inject_hyperparams or MultiSteps: found by its type name.
    nested = (optax.EmptyState(), {"inner": state})
    support.assert_equal(find_diagnostics(nested), diag)


def test_find_diagnostics_needs_exactly_one(x64):
    (state,) = _run(1)
    with pytest.raises(ValueError, match="holds 0 NoetherDiagnostics"):
        find_diagnostics(optax.sgd(0.1).init({"w": jnp.ones(2)}))
    with pytest.raises(ValueError, match=r"holds 2 NoetherDiagnostics.*exactly one"):
        find_diagnostics((state, state))


def test_history_is_the_recorded_states_stacked(x64):
    """Each row of the history is the diagnostics of the state recorded at that step, bit
    for bit (float64), for every field; fields that do not apply stay None."""
    rec = Recorder(SYM)
    states = _run(4, recorders=(rec,))
    h = rec.history()
    np.testing.assert_array_equal(h.steps, [0, 1, 2, 3])
    assert len(h) == len(rec) == 4
    for name in PER_GROUP_FIELDS:
        for i in range(len(SYM)):
            want = [getattr(s.diagnostics, name)[i] for s in states]
            if want[0] is None:
                assert h[name][i] is None, name
                continue
            assert h[name][i].dtype == np.float64, name
            np.testing.assert_array_equal(h[name][i], np.stack([np.asarray(w) for w in want]))


def test_every_and_refresh_skip_records():
    """``every=2`` looks at steps 0, 2, 4; a monitor that refreshes every 3 steps has new
    diagnostics at 0, 3: the record at step 2 repeats step 0's and is skipped."""
    rec = Recorder(SYM, every=2)
    _run(5, every=3, recorders=(rec,))
    np.testing.assert_array_equal(rec.history().steps, [0, 3])
    assert Recorder(SYM).record(0, _run(1)[0]) is True
    assert Recorder(SYM, every=2).record(1, _run(1)[0]) is False


def test_init_state_is_not_recorded():
    """Before the first update the diagnostics describe no step (step -1): nothing to keep."""
    tx = ksbopt.monitor(optax.sgd(0.1), SYM)
    rec = Recorder(SYM)
    assert rec.record(0, tx.init(CASE.params())) is False
    assert len(rec) == 0


def test_summarize_is_mean_min_max_per_symmetry(x64):
    (state,) = _run(1)
    s = summarize(state, ["relu", "head"], prefix="ksb")
    assert s["ksb/step"] == 0.0
    assert all(type(v) is float for v in s.values())
    for label, q in zip(["relu", "head"], state.diagnostics.charges):
        q = np.asarray(q, np.float64)
        assert s[f"ksb/{label}/charges/mean"] == float(q.mean())
        assert s[f"ksb/{label}/charges/min"] == float(q.min())
        assert s[f"ksb/{label}/charges/max"] == float(q.max())
    # Labels from the declarations; a subset of the fields.
    only = summarize(state.diagnostics, SYM, fields=["charges"])
    stats = ("/charges/mean", "/charges/min", "/charges/max")
    assert all(k.endswith(stats) for k in only if k != "noether/step"), sorted(only)
    assert len(only) == 1 + 3 * len(SYM)
    # Fields that do not apply (no scale group here) are left out, not NaN.
    assert not any("effective_learning_rate" in k for k in s)


def test_summarize_refuses_bad_labels_and_fields():
    (state,) = _run(1)
    with pytest.raises(ValueError, match="3 labels for 2 monitored symmetries"):
        summarize(state, ["a", "b", "c"])
    with pytest.raises(ValueError, match="field='loss' is not a diagnostic"):
        summarize(state, fields=["loss"])


def test_recorder_summary_labels_and_max_abs(x64):
    rec = Recorder(["relu", "head"])
    states = _run(3, recorders=(rec,))
    assert rec.labels == ["relu", "head"]
    assert rec.summary() == summarize(states[-1], ["relu", "head"])
    assert rec.summary(0) == summarize(states[0], ["relu", "head"])
    want = max(
        float(np.max(np.abs(np.asarray(s.diagnostics.first_order[i]))))
        for s in states
        for i in range(len(SYM))
    )
    assert rec.max_abs("first_order") == want
    assert rec.max_abs("effective_learning_rate") == 0.0  # applies to no symmetry here
    assert Recorder().labels == []
    unnamed = Recorder()
    unnamed.record(0, states[0])
    assert unnamed.labels == ["sym0", "sym1"]


def test_recorder_errors_name_the_fix():
    for every in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"every=.* must be a positive int"):
            Recorder(SYM, every=every)
    with pytest.raises(ValueError, match=r"nothing recorded yet.*record"):
        Recorder(SYM).history()
    with pytest.raises(ValueError, match=r"nothing recorded yet.*summary"):
        Recorder(SYM).summary()


def test_states_are_the_exported_types():
    (state,) = _run(1)
    assert isinstance(state, MonitorState)
    assert isinstance(state.diagnostics, NoetherDiagnostics)
