"""Reading Noether charges from a parameter tree."""

from __future__ import annotations

from typing import Any

import jax

from ksbopt._src.symmetries import orbit


def charges(params: Any, symmetries) -> tuple[jax.Array, ...]:
    r"""The Noether charge of every group of every declared symmetry.

    .. math::

        Q_{scale} = \tfrac12 \lVert w \rVert^2, \quad
        Q_{rescale} = \tfrac12 (\lVert w_{in} \rVert^2 - \lVert w_{out} \rVert^2), \quad
        Q_{translation} = \langle \mathbf 1, w \rangle, \quad
        C_{linear} = A^\top A - B B^\top

    (:ref:`symmetry-generator-charge`), accumulated in float32 or wider whatever the parameter
    dtype.

    Args:
      params: any pytree of arrays (dict, ``flax.linen`` variables, ``nnx.State``).
      symmetries: a declaration or a list of them.

    Returns:
      A tuple with one array per symmetry: shape ``(n_groups,)``, or
      ``(heads, k, k)`` for :class:`~ksbopt.Linear`.

    Example:
      >>> import jax.numpy as jnp, ksbopt
      >>> ksbopt.charges({"w": jnp.array([3.0, 4.0])}, ksbopt.Scale("w", axis=None))
      (Array([12.5], dtype=float32),)

    References:
      Kunin et al., "Neural Mechanics: Symmetry and Broken Conservation Laws in Deep
      Learning Dynamics", ICLR 2021, https://arxiv.org/abs/2012.04728
    """
    syms = orbit.as_symmetries(symmetries)
    binding = orbit.bind(syms, params)
    return orbit.charges(binding, orbit.promote(jax.tree.leaves(params)))
