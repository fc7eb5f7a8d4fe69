"""Charge targets for :func:`ksbopt.steer`."""

from ksbopt._src.targets import Target, balanced, constant, schedule

__all__ = ["Target", "balanced", "constant", "schedule"]
