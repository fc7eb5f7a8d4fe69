"""Families of JAX primitives that the graph analysis treats alike.

One place names them: the layout changes, the maps that break both actions (with the name a
finding's reason gives them), comparisons, reductions, cumulative scans and pooling windows.
"""

from __future__ import annotations

# Change only where the entries sit (or their dtype), never their values.
LAYOUT = frozenset(
    {
        "reshape",
        "transpose",
        "broadcast_in_dim",
        "squeeze",
        "convert_element_type",
        "copy",
        "copy_p",
        "reduce_precision",
        "stop_gradient",
    }
)
# Pass the values through unchanged (their labels too).
IDENTITY_LAYOUT = frozenset(
    {"convert_element_type", "copy", "copy_p", "reduce_precision", "stop_gradient"}
)

# Neither positively homogeneous nor shift-equivariant: primitive -> the name a reason uses.
BREAKING = {
    "exp": "exp",
    "exp2": "exp",
    "log": "log",
    "log1p": "log1p",
    "expm1": "expm1",
    "tanh": "tanh",
    "logistic": "sigmoid",
    "erf": "erf (GELU)",
    "erfc": "erfc",
    "erf_inv": "erf_inv",
    "sin": "sin",
    "cos": "cos",
    "tan": "tan",
    "atan": "atan",
    "asin": "asin",
    "acos": "acos",
    "sinh": "sinh",
    "cosh": "cosh",
    "asinh": "asinh",
    "acosh": "acosh",
    "atanh": "atanh",
    "lgamma": "lgamma",
    "digamma": "digamma",
    "floor": "floor",
    "ceil": "ceil",
    "round": "round",
    "atan2": "atan2",
    "rem": "rem",
    "logaddexp": "logaddexp",
    "reduce_prod": "reduce_prod",
    "cumprod": "cumprod",
    "clamp": "clamp",
    "nextafter": "nextafter",
    "integer_pow_neg": "pow",
}


def display_name(prim: str) -> str:
    """The name a reason gives ``prim`` (``logistic`` is a sigmoid, ``erf`` a GELU...)."""
    return BREAKING.get(prim, prim)


COMPARE = frozenset({"gt", "ge", "lt", "le", "eq", "ne"})
REDUCE = frozenset({"reduce_sum", "reduce_max", "reduce_min", "argmax", "argmin"})
CUMULATIVE = frozenset({"cumsum", "cummax", "cummin", "cumlogsumexp"})
POOL = frozenset({"reduce_window_sum", "reduce_window_max", "reduce_window_min"})
ADD = frozenset({"add", "sub", "add_any"})
# Polynomial (or linear) maps: a polynomial of a shift may still cancel (a variance).
POLYNOMIAL = frozenset(
    {
        "add",
        "sub",
        "add_any",
        "neg",
        "reduce_sum",
        "mul",
        "div",
        "dot_general",
        "square",
        "integer_pow",
        "copy",
        "copy_p",
        "conv_general_dilated",
    }
)
