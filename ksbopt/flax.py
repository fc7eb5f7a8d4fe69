"""Helpers for Flax models (optional dependency: ``pip install flax``).

**Path conventions.** ksbopt selects leaves by the ``"/"``-joined key path of the parameter
tree it is given (:func:`param_paths` lists them):

- ``flax.nnx``: the tree is ``nnx.state(model, nnx.Param)`` (what
  ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` hands to ``tx.update``); paths are attribute
  names and list indices, e.g. ``"conv1/kernel"``, ``"blocks/0/attn/query/kernel"``. The
  ``.value`` of a Variable does not appear in the path.
- ``flax.linen``: the tree is ``variables["params"]`` (what a ``TrainState`` holds); paths are
  the auto-generated or given module names, e.g. ``"Conv_0/kernel"``,
  ``"MultiHeadDotProductAttention_0/query/kernel"``. Batch statistics live in
  ``variables["batch_stats"]`` and are not parameters.

A selector also matches every path suffix at a ``"/"`` boundary, so ``"Dense_0/kernel"``
selects ``"params/Dense_0/kernel"`` too. Kernels use the Flax layout: a Dense kernel is
``(in, out)``, a Conv kernel ``(..., in, out)``: the output unit is the **last** axis.

**Detection.** :func:`ksbopt.detect` wants ``loss_fn(params, batch)``. For a model whose
state lives in the object (NNX) or in a variables dict with mutable collections (Linen),
:func:`nnx_loss` and :func:`linen_loss` build that function: BatchNorm layers run in training
mode on the batch statistics, and their running averages are updated on a throw-away copy.

**Training with nnx.Optimizer** (``wrt=nnx.Param`` makes it pass the parameters to the
transform, which ksbopt's transforms need)::

    loss_fn, params = ksbopt.flax.nnx_loss(model, lambda m, b: ce(m(b[0]), b[1]))
    syms, report = ksbopt.detect(loss_fn, params, batch)
    tx = optax.chain(optax.sgd(0.1, momentum=0.9), ksbopt.retract(syms))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    grads = nnx.grad(lambda m: ce(m(x), y))(model)
    optimizer.update(model, grads)

**Training with a Linen TrainState** (``apply_gradients`` passes ``params`` to ``tx.update``;
keep ``batch_stats`` beside it)::

    loss_fn, params = ksbopt.flax.linen_loss(model.apply, variables, ce_of_logits,
                                             train=True)
    syms, report = ksbopt.detect(loss_fn, params, batch)
    state = TrainState.create(apply_fn=model.apply, params=params,
                              tx=optax.chain(optax.sgd(0.1), ksbopt.retract(syms)))
    state = state.apply_gradients(grads=grads)

References:
  Kunin et al., "Neural Mechanics: Symmetry and Broken Conservation Laws in Deep Learning
  Dynamics", ICLR 2021, https://arxiv.org/abs/2012.04728
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ksbopt._src import groups as groups_lib

try:  # optional dependency
    from flax import nnx
except ImportError:  # pragma: no cover - exercised only without flax
    nnx = None

__all__ = ["linen_loss", "nnx_loss", "param_paths"]


def _require_flax(name: str) -> None:
    if nnx is None:  # pragma: no cover
        raise ImportError(f"ksbopt.flax.{name} needs flax: pip install flax")


def param_paths(tree: Any) -> list[str]:
    """The ``"/"``-joined path of every leaf, as ksbopt selectors see them.

    Args:
      tree: a parameter tree: a dict, ``variables["params"]`` of a Linen model or
        ``nnx.state(model, nnx.Param)``.

    Returns:
      The paths in ``jax.tree.leaves`` order.

    Example:
      >>> from flax import nnx
      >>> import ksbopt.flax
      >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> ksbopt.flax.param_paths(nnx.state(model, nnx.Param))
      ['bias', 'kernel']

    References:
      None: it lists the path strings that selectors match; no paper is involved.
    """
    return groups_lib.leaf_paths(tree)


def nnx_loss(
    model: Any,
    loss: Callable[..., Any],
    *,
    wrt: Any = None,
) -> tuple[Callable[[Any, Any], Any], Any]:
    """A ``loss_fn(params, batch)`` for a ``flax.nnx`` model, and its parameters.

    The model is split once into its graph definition, the parameters selected by ``wrt``
    and the rest (batch statistics, RNG counters, ...). Each call merges a fresh model from
    the given parameters and a copy of the rest, so BatchNorm in training mode normalises
    with the batch statistics and updates its running averages on the copy only (the model
    passed in is never modified).

    Args:
      model: an ``nnx.Module`` (in the mode you want analysed: ``model.train()`` for
        BatchNorm batch statistics).
      loss: ``loss(model, batch) -> scalar``, e.g.
        ``lambda m, b: optax.softmax_cross_entropy_with_integer_labels(m(b[0]), b[1]).mean()``.
      wrt: the filter of the differentiable state (default ``nnx.Param``), as in
        ``nnx.Optimizer(model, tx, wrt=nnx.Param)``.

    Returns:
      ``(loss_fn, params)``: ``loss_fn(params, batch)`` and ``params`` as
      ``nnx.Optimizer`` passes them to ``tx.update`` (paths such as ``"conv1/kernel"``).

    Example:
      >>> import jax.numpy as jnp, ksbopt
      >>> from flax import nnx
      >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.relu,
      ...                        nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
      >>> loss_fn, params = ksbopt.flax.nnx_loss(model, lambda m, x: jnp.mean(m(x) ** 2))
      >>> syms, report = ksbopt.detect(loss_fn, params, jnp.linspace(-1, 1, 24).reshape(8, 3))
      >>> [type(s).__name__ for s in syms]
      ['Rescale']

    References:
      Kunin et al., "Neural Mechanics: Symmetry and Broken Conservation Laws in Deep
      Learning Dynamics", ICLR 2021, https://arxiv.org/abs/2012.04728 (the symmetries that
      :func:`ksbopt.detect` looks for in the loss built here)
    """
    _require_flax("nnx_loss")
    if not isinstance(model, nnx.Module):
        raise TypeError(
            f"model={type(model).__name__} must be a flax.nnx.Module; for a Linen "
            "model use ksbopt.flax.linen_loss(model.apply, variables, loss)."
        )
    if not callable(loss):
        raise TypeError(f"loss={loss!r} must be a callable loss(model, batch) -> scalar.")
    wrt = nnx.Param if wrt is None else wrt
    graphdef, params, rest = nnx.split(model, wrt, ...)
    params = nnx.as_pure(params)
    # Held as jax arrays: BatchNorm writes its running averages into them under tracing.
    rest = jax.tree.map(jnp.asarray, nnx.as_pure(rest))

    def loss_fn(params: Any, batch: Any) -> Any:
        return loss(nnx.merge(graphdef, params, rest), batch)

    return loss_fn, params


def linen_loss(
    apply_fn: Callable[..., Any],
    variables: Any,
    loss: Callable[..., Any],
    *,
    mutable: Sequence[str] | bool = ("batch_stats",),
    **apply_kwargs: Any,
) -> tuple[Callable[[Any, Any], Any], Any]:
    """A ``loss_fn(params, batch)`` for a ``flax.linen`` model, and its parameters.

    ``variables["params"]`` are the differentiable leaves; every other collection (e.g.
    ``batch_stats``) is held fixed. The model is applied with ``mutable`` collections (so
    BatchNorm with ``use_running_average=False`` normalises with batch statistics) and the
    updated collections are discarded.

    Args:
      apply_fn: the model's ``apply`` (e.g. ``model.apply``).
      variables: the variables from ``model.init`` (``{"params": ..., "batch_stats": ...}``).
      loss: ``loss(model_fn, batch) -> scalar`` where ``model_fn(*args, **kwargs)`` applies
        the model and returns its output, e.g.
        ``lambda f, b: optax.softmax_cross_entropy_with_integer_labels(f(b[0]), b[1]).mean()``.
      mutable: collections the model may update (default ``("batch_stats",)``; only those
        present in ``variables`` are passed; ``False`` for none).
      **apply_kwargs: keyword arguments for every call, e.g. ``train=True``.

    Returns:
      ``(loss_fn, params)`` with ``params = variables["params"]``.

    Example:
      >>> import jax, jax.numpy as jnp, ksbopt
      >>> from flax import linen as nn
      >>> model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
      >>> x = jnp.linspace(-1, 1, 24).reshape(8, 3)
      >>> variables = model.init(jax.random.key(0), x)
      >>> loss_fn, params = ksbopt.flax.linen_loss(model.apply, variables,
      ...                                          lambda f, x: jnp.mean(f(x) ** 2))
      >>> syms, report = ksbopt.detect(loss_fn, params, x)
      >>> syms[0].incoming, syms[0].outgoing
      (('layers_0/bias', 'layers_0/kernel'), ('layers_2/kernel',))

    References:
      Kunin et al., "Neural Mechanics: Symmetry and Broken Conservation Laws in Deep
      Learning Dynamics", ICLR 2021, https://arxiv.org/abs/2012.04728 (the symmetries that
      :func:`ksbopt.detect` looks for in the loss built here)
    """
    _require_flax("linen_loss")
    if not callable(apply_fn):
        raise TypeError(
            f"apply_fn={apply_fn!r} must be the model's apply function, e.g. model.apply."
        )
    if not isinstance(variables, dict) and not hasattr(variables, "keys"):
        raise TypeError(
            f"variables must be the dict returned by model.init; got {type(variables).__name__}."
        )
    if "params" not in variables:
        raise ValueError(
            f"variables has no 'params' collection (it has {list(variables)}); "
            "pass the dict returned by model.init."
        )
    if not callable(loss):
        raise TypeError(f"loss={loss!r} must be a callable loss(model_fn, batch) -> scalar.")
    others = {k: v for k, v in variables.items() if k != "params"}
    if mutable is False:
        cols: list[str] = []
    elif mutable is True:
        cols = list(others)
    else:
        cols = [c for c in mutable if c in others]

    def loss_fn(params: Any, batch: Any) -> Any:
        def model_fn(*args: Any, **kwargs: Any) -> Any:
            kw = {**apply_kwargs, **kwargs}
            if cols:
                out, _ = apply_fn({"params": params, **others}, *args, mutable=cols, **kw)
                return out
            return apply_fn({"params": params, **others}, *args, **kw)

        return loss(model_fn, batch)

    return loss_fn, variables["params"]
