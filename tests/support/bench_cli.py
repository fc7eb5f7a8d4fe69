"""The benchmark command line run in-process, its output captured."""

from __future__ import annotations

import contextlib
import io


def run_cli(argv) -> tuple[int, str, str]:
    """``ksbopt-bench argv`` in this process: (exit status, stdout, stderr); a usage error's
    ``SystemExit`` becomes its status."""
    from ksbopt.bench import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main([str(a) for a in argv])
        except SystemExit as e:
            rc = e.code
    return rc, out.getvalue(), err.getvalue()
