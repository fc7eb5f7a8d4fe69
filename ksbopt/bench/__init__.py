"""The ksbopt benchmark harness (install the ``bench`` extra: ``pip install "ksbopt[bench]"``).

Tasks (Flax NNX models on locally generated or shipped data), the optimizer registry, the
tuning protocol, the runner, and the report. The command line is ``ksbopt-bench`` (or
``python -m ksbopt.bench``); see ``docs/howto/benchmarks.md``. The library: :func:`compare`
your optimizers (factories ``lr -> optax transformation``) with the registry's on built-in
tasks or your own (:func:`make_task`), and read the :class:`Results`; see
``docs/howto/compare.md``. The tuning rules and statistics every suite uses are the public
modules :mod:`ksbopt.bench.protocol` and :mod:`ksbopt.bench.stats`; whether a ksbopt kinetic
energy pays against the practitioners' optimizers, :mod:`ksbopt.bench.advantage`; whether two
suites' verdicts agree where they overlap, :mod:`ksbopt.bench.agreement`; keeping XLA:CPU's
large buffers from being page-faulted every step, :mod:`ksbopt.bench.host`.
"""

__all__ = [
    "Results",
    "advantage",
    "agreement",
    "compare",
    "host",
    "make_task",
    "protocol",
    "stats",
]


def __getattr__(name: str):
    # Lazy: ``python -m ksbopt.bench`` checks the extra's packages before anything imports them.
    if name in ("Results", "compare"):
        from ksbopt.bench import api

        return getattr(api, name)
    if name == "make_task":
        from ksbopt.bench.user import make_task

        return make_task
    # the rules every suite is scored by, and the check that two suites agree
    if name in ("advantage", "agreement", "host", "protocol", "stats"):
        import importlib

        return importlib.import_module(f"ksbopt.bench.{name}")
    raise AttributeError(f"module 'ksbopt.bench' has no attribute {name!r}")
