"""Runs trained several at a time, each in a worker process pinned to one CPU core
(``ksbopt-bench --jobs N``).

XLA:CPU spreads one step of a small model over the cores poorly: the steps of the suite's
tasks are chains of small loops and matrix products, and two threads finish one of them
only 1.2-1.6x faster than one core does. On the 2-core VM of ``benchmarks/results``, two
runs side by side, one per core, trained 1.2-1.4x (the MNIST-1D ResNets), 1.3-1.4x (the deep
MLPs) and 1.4x (the byte-level LM) as many runs per hour as one run on both cores
(``benchmarks/bench_task_costs.py --jobs``; the results README has the figures and a direct
comparison). A machine with many cores gains more, since one run cannot use them all.

:class:`Workers` starts ``jobs`` fresh (spawned) processes, each pinned to its own core
(``os.sched_setaffinity``, Linux) before its XLA backend starts, so that XLA:CPU sizes its
thread pool to that one core (XLA's thread flags do not bound the pool of jax's CPU client;
the affinity does), and with the command line's own entries registered again
(``--optimizer``, ``--grid``, ``--task``). It hands each one a *unit*: the runs that share a
compiled train step and a failure (every seed and learning rate of one setting), so no step
is compiled twice and a setting that fails stops after its first failure, as in one process.
A unit goes where its step or task was built before, so later rounds of a search do not
compile again. A worker that dies (killed, out of memory) is restarted and its unit sent
again once, then reported as failed (the suite goes on and reports it). The workers write
the records (atomically, as one process does); the caller receives every run's outcome as
its unit finishes.

Each record's environment says how it was trained (:func:`setting`): ``jobs`` and, in a
worker, its ``core``. Wall-clock figures of runs trained side by side include the
neighbours' share of memory bandwidth and caches; compare them only within one setting.

Example:
  >>> from ksbopt.bench import workers
  >>> workers.setting()
  {'jobs': 1}
  >>> workers.check_jobs(1)  # raises ValueError for 0, or for more workers than cores

References: ``sched_setaffinity(2)``; Python's :mod:`multiprocessing` (the ``spawn`` start
method).
"""

from __future__ import annotations

import collections
import multiprocessing
import multiprocessing.connection
import os
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["Outcome", "Workers", "attempt", "check_jobs", "cores", "setting"]

#: Times a unit may lose its worker (killed, out of memory) before it is reported as failed.
_MAX_DEATHS_PER_UNIT = 2
_DIED = "WorkerDied: the worker process training this unit died twice (killed, out of memory)"
_NO_TRACE = "(no traceback: the worker process died)\n"

# In a worker: what :func:`setting` reports, and the runners by output folder.
_setting: dict = {"jobs": 1}
_runners: dict = {}

# (run config, record or None, trained now, failure line or None, traceback or None)
Outcome = tuple[Any, "dict | None", bool, "str | None", "str | None"]


def cores() -> list[int]:
    """The CPU cores this process may run on (all of them where affinity is not supported)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def check_jobs(jobs: int, platform: str = "cpu") -> None:
    """Raises ValueError if ``jobs`` worker processes cannot run on ``platform``.

    Example:
      >>> check_jobs(2, "gpu")  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: jobs=2: worker processes split CPU cores; on the gpu ... leave --jobs at 1
    """
    if jobs < 1:
        raise ValueError(f"jobs={jobs}: give a positive number of worker processes, e.g. --jobs 2")
    if jobs > 1 and platform != "cpu":
        raise ValueError(
            f"jobs={jobs}: worker processes split CPU cores; on the {platform} every run "
            "shares one accelerator, so leave --jobs at 1"
        )
    if jobs > 1 and not hasattr(os, "sched_setaffinity"):
        raise ValueError(
            f"jobs={jobs}: a worker must be pinned to one core and this platform cannot "
            "(os.sched_setaffinity is Linux-only); leave --jobs at 1"
        )
    if jobs > len(cores()):
        raise ValueError(
            f"jobs={jobs}: this process may use {len(cores())} CPU cores; give at most "
            f"--jobs {len(cores())} (one worker per core)"
        )


def setting() -> dict:
    """How this process trains runs, for a record's environment: ``{"jobs": 1}``, or in a
    worker ``{"jobs": N, "core": its core}``."""
    return dict(_setting)


def _failure(e: Exception) -> tuple[str, str]:
    """The first line of ``e`` (at most 300 characters) and the current traceback."""
    line = f"{type(e).__name__}: {e}".splitlines()[0][:300] if str(e) else type(e).__name__
    return line, traceback.format_exc()


def attempt(runner, cfg, position: str = "") -> Outcome:
    """Trains ``cfg`` with ``runner`` (or finds its record); never raises: a failure comes
    back as its first line and traceback, so one broken optimizer cannot stop a suite."""
    try:
        rec, new = runner.run(cfg, position=position)
    except Exception as e:
        return cfg, None, False, *_failure(e)
    return cfg, rec, new, None, None


def _start_worker(core: int, jobs: int, user_args: tuple) -> None:
    """A worker's start: pinned to ``core`` before XLA sizes its thread pool, then the
    command line's own entries registered."""
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():  # its thread pool would span every core
        raise RuntimeError("a worker's XLA backend started before it was pinned to its core")
    os.sched_setaffinity(0, {core})
    _setting.update(jobs=jobs, core=core)
    if any(user_args):
        from ksbopt.bench import user

        user.parse_cli(*user_args)


