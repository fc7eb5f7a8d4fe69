"""Sharded training (issue 7, "Sharding"): every public transform on 8 simulated CPU devices.

JAX fixes its device count when it starts, and this pytest process has one CPU device, so
the checks run in a child process: ``tests/support/sharding_check.py`` (run with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``) trains a small CNN/MLP parameter tree
carrying Scale, Rescale, Linear and Translation symmetries on a (data=2, model=4) mesh and
prints its measurements as JSON; the tests below read them. A run that raised in the child
fails its test with the child's traceback; a child that crashed fails every test that needs
it with its stderr.

Sharding cases (``sharding_check.CASES``): data parallel (parameters replicated, batch
sharded), model parallel with kernels and biases sharded along the unit (last) axis, and
model parallel with kernels sharded along the input axis (biases replicated). The default
run (``-m "not slow"``) covers ``retract`` in all three cases, ``monitor`` in the unit case
and the main HLO checks (about 60 s of CPU on 2 cores); every other transform and case, the
Explicit-axes checks and a two-process ``jax.distributed`` run are marked slow (about 5 min
of CPU).
"""

from __future__ import annotations

import functools
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from support import sharding_check as check

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(check.__file__).resolve()

# float32 tolerances (inf-norm relative, per leaf; per symmetry for charges).
EPS = float(np.finfo(np.float32).eps)
# A sharded program does the same arithmetic as the single-device one except that every
# reduction over a sharded axis (the batch in the loss, a unit's sum of squares in a charge)
# becomes per-device partial sums combined by an all-reduce: another summation order, a few
# ulps per sum. Measured after 3 steps: <= 4.1e-7. 1e-6 (8.4 eps) leaves room for that and no
# more; a wrong sharded reduction (a partial sum that is never combined) is an O(1) error.
RTOL = 1e-6
# Linear orbit moves are Newton solves that stop once the relative charge residual is below
# 64 eps (BoundLinear.move_to in ksbopt/_src/symmetries/linear_groups.py): two runs that round
# differently may stop at different iterates anywhere inside that tolerance, so their Linear
# leaves and charges can differ by up to 2 x 64 eps (measured: 1.6e-6). This is the solver's stated
# accuracy, the same between two single-device runs with another reduction order.
RTOL_NEWTON = 2 * 64 * EPS
# The orbit search of teleport takes gradient steps on an objective made of the loss's
# gradients, so the rounding of their sums is amplified: two single-device runs whose batches
# differ only in the order of their rows differ by up to 2.0e-6 in the head bias (measured on
# 2026-12-07; the sharded run: 2.7e-6). A search's run is held to twice that spread, measured
# in the same process (``reorder_errs``), and the spread itself to REORDER_MAX, so the bound
# stays a few ulps of amplification and cannot grow without the test saying so.
REORDER_MAX = 1e-5

CASES = ("data", "unit", "input")
DEFAULT_RUNS = ("retract:data", "retract:unit", "retract:input", "monitor:unit")
SLOW_RUNS = tuple(
    f"{name}:{case}"
    for name in check.TRANSFORMS
    for case in CASES
    if f"{name}:{case}" not in DEFAULT_RUNS
)
DEFAULT_HLO = (
    "retract:all:data",
    "retract:axis:unit",
    "project:axis:unit",
    "retract:axis:input",
    "retract:axis:input:pinned",
    "retract:all:unit",
    "retract:all:k_local",
)
SLOW_HLO = (
    "project:all:data",
    "charges:axis:unit",
    "steer:axis:unit",
    "monitor:axis:unit",
    "project:axis:input",
    "charges:axis:input",
    "retract:linear:input",
    "monitor:all:k_local",
)
EXPLICIT = tuple(
    f"{kind}:{case}"
    for kind in ("scale", "rescale", "translation", "linear")
    for case in ("unit", "input")
)


def _env(device_flag: str = check.DEVICE_FLAG) -> dict:
    """This process's environment with ``device_flag`` as the CPU device count."""
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} {device_flag}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _output(proc: subprocess.CompletedProcess) -> dict:
    """The child's JSON, or ``{"crash": ...}`` with its exit status and stderr."""
    if proc.returncode != 0:
        return {"crash": f"{SCRIPT.name} exited with {proc.returncode}:\n{proc.stderr[-6000:]}"}
    # The JSON is the last line: collective libraries may print to stdout before it (Gloo).
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check_crash(out: dict) -> dict:
    if "crash" in out:
        pytest.fail(out["crash"], pytrace=False)
    return out


