"""Symmetry-aware peer optimizers (SGDP, AdamP, Nero, rotational equilibrium, Path-SGD).

Reimplemented from their papers for Flax layouts (the output unit is the LAST axis of a
kernel), jit-safe and NaN-free on zero-norm units. The public namespace is
:mod:`ksbopt.peers`, which re-exports them from the modules of this package.
"""