def _train_unit(out: str, cache_dir: str | None, cfgs: Sequence) -> list[Outcome]:
    """A worker's share: the runs of one unit in order; after a failure the rest of the unit
    is skipped with its reason (they would fail the same way)."""
    from ksbopt.bench.runner import Runner

    key = (out, cache_dir)
    if key not in _runners:
        _runners[key] = Runner(Path(out), cache_dir=cache_dir and Path(cache_dir), progress=False)
    outcomes: list[Outcome] = []
    failed = None
    for cfg in cfgs:
        if failed is not None:
            outcomes.append((cfg, None, False, failed, None))
            continue
        outcomes.append(attempt(_runners[key], cfg))
        failed = outcomes[-1][3]
    return outcomes


def _serve(core: int, inbox, outbox, jobs: int, user_args: tuple) -> None:
    """A worker process on ``core``: calls ``fn(*args)`` for each ``(uid, fn, args)`` it
    receives on ``inbox`` and sends ``(uid, ok, result)`` on ``outbox`` (``ok`` False: the
    result is the exception's first line and traceback); stops at None."""
    _start_worker(core, jobs, user_args)
    try:
        while (msg := inbox.recv()) is not None:
            uid, fn, args = msg
            try:
                outbox.send((uid, True, fn(*args)))
            except Exception as e:
                outbox.send((uid, False, _failure(e)))
    except KeyboardInterrupt:  # Ctrl-C reaches the whole group: the parent says what to do
        return


