"""The harness as a library: :func:`compare` your optimizers with the registry's on any task.

``compare`` registers the user entries (:mod:`ksbopt.bench.user`) and runs the same pipeline
as ``ksbopt-bench`` (validation, tuning protocol, resumable records, report, plots), then
returns a :class:`Results` view of what it wrote.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["Results", "compare"]


class Results:
    """What :func:`compare` (or ``ksbopt-bench``) wrote under ``out``, read back.

    Args:
      out: the output folder (``report.md``, ``summary.json``, ``plots/``, ``runs/``).
      status: the exit status of the run (0: every entry ran; 1: some failed, see
        :attr:`failures`).

    Attributes:
      summary: ``summary.json`` as a dict (per task and optimizer: best learning rate, test
        and validation metric mean and std over seeds, steps to target, timings).
      records: every run record under ``out/runs``.

    Example:
      >>> import os, tempfile, numpy as np, ksbopt.bench
      >>> from flax import nnx
      >>> x, y = np.ones((8, 4), "f4"), np.arange(8) % 2
      >>> task = ksbopt.bench.make_task("doc_results", lambda rngs: nnx.Linear(4, 2, rngs=rngs),
      ...                               (x, y), (x, y), steps=2, symmetries=[])
      >>> out = os.path.join(tempfile.mkdtemp(), "bench")
      >>> _ = ksbopt.bench.compare({"sgd": "sgd"}, [task], seeds=1, out=out, plots=False,
      ...                          verbose=False)
      >>> res = ksbopt.bench.Results(out)
      >>> res.report.name, list(res.best("doc_results")), len(res.records) >= 3
      ('report.md', ['sgd'], True)

    References:
      None: a view of files the harness wrote; the protocol is :func:`compare`'s.
    """

    def __init__(self, out: str | Path, status: int = 0):
        from ksbopt.bench.records import load_record

        self.out = Path(out)
        self.status = status
        self.summary = json.loads((self.out / "summary.json").read_text())
        paths = sorted((self.out / "runs").glob("*.json"))
        self.records = [r for r in map(load_record, paths) if r is not None]

    @property
    def report(self) -> Path:
        """The Markdown report."""
        return self.out / "report.md"

    @property
    def failures(self) -> list[str]:
        """The entries that did not run, each with its reason."""
        return [n for n in self.summary["meta"].get("notes", []) if "FAILED" in n]

    def best(self, task: str) -> dict[str, dict]:
        """Optimizer -> its row on ``task`` (best learning rate, test/val mean and std, ...)."""
        return self.summary["grid"][task]["optimizers"]

    def profile(self, task: str, optimizer: str) -> dict[str, str]:
        """Symmetry label -> ``exact`` / ``second order`` / ``first order`` of the chosen runs."""
        from ksbopt.bench.profiles import of_runs

        row = self.best(task)[optimizer]
        got = [r.get("profile") for r in self.records if r["id"] in row["runs"]]
        labels = dict.fromkeys(lab for p in got if p for lab in p["labels"])
        return {lab: of_runs(got, lab)[0] for lab in labels}

    def write(self, out: str | Path | None = None, *, plots: bool = True) -> Path:
        """Writes the report, ``summary.json`` and plots again (to ``out``, default the same)."""
        from ksbopt.bench.report import write_report
        from ksbopt.bench.suites import PUBLISHED

        return write_report(
            out or self.out, self.records, self.summary["meta"], published=PUBLISHED, plots=plots
        )

    def __repr__(self) -> str:
        return f"Results({str(self.out)!r}, tasks={list(self.summary['grid'])})"


def _entry(name: str, value) -> list[str]:
    """Registry names for one ``optimizers`` item of :func:`compare`."""
    from ksbopt.bench import registry, user

    if isinstance(value, str) and ":" not in value:
        if value not in registry.REGISTRY:
            raise ValueError(
                f"optimizers[{name!r}]={value!r} is not a registry optimizer; valid: "
                f"{', '.join(registry.REGISTRY)} (or give a factory lr -> optax transformation)."
            )
        if name != value:
            raise ValueError(
                f"optimizers[{name!r}]={value!r}: a registry optimizer keeps its name; write "
                f"{{{value!r}: {value!r}}}."
            )
        return [value]
    if isinstance(value, Mapping):
        extra = set(value) - {"factory", "lrs", "grid", "description"}
        if "factory" not in value or extra:
            raise ValueError(
                f"optimizers[{name!r}]: a dict needs 'factory' and may have 'lrs', 'grid', "
                f"'description' (got {sorted(value)})."
            )
        return user.register_optimizer(name, **value)
    return user.register_optimizer(name, value)


def compare(
    optimizers: Mapping[str, str | Callable | Mapping[str, Any]],
    tasks: Sequence[str | Any] = ("mnist1d_cnn_bn",),
    *,
    seeds: int | Sequence[int] = 2,
    out: str | Path = "bench_results/compare",
    suite: str = "quick",
    scale: str | None = None,
    steps: int | None = None,
    progress: bool = False,
    plots: bool = True,
    verbose: bool = True,
) -> Results:
    r"""Benchmark your optimizers beside the registry's with the harness's protocol.

    Every entry is tuned on every task by the benchmark protocol (:doc:`/howto/protocol`): a
    search on the half-decade learning-rate lattice, extended until the best rate is interior,
    with weight decay where a registry entry tunes it, on the first seed
    (:func:`ksbopt.bench.protocol.search`). The chosen setting

    .. math::

        \hat p = \operatorname*{arg\,max}_{p \in E} \frac{1}{n_{\rm tune}}
        \sum_{s=0}^{n_{\rm tune}-1} \operatorname{val}(p, s)

    over the evaluated points :math:`E` (arg min for a lower-is-better metric) then runs on
    every seed, and the test metric is reported there as ``mean ± std`` over the seeds, with
    paired-bootstrap verdicts against the best baseline
    (:func:`ksbopt.bench.stats.paired_bootstrap`), beside the symmetry profile of every entry
    (:func:`ksbopt.profile`'s classes measured at every training step).

    Args:
      optimizers: name -> a registry name (``"adamw"``), a factory ``lr -> optax
        transformation`` (it may also take ``task``; an import path ``"module:attr"`` works
        too), or ``{"factory": ..., "lrs": [5+ learning rates], "grid": {"b1": (0.9, 0.95)}}``
        (``lrs``: the search starts from the lattice points around their centre).
      tasks: registry task names and/or tasks from :func:`ksbopt.bench.make_task`.
      seeds: a count (seeds 0..n-1) or a list of seeds.
      out: the output folder; rerunning resumes (finished runs are kept, a changed factory
        is re-run).
      suite: ``"quick"`` (the warm-up + cosine arm) or ``"full"`` (also the constant arm).
      scale: the built-in tasks' size (``"tiny"`` for smoke tests; default the suite's).
      steps: training steps per run (default the task's).
      progress: show a progress bar per run.
      plots: write the PNG plots.
      verbose: print a line per run (as ``ksbopt-bench`` does).

    Returns:
      :class:`Results`; ``report.md``, ``summary.json``, ``plots/`` and ``runs/`` are under
      ``out``. Entries that failed are listed in ``Results.failures`` and the report.

    Example:
      >>> import os, tempfile, numpy as np, optax, ksbopt.bench
      >>> from flax import nnx
      >>> x = np.random.default_rng(0).normal(size=(64, 4)).astype("f4")
      >>> task = ksbopt.bench.make_task(
      ...     "doc_toy", lambda rngs: nnx.Sequential(nnx.Linear(4, 8, rngs=rngs), nnx.relu,
      ...     nnx.Linear(8, 2, rngs=rngs)), (x[:48], (x[:48, 0] > 0).astype("i4")),
      ...     (x[48:], (x[48:, 0] > 0).astype("i4")), steps=4, batch_size=16)
      >>> res = ksbopt.bench.compare(
      ...     {"mine": lambda lr: optax.lion(lr), "sgd": "sgd"}, [task], seeds=1,
      ...     out=os.path.join(tempfile.mkdtemp(), "bench"), plots=False, verbose=False)
      >>> sorted(res.best("doc_toy")), res.status, res.failures
      (['mine', 'sgd'], 0, [])
      >>> sorted(set(res.profile("doc_toy", "sgd").values()))  # rescale, translation
      ['exact', 'first order']

    References:
      None: a benchmark protocol of this package; the papers behind its tuning protocol are
      cited by :func:`ksbopt.bench.protocol.search` and :func:`ksbopt.bench.stats.paired_bootstrap`,
      and the symmetry classes follow :func:`ksbopt.profile`, which cites the papers.
    """
    from ksbopt.bench import cli, user

    if not optimizers:
        raise ValueError("optimizers={} names nothing; give e.g. {'adamw': 'adamw'}.")
    names = [n for k, v in optimizers.items() for n in _entry(k, v)]
    task_names = [t if isinstance(t, str) else user.register_task(t) for t in tasks]
    if isinstance(seeds, int):
        seeds_arg = str(seeds)
    else:
        seeds_arg = ",".join(str(int(s)) for s in seeds)
    argv = ["--suite", suite, "--tasks", ",".join(task_names), "--optimizers", ",".join(names)]
    argv += ["--seeds", seeds_arg, "--out", str(out), "--experiments", "grid"]
    argv += ["--scale", scale] if scale else []
    argv += ["--steps", str(steps)] if steps else []
    argv += [] if progress else ["--no-progress"]
    argv += [] if plots else ["--no-plots"]
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    try:
        with quiet:
            status = cli.main(argv)
    except SystemExit as e:  # argparse's usage error, already printed
        raise ValueError(
            f"ksbopt.bench.compare: invalid arguments ({e}); see the message above."
        ) from None
    return Results(out, status)
