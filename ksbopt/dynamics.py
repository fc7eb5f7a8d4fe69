"""Descriptions of optimizers for :func:`ksbopt.monitor`: which exact recursions apply.

``ksbopt.dynamics.sgd(learning_rate, momentum, weight_decay, decoupled=, nesterov=)``,
``ksbopt.dynamics.rmsprop(...)`` and ``ksbopt.dynamics.adam(...)`` describe the wrapped
optimizer so that the monitor can predict every charge and report the residual.
"""

from ksbopt._src.diagnostics.dynamics import Dynamics, adam, rmsprop, sgd

__all__ = ["Dynamics", "adam", "rmsprop", "sgd"]
