"""Resolving selectors against any pytree: path strings, leaf selection, unit axes.

This module is the one place that decides *which numbers form a group*. A symmetry
declaration names leaves by selector and a unit axis; :func:`select` finds the leaves and
:class:`AxisPart` turns "leaf + the axes that index the groups" into the two operations
everything else is built from: a per-group reduction and its adjoint, a per-group broadcast.

Path strings join the key path of a leaf with ``"/"``: dict keys, attribute names and
sequence indices. The ``.value`` attribute of a ``flax.nnx.Variable`` is dropped, so the
same selector works on plain dicts, ``flax.linen`` variables and ``nnx.State`` trees.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

Selector = str | re.Pattern | Callable[[str, Any], bool] | Sequence[Any]


def key_to_str(key: Any) -> str | None:
    """One entry of a JAX key path as a string (``None`` for a Variable's ``.value``)."""
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return None if key.name == "value" else key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_str(path: Sequence[Any]) -> str:
    """The ``"/"``-joined path of a leaf, e.g. ``"params/Dense_0/kernel"``."""
    return "/".join(s for s in map(key_to_str, path) if s is not None)


def leaf_paths(tree: Any) -> list[str]:
    """Path strings of every leaf of ``tree`` in ``jax.tree.leaves`` order."""
    return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _suffixes(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[i:]) for i in range(len(parts))]


def _matches_one(selector: Any, path: str, leaf: Any) -> bool:
    if isinstance(selector, str):
        return any(fnmatch.fnmatchcase(s, selector) for s in _suffixes(path))
    if isinstance(selector, re.Pattern):
        return selector.search(path) is not None
    if callable(selector):
        return bool(selector(path, leaf))
    raise TypeError(
        f"selector={selector!r} has type {type(selector).__name__}; write a glob string such as "
        "'Dense_0/kernel', a compiled regex, a callable (path, leaf) -> bool, or a list of these."
    )


def normalize_selector(selector: Selector) -> tuple[Any, ...]:
    """A hashable tuple of elementary selectors (strings, regexes, callables)."""
    items = tuple(selector) if isinstance(selector, (list, tuple)) else (selector,)
    if not items:
        raise ValueError("selector=[] selects nothing; name at least one leaf path or pattern.")
    for item in items:
        if not isinstance(item, (str, re.Pattern)) and not callable(item):
            raise TypeError(
                f"selector item {item!r} has type {type(item).__name__}; write a glob string such "
                "as 'Dense_0/kernel', a compiled regex, or a callable (path, leaf) -> bool."
            )
    return items


def _is_hidden(x: Any) -> bool:
    """A leaf an ``optax.masked`` / ``optax.transforms.partition`` wrapper hides."""
    return isinstance(x, optax.MaskedNode)


def _show(paths: Sequence[str]) -> str:
    return ", ".join(repr(p) for p in paths[:8]) + (", ..." if len(paths) > 8 else "")


def select(tree: Any, selector: tuple[Any, ...], *, what: str) -> list[int]:
    """Indices (in ``jax.tree.leaves`` order) of the leaves matched by ``selector``.

    Every elementary selector must match at least one leaf; otherwise a ``ValueError`` names
    it, lists a few available paths and says what to write instead. Inside ``optax.masked``
    or ``optax.transforms.partition`` the leaves the wrapper hides (``optax.MaskedNode``) are
    matched too: a selector that matches hidden leaves beside visible ones would silently
    make smaller groups than the declaration says, so it is a ``ValueError`` as well.
    """
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_hidden)[0]
    hidden = [_is_hidden(leaf) for _, leaf in flat]
    paths = [path_str(p) for p, _ in flat]
    index = np.cumsum([not h for h in hidden]) - 1  # position among the visible leaves
    chosen: list[int] = []
    for item in selector:
        hits = [
            i
            for i, (p, (_, leaf)) in enumerate(zip(paths, flat))
            # a callable cannot look at a hidden leaf: it is matched on visible leaves only
            if not (hidden[i] and callable(item)) and _matches_one(item, p, leaf)
        ]
        seen = [i for i in hits if not hidden[i]]
        unseen = [paths[i] for i in hits if hidden[i]]
        if seen and unseen:
            raise ValueError(
                f"{what}={item!r} matches {_show(unseen)}, which an optax.masked or "
                "optax.transforms.partition wrapper hides from this transform, beside "
                f"{_show([paths[i] for i in seen])}: its groups would silently lose those "
                "numbers. Give the whole group to the transform (mask it in or label it alike), "
                "or declare the visible leaves by explicit path."
            )
        if not seen:
            visible = [p for p, h in zip(paths, hidden) if not h]
            note = (
                f" (it matches {_show(unseen)}, which an optax.masked or "
                "optax.transforms.partition wrapper hides from this transform)"
                if unseen
                else ""
            )
            raise ValueError(
                f"{what}={item!r} matches no leaf of the parameter tree{note}. Available paths: "
                f"{_show(visible)}. Write a glob over these '/'-joined paths (a pattern also "
                "matches any path suffix at a '/' boundary, e.g. 'Dense_0/kernel'), a compiled "
                "regex, or a callable."
            )
        chosen.extend(int(index[i]) for i in seen if int(index[i]) not in chosen)
    return sorted(chosen)


