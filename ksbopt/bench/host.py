"""The benchmark process: XLA:CPU's large buffers reused, not page-faulted anew every step.

XLA:CPU allocates each execution's temporary buffer (and its fresh outputs) with ``malloc``.
glibc serves a block larger than its mmap threshold with a fresh ``mmap`` and returns it to
the kernel on ``free``; the threshold adapts to freed blocks, but only up to 32 MiB
(``DEFAULT_MMAP_THRESHOLD_MAX`` on 64-bit). A step whose temporaries exceed that therefore gets
new pages every time, and the kernel zeroes each 4 KiB page on first touch: the byte-level
Transformer of the benchmark (34 MiB of temporaries) took 8400 minor page faults per step,
about 20 ms of a 55 ms step on the 2-core VM, while an optimizer whose step stayed under
32 MiB took 270. Which optimizer crossed the line decided which one looked slow.

Threads other than the main one allocate from their own arenas, whose heaps hold at most
64 MiB: a larger block allocated there (XLA:CPU's worker threads run the steps) is mapped
afresh whatever the thresholds. One arena for the process removes that: on the 10M-parameter
tree of ``benchmarks/bench_transforms.py``, ``symmetrize(adam)`` stepped in 55 ms with it and
150 ms without.

:func:`reuse_large_buffers` raises both glibc thresholds and keeps one arena (``mallopt``),
so freed large blocks stay in the heap and the next step reuses pages already mapped: the same
compiled program, the same results bit for bit, minus the page faults. The process keeps the
memory it freed (up to the trim threshold) instead of returning it to the system, which is
what a benchmark process wants. It is applied by :class:`ksbopt.bench.runner.Runner` and by
every timing script of ``benchmarks/``; :func:`setting` is recorded in each record's
environment.

Example:
  >>> from ksbopt.bench import host
  >>> host.reuse_large_buffers()["allocator"] in ("glibc, large blocks reused", "default")
  True

References: glibc manual, "Malloc Tunable Parameters" (``M_MMAP_THRESHOLD``,
``M_TRIM_THRESHOLD``, ``M_ARENA_MAX``); ``mallopt(3)``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["reuse_large_buffers", "setting"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # mallopt's (malloc.h)
_MMAP_THRESHOLD = 1 << 30  # blocks up to 1 GiB come from the heap
_TRIM_THRESHOLD = (1 << 31) - 1  # the most mallopt's int takes: freed memory stays mapped

_applied: dict | None = None


def _glibc():
    """The C library when it is glibc (``mallopt`` with these parameters), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def reuse_large_buffers() -> dict:
    """Raise glibc's mmap and trim thresholds and keep one malloc arena, once per process.

    The settings (``mallopt``), applied before the first computation (threads that allocated
    earlier keep their own arenas)::

        M_MMAP_THRESHOLD = 2**30        (blocks up to 1 GiB come from the heap)
        M_TRIM_THRESHOLD = 2**31 - 1    (freed memory stays mapped for the next step)
        M_ARENA_MAX = 1                 (worker threads share the main heap)

    A step with ``T`` bytes of temporaries above glibc's 32 MiB default then stops paying
    ``T / 4096`` page faults per call. A no-op where the C library is not glibc (macOS,
    musl).

    Returns:
      :func:`setting`: ``{"allocator": "glibc, large blocks reused", "mmap_threshold": ...,
      "trim_threshold": ..., "arena_max": 1}``, or ``{"allocator": "default"}`` where the C
      library is not glibc.

    Raises:
      RuntimeError: if glibc refuses one of the values (it has not for these).

    Example:
      >>> from ksbopt.bench import host
      >>> host.reuse_large_buffers()["allocator"] in ("glibc, large blocks reused", "default")
      True

    References:
      None: an allocator setting of the C library, documented in the glibc manual's
      "Malloc Tunable Parameters" and ``mallopt(3)``, not in a paper.
    """
    global _applied
    if _applied is None:
        libc = _glibc()
        if libc is None:
            _applied = {"allocator": "default"}
        else:
            for name, param, value in (
                ("M_MMAP_THRESHOLD", _M_MMAP_THRESHOLD, _MMAP_THRESHOLD),
                ("M_TRIM_THRESHOLD", _M_TRIM_THRESHOLD, _TRIM_THRESHOLD),
                ("M_ARENA_MAX", _M_ARENA_MAX, 1),
            ):
                if libc.mallopt(param, value) != 1:
                    raise RuntimeError(f"glibc's mallopt refused {name}={value}")
            _applied = {
                "allocator": "glibc, large blocks reused",
                "mmap_threshold": _MMAP_THRESHOLD,
                "trim_threshold": _TRIM_THRESHOLD,
                "arena_max": 1,
            }
    return dict(_applied)


def setting() -> dict:
    """What :func:`reuse_large_buffers` set in this process, for a record's environment.

    ``setting() == reuse_large_buffers()`` once it has run in the process;
    ``{"allocator": "default"}`` before, or where the C library is not glibc.

    Returns:
      A new dict: ``allocator`` and, where glibc was set, the three values.

    Example:
      >>> from ksbopt.bench import host
      >>> "allocator" in host.setting()
      True

    References:
      None: a record of the process's allocator settings, which have no paper of their own.
    """
    return dict(_applied) if _applied is not None else {"allocator": "default"}
