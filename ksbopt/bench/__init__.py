"""The ksbopt benchmark harness (install the ``bench`` extra: ``pip install "ksbopt[bench]"``).

Tasks (Flax NNX models on locally generated or shipped data), the optimizer registry, the
tuning protocol, the runner, and the report. The command line is ``ksbopt-bench`` (or
``python -m ksbopt.bench``); see ``docs/howto/benchmarks.md``.
"""