def normalize_axis(axis: int, ndim: int, *, what: str, path: str, shape: tuple[int, ...]) -> int:
    """A non-negative axis, or a ``ValueError`` naming the leaf, its shape and the axis."""
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
        raise TypeError(f"{what}={axis!r} must be an int (negative counts from the end) or None.")
    if ndim == 0:
        raise ValueError(
            f"{what}={axis} cannot apply to leaf {path!r} with shape {shape}: a scalar has no "
            "unit axis; write axis=None (the scalar is one group) or leave it out of the selection."
        )
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"{what}={axis} is out of range for leaf {path!r} with shape {shape} (ndim={ndim}); "
            f"write an axis in [{-ndim}, {ndim - 1}], e.g. -1 for the output unit of a Flax kernel."
        )
    return int(axis) % ndim


def explicit_sharding(x: Any, *, own: bool = False) -> jax.sharding.NamedSharding | None:
    """The sharding to give a result computed from ``x``, or ``None`` (no pin needed).

    ``None`` (the layout is left to XLA, as everywhere else) unless ``x`` is typed with a
    sharding over a mesh with Explicit axes (sharding in types, the default of
    ``jax.make_mesh``). Then jax types every result's sharding from its operands and refuses
    what it cannot type: a per-group vector summed out of a leaf sharded along its unit axis
    comes out sharded like that axis and cannot be broadcast onto leaves laid out otherwise
    (a Rescale coefficient from fc1's columns onto fc2's rows) or padded next to another
    leaf's groups (a Translation kernel's rows and its bias), and a contraction over a sharded
    axis (Linear's A^T A) has no sharding of its own. Per-group results are small, so they
    are pinned replicated on ``x``'s mesh (one all-reduce or all-gather of the small result);
    with ``own=True`` the result of a leaf-shaped product (Linear's A G) is pinned to ``x``'s
    own sharding, so that the leaf keeps its layout. The mesh is read from ``x``'s type, not
    from the context mesh: ``jit`` of Explicit-sharded arrays sets no context mesh.
    """
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty or jax.sharding.AxisType.Explicit not in mesh.axis_types:
        return None
    return sharding if own else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def replicated(x: jax.Array) -> jax.Array:
    """``x`` resharded to replicated under Explicit mesh axes, else ``x`` itself (see
    :func:`explicit_sharding`)."""
    sharding = explicit_sharding(x)
    return x if sharding is None else jax.sharding.reshard(x, sharding)


@dataclasses.dataclass(frozen=True)
class AxisPart:
    """One leaf's share of a family of groups, indexed by some of the leaf's axes.

    ``group_axes`` index the groups (their flattened product is the group index); all other
    axes are reduced over. ``offset`` places this leaf's groups inside the symmetry's group
    vector: leaves that share groups (a kernel column and its bias entry) have the same
    offset, leaves with groups of their own (translation rows) are laid end to end.
    """

    leaf: int
    path: str
    shape: tuple[int, ...]
    group_axes: tuple[int, ...]
    offset: int = 0
    block: int = 1  # consecutive units along a single group axis that form one group

    def __post_init__(self):
        if tuple(sorted(self.group_axes)) != tuple(self.group_axes):
            raise ValueError(f"group_axes={self.group_axes} must be increasing.")
        if self.block != 1 and len(self.group_axes) != 1:
            raise ValueError("block > 1 needs exactly one group axis.")

    @property
    def size(self) -> int:
        """Number of groups this leaf contributes to."""
        return math.prod(self.shape[a] for a in self.group_axes) // self.block

    @property
    def reduce_axes(self) -> tuple[int, ...]:
        return tuple(a for a in range(len(self.shape)) if a not in self.group_axes)

    @property
    def count(self) -> int:
        """Number of entries of the leaf in each group."""
        return math.prod(self.shape[a] for a in self.reduce_axes) * self.block

    def reduce(self, x: jax.Array) -> jax.Array:
        """Sum ``x`` (leaf-shaped) over each group: a vector of length :attr:`size`
        (replicated under Explicit mesh axes, see :func:`replicated`)."""
        return replicated(
            jnp.sum(jnp.reshape(jnp.sum(x, axis=self.reduce_axes), (self.size, self.block)), axis=1)
        )

    def broadcast(self, c: jax.Array) -> jax.Array:
        """Per-group values ``c`` (length :attr:`size`) shaped to broadcast against the leaf."""
        shape = [self.shape[a] if a in self.group_axes else 1 for a in range(len(self.shape))]
        return jnp.reshape(jnp.repeat(c, self.block) if self.block > 1 else c, shape)


def scatter_groups(parts: Sequence[AxisPart], values: Sequence[jax.Array], n: int) -> jax.Array:
    """Add each part's per-group vector into a length-``n`` vector at the part's offset."""
    total = None
    for part, v in zip(parts, values):
        if part.offset == 0 and part.size == n:
            total = v if total is None else total + v
        else:
            padded = jnp.pad(v, (part.offset, n - part.offset - part.size))
            total = padded if total is None else total + padded
    return total
