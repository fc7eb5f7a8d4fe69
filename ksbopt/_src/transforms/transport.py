"""Finding an optimizer's per-parameter state so that it can follow an orbit move.

A wrapped optimizer keeps trees shaped like the parameters in its state: first moments (a
momentum buffer, Adam's ``mu``: sums of gradients) and second moments (Adam's ``nu``,
RMSProp's ``nu``, Adagrad's ``sum_of_squares``: sums of squared gradients). When the
parameters move along a symmetry orbit these trees must move with them
(:ref:`state transport <state-transport>`): a first moment transforms like a gradient, a
second moment like its elementwise square.

Which tree is which cannot be read off its values, so it is read off its field name in the
state, with the names optax uses; other names are declared by the caller
(``moments={"my_buffer": "first"}``). A tree is *parameter-shaped* when it has the
parameters' tree structure and leaf shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax

from ksbopt._src import groups as groups_lib

#: State fields that hold sums of gradients in optax's transformations.
FIRST_MOMENTS = ("mu", "trace", "momentum", "acc_grads", "ema")
#: State fields that hold sums of squared gradients in optax's transformations.
SECOND_MOMENTS = ("nu", "sum_of_squares", "nu_max")
KINDS = ("first", "second", "none")


def check_moments(moments: Mapping[str, str] | None, *, owner: str) -> dict[str, str]:
    """The field-name -> kind table: optax's names updated by the caller's ``moments``."""
    table = {n: "first" for n in FIRST_MOMENTS} | {n: "second" for n in SECOND_MOMENTS}
    if moments is None:
        return table
    if not isinstance(moments, Mapping):
        raise TypeError(
            f"{owner}: moments={moments!r} must be a dict field name -> kind, e.g. "
            "{'my_buffer': 'first', 'my_var': 'second', 'other': 'none'}."
        )
    for name, kind in moments.items():
        if not isinstance(name, str) or kind not in KINDS:
            raise ValueError(
                f"{owner}: moments entry {name!r}: {kind!r} is not valid; map a state field "
                f"name (str) to one of {KINDS} ('first' for sums of gradients, 'second' for "
                "sums of squared gradients, 'none' to leave the field as it is)."
            )
    return table | dict(moments)


def _field_name(path: tuple) -> str | None:
    for key in reversed(path):
        name = groups_lib.key_to_str(key)
        if name is not None:
            return name
    return None


def _matcher(params: Any) -> Callable[[Any], bool]:
    treedef = jax.tree.structure(params)
    shapes = [jax.numpy.shape(x) for x in jax.tree.leaves(params)]

    def is_params_like(x: Any) -> bool:
        if jax.tree.structure(x) != treedef:
            return False
        return [jax.numpy.shape(y) for y in jax.tree.leaves(x)] == shapes

    return is_params_like


def parameter_fields(state: Any, params: Any) -> list[tuple[str | None, tuple]]:
    """``(field name, path)`` of every parameter-shaped tree inside ``state``."""
    is_params_like = _matcher(params)
    flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=is_params_like)[0]
    return [(_field_name(p), p) for p, x in flat if is_params_like(x)]


def map_moments(
    state: Any, params: Any, table: Mapping[str, str], fns: Mapping[str, Callable[[Any], Any]]
) -> Any:
    """Apply ``fns[kind]`` to every parameter-shaped tree of ``state`` whose field is of ``kind``.

    Trees whose field name is not in ``table`` (or whose kind has no entry in ``fns``) are
    left unchanged; :func:`unknown_fields` lists them for callers that must refuse them.
    """
    is_params_like = _matcher(params)
    flat, treedef = jax.tree_util.tree_flatten_with_path(state, is_leaf=is_params_like)
    out = []
    for path, x in flat:
        kind = table.get(_field_name(path)) if is_params_like(x) else None
        out.append(fns[kind](x) if kind in fns else x)
    return jax.tree_util.tree_unflatten(treedef, out)


def unknown_fields(state: Any, params: Any, table: Mapping[str, str]) -> list[str]:
    """Paths of parameter-shaped trees in ``state`` whose field name ``table`` does not know."""
    return [
        groups_lib.path_str(path) or "<the whole state>"
        for name, path in parameter_fields(state, params)
        if name not in table
    ]
