"""ksbopt.bench.host: XLA:CPU's large buffers reused instead of page-faulted every step."""

import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ksbopt.bench import host

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# A jitted step whose temporary (a 48 MiB tanh that the matrix product must read whole)
# exceeds glibc's 32 MiB dynamic mmap limit.
# Prints the minor page faults per call, over 20 calls after 10 warm-up calls (glibc settles
# into reusing the block within a few calls; 5-call windows still saw one fresh mapping in
# two to five).
_PROBE = textwrap.dedent(
    """
    import resource, sys
    import jax, jax.numpy as jnp
    if sys.argv[1] == "reuse":
        from ksbopt.bench import host
        host.reuse_large_buffers()
    x = jnp.ones((3 * 2**12, 2**10), jnp.float32)  # 48 MiB
    w = jnp.ones((2**10, 8), jnp.float32)
    f = jax.jit(lambda x, w: jnp.tanh(x) @ w)
    for _ in range(10):
        f(x, w).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        f(x, w).block_until_ready()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
    """
)


def _faults_per_call(mode: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    return float(out.stdout.strip().splitlines()[-1])


def _thp_always() -> bool:
    try:
        return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not GLIBC, reason="mallopt thresholds are glibc's (Linux)")
def test_reuse_sets_both_thresholds_once_and_is_recorded():
    got = host.reuse_large_buffers()
    assert got == {
        "allocator": "glibc, large blocks reused",
        "mmap_threshold": 1 << 30,
        "trim_threshold": (1 << 31) - 1,
        "arena_max": 1,
    }
    assert host.reuse_large_buffers() == got  # idempotent
    assert host.setting() == got
    from ksbopt.bench.runner import environment

    assert environment()["allocator"] == "glibc, large blocks reused"


@pytest.mark.skipif(not GLIBC, reason="mallopt thresholds are glibc's (Linux)")
def test_large_temporaries_stop_page_faulting():
    # 48 MiB of fresh pages is 12288 faults of 4 KiB, on every call with glibc's defaults.
    # With the heap reused, a call faults only when the heap had no free block for it (seen
    # on the 2-core VM: 0 to 4 fresh mappings in 20 calls, i.e. 0-2458 faults a call); the
    # bound is half the calls, well clear of both.
    pages = 12 * 2**20 * 4 / 4096
    reused = _faults_per_call("reuse")
    assert reused < 0.5 * pages, f"{reused} minor page faults per call with the heap reused"
    if not _thp_always():  # with transparent huge pages always on, an mmap faults per 2 MiB
        fresh = _faults_per_call("default")
        assert fresh > 0.9 * pages, f"only {fresh} faults per call with glibc's defaults"


def test_setting_reads_default_where_nothing_was_applied(monkeypatch):
    monkeypatch.setattr(host, "_applied", None)
    assert host.setting() == {"allocator": "default"}
    monkeypatch.setattr(host, "_glibc", lambda: None)
    assert host.reuse_large_buffers() == {"allocator": "default"}
