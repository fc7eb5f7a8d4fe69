"""Charge targets for :func:`ksbopt.steer`."""

from ksbopt._src.targets.predicted import equilibrium, nld
from ksbopt._src.targets.prescribed import Target, balanced, constant, schedule

__all__ = ["Target", "balanced", "constant", "equilibrium", "nld", "schedule"]
