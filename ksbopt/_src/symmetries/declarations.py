"""The symmetry declarations: Scale, Rescale, Translation, Linear.

A declaration (the public classes) is a hashable description: which leaves, which axes.
:meth:`Symmetry.bind` resolves it against a parameter tree into a bound symmetry
(:class:`~ksbopt._src.symmetries.bound.BoundSymmetry`), which knows the groups and
implements the mathematics of :doc:`/concepts/symmetries` for every group at once.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import jax
import numpy as np

from ksbopt._src import groups as groups_lib
from ksbopt._src.groups import AxisPart

# Re-exported for modules that still import them from here.
from ksbopt._src.numerics import safe_div as _safe_div  # noqa: F401
from ksbopt._src.symmetries.axis_groups import BoundRescale, BoundScale, BoundTranslation
from ksbopt._src.symmetries.bound import BoundSymmetry, Flat, Moved
from ksbopt._src.symmetries.linear_groups import BoundLinear, LinearPart


class Symmetry(abc.ABC):
    r"""Base class of the symmetry declarations.

    A declaration names a group action :math:`\psi(\theta, a)` on some leaves with
    :math:`L(\psi(\theta, a)) = L(\theta)`; its generator is
    :math:`\xi = \partial_a \psi |_{a = e}` and its Noether charge is the quantity a
    learning rule's kinetic energy conserves or breaks (:ref:`symmetry-generator-charge`). The
    concrete declarations are :class:`Scale`, :class:`Rescale`, :class:`Translation` and
    :class:`Linear`; every ksbopt function that takes ``symmetries`` accepts any of them or
    a list.

    Example:
      >>> import ksbopt
      >>> isinstance(ksbopt.Scale("conv/kernel"), ksbopt.Symmetry)
      True

    References:
      Kunin et al., "Neural Mechanics: Symmetry and Broken Conservation Laws in Deep
      Learning Dynamics", ICLR 2021, https://arxiv.org/abs/2012.04728
    """

    kind: str = ""

    @abc.abstractmethod
    def bind(self, params: Any) -> BoundSymmetry:
        """Resolve the declaration against ``params``; ``ValueError`` if it does not fit."""


def _leaves_with_paths(params: Any) -> tuple[list[str], list[Any]]:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return [groups_lib.path_str(p) for p, _ in flat], [leaf for _, leaf in flat]


def _shape(leaf: Any, path: str) -> tuple[int, ...]:
    shape = getattr(leaf, "shape", None)
    if shape is None:
        raise TypeError(
            f"leaf {path!r} of type {type(leaf).__name__} has no shape; symmetries act on array "
            "leaves (pass the parameter tree, e.g. nnx.state(model, nnx.Param))."
        )
    return tuple(shape)


def _unit_parts(
    params: Any,
    selection: tuple,
    axis: int | None,
    *,
    what: str,
    sign: int = 1,
    groups: int | None = None,
) -> tuple[list[AxisPart], list[int]]:
    """Parts of a per-unit declaration (Scale, one side of Rescale): shared groups."""
    paths, leaves = _leaves_with_paths(params)
    idx = groups_lib.select(params, selection, what=what)
    parts = []
    for i in idx:
        shape = _shape(leaves[i], paths[i])
        axes = (
            ()
            if axis is None
            else (
                groups_lib.normalize_axis(
                    axis, len(shape), what=f"{what} axis", path=paths[i], shape=shape
                ),
            )
        )
        block = 1
        if groups is not None:
            n = shape[axes[0]]
            if n % groups or n < groups:
                raise ValueError(
                    f"{groups=} does not divide the {n} units of {paths[i]!r} (shape {shape}) "
                    "into equal contiguous groups; give the normalisation's number of groups "
                    "(e.g. GroupNorm(num_groups=...))."
                )
            block = n // groups
        parts.append(AxisPart(i, paths[i], shape, axes, block=block))
    return parts, [sign] * len(parts)


def _check_units(parts: list[AxisPart], *, what: str) -> None:
    sizes = {p.path: (p.shape, p.size) for p in parts}
    if len({s for _, s in sizes.values()}) > 1:
        listing = "; ".join(
            f"{path!r} shape {shape} -> {n} units" for path, (shape, n) in sizes.items()
        )
        raise ValueError(
            f"{what}: the selected leaves disagree on the number of units along the unit axis "
            f"({listing}). Every leaf of one declaration must have the same number of units; "
            "select a kernel together with its own bias only, or set the axis per declaration."
        )


def _check_disjoint(a: list, b: list, *, what: str) -> None:
    both = sorted({p.path for p in a} & {p.path for p in b})
    if both:
        raise ValueError(
            f"{what}: leaves {both} are selected on both sides; each leaf belongs to one side only."
        )


@dataclasses.dataclass(frozen=True, init=False)
class Scale(Symmetry):
    r"""Scale symmetry w -> a w (a > 0) of a group of weights, as from a normalisation layer.

    A linear map followed by BatchNorm, LayerNorm, RMSNorm, GroupNorm or weight
    normalisation computes the same loss after its weights are multiplied by any a > 0.

    .. math::

        \psi(w, a) = a w, \qquad \xi(w) = w, \qquad Q(w) = \tfrac12 \lVert w \rVert^2 .

    Every minibatch gradient is orthogonal to the generator, <g, w> = 0 [paper: NM]; with
    plain SGD the squared norm only grows,
    :math:`x_{k+1} = x_k + \eta^2 \lVert g_k \rVert^2` ([derived] :ref:`P1 <p1>`).

    Args:
      selection: which leaves form the groups: a glob over the "/"-joined key path (also
        matched against every suffix at a "/" boundary), a compiled regex, a callable
        ``(path, leaf) -> bool``, or a list of these.
      axis: the unit axis. With the Flax layout the output unit is the LAST axis
        (``axis=-1``: BatchNorm, one group per output unit made of ``kernel[..., j]`` and
        ``bias[j]``). ``axis=None``: the whole selection is one group (LayerNorm / RMSNorm
        over the features of a Dense layer).
      groups: split the units along ``axis`` into this many contiguous groups of equal
        size (GroupNorm with ``num_groups=groups``); default ``None``, one group per unit.

    Example:
      >>> import jax.numpy as jnp, ksbopt
      >>> params = {"conv": {"kernel": jnp.ones((3, 2, 4)), "bias": jnp.zeros(4)}}
      >>> ksbopt.charges(params, [ksbopt.Scale("conv/*", axis=-1)])[0]
      Array([3., 3., 3., 3.], dtype=float32)

    References:
      Kunin et al., "Neural Mechanics: Symmetry and Broken Conservation Laws in Deep
      Learning Dynamics", ICLR 2021, https://arxiv.org/abs/2012.04728
    """

    selection: tuple
    axis: int | None
    groups: int | None

    kind = "scale"

    def __init__(self, selection, axis: int | None = -1, groups: int | None = None):
        object.__setattr__(self, "selection", groups_lib.normalize_selector(selection))
        object.__setattr__(self, "axis", _check_axis_arg(axis, "axis"))
        if groups is not None:
            if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
                raise ValueError(
                    f"{groups=} must be a positive int (the number of channel "
                    "groups, as GroupNorm's num_groups) or None."
                )
            if axis is None:
                raise ValueError(
                    f"{groups=} needs a unit axis to split; got axis=None. Write "
                    "axis=-1 (the output unit of a Flax kernel)."
                )
            groups = int(groups)
        object.__setattr__(self, "groups", groups)

    def bind(self, params: Any) -> BoundSymmetry:
        parts, signs = _unit_parts(
            params, self.selection, self.axis, what="Scale selection", groups=self.groups
        )
        _check_units(parts, what=f"Scale({self.selection!r}, axis={self.axis})")
        return BoundScale(self, tuple(parts), tuple(signs))


@dataclasses.dataclass(frozen=True, init=False)
class Rescale(Symmetry):
    r"""Rescale symmetry of a positively homogeneous unit between two layers.

    For a ReLU (leaky ReLU, identity) unit j between layers A and B, scaling its incoming
    weights by a > 0 and its outgoing weights by 1/a leaves the network unchanged:

    .. math::

        \psi = (a\, w_{in}, w_{out} / a), \quad \xi = (w_{in}, -w_{out}), \quad
        Q = \tfrac12 (\lVert w_{in} \rVert^2 - \lVert w_{out} \rVert^2).

    Rescale is the diagonal case of :class:`Linear`. GELU, SiLU, tanh and sigmoid break it,
    and so does a residual connection around the unit.

    Args:
      incoming: leaves holding the incoming weights, e.g. ``["Dense_0/kernel",
        "Dense_0/bias"]``; unit j is ``kernel[..., j]`` and ``bias[j]``.
      outgoing: leaves holding the outgoing weights, e.g. ``"Dense_1/kernel"``; unit j is
        ``kernel[..., j, :]`` (axis -2, also for a Conv kernel).
      incoming_axis: unit axis of the incoming leaves (default -1).
      outgoing_axis: unit axis of the outgoing leaves (default -2).

    Example:
      >>> import jax.numpy as jnp, ksbopt
      >>> params = {"Dense_0": {"kernel": 2 * jnp.ones((3, 2))},
      ...           "Dense_1": {"kernel": jnp.ones((2, 5))}}
      >>> sym = ksbopt.Rescale(incoming="Dense_0/kernel", outgoing="Dense_1/kernel")
      >>> ksbopt.charges(params, [sym])[0]
      Array([3.5, 3.5], dtype=float32)

    References:
      Kunin et al., "Neural Mechanics: Symmetry and Broken Conservation Laws in Deep
      Learning Dynamics", ICLR 2021, https://arxiv.org/abs/2012.04728
    """

    incoming: tuple
    outgoing: tuple
    incoming_axis: int
    outgoing_axis: int

    kind = "rescale"

    def __init__(self, incoming, outgoing, *, incoming_axis: int = -1, outgoing_axis: int = -2):
        object.__setattr__(self, "incoming", groups_lib.normalize_selector(incoming))
        object.__setattr__(self, "outgoing", groups_lib.normalize_selector(outgoing))
        for name, value in (("incoming_axis", incoming_axis), ("outgoing_axis", outgoing_axis)):
            if value is None:
                raise TypeError(
                    f"{name}=None is not allowed for Rescale; the unit axis must be "
                    "an int (default incoming_axis=-1, outgoing_axis=-2)."
                )
            object.__setattr__(self, name, _check_axis_arg(value, name))

    def bind(self, params: Any) -> BoundSymmetry:
        p_in, s_in = _unit_parts(params, self.incoming, self.incoming_axis, what="Rescale incoming")
        p_out, s_out = _unit_parts(
            params, self.outgoing, self.outgoing_axis, what="Rescale outgoing", sign=-1
        )
        what = f"Rescale(incoming={self.incoming!r}, outgoing={self.outgoing!r})"
        _check_disjoint(p_in, p_out, what=what)
        _check_units(p_in + p_out, what=what)
        return BoundRescale(self, tuple(p_in + p_out), tuple(s_in + s_out))


@dataclasses.dataclass(frozen=True, init=False)
class Translation(Symmetry):
    r"""Translation symmetry w -> w + a 1 of the logits' weights under softmax.

    Softmax cross-entropy is unchanged when every logit is shifted by the same amount, so
    each row ``kernel[i, :]`` of a classifier head (class axis last) and its bias form
    groups that can be shifted along the class axis:

    .. math::

        \psi(w, a) = w + a\,\mathbf 1, \qquad \xi = \mathbf 1, \qquad
        Q(w) = \langle \mathbf 1, w \rangle .

    SGD and heavy ball conserve Q exactly without weight decay; RMSProp and Adam do not
    (:ref:`P4 <p4>`, :ref:`P6 <p6>`).

    Args:
      selection: the head's leaves, e.g. ``["head/kernel", "head/bias"]``.
      axis: the class axis (default -1). Every position along the other axes is one group:
        a (h, C) kernel gives h groups and a (C,) bias one.

    Example:
      >>> import jax.numpy as jnp, ksbopt
      >>> params = {"head": {"kernel": jnp.arange(6.0).reshape(2, 3), "bias": jnp.ones(3)}}
      >>> ksbopt.charges(params, [ksbopt.Translation("head/*")])[0]
      Array([ 3.,  3., 12.], dtype=float32)

    References:
      Kunin et al., "Neural Mechanics: Symmetry and Broken Conservation Laws in Deep
      Learning Dynamics", ICLR 2021, https://arxiv.org/abs/2012.04728
    """

    selection: tuple
    axis: int

    kind = "translation"

    def __init__(self, selection, axis: int = -1):
        object.__setattr__(self, "selection", groups_lib.normalize_selector(selection))
        if axis is None:
            raise TypeError(
                "axis=None is not allowed for Translation; give the class axis (default -1)."
            )
        object.__setattr__(self, "axis", _check_axis_arg(axis, "axis"))

    def bind(self, params: Any) -> BoundSymmetry:
        paths, leaves = _leaves_with_paths(params)
        parts, offset = [], 0
        for i in groups_lib.select(params, self.selection, what="Translation selection"):
            shape = _shape(leaves[i], paths[i])
            ax = groups_lib.normalize_axis(
                self.axis, len(shape), what="Translation axis", path=paths[i], shape=shape
            )
            part = AxisPart(
                i, paths[i], shape, tuple(a for a in range(len(shape)) if a != ax), offset
            )
            parts.append(part)
            offset += part.size
        return BoundTranslation(self, tuple(parts), (1,) * len(parts))


@dataclasses.dataclass(frozen=True, init=False)
class Linear(Symmetry):
    r"""Linear (GL(k)) symmetry of two stacked linear maps x A B, optionally per head.

    .. math::

        \psi(A, B; G) = (A G, G^{-1} B), \quad \xi_X = (A X, -X B)\ (X \in gl(k)), \quad
        C = A^\top A - B B^\top \ (k \times k).

    Under gradient flow C is conserved; SGD with weight decay moves it by
    C_{k+1} = (1 - eta lam)^2 C_k + eta^2 (G_A^T G_A - G_B G_B^T) (:ref:`P10 <p10>`).

    ``left`` leaves transform as A -> A G along ``left_axis`` (their other axes are summed
    in A^T A), ``right`` leaves as B -> G^{-1} B along ``right_axis``. With a head axis, each
    head has its own G. Biases of the left map belong to ``left`` (x A + b -> (x A + b) G).

    Args:
      left: leaves of A (and its bias), e.g. ``["Dense_0/kernel", "Dense_0/bias"]``.
      right: leaves of B, e.g. ``"Dense_1/kernel"``.
      left_axis: the shared k axis in the left leaves (default -1, a Flax output unit).
      right_axis: the shared k axis in the right leaves (default -2, a Flax input axis).
      left_head_axis: the head axis of the left leaves (default None: one group).
      right_head_axis: the head axis of the right leaves (default None: one group).
      max_iter: Newton steps allowed when moving to a target charge.

    Use :meth:`query_key` and :meth:`value_output` for Flax ``MultiHeadAttention`` kernels.

    Example:
      >>> import jax.numpy as jnp, ksbopt
      >>> params = {"A": {"kernel": jnp.eye(3, 2)}, "B": {"kernel": jnp.ones((2, 4))}}
      >>> ksbopt.charges(params, [ksbopt.Linear(left="A/kernel", right="B/kernel")])[0]
      Array([[[-3., -4.],
              [-4., -3.]]], dtype=float32)

    References:
      Tanaka, Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
      Networks", NeurIPS 2021, https://arxiv.org/abs/2105.02716
    """

    left: tuple
    right: tuple
    left_axis: int
    right_axis: int
    left_head_axis: int | None
    right_head_axis: int | None
    max_iter: int

    kind = "linear"

    def __init__(
        self,
        left,
        right,
        *,
        left_axis: int = -1,
        right_axis: int = -2,
        left_head_axis: int | None = None,
        right_head_axis: int | None = None,
        max_iter: int = 32,
    ):
        object.__setattr__(self, "left", groups_lib.normalize_selector(left))
        object.__setattr__(self, "right", groups_lib.normalize_selector(right))
        for name, value in (("left_axis", left_axis), ("right_axis", right_axis)):
            if value is None:
                raise TypeError(f"{name}=None is not allowed; give the shared k axis as an int.")
            object.__setattr__(self, name, _check_axis_arg(value, name))
        object.__setattr__(
            self, "left_head_axis", _check_axis_arg(left_head_axis, "left_head_axis")
        )
        object.__setattr__(
            self, "right_head_axis", _check_axis_arg(right_head_axis, "right_head_axis")
        )
        if not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"{max_iter=} must be a positive int (Newton steps), e.g. 32.")
        object.__setattr__(self, "max_iter", max_iter)

    @classmethod
    def query_key(cls, query, key, **kwargs) -> Linear:
        """Per-head GL(head_dim) of Flax attention: W_q -> W_q G, W_k -> W_k G^-T.

        Flax ``MultiHeadAttention`` query/key kernels are (embed, heads, head_dim) and their
        biases (heads, head_dim); the scores q k^T are unchanged. Without QK-normalisation
        this is an exact symmetry of the attention logits.
        """
        return cls(
            query, key, left_axis=-1, right_axis=-1, left_head_axis=-2, right_head_axis=-2, **kwargs
        )

    @classmethod
    def value_output(cls, value, output, **kwargs) -> Linear:
        """Per-head GL(head_dim) of Flax attention: W_v -> W_v G, W_o -> G^-1 W_o.

        Value kernel (embed, heads, head_dim) and bias (heads, head_dim); output kernel
        (heads, head_dim, embed).
        """
        return cls(
            value,
            output,
            left_axis=-1,
            right_axis=-2,
            left_head_axis=-2,
            right_head_axis=-3,
            **kwargs,
        )

    def bind(self, params: Any) -> BoundSymmetry:
        paths, leaves = _leaves_with_paths(params)
        parts = []
        for side, sel, axis, head in (
            ("left", self.left, self.left_axis, self.left_head_axis),
            ("right", self.right, self.right_axis, self.right_head_axis),
        ):
            for i in groups_lib.select(params, sel, what=f"Linear {side}"):
                shape = _shape(leaves[i], paths[i])
                k_ax = groups_lib.normalize_axis(
                    axis, len(shape), what=f"{side}_axis", path=paths[i], shape=shape
                )
                h_ax = (
                    None
                    if head is None
                    else groups_lib.normalize_axis(
                        head, len(shape), what=f"{side}_head_axis", path=paths[i], shape=shape
                    )
                )
                if h_ax == k_ax:
                    raise ValueError(
                        f"{side}_head_axis={head} and {side}_axis={axis} name the "
                        f"same axis of {paths[i]!r} with shape {shape}."
                    )
                parts.append(LinearPart(i, paths[i], shape, k_ax, h_ax, side == "left"))
        what = f"Linear(left={self.left!r}, right={self.right!r})"
        _check_disjoint([p for p in parts if p.left], [p for p in parts if not p.left], what=what)
        ks = {p.path: p.shape[p.k_axis] for p in parts}
        if len(set(ks.values())) > 1:
            raise ValueError(
                f"{what}: the shared dimension k differs between leaves ({ks}); "
                "the left map's output size must equal the right map's input size. "
                "Check left_axis / right_axis."
            )
        hs = {p.path: 1 if p.head_axis is None else p.shape[p.head_axis] for p in parts}
        if len(set(hs.values())) > 1:
            raise ValueError(
                f"{what}: the number of heads differs between leaves ({hs}); set "
                "left_head_axis / right_head_axis to the heads axis of every leaf."
            )
        return BoundLinear(
            self, tuple(parts), next(iter(hs.values())), next(iter(ks.values())), self.max_iter
        )


def _check_axis_arg(value, name):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}={value!r} must be an int (negative counts from the end).")
    return int(value)


def apply_moved(flat: Flat, moved: Moved, sign: float = 1.0, add: bool = True) -> Flat:
    """``flat`` with the leaves of ``moved`` added (``add``, times ``sign``) or replaced."""
    out = list(flat)
    for i, v in moved.items():
        out[i] = out[i] + sign * v if add else v
    return out