class Workers:
    """``jobs`` worker processes, one per core, that train units of runs.

    Args:
      jobs: worker processes (:func:`check_jobs` must accept it).
      user_args: ``(optimizers, grids, tasks)`` of the command line's ``--optimizer``,
        ``--grid`` and ``--task`` flags, registered again in every worker.

    A unit goes to an idle worker that has already compiled its train step if there is one,
    else to one that has built its task, else to any (largest units first), so the rounds of
    a search do not compile its step on every worker. Each worker has its own pair of pipes,
    so one that dies in the middle of a message cannot block the others (a queue shared by
    all would stay locked by a writer killed while holding its lock). Use as a context
    manager.
    """

    def __init__(self, jobs: int, user_args: tuple = ((), (), ())):
        check_jobs(jobs)
        self.jobs = jobs
        self.user_args = tuple(tuple(a) for a in user_args)
        self._ctx = multiprocessing.get_context("spawn")
        self._procs: list = [None] * jobs
        self._pipes: list = [None] * jobs  # (to the worker, from the worker)
        self._seen: list[set] = [set() for _ in range(jobs)]  # keys and tasks each has built
        self._uid = 0

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.close(terminate=exc_type is not None)

    def _worker(self, i: int):
        """The pipe to worker ``i``, which is (re)started if it is not running."""
        if self._procs[i] is None or not self._procs[i].is_alive():
            self._stop(i, terminate=True)
            inbox, to_worker = self._ctx.Pipe(duplex=False)
            from_worker, outbox = self._ctx.Pipe(duplex=False)
            args = (cores()[i], inbox, outbox, self.jobs, self.user_args)
            self._procs[i] = self._ctx.Process(target=_serve, args=args, daemon=True)
            self._procs[i].start()
            inbox.close()  # the worker's ends: only it holds them now, so its death is EOF
            outbox.close()
            self._pipes[i] = (to_worker, from_worker)
            self._seen[i] = set()
        return self._pipes[i][0]

    def _send(self, i: int, fn: Callable, args: tuple) -> int:
        self._uid += 1
        self._worker(i).send((self._uid, fn, args))
        return self._uid

    def _receive(self, busy: dict) -> tuple:
        """The next ``(worker, uid, ok, result)`` of the ``busy`` workers (worker -> uid);
        ``(worker, uid, None, None)`` for one that died."""
        while True:
            readers = {self._pipes[i][1]: i for i in busy}
            for conn in multiprocessing.connection.wait(list(readers), timeout=1.0):
                i = readers[conn]
                try:
                    return (i, *conn.recv())
                except (EOFError, OSError):  # it died: its pipe closed
                    break
            else:
                dead = [i for i in busy if not self._procs[i].is_alive()]
                if not dead:
                    continue
                i = dead[0]
            self._stop(i, terminate=True)  # a new one starts on the next call
            return i, busy[i], None, None

    def _stop(self, i: int, terminate: bool) -> None:
        """Stops worker ``i`` (after its current call, or at once) and closes its pipes."""
        proc = self._procs[i]
        if proc is not None and proc.is_alive():
            if terminate:
                proc.terminate()
            else:
                self._pipes[i][0].send(None)
            proc.join()
        for conn in self._pipes[i] or ():
            conn.close()
        self._procs[i] = self._pipes[i] = None

    def close(self, terminate: bool = False) -> None:
        """Stops the workers: after their current call, or at once with ``terminate`` (an
        interrupted suite; the records written so far are complete)."""
        for i in range(self.jobs):
            self._stop(i, terminate)

    def map(self, fn: Callable, items: Sequence) -> list:
        """``[fn(x) for x in items]``, at most one call per worker at a time (``fn``
        importable by name); a call's exception or a worker's death raises RuntimeError."""
        out: dict[int, Any] = {}
        todo = list(enumerate(items))
        busy: dict[int, int] = {}
        index: dict[int, int] = {}
        while todo or busy:
            for i in range(self.jobs):
                if i not in busy and todo:
                    k, x = todo.pop(0)
                    busy[i] = self._send(i, fn, (x,))
                    index[busy[i]] = k
            i, uid, ok, result = self._receive(busy)
            del busy[i]
            if not ok:
                name, item = getattr(fn, "__name__", fn), items[index[uid]]
                why = "its worker process died" if ok is None else "\n".join(result)
                raise RuntimeError(f"a worker's call {name}({item!r}) failed: {why}")
            out[index[uid]] = result
        return [out[k] for k in range(len(items))]

    def train(
        self, out: Path, cache_dir: Path | None, units: Sequence[tuple[tuple, Sequence]]
    ) -> Iterator[Outcome]:
        """Trains ``units`` (``(key, run configs)``: runs sharing the compiled train step
        ``key``); yields each run's outcome when its unit finishes. A unit whose worker dies
        is sent again (to a restarted worker) once, then reported as failed."""
        pending = sorted(units, key=lambda u: len(u[1]), reverse=True)
        busy: dict[int, int] = {}
        sent: dict[int, tuple] = {}
        deaths: collections.Counter = collections.Counter()
        while pending or busy:
            while pending and len(busy) < self.jobs:
                # the best (idle worker, unit) pair: affinity first, then the larger unit
                idle = [i for i in range(self.jobs) if i not in busy]
                pairs = [(i, k) for i in idle for k in range(len(pending))]
                i, k = max(pairs, key=lambda p: (self._affinity(p[0], pending[p[1]]), -p[1]))
                unit = pending.pop(k)
                args = (str(out), cache_dir and str(cache_dir), unit[1])
                busy[i] = self._send(i, _train_unit, args)
                sent[busy[i]] = unit
            i, uid, ok, result = self._receive(busy)
            del busy[i]
            key, cfgs = unit = sent.pop(uid)
            if ok:
                self._seen[i] |= {key, cfgs[0].task}
                yield from result
            elif ok is None:
                deaths[id(unit)] += 1
                if deaths[id(unit)] < _MAX_DEATHS_PER_UNIT:
                    pending.insert(0, unit)
                else:
                    yield from ((cfg, None, False, _DIED, _NO_TRACE) for cfg in cfgs)
            else:  # the unit's own code raised outside a run (attempt catches the runs')
                yield from ((cfg, None, False, result[0], result[1]) for cfg in cfgs)

    def _affinity(self, i: int, unit: tuple) -> int:
        """2: worker ``i`` has compiled the unit's step, 1: built its task, 0: neither."""
        key, cfgs = unit
        return 2 if key in self._seen[i] else int(cfgs[0].task in self._seen[i])
