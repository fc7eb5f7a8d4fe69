"""The training session of one ``ksbopt-bench`` invocation: its records, its failures, the
rounds of the tuning protocol, and the progress lines.

:class:`Session` keeps the records of the runs this invocation finished or found on disk, the
(experiment, task, scale, optimizer, hyperparameters, schedule) combinations that raised, and
the (optimizer, task) pairs that cannot start; a blocked combination is skipped instead of
compiled again. :func:`tuning_round` asks :func:`ksbopt.bench.suites.tuning_round` for the runs
the next round of the protocol needs, from the results this session holds.
"""

from __future__ import annotations

import dataclasses
import sys

__all__ = ["Session", "protocol_meta", "search_notes", "tuning_round"]


def _f(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def _combo(cfg) -> tuple:
    """The runs a failure blocks: every seed and learning rate of the same setting."""
    return (cfg.experiment, cfg.task, cfg.scale, cfg.optimizer, cfg.hparams, cfg.schedule)


class Session:
    """The records of one invocation, the runs that failed, and training with progress lines.

    With ``workers`` (:class:`ksbopt.bench.workers.Workers`) the runs of a round are trained
    by worker processes, one unit (setting) at a time each; else one by one here.
    """

    def __init__(self, runner, workers=None):
        self.runner = runner
        self.workers = workers
        self.records: dict[str, dict] = {}
        self.trained = 0
        self.failed: dict[tuple, str] = {}
        self.excluded: set[tuple[str, str]] = set()  # (optimizer, task) that cannot start

    def blocked(self, cfg) -> bool:
        return _combo(cfg) in self.failed or (cfg.optimizer, cfg.task) in self.excluded

    def result(self, cfg):
        """Final validation metric of ``cfg`` (None: diverged or cannot run; MISSING: not yet)."""
        from ksbopt.bench.protocol import MISSING
        from ksbopt.bench.records import load_record, record_path

        rec = self.records.get(cfg.run_id)
        if rec is None:
            rec = load_record(record_path(self.runner.out, cfg), self.runner.full_config(cfg))
            if rec is not None:
                self.records[cfg.run_id] = rec
        if rec is None:
            return None if self.blocked(cfg) else MISSING
        return None if rec["status"] == "diverged" else rec["final"]["val_metric"]

    def train(self, runs, what: str) -> None:
        runs = [r for r in runs if r.run_id not in self.records]
        if runs:
            print(f"-- {what}: {len(runs)} runs", flush=True)
        for i, outcome in enumerate(self._outcomes(runs), 1):
            self._settle(_position(i, len(runs)), *outcome)

    def _skipped(self, cfg):
        """The outcome of a run whose setting failed or cannot start: not compiled again."""
        return cfg, None, False, self.failed.get(_combo(cfg), "cannot start"), None

    def _outcomes(self, runs):
        """Each run's outcome (:data:`ksbopt.bench.workers.Outcome`), in order here, as
        units finish on workers."""
        from ksbopt.bench import compiled, workers

        if self.workers is None:
            for i, cfg in enumerate(runs, 1):
                pos = _position(i, len(runs))  # for the run's progress bar
                yield (
                    self._skipped(cfg)
                    if self.blocked(cfg)
                    else workers.attempt(self.runner, cfg, position=pos)
                )
            return
        units: dict[tuple, list] = {}
        for cfg in runs:
            if self.blocked(cfg):
                yield self._skipped(cfg)
            else:
                units.setdefault(_combo(cfg), []).append(cfg)
        for cfg, *_ in units.values():  # data generated (and cached) here, once, not per worker
            self.runner.task(cfg.task, cfg.scale)
        keyed = [(compiled.train_key(u[0]), u) for u in units.values()]
        yield from self.workers.train(self.runner.out, self.runner.cache_dir, keyed)

    def _settle(self, pos: str, cfg, rec, new: bool, failure, trace) -> None:
        """Keeps one outcome and prints its line (a failure blocks its setting's other runs:
        the same error again would cost its compilation every time)."""
        if rec is None and trace is None:
            print(f"{pos}{cfg.run_id}: skipped, {failure}", flush=True)
        elif rec is None:
            self.failed[_combo(cfg)] = failure
            print(f"{pos}{cfg.run_id}: FAILED, {failure}", file=sys.stderr, flush=True)
            print(trace, file=sys.stderr, end="", flush=True)
        else:
            self.trained += new
            self.records[cfg.run_id] = rec
            print(f"{pos}{_progress_line(cfg, rec, new)}", flush=True)


def _position(i: int, n: int) -> str:
    return f"[{i}/{n}] "


def _progress_line(cfg, rec: dict, new: bool) -> str:
    """One finished run: its setting, final metrics and cost (or that it was kept)."""
    f = rec["final"]
    how = (
        f"{rec['timing']['total_s']:.1f}s, {rec['timing']['step_ms_median']:.2f} ms/step"
        if new
        else "kept from an earlier run"
    )
    return (
        f"{cfg.experiment} {cfg.task} {cfg.optimizer}"
        f"{''.join(f' {k}={v:g}' for k, v in cfg.hparams)} lr={cfg.learning_rate:g} "
        f"{cfg.schedule} seed={cfg.seed}: val {rec['task']['metric']} "
        f"{_f(f['val_metric'])}, test {_f(f['test_metric'])}"
        f"{' DIVERGED' if rec['status'] == 'diverged' else ''} ({how})"
    )


def tuning_round(suite, session: Session, grid_args: dict) -> tuple[list, dict]:
    """(runs of the next round not blocked by a failure, the searches) from the session's
    results (:func:`ksbopt.bench.suites.tuning_round`)."""
    from ksbopt.bench.suites import tuning_round as next_round

    runs, searches = next_round(
        suite,
        **grid_args,
        result=session.result,
        higher_is_better=lambda t: (
            session.runner.task(t, grid_args["scale"] or suite.scale_of("grid")).higher_is_better
        ),
    )
    return [r for r in runs if not session.blocked(r)], searches


def search_notes(suite, session: Session, grid_args: dict) -> list[str]:
    """Report notes: every search stopped by the extension budget or with no finite point."""
    from ksbopt.bench.protocol import lattice_lr

    _, searches = tuning_round(suite, session, grid_args)
    out = []
    for (t, arm, o), s in searches.items():
        if s.best is None or s.needed:
            continue
        if s.scores.get(s.best) is None:
            out.append(f"no finite point: {o} on {t} ({arm}) diverged at every learning rate tried")
        elif s.edge:
            why = " (extension budget spent)" if s.exhausted else ""
            out.append(
                f"edge: {o} on {t} ({arm}) chose lr {lattice_lr(s.best[0]):g} at the edge of "
                f"its searched range{why}"
            )
    return out


def protocol_meta(suite, seeds) -> dict:
    """The protocol of a tuned invocation as the report's metadata records it."""
    from ksbopt.bench.protocol import WARMUP_FRACTION

    return {
        **dataclasses.asdict(suite.protocol),
        "schedules": list(suite.schedules),
        "arm_scope": {a: [list(t), list(o)] for a, (t, o) in suite.arm_scope.items()},
        "warmup_fraction": WARMUP_FRACTION,
        "seeds": list(seeds),
    }
