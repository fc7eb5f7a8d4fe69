"""Charge targets for :func:`ksbopt.steer`."""

from ksbopt._src.targets import Target, balanced, constant, schedule
from ksbopt._src.targets_dynamic import equilibrium, nld

__all__ = ["Target", "balanced", "constant", "equilibrium", "nld", "schedule"]
