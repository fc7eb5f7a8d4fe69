"""Matplotlib figures of recorded Noether diagnostics (``pip install ksbopt[plot]``).

Importing this module does not import matplotlib; each function does, and raises an
``ImportError`` naming ``pip install ksbopt[plot]`` when it is missing.
"""

from ksbopt._src.diagnostics.plotting import (
    plot_angular_update,
    plot_charges,
    plot_decomposition,
    plot_effective_learning_rate,
    plot_prediction_error,
)

__all__ = [
    "plot_angular_update",
    "plot_charges",
    "plot_decomposition",
    "plot_effective_learning_rate",
    "plot_prediction_error",
]
