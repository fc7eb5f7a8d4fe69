"""The formulas of THEORY.md as pure, jit-able functions (closed forms and exact recursions).

See :mod:`ksbopt._src.theory` for the conventions; every function documents its formula, its
tag ([paper: NLD], [paper: NM] or [derived]) and its THEORY.md item.
"""

from ksbopt._src.theory import *  # noqa: F403
from ksbopt._src.theory import __all__  # noqa: F401