def _launch(runs=(), hlo=(), explicit=(), timeout: float = 3600) -> dict:
    """Run sharding_check.py in a child process with 8 CPU devices; its JSON output."""
    cmd = [sys.executable, str(SCRIPT)]
    cmd += ["--runs", ",".join(runs), "--hlo", ",".join(hlo), "--explicit", ",".join(explicit)]
    return _output(
        subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=ROOT)
    )


@functools.cache
def _results(kind: str) -> dict:
    """The child's measurements, one child per kind ("default", "slow"), cached (a crash
    too: every test that needs the child fails with its stderr, without rerunning it)."""
    if kind == "default":
        return _launch(DEFAULT_RUNS, DEFAULT_HLO)
    return _launch(SLOW_RUNS, SLOW_HLO, EXPLICIT)


def _entry(section: str, key: str, kind: str) -> dict:
    out = _check_crash(_results(kind))
    assert out["devices"] == 8, out["devices"]
    entry = out[section][key]
    if "error" in entry:
        pytest.fail(f"{section} {key} raised in the 8-device process:\n{entry['error']}")
    return entry


def _run(key: str) -> dict:
    return _entry("runs", key, "default" if key in DEFAULT_RUNS else "slow")


def _hlo(key: str) -> dict:
    return _entry("hlo", key, "default" if key in DEFAULT_HLO else "slow")


def _params(keys, slow_keys=()):
    return [
        pytest.param(k, id=k.replace(":", "-"), marks=pytest.mark.slow if k in slow_keys else ())
        for k in keys
    ]


ALL_RUNS = _params(DEFAULT_RUNS + SLOW_RUNS, SLOW_RUNS)


def _tolerance(name: str, what: str, reorder: float | None = None) -> float:
    """The tolerance of one measured difference; a search (``check.SEARCH``) is held to
    twice ``reorder``, the spread its single-device run shows under reordered reductions."""
    if name in check.SEARCH:
        assert reorder is not None, f"{name}: a search needs its measured reorder spread"
        return max(RTOL, 2 * reorder)
    newton = name in check.NEWTON and what in (*check.LINEAR_LEAVES, "Linear")
    return RTOL_NEWTON if newton else RTOL


# --------------------------------------------------------------------------- results


@pytest.mark.parametrize("key", ALL_RUNS)
def test_sharded_run_matches_single_device(key):
    """Parameters after 3 steps, their charges and the monitor's recorded charges equal the
    single-device run (see RTOL, RTOL_NEWTON, REORDER_MAX), and the run really was sharded as
    declared."""
    name, case = key.split(":")
    res = _run(key)
    assert res["n_devices"] == 8
    params = check.init_params()
    want = {
        path: str(check.spec(path, x.shape, case))
        for path, x in zip(check.paths(params), jax.tree.leaves(params))
    }
    assert res["input_specs"] == want, "the harness did not lay the parameters out as declared"
    measured = [(f"params{k}", k, v) for k, v in res["param_errs"].items()]
    measured += [(f"charges {k}", k, v) for k, v in res["charge_errs"].items()]
    measured += [
        (f"monitor charges {k}", k, v) for k, v in res.get("monitor_charge_errs", {}).items()
    ]
    reorder = res.get("reorder_errs", {})
    assert all(v <= REORDER_MAX for v in reorder.values()), f"{key}: reorder spread {reorder}"
    assert (name in check.SEARCH) == bool(reorder), f"{key}: reorder spread measured iff a search"
    tol = {label: _tolerance(name, what, reorder.get(label)) for label, what, _ in measured}
    bad = {
        label: f"{err:.2e} > {tol[label]:.1e}"
        for label, _, err in measured
        if not err <= tol[label]
    }
    assert not bad, f"{key}: sharded run differs from the single-device run: {bad}"


