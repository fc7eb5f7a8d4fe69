"""The tuning protocol, its statistics and the quick-suite subset property (no training).

The search is checked on synthetic score functions whose optimum is known; the statistics on
cases with a known answer; the suites by replaying the search with a deterministic fake result
for every run.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from ksbopt.bench import protocol, stats
from ksbopt.bench.protocol import MISSING, Protocol, lattice_index, lattice_lr, search


def _peak(at: int, width: float = 1.0):
    """A score with its maximum at lattice index ``at``."""
    return lambda p: -abs(p[0] - at) / width


# ---- lattice -------------------------------------------------------------------------------


def test_lattice_is_half_decades_with_the_3_points_and_round_trips():
    ks = range(-12, 4)
    lrs = [lattice_lr(k) for k in ks]
    assert 0.03 in lrs and 0.003 in lrs and 0.1 in lrs and 1.0 in lrs
    ratios = np.diff(np.log10(lrs))
    np.testing.assert_allclose(ratios[:-1] + ratios[1:], 1.0, atol=1e-12)  # two steps: 10x
    assert all(math.log10(3) - 1e-9 <= r <= 1 - math.log10(3) + 1e-9 for r in ratios)
    assert [lattice_index(x) for x in lrs] == list(ks)
    assert lattice_index(0.0316) == lattice_index(0.03)  # sqrt(10) rounded to the 3-point
    with pytest.raises(ValueError, match="positive finite"):
        lattice_index(0.0)


def test_start_window_centres_on_the_registry_grid():
    assert protocol.start_window((1e-3, 3e-3, 1e-2, 3e-2, 1e-1), 3) == (-5, -4, -3)
    assert [lattice_lr(k) for k in protocol.start_window((0.01, 0.1, 1.0), 3)] == [
        0.03,
        0.1,
        0.3,
    ]
    with pytest.raises(ValueError, match="empty"):
        protocol.start_window((), 3)


# ---- the search ------------------------------------------------------------------------------


@pytest.mark.parametrize("at", [-8, -6, -5, -4, -2, 0])  # below, at the edges, inside, above
def test_search_extends_until_the_optimum_is_interior(at):
    s = search((-5, -4, -3), (), _peak(at), higher_is_better=True, max_extensions=4)
    assert s.done and s.best == (at, None) and not s.edge and not s.exhausted
    ks = sorted(k for k, _ in s.scores)
    assert ks == list(range(min(at - 1, -5), max(at + 1, -3) + 1))  # no gaps, one beyond


def test_search_stops_at_the_extension_budget_and_flags_the_edge():
    s = search((-5, -4, -3), (), _peak(10), higher_is_better=True, max_extensions=4)
    assert s.best == (1, None) and s.edge and s.exhausted
    assert sorted(k for k, _ in s.scores) == list(range(-5, 2))


def test_search_lower_is_better_and_divergence_counts_as_worst():
    # a loss: best at index -4; above -2 the run diverges (None)
    def loss(p):
        return None if p[0] > -2 else 1 + abs(p[0] + 4)

    s = search((-3, -2, -1), (), loss, higher_is_better=False, max_extensions=4)
    assert s.best == (-4, None) and not s.edge


def test_search_with_every_point_diverged_walks_down_and_reports_it():
    s = search((-3, -2, -1), (), lambda p: None, higher_is_better=True, max_extensions=2)
    assert s.done and s.edge and s.exhausted and s.scores[s.best] is None
    assert sorted(k for k, _ in s.scores) == [-5, -4, -3, -2, -1]  # two extensions, downward


def test_search_tunes_weight_decay_and_follows_the_learning_rate():
    wds = (5e-5, 5e-4, 5e-3)

    def score(p):  # optimum at (index -3, wd 5e-3); the best lr moves with the decay
        k, wd = p
        best_k = -3 if wd == 5e-3 else -4
        return -0.5 * abs(k - best_k) - 0.6 * abs(math.log10(wd / 5e-3))

    s = search((-5, -4, -3), wds, score, higher_is_better=True, max_extensions=4, wd0=5e-4)
    assert s.best == (-3, 5e-3) and not s.edge
    assert {(-4, 5e-3), (-2, 5e-3)} <= set(s.scores)  # its lr neighbours at the new decay
    with pytest.raises(ValueError, match="not on the weight-decay grid"):
        search((-1,), wds, score, higher_is_better=True, max_extensions=0, wd0=1.0)


def _plateau(at: int, half_width: int):
    """An accuracy of 0.9 within ``half_width`` lattice points of ``at`` (a tiny peak at
    ``at``), 0.5 beyond: a good band of ``2 * half_width + 1`` points."""
    return lambda p: (0.9 + (0.001 if p[0] == at else 0.0)) if abs(p[0] - at) <= half_width else 0.5


def test_search_follows_the_good_band_beyond_the_worse_neighbours():
    hill = search((-5, -4, -3), (), _plateau(-4, 2), higher_is_better=True, max_extensions=4)
    assert sorted(k for k, _ in hill.scores) == [-5, -4, -3]  # the hill climb stops here
    s = search(
        (-5, -4, -3), (), _plateau(-4, 2), higher_is_better=True, max_extensions=4, band_reach=3
    )
    assert s.done and s.best == (-4, None) and not s.edge and not s.exhausted
    # walked out to the first bad point on each side (distance 3), then stopped
    assert sorted(k for k, _ in s.scores) == [-7, -6, -5, -4, -3, -2, -1]
    acc = {lattice_lr(k): v for (k, _), v in s.scores.items()}
    assert stats.band(acc)[2] == 2.0  # -6 .. -2: two decades, closed on both sides


def test_band_walk_stops_at_its_reach_and_spends_no_extension():
    s = search(
        (-5, -4, -3), (), _plateau(-4, 5), higher_is_better=True, max_extensions=0, band_reach=2
    )
    assert s.best == (-4, None) and not s.exhausted
    assert sorted(k for k, _ in s.scores) == [-6, -5, -4, -3, -2]  # reach 2; still good there


def test_band_walk_restarts_the_search_from_a_better_band_point():
    def score(p):  # a second, higher peak two points above the first optimum of the window
        return {-5: 0.85, -4: 0.9, -3: 0.895, -2: 0.93, -1: 0.8}.get(p[0], 0.5)

    s = search((-5, -4, -3), (), score, higher_is_better=True, max_extensions=4, band_reach=3)
    assert s.best == (-2, None) and not s.edge


def test_band_walk_leaves_a_budget_blocked_neighbour_unevaluated():
    s = search((-5, -4, -3), (), _peak(10), higher_is_better=True, max_extensions=0, band_reach=3)
    assert s.best == (-3, None) and s.edge and s.exhausted
    assert sorted(k for k, _ in s.scores) == [-5, -4, -3]


def test_in_band_matches_the_band_tolerance():
    assert stats.in_band(0.891, 0.9) and not stats.in_band(0.889, 0.9)
    assert stats.in_band(2.02, 2.0, False) and not stats.in_band(2.03, 2.0, False)
    assert not stats.in_band(float("nan"), 0.9) and not stats.in_band(None, 0.9)


def test_search_resumes_round_by_round_to_the_one_shot_answer():
    """Replaying with the results known so far asks only for new points, each once."""
    score = _peak(-8)
    one_shot = search((-5, -4, -3), (), score, higher_is_better=True, max_extensions=4)
    known: dict = {}
    rounds = 0
    while True:
        s = search(
            (-5, -4, -3),
            (),
            lambda p: known.get(p, MISSING),
            higher_is_better=True,
            max_extensions=4,
        )
        if s.done:
            break
        assert not set(s.needed) & set(known)
        known.update({p: score(p) for p in s.needed})
        rounds += 1
    assert s == one_shot and rounds == 5  # the window, then -6, -7, -8, -9 one per round


def test_protocol_rejects_bad_knobs():
    with pytest.raises(ValueError, match="tuning_seeds"):
        Protocol(tuning_seeds=0)
    with pytest.raises(ValueError, match=r"must contain 1\.0"):
        Protocol(wd_factors=(0.1, 10.0))
    with pytest.raises(ValueError, match=r"band_reach=0"):
        Protocol(band_reach=0)


def test_weight_decay_grid_only_for_a_positive_default():
    assert protocol.wd_grid(1e-2, (0.1, 1.0, 10.0)) == (1e-3, 1e-2, 1e-1)
    assert protocol.wd_grid(0.0, (0.1, 1.0, 10.0)) == ()


# ---- schedules -------------------------------------------------------------------------------


def test_cosine_schedule_warms_up_then_decays_to_zero_and_traces_the_same():
    jnp = pytest.importorskip("jax.numpy")
    steps = 200
    f = [protocol.schedule_factor("cosine", s, steps) for s in range(steps)]
    w = math.ceil(protocol.WARMUP_FRACTION * steps)
    np.testing.assert_allclose(f[:w], np.arange(1, w + 1) / w)
    assert f[w] == pytest.approx(1.0) and 0 < f[-1] < 1e-3  # every step moves
    assert all(a >= b for a, b in zip(f[w:], f[w + 1 :]))
    traced = [float(protocol.schedule_factor("cosine", s, steps, jnp)) for s in range(steps)]
    np.testing.assert_allclose(traced, f, atol=1e-6)  # float32
    assert protocol.schedule_factor("constant", 7, steps) == 1.0
    with pytest.raises(ValueError, match="not one of"):
        protocol.schedule_factor("linear", 0, steps)


# ---- statistics ------------------------------------------------------------------------------


def test_paired_bootstrap_known_cases():
    # identical differences: the interval is that difference; pairing removes the seed effect
    a = {0: 0.90, 1: 0.70, 2: 0.80}
    b = {s: v - 0.01 for s, v in a.items()}
    p = stats.paired_bootstrap(a, b)
    assert p.mean == pytest.approx(0.01) and p.low == pytest.approx(0.01)
    assert p.high == pytest.approx(0.01) and p.n == 3
    assert p.verdict(True) == "better" and p.verdict(False) == "worse"
    # unpaired spread (0.1) dwarfs the difference; paired it is resolved
    assert np.std(list(a.values())) > 5 * 0.01
    # differences of both signs: a tie
    t = stats.paired_bootstrap({0: 1.0, 1: 0.0, 2: 0.5}, {0: 0.0, 1: 1.0, 2: 0.5})
    assert t.low < 0 < t.high and t.verdict() == "tie" and t.mean == pytest.approx(0.0)
    # missing or diverged seeds drop out; one shared seed gives no verdict
    q = stats.paired_bootstrap({0: 1.0, 1: None, 2: 3.0}, {0: 0.5, 2: 2.0, 5: 1.0})
    assert q.n == 2 and q.mean == pytest.approx(0.75)
    two = stats.paired_bootstrap({0: 1.0, 1: 2.0}, {0: 0.0, 1: 0.5})
    assert two.n == 2 and two.low > 0 and two.verdict() == "-"  # fewer than MIN_PAIRS
    assert stats.paired_bootstrap({0: 1.0}, {1: 1.0}) == (None, None, None, 0)


def test_paired_bootstrap_interval_matches_the_normal_interval():
    rng = np.random.default_rng(1)
    d = rng.normal(0.02, 0.01, size=400)
    p = stats.paired_bootstrap(dict(enumerate(d)), dict.fromkeys(range(400), 0.0))
    half = 1.96 * d.std() / math.sqrt(d.size)
    assert p.low == pytest.approx(d.mean() - half, abs=0.15 * half)
    assert p.high == pytest.approx(d.mean() + half, abs=0.15 * half)
    with pytest.raises(ValueError, match="level"):
        stats.paired_bootstrap({0: 1.0}, {0: 1.0}, level=1.5)


def test_good_band_width():
    acc = {0.01: 0.80, 0.03: 0.895, 0.1: 0.90, 0.3: 0.893, 1.0: 0.5}
    assert stats.band(acc) == (0.03, 0.3, 1.0)
    # not contiguous: a point within tolerance beyond a bad one does not widen the band
    assert stats.band({0.01: 0.9, 0.03: 0.5, 0.1: 0.901}) == (0.1, 0.1, 0.0)
    # a loss: within 1% of the best (2.0 -> up to 2.02)
    assert stats.band({0.01: 2.03, 0.03: 2.01, 0.1: 2.0, 0.3: None}, False) == (
        0.03,
        0.1,
        round(math.log10(0.1 / 0.03), 6),
    )
    assert stats.band({0.1: None}) is None


def test_targets_and_sampling_error():
    assert stats.target_value(0.9, True) == pytest.approx(0.855)
    assert stats.target_value(2.0, False) == pytest.approx(2.0 / 0.95)
    assert stats.first_reach([0, 5, 10], [0.1, 0.86, 0.95], 0.855, True) == 5
    assert stats.first_reach([0, 5], [None, 3.0], 2.0, False) is None
    assert stats.sampling_error(0.9, 8000) == pytest.approx(math.sqrt(0.09 / 8000))
    assert stats.sampling_error(None, 10) is None


# ---- suites: quick is a faithful subset of full ----------------------------------------------


def _fake_result(cfg):
    """A deterministic validation accuracy per run: peaked in lr, per optimizer and seed."""
    h = sum(map(ord, cfg.optimizer + cfg.task + cfg.schedule)) % 7
    k = lattice_index(cfg.learning_rate)
    wd = dict(cfg.hparams).get("weight_decay", 1.0)
    return 0.9 - 0.02 * abs(k + h) - 0.001 * cfg.seed - 0.001 * abs(math.log10(wd) + 3)


def _replay(suite, tasks=None):
    from ksbopt.bench.suites import tuning_round

    done: dict = {}
    rounds = []
    while True:
        runs, searches = tuning_round(
            suite,
            tasks=tasks or suite.tasks,
            optimizers=suite.optimizers,
            seeds=suite.seeds,
            result=lambda c: done.get(c.run_id, MISSING),
            higher_is_better=lambda t: True,
        )
        if not runs:
            return done, searches, rounds
        rounds.append(runs)
        done.update({r.run_id: _fake_result(r) for r in runs})


def test_quick_suite_is_a_subset_of_the_full_suite_and_agrees_with_it():
    from ksbopt.bench.suites import SUITES, subset_problems

    quick, full = SUITES["quick"], SUITES["full"]
    assert subset_problems(quick, full) == []
    shared = tuple(t for t in quick.tasks if t in full.tasks)
    q_done, q_search, _ = _replay(quick)
    f_done, f_search, _ = _replay(dataclasses.replace(full, tasks=shared))
    assert set(q_done) <= set(f_done)  # every quick run is a full run, same id
    for key, s in q_search.items():
        assert f_search[key].best == s.best  # hence the same chosen setting
    # the full suite's extra seeds run only at the chosen settings
    extra = {r for r in f_done if not r.endswith(("__s0__cosine", "__s1__cosine"))}
    assert extra and all("__s0__" not in r and "__s1__" not in r for r in extra)


def test_subset_problems_names_what_differs():
    from ksbopt.bench.suites import SUITES, subset_problems

    quick, full = SUITES["quick"], SUITES["full"]
    bad = dataclasses.replace(quick, protocol=Protocol(window=5), seeds=(1, 2), scale="tiny")
    problems = " ".join(subset_problems(bad, full))
    assert "protocol" in problems and "tuning seeds" in problems and "scale" in problems
    assert subset_problems(full, quick)  # the full suite is not a subset of the quick one


def test_every_applicable_pair_starts_with_the_same_window_in_every_arm():
    from ksbopt.bench import registry
    from ksbopt.bench.suites import SUITES, arms_of, tuning_round
    from ksbopt.bench.tasks import TASKS

    full = SUITES["full"]
    runs, _ = tuning_round(
        full,
        tasks=full.tasks,
        optimizers=full.optimizers,
        seeds=full.seeds,
        result=lambda c: MISSING,
        higher_is_better=lambda t: True,
    )
    for t in full.tasks:
        for o, spec in registry.REGISTRY.items():
            for arm in full.schedules:
                mine = [r for r in runs if (r.task, r.optimizer, r.schedule) == (t, o, arm)]
                wanted = spec.applies_to(TASKS[t]) and arm in arms_of(full, t, o)
                assert bool(mine) == wanted, (t, o, arm)
                if mine:
                    assert len({r.learning_rate for r in mine}) == full.protocol.window
                    assert {r.seed for r in mine} == set(full.seeds[: full.protocol.tuning_seeds])
                    assert len({r.steps for r in mine}) == 1
    assert len(runs) == len({r.run_id for r in runs})


# ---- end to end at the tiny scale ------------------------------------------------------------


def _cli(argv):
    import contextlib
    import io

    from ksbopt.bench import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    pytest.importorskip("flax")
    out = tmp_path_factory.mktemp("tuned")
    argv = ["--suite", "quick", "--scale", "tiny", "--tasks", "teacher_relu", "--steps", "10"]
    argv += ["--optimizers", "sgd,sgd+wd", "--seeds", "3", "--out", out, "--no-progress"]
    argv += ["--no-plots", "--cache-dir", tmp_path_factory.mktemp("cache")]
    rc, stdout, err = _cli(argv)
    assert rc == 0, err
    return out, argv, stdout


def test_tuned_grid_runs_the_search_and_reports_its_statistics(tuned):
    import json

    from ksbopt.bench.suites import SUITES, tuning_round

    out, _, stdout = tuned
    assert "-- tuning round 2" in stdout  # at least one round after the window
    recs = {p.stem: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["arms"]["cosine"]["teacher_relu"]["optimizers"]
    n_tune = SUITES["quick"].protocol.tuning_seeds
    assert summary["grid_arm"] == "cosine" and summary["meta"]["protocol"]["tuning_seeds"] == n_tune

    def result(c):
        r = recs.get(c.run_id)
        return MISSING if r is None else r["final"]["val_metric"]

    quick = SUITES["quick"]
    runs, searches = tuning_round(
        quick,
        tasks=("teacher_relu",),
        optimizers=("sgd", "sgd+wd"),
        seeds=(0, 1, 2),
        result=result,
        higher_is_better=lambda t: False,
        scale="tiny",
        steps=10,
    )
    assert runs == []  # every search is over and every seed trained
    for o, row in rows.items():
        s = searches[("teacher_relu", "cosine", o)]
        assert row["best_lr"] == lattice_lr(s.best[0]) and row["edge"] == s.edge
        assert row["seeds"] == 3 and row["tuning_seeds"] == [0, 1][:n_tune]
        assert row["hparams"].get("weight_decay") == s.best[1] or s.best[1] is None
        assert row["band"] is not None and row["band"][0] <= row["best_lr"] <= row["band"][1]
        assert row["reached"] >= 1 and row["steps_to_target"] > 0 and row["time_to_target"] > 0
    assert len(rows["sgd+wd"]["scores"]) > len(rows["sgd"]["scores"])  # weight decay searched
    ref = summary["grid"]["teacher_relu"]["reference"]
    other = next(o for o in rows if o != ref)
    p = rows[other]["paired"]
    assert p["vs"] == ref and p["n"] == 3 and p["low"] <= p["mean"] <= p["high"]


def test_a_finished_tuned_suite_resumes_without_training(tuned, monkeypatch):
    from ksbopt.bench import runner

    out, argv, _ = tuned

    def refuse(self, cfg, full, position):
        raise AssertionError(f"{cfg.run_id} was trained again")

    monkeypatch.setattr(runner.Runner, "_execute", refuse)
    rc, stdout, err = _cli(argv)
    assert rc == 0, err
    assert "-- tuning round" not in stdout and "0 trained now" in (out / "report.md").read_text()
    rc, stdout, _ = _cli([*argv, "--dry-run"])
    assert rc == 0 and "dry run: 0 runs next" in stdout and "2 of them over" in stdout


def test_dry_run_lists_the_first_round_and_trains_nothing(tmp_path):
    argv = ["--suite", "quick", "--scale", "tiny", "--tasks", "teacher_relu", "--seeds", "2"]
    rc, stdout, err = _cli([*argv, "--optimizers", "sgd", "--out", tmp_path, "--dry-run"])
    assert rc == 0, err
    from ksbopt.bench.suites import SUITES

    ids = [ln for ln in stdout.splitlines() if ln.startswith("grid__")]
    n_tune = SUITES["quick"].protocol.tuning_seeds
    assert len(ids) == 3 * n_tune and all(i.endswith("__cosine") for i in ids)  # 3 rates
    # the estimate of the whole invocation: 3 rates on the tuning seeds, then the other seed
    assert f"estimate, optimum at centre: {3 * n_tune + 2 - n_tune} runs" in stdout
    assert not (tmp_path / "runs").exists()


def test_dry_run_estimates_hours_from_measured_costs_and_max_hours_guards(tmp_path):
    import json

    costs = tmp_path / "costs.json"
    row = {"task": "teacher_relu", "scale": "tiny", "run_s": 360.0, "compile_s": 0.0}
    costs.write_text(json.dumps({"env": {}, "load_average": [1.0], "results": [row]}))
    argv = ["--suite", "quick", "--scale", "tiny", "--tasks", "teacher_relu", "--seeds", "5"]
    argv += ["--optimizers", "sgd", "--out", tmp_path / "o", "--costs", costs]
    rc, stdout, err = _cli([*argv, "--dry-run"])
    assert rc == 0, err
    # sgd (no weight decay): 3 lattice points on the tuning seeds, then the other seeds
    from ksbopt.bench.suites import SUITES

    n_tune = SUITES["quick"].protocol.tuning_seeds
    n = 3 * n_tune + 5 - n_tune
    assert f"estimate, optimum at centre: {n} runs, {n * 0.1:.1f} h ({n * 6} min)" in stdout
    with pytest.raises(SystemExit):
        _cli([*argv, "--max-hours", "0.1"])
    with pytest.raises(SystemExit):
        _cli([*argv[:-2], "--max-hours", "1"])  # no --costs
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(SystemExit):
        _cli([*argv[:-1], bad, "--dry-run"])


def test_records_are_priced_with_one_compilation_per_train_step(tuned, tmp_path, capsys):
    import json

    from ksbopt.bench import budget

    out, _, _ = tuned
    recs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    # sgd and sgd+wd (its weight decay tuned: in the state, so one step for all of them)
    configs = {(r["config"]["optimizer"], r["config"]["schedule"]) for r in recs}
    costs = {("teacher_relu", "tiny"): (10.0, 100.0)}
    priced = budget.price_records(recs, costs)
    task = priced["tasks"][("teacher_relu", "tiny")]
    assert task == {
        "runs": len(recs),
        "compilations": len(configs),
        "hours": (10.0 * len(recs) + 100.0 * len(configs)) / 3600,
    }
    assert priced["hours"] == task["hours"] and priced["unpriced"] == []
    unpriced = budget.price_records(recs, {})
    assert unpriced["hours"] == 0.0 and unpriced["unpriced"] == [("teacher_relu", "tiny")]
    # a user's entry (not in the registry): one compilation per hyperparameter setting
    mine = [{**r, "config": {**r["config"], "optimizer": "mine"}} for r in recs]
    settings = {json.dumps(r["config"]["hparams"], sort_keys=True) for r in recs}
    assert budget.price_records(mine, costs)["tasks"][("teacher_relu", "tiny")][
        "compilations"
    ] == len({(r["config"]["schedule"], json.dumps(r["config"]["hparams"])) for r in recs})
    assert len(settings) > 1  # sgd+wd's weight decays: the registry's entries share a step

    file = tmp_path / "costs.json"
    row = {"task": "teacher_relu", "scale": "tiny", "run_s": 10.0, "compile_s": 100.0}
    file.write_text(json.dumps({"env": {}, "load_average": [1.0], "results": [row]}))
    assert budget.main([str(out), "--costs", str(file)])["hours"] == task["hours"]
    assert f"{len(recs)} records: {task['hours']:.2f} h in one sitting" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        budget.main([str(tmp_path), "--costs", str(file)])  # no records there


def test_readme_block_is_generated_from_the_summary(tuned, tmp_path):
    from ksbopt.bench import readme

    out, _, _ = tuned
    results = tmp_path / "results"
    (results / "mine").mkdir(parents=True)
    (results / "mine" / "summary.json").write_text((out / "summary.json").read_text())
    doc = tmp_path / "README.md"
    doc.write_text("# x\n<!-- bench-results mine -->\nstale\n<!-- /bench-results -->\nend\n")
    assert readme.main(["--readme", str(doc), "--results", str(results), "--check"]) == 1
    assert readme.main(["--readme", str(doc), "--results", str(results)]) == 0
    text = doc.read_text()
    assert "stale" not in text and text.endswith("<!-- /bench-results -->\nend\n")
    assert "| teacher_relu (nmse, 3) |" in text and "results/mine/summary.json" in text
    assert readme.main(["--readme", str(doc), "--results", str(results), "--check"]) == 0


def test_report_only_rebuilds_with_the_training_invocations_protocol(tuned, tmp_path):
    import json
    import shutil

    out, _, _ = tuned
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = json.loads((copy / "summary.json").read_text())
    rc, _, err = _cli(["--suite", "quick", "--out", copy, "--report-only", "--no-plots"])
    assert rc == 0, err
    after = json.loads((copy / "summary.json").read_text())
    # the protocol of the runs survives the rebuild, and the note names their command
    assert after["meta"]["protocol"] == before["meta"]["protocol"] is not None
    assert after["meta"]["made_by"] == before["meta"]["command"]
    assert after["meta"]["made_in_s"] == before["meta"]["wall_s"] > 0
    assert after["arms"] == before["arms"]
    report = (copy / "report.md").read_text()
    assert "Protocol: learning rates on the half-decade lattice" in report
    assert f"the last invocation that trained them: `{before['meta']['command']}`" in report
    # a second rebuild still names the training command, not the first rebuild's
    rc, _, err = _cli(["--suite", "quick", "--out", copy, "--report-only", "--no-plots"])
    assert rc == 0, err
    again = json.loads((copy / "summary.json").read_text())
    assert again["meta"]["made_by"] == before["meta"]["command"]
    assert again["meta"]["made_in_s"] == before["meta"]["wall_s"]
    with pytest.raises(SystemExit):
        _cli(["--suite", "quick", "--out", tmp_path / "empty", "--report-only"])


# ---- the summary on synthetic records ---------------------------------------------------------


def _rec(opt, lr, seed, val, test, *, wd=None, status="ok"):
    hp = {} if wd is None else {"weight_decay": wd}
    return {
        "id": f"{opt}_{lr}_{wd}_{seed}",
        "config": {
            "task": "t",
            "optimizer": opt,
            "learning_rate": lr,
            "seed": seed,
            "hparams": hp,
            "schedule": "cosine",
            "steps": 100,
            "eval_every": 2,
        },
        "task": {
            "higher_is_better": True,
            "metric": "accuracy",
            "description": "synthetic",
            "data": {"sizes": {"train": 10, "val": 10, "test": 400}},
            "n_params": 1,
        },
        "status": status,
        "final": {"val_metric": val, "test_metric": test},
        "curves": {
            "step": [0, 50, 100],
            "val_metric": [0.1, val and val * 0.97, val],
            "time_s": [0, 1, 2],
        },
        "timing": {"step_ms_median": 1.0, "compile_s": 1.0},
    }


def test_summary_chooses_on_tuning_seeds_and_pairs_against_the_best_baseline():
    from ksbopt.bench.summary import grid_summary

    recs = []
    for lr, v in ((0.01, 0.80), (0.03, 0.90), (0.1, 0.85)):  # sgd: best 0.03
        recs += [_rec("sgd", lr, s, v, v - 0.01 * s) for s in (0, 1)]
    recs += [_rec("sgd", 0.03, s, 0.9, 0.9 - 0.01 * s) for s in (2, 3)]  # final seeds
    for lr, v in ((0.01, 0.7), (0.03, 0.95), (0.1, None)):  # adamw at two decays
        for wd in (1e-3, 1e-2):
            st = "diverged" if v is None else "ok"
            recs += [_rec("adamw", lr, s, v, v and v - 0.02, wd=wd, status=st) for s in (0, 1)]
    recs += [_rec("sgd+retract", 0.03, s, 0.88, 0.88 - 0.01 * s) for s in range(4)]
    (arm,) = grid_summary(recs).values()
    t = arm["t"]
    rows = t["optimizers"]
    assert rows["sgd"]["best_lr"] == 0.03 and rows["sgd"]["seeds"] == 4
    assert rows["sgd"]["tuning_seeds"] == [0, 1] and not rows["sgd"]["edge"]
    assert rows["sgd"]["val_by_lr"] == {"0.01": 0.80, "0.03": 0.90, "0.1": 0.85}
    assert rows["sgd"]["test_mean"] == pytest.approx(np.mean([0.9, 0.89, 0.88, 0.87]))
    # adamw: ties on the decay go to the lower one; a diverged rate is never chosen
    assert rows["adamw"]["best_lr"] == 0.03 and rows["adamw"]["hparams"] == {"weight_decay": 1e-3}
    assert rows["adamw"]["val_by_lr"]["0.1"] is None and not rows["adamw"]["edge"]
    # the reference is the best baseline on validation (adamw; sgd+retract uses ksbopt)
    assert t["reference"] == "adamw" and rows["adamw"]["paired"] is None
    p = rows["sgd+retract"]["paired"]
    assert p["vs"] == "adamw" and p["n"] == 2 and p["verdict"] == "-"  # two shared seeds
    assert p["mean"] == pytest.approx(np.mean([0.88 - 0.93, 0.87 - 0.93]))
    # one target: 0.95 x the best validation mean; reached at the first point above it
    assert t["target"] == pytest.approx(0.95 * 0.95)
    assert rows["adamw"]["steps_to_target"] == 50 and rows["adamw"]["time_to_target"] == 1
    assert rows["sgd"]["reached"] == 0 and rows["sgd"]["steps_to_target"] is None
    assert rows["sgd"]["sampling_error"] == pytest.approx(
        math.sqrt(rows["sgd"]["test_mean"] * (1 - rows["sgd"]["test_mean"]) / 400)
    )


def test_the_practitioners_target_is_set_by_their_best_not_by_a_runaway_optimizer():
    from ksbopt.bench.summary import grid_summary

    # muon far ahead (0.99): the task target (0.9405) is out of every other's reach, the
    # practitioners' target (0.95 x adamw's 0.80 = 0.76) is not
    recs = [_rec("muon", 0.01, s, 0.99, 0.99) for s in (0, 1)]
    recs += [_rec("adamw", 0.01, s, 0.80, 0.80) for s in (0, 1)]
    recs += [_rec("noether_rmsprop", 0.1, s, 0.70, 0.70) for s in (0, 1)]
    (arm,) = grid_summary(recs).values()
    rows = arm["t"]["optimizers"]
    assert rows["adamw"]["target"] == pytest.approx(0.95 * 0.99)
    assert rows["adamw"]["steps_to_target"] is None and rows["adamw"]["reached"] == 0
    assert rows["adamw"]["practitioners_target"] == pytest.approx(0.95 * 0.80)
    # the curves reach 0.97 x the final value at step 50: above 0.76 for adamw, not for the other
    assert rows["adamw"]["steps_to_practitioners_target"] == 50
    assert rows["adamw"]["time_to_practitioners_target"] == 1
    assert rows["adamw"]["reached_practitioners_target"] == 2
    assert rows["muon"]["steps_to_practitioners_target"] == 50
    assert rows["noether_rmsprop"]["steps_to_practitioners_target"] is None
    assert rows["noether_rmsprop"]["reached_practitioners_target"] == 0


def test_summary_without_a_baseline_has_no_reference():
    from ksbopt.bench.summary import grid_summary

    recs = [_rec("sgd+retract", lr, s, 0.8 + lr, 0.8) for lr in (0.01, 0.03) for s in (0, 1)]
    (arm,) = grid_summary(recs).values()
    assert arm["t"]["reference"] is None and arm["t"]["optimizers"]["sgd+retract"]["edge"]


def test_arms_follow_the_scope_and_own_schedules():
    from ksbopt.bench.suites import SUITES, Suite, arms_of, subset_problems

    s = Suite(
        "s",
        "tiny",
        ("a", "b"),
        ("sgd", "sf_adamw"),
        (0, 1),
        ("grid",),
        "",
        schedules=("cosine", "constant"),
        arm_scope={"constant": (("a",), ("sgd", "sf_adamw"))},
    )
    assert arms_of(s, "a", "sgd") == ("cosine", "constant")
    assert arms_of(s, "b", "sgd") == ("cosine",)
    # schedule-free brings its own schedule: one arm, the suite's first
    assert arms_of(s, "a", "sf_adamw") == ("cosine",)
    wider = dataclasses.replace(s, name="wider", arm_scope={})
    assert subset_problems(s, wider) == []
    assert subset_problems(wider, s) == ["sgd on b: arms ['constant'] not in s"]
    assert subset_problems(SUITES["quick"], SUITES["full"]) == []


def test_weight_decay_is_tuned_exactly_where_the_registry_says():
    from ksbopt.bench import registry
    from ksbopt.bench.suites import _wd_grid

    proto = Protocol()
    for name, spec in registry.REGISTRY.items():
        tuned = bool(_wd_grid(spec, proto))
        assert tuned == ("weight_decay" in spec.tune and spec.hparams["weight_decay"] > 0), name
    # a positive default that the registry does not tune (the NLD target's decay) stays fixed
    assert registry.get("adam+steer_nld").hparams["weight_decay"] > 0
    assert _wd_grid(registry.get("adam+steer_nld"), proto) == ()


def test_profile_summary_keeps_ten_blocks_of_the_run():
    from ksbopt.bench import profiles

    rng = np.random.default_rng(0)
    chunks = [rng.random((4, 2, 7)) for _ in range(50)]  # 50 chunks of 4 steps, 2 symmetries
    out = profiles.summary(["scale:a", "scale:b"], chunks, {"w": np.zeros(3, np.float32)})
    assert out["block_chunks"] == [5] * 10 and len(out["blocks"]) == 10
    want = np.median(np.concatenate(chunks[45:]), axis=0)
    np.testing.assert_allclose(out["blocks"][-1], want, rtol=1e-12)
    np.testing.assert_allclose(out["median"], np.median(np.concatenate(chunks), 0), rtol=1e-12)
    short = profiles.summary(["scale:a"], [rng.random((4, 1, 7)) for _ in range(3)], {})
    assert short["block_chunks"] == [1, 1, 1]


def test_budget_replays_the_search_on_a_synthetic_curve():
    from ksbopt.bench import budget

    kw = dict(window=3, tuning_seeds=1, seeds=5, max_extensions=4)
    # at the centre: the window, then the two weight-decay neighbours, then 4 more seeds
    assert budget.search_runs(wds=(5e-5, 5e-4, 5e-3), **kw) == 3 + 2 + 4
    assert budget.search_runs(wds=(), **kw) == 3 + 4
    # one point outside the window at a larger decay: more runs, never fewer
    assert budget.search_runs(wds=(5e-5, 5e-4, 5e-3), case="typical", **kw) > 9
    # a flat "typical" curve: the band walk adds the rate two above the optimum (the one two
    # below is in the window already)
    plain = budget.search_runs(wds=(), case="typical", **kw)
    assert budget.search_runs(wds=(), case="typical", band_reach=3, **kw) == plain + 1
    with pytest.raises(ValueError, match="case="):
        budget.search_runs(wds=(), case="worst", **kw)
    est = budget.estimate(
        {"at_centre": {("a", "small"): (10, 2)}, "typical": {("a", "small"): (20, 3)}},
        {("b", "base"): 4},
        {("a", "small"): (36.0, 18.0)},
    )
    assert est.runs["at_centre"] == {("a", "small"): 10, ("b", "base"): 4}
    assert est.hours["at_centre"] == pytest.approx((10 * 36 + 2 * 18) / 3600)
    assert est.unknown == (("b", "base"),)
