"""Path-SGD: steepest descent with respect to the path regulariser of a ReLU network.

Neyshabur, Salakhutdinov and Srebro (NeurIPS 2015) precondition each weight's gradient by
the sum, over all input-output paths through that weight, of the product of the other
squared weights on the path. The update is invariant to the node-wise rescaling symmetry of
ReLU networks (the "rescale" symmetry, :ref:`symmetry-generator-charge`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ksbopt._src import checks
from ksbopt._src.numerics import compute_dtype, safe_div
from ksbopt._src.peers._common import check_range

__all__ = ["ScaleByPathNormState", "path_preconditioner", "path_sgd", "scale_by_path_norm"]

PathNormFn = Callable[[Any], jax.Array]


def _check_fn(owner: str, path_norm_fn: Any) -> None:
    if not callable(path_norm_fn):
        raise TypeError(
            f"{owner}: path_norm_fn={path_norm_fn!r} is not callable; pass a function of the "
            "squared-parameter tree that returns the scalar squared path norm, e.g. "
            "lambda sq: jnp.sum(apply(sq, jnp.ones(input_shape)))."
        )


def path_preconditioner(path_norm_fn: PathNormFn, params: Any) -> Any:
    """The per-weight Path-SGD preconditioner ``kappa``, from one gradient.

    Math [paper: Neyshabur et al. 2015, Sec. 4]: with ``pi(s) = sum over input-output paths
    of the product of s_e on the path`` (the squared l2 path norm when ``s = w**2``),
    ``kappa_e(w) = sum over paths through e of prod_{e' != e} w_{e'}^2
    = d pi / d s_e`` at ``s = w**2``, which equals ``gamma_in(u) * gamma_out(v)`` for an
    edge ``u -> v`` (the paper's forward/backward recursions). For a ReLU network,
    ``pi(s)`` is the sum of the outputs of the same network with its ReLUs replaced by the
    identity, run with weights ``s`` on an all-ones input. Keep the ReLUs out: on the
    non-negative squared network they agree with the identity in value, but their
    derivative at a zero pre-activation is 0, which would cut every path through a zero
    unit and give ``kappa = 0`` on its incoming weights. Biases, when the network applies
    them, count as edges from a constant unit.

    Args:
      path_norm_fn: ``pi``: maps a tree shaped like ``params`` (holding squared weights) to
        a scalar.
      params: the current weights.

    Returns:
      A tree like ``params`` holding ``kappa`` (computed in at least float32).

    Example:
      >>> import jax.numpy as jnp
      >>> from ksbopt.peers import path_preconditioner
      >>> # two-layer linear net x -> x @ A -> (.) @ B, input dim 2, hidden 2, output 1
      >>> pi = lambda s: jnp.sum(jnp.ones((1, 2)) @ s["A"] @ s["B"])
      >>> params = {"A": jnp.array([[1.0, 2.0], [3.0, 0.0]]), "B": jnp.array([[1.0], [2.0]])}
      >>> kappa = path_preconditioner(pi, params)
      >>> kappa["A"].tolist(), kappa["B"].tolist()
      ([[1.0, 4.0], [1.0, 4.0]], [[10.0], [4.0]])

    References:
      B. Neyshabur, R. Salakhutdinov, N. Srebro, "Path-SGD: Path-Normalized Optimization in
      Deep Neural Networks", NeurIPS 2015, https://arxiv.org/abs/1506.02617
    """
    owner = "path_preconditioner"
    _check_fn(owner, path_norm_fn)
    squared = jax.tree.map(lambda w: jnp.square(w.astype(compute_dtype(w))), params)
    out = jax.eval_shape(path_norm_fn, squared)
    if not (hasattr(out, "shape") and out.shape == ()):
        raise ValueError(
            f"{owner}: path_norm_fn must return a scalar, got {out!r}; sum the network's "
            "outputs, e.g. jnp.sum(apply(sq, ones))."
        )
    return jax.grad(path_norm_fn)(squared)


class ScaleByPathNormState(NamedTuple):
    """The (empty) state of :func:`scale_by_path_norm`: ``kappa`` is recomputed each step.

    Example:
      >>> import jax.numpy as jnp, ksbopt
      >>> tx = ksbopt.peers.scale_by_path_norm(lambda sq: jnp.sum(sq["w"]))
      >>> tx.init({"w": jnp.ones(2)})
      ScaleByPathNormState()

    References:
      Neyshabur, Salakhutdinov, Srebro, "Path-SGD: Path-Normalized Optimization in Deep
      Neural Networks", NeurIPS 2015, https://arxiv.org/abs/1506.02617
    """


def scale_by_path_norm(path_norm_fn: PathNormFn) -> optax.GradientTransformationExtraArgs:
    """Divides each gradient entry by its Path-SGD preconditioner ``kappa``.

    Math [paper: Neyshabur et al. 2015, Alg. 1]: ``out_e = g_e / kappa_e(w)`` with
    ``kappa`` from :func:`path_preconditioner` (one gradient of ``path_norm_fn`` at the
    squared weights). Where ``kappa_e = 0`` every path through ``e`` has another zero
    weight, so in a ReLU network ``g_e = 0`` as well; the output is then 0 (no NaN).

    Args:
      path_norm_fn: maps the squared-parameter tree to the scalar squared path norm (see
        :func:`path_preconditioner`). It must accept the tree this transform sees as
        ``params`` (a sub-tree when used inside ``optax.partition`` or ``masked``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with empty state
      :class:`ScaleByPathNormState`; ``update`` needs ``params``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from ksbopt.peers import scale_by_path_norm
      >>> pi = lambda s: jnp.sum(jnp.ones((1, 2)) @ s["A"] @ s["B"])
      >>> params = {"A": jnp.array([[1.0, 2.0], [3.0, 0.0]]), "B": jnp.array([[1.0], [2.0]])}
      >>> tx = scale_by_path_norm(pi)
      >>> out, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
      >>> [round(float(x), 6) for x in out["B"][:, 0]]
      [0.1, 0.25]

    References:
      B. Neyshabur, R. Salakhutdinov, N. Srebro, "Path-SGD: Path-Normalized Optimization in
      Deep Neural Networks", NeurIPS 2015, https://arxiv.org/abs/1506.02617
    """
    owner = "scale_by_path_norm"
    _check_fn(owner, path_norm_fn)

    def init_fn(params):
        del params
        return ScaleByPathNormState()

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        checks.require_params(params, owner)
        kappa = path_preconditioner(path_norm_fn, params)
        out = jax.tree.map(
            lambda g, k: safe_div(g.astype(k.dtype), k).astype(g.dtype), updates, kappa
        )
        return out, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def path_sgd(
    learning_rate: optax.ScalarOrSchedule, *, path_norm_fn: PathNormFn
) -> optax.GradientTransformationExtraArgs:
    """Path-SGD for ReLU networks: ``w_e <- w_e - lr * g_e / kappa_e(w)``.

    Math [paper: Neyshabur et al. 2015, Alg. 1]: ``kappa_e(w) = sum over input-output paths
    through e of the product of the other squared weights on the path
    = gamma_in(u) gamma_out(v)`` for the edge ``u -> v``. Here ``kappa`` is one gradient of
    ``path_norm_fn`` (the squared l2 path norm as a function of the squared weights: the
    network without its ReLUs run with squared weights on an all-ones input, outputs
    summed) at ``w**2``; see
    :func:`path_preconditioner`. Entries with ``kappa_e = 0`` get a zero step (no NaN).
    The authors published no implementation; this follows the paper's Algorithm 1 (plain
    steps, no momentum; a bias is an edge from a constant unit) and is checked against a
    reference written from the paper's ``gamma_in`` / ``gamma_out`` recursions.

    Because ``kappa`` needs the network, the function is given at construction and is
    keyword-only. With ``optax.inject_hyperparams`` name it static, or it will be taken for
    a schedule: ``optax.inject_hyperparams(path_sgd, static_args="path_norm_fn")``.

    Args:
      learning_rate: step size ``>= 0`` or an optax schedule.
      path_norm_fn: maps a tree shaped like ``params`` holding SQUARED weights to the scalar
        squared path norm: the network with every ReLU replaced by the identity, on an
        all-ones input, outputs summed; e.g. for a Flax MLP whose activation is a field,
        ``lambda sq: jnp.sum(MLP(act=lambda x: x).apply({"params": sq}, jnp.ones((1, d))))``.
        Valid for networks built from linear maps (Dense, Conv, sum/average pooling) and
        ReLU (or identity) activations; max-pooling and normalisation layers are not path
        sums.

    Returns:
      ``optax.chain(scale_by_path_norm(path_norm_fn),
      optax.scale_by_learning_rate(learning_rate))``; ``update`` needs ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from ksbopt.peers import path_sgd
      >>> def apply(p, x, act=jax.nn.relu):
      ...     return act(x @ p["A"]) @ p["B"]
      >>> pi = lambda sq: jnp.sum(apply(sq, jnp.ones((1, 2)), act=lambda z: z))
      >>> params = {"A": jnp.array([[1.0, 2.0], [3.0, 0.5]]), "B": jnp.array([[1.0], [2.0]])}
      >>> tx = path_sgd(0.1, path_norm_fn=pi)
      >>> state = tx.init(params)
      >>> loss = lambda p: jnp.sum(apply(p, jnp.array([[1.0, -1.0]])) ** 2)
      >>> updates, state = tx.update(jax.grad(loss)(params), state, params)
      >>> jax.tree.map(jnp.shape, updates) == jax.tree.map(jnp.shape, params)
      True

    References:
      B. Neyshabur, R. Salakhutdinov, N. Srebro, "Path-SGD: Path-Normalized Optimization in
      Deep Neural Networks", NeurIPS 2015, https://arxiv.org/abs/1506.02617
    """
    check_range(
        "path_sgd",
        "learning_rate",
        learning_rate,
        low=0.0,
        hint="Pass the positive step size; the optimizer applies the minus sign itself.",
    )
    _check_fn("path_sgd", path_norm_fn)
    return optax.chain(
        scale_by_path_norm(path_norm_fn), optax.scale_by_learning_rate(learning_rate)
    )
