"""Charge targets for ``steer``: prescribed values and values predicted by the theory."""
