"""Symmetry declarations, each kind's mathematics, and the moves along an orbit."""