@pytest.mark.parametrize("key", ALL_RUNS)
def test_sharded_run_keeps_shardings(key):
    """Each step returns every parameter and optimizer-state leaf with the sharding it came
    in with (``is_equivalent_to``), so the training loop keeps one layout and one compiled
    program (leaves that ``init`` leaves uncommitted are laid out by the first step).

    Data parallel and unit-axis sharding: no leaf changes layout. Input-axis sharding (the
    biases replicated): in a Rescale group the fc1 bias (replicated) shares its per-unit
    coefficient with the rows of the fc2 kernel (sharded: the outgoing kernel's unit axis is
    its input axis), and XLA's sharding propagation (Auto axes, no ``out_shardings``) then
    returns the bias sharded; likewise small per-group vectors of the state may come back
    laid out otherwise. Plain ``optax.sgd`` does not do this (checked by hand), so it is the
    per-group coupling: allowed for leaves smaller than every kernel, never for a kernel or a
    kernel-shaped state leaf; ``out_shardings`` pins the layout (test below).
    """
    case = key.split(":")[1]
    res = _run(key)
    smallest_kernel = min(
        int(np.prod(s)) for v in check.SHAPES.values() for s in v.values() if len(s) >= 2
    )
    mismatches = res["mismatches"]
    if case == "input":
        mismatches = [m for m in mismatches if int(np.prod(m["shape"])) >= smallest_kernel]
    assert not mismatches, f"{key}: layout changed by a step: {mismatches}"


# --------------------------------------------------------------------------- compiled HLO


def _kernel_sized(entry: dict) -> list[dict]:
    """Collectives moving at least as many numbers as the smallest kernel."""
    smallest = min(entry["kernel_sizes"].values())
    return [c for c in entry["collectives"] if max(c["sizes"]) >= smallest]


@pytest.mark.parametrize("key", _params(("retract:all:data", "project:all:data"), SLOW_HLO))
def test_data_parallel_update_communicates_nothing(key):
    """Replicated parameters and gradients: the update is local to every device."""
    assert _hlo(key)["collectives"] == []


@pytest.mark.parametrize(
    "key",
    _params(
        (
            "retract:axis:unit",
            "project:axis:unit",
            "charges:axis:unit",
            "steer:axis:unit",
            "monitor:axis:unit",
        ),
        SLOW_HLO,
    ),
)
def test_unit_sharded_groups_never_gather_a_kernel(key):
    """Scale, Rescale and Translation groups with kernels sharded along the unit axis: every
    collective of the compiled update moves per-group vectors (a unit's sums: all-reduces
    where the group's sum runs over the sharded axis, as for a Translation row or a Rescale
    group's outgoing rows), never a kernel."""
    entry = _hlo(key)
    assert not _kernel_sized(entry), _kernel_sized(entry)


@pytest.mark.parametrize(
    "key",
    _params(
        ("retract:axis:input", "project:axis:input", "charges:axis:input"),
        ("project:axis:input", "charges:axis:input"),
    ),
)
def test_input_sharded_groups_reduce_partial_sums(key):
    """Kernels sharded along the input axis: each device sums its part of every group and an
    all-reduce of per-group vectors combines them; no kernel moves."""
    entry = _hlo(key)
    assert not _kernel_sized(entry), _kernel_sized(entry)
    assert any(c["op"] == "all-reduce" for c in entry["collectives"]), entry["collectives"]


def test_pinned_out_shardings_keep_layout_at_a_bias_gather():
    """With ``jit(..., out_shardings=<input shardings>)`` the input-axis case keeps every
    layout; what it costs over the unpinned program is a gather of the bias (16 numbers)."""
    pinned, free = _hlo("retract:axis:input:pinned"), _hlo("retract:axis:input")
    assert pinned["mismatches"] == []
    assert [m["leaf"] for m in free["mismatches"]] == ["updates['fc1']['bias']"]
    assert not _kernel_sized(pinned), _kernel_sized(pinned)
    extra = len(pinned["collectives"]) - len(free["collectives"])
    assert extra <= 1, (pinned["collectives"], free["collectives"])


