"""Transitional alias of :mod:`support` for test files not yet switched over (``import utils``).

New code imports ``support``; this module goes once no test file imports ``utils``.
"""

from support import *  # noqa: F403
from support import __all__  # noqa: F401