def test_linear_gathers_only_its_own_factors_when_k_is_sharded():
    """A Linear symmetry mixes the k units (C = A^T A - B B^T, A -> A G): with the k axis
    sharded, a factor must be gathered (inherent, not a defect); no other kernel is."""
    entry = _hlo("retract:all:unit")
    sizes = entry["kernel_sizes"]
    linear = {sizes[k] for k in check.LINEAR_LEAVES}
    gathered = {max(c["sizes"]) for c in _kernel_sized(entry)}
    assert gathered, "expected the Linear factors to be gathered with k sharded"
    assert gathered <= linear, (gathered, sizes)


@pytest.mark.parametrize(
    "key", _params(("retract:all:k_local", "monitor:all:k_local"), ("monitor:all:k_local",))
)
def test_linear_factors_sharded_off_k_reduce_partial_sums(key):
    """A sharded along its input axis and B along its output axis (k whole on every device):
    A^T A and B B^T are partial sums combined by all-reduces of k x k; no kernel moves."""
    entry = _hlo(key)
    assert not _kernel_sized(entry), _kernel_sized(entry)


@pytest.mark.slow
def test_linear_with_k_sharded_on_the_right_factor_gathers_it():
    """Input-axis sharding puts B's k axis (its input axis) on the mesh: B is gathered, A
    (sharded along its input axis, not k) is not."""
    entry = _hlo("retract:linear:input")
    sizes = entry["kernel_sizes"]
    gathered = {max(c["sizes"]) for c in _kernel_sized(entry)}
    assert gathered == {sizes["['B']['kernel']"]}, (gathered, sizes)


# --------------------------------------------------------------------------- Explicit axes

# ``jax.make_mesh`` makes Explicit axes by default in jax 0.10 (sharding in types): every
# operation must then be able to type its result's sharding. ksbopt's per-group vectors are
# summed out of leaves sharded along the units they index and then broadcast onto leaves
# laid out otherwise (a Rescale coefficient from fc1's columns onto fc2's rows), padded into
# one vector (Translation: rows of a kernel and its bias) or contracted over a sharded axis
# (Linear: A^T A); ksbopt pins them replicated under Explicit axes
# (``groups.explicit_sharding``), and Linear's A G and G^-1 B to the leaf's own sharding.


@pytest.mark.slow
@pytest.mark.parametrize("key", _params(EXPLICIT))
def test_retract_under_explicit_axes(key):
    """``retract`` traces, matches the single-device update and keeps the gradients'
    shardings on a mesh with Explicit axes; pinning the per-group results replicated gathers
    no kernel (a Linear factor whose k axis is sharded only, as with Auto axes)."""
    res = _entry("explicit", key, "slow")
    assert res["mismatches"] == []
    errs = res["param_errs"]
    tol = RTOL_NEWTON if key.startswith("linear") else RTOL
    assert max(errs.values()) <= tol, errs
    sizes = res["kernel_sizes"]
    linear = {sizes[k] for k in check.LINEAR_LEAVES} if key.startswith("linear") else set()
    gathered = {max(c["sizes"]) for c in _kernel_sized(res)}
    assert gathered <= linear, (gathered, sizes)


# --------------------------------------------------------------------------- several processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one_device():
    """Two processes with 4 CPU devices each, joined by ``jax.distributed.initialize``
    (the multi-host recipe of docs/howto/sharding.md on one machine): the same transforms,
    no process-specific code, results equal to a single-device run."""
    n, port = 2, _free_port()
    env = _env("--xla_force_host_platform_device_count=4")
    procs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), "--multiprocess", f"{i}:{n}:{port}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for i in range(n)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=1200)
        proc = subprocess.CompletedProcess(p.args, p.returncode, out, err)
        results.append(_check_crash(_output(proc)))
    for res in results:
        assert (res["devices"], res["local_devices"]) == (8, 4)
        assert not res["fully_addressable"], "the parameters should span both processes"
        for what, errs in (("params", res["param_errs"]), ("charges", res["charge_errs"])):
            for k, err in errs.items():
                assert err <= _tolerance("monitor_retract", k), (res["process"], what, k, err)
        for k, err in res["monitor_charge_errs"].items():
            assert err <= _tolerance("monitor_retract", k), (res["process"], "monitor", k, err)
    assert results[0]["param_errs"] == results[1]["param_errs"]
