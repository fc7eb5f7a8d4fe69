"""Closed forms and exact recursions of Noether's learning dynamics.

The formulas are presented on the concepts pages (:doc:`/concepts/noether_charges`,
:doc:`/concepts/implicit_rmsprop`).

Every function here is pure and jit-able: it takes arrays (any shape, one entry per symmetry
group, broadcasting as usual) and returns arrays, in the floating dtype it is given (float32 or
float64). Hyperparameters may be numbers or arrays; concrete numbers (Python, NumPy or 0-d
arrays) are validated eagerly (``ValueError`` naming the argument), traced values and arrays
with axes are not inspected.

Conventions (those of :ref:`exact-identities`):

* ``charge`` of a scale group is ``x_k = |w_k|^2``; of a rescale group the in-minus-out difference
  ``|w_in|^2 - |w_out|^2``; of a translation group ``s_k = <1_A, w_k>``; of a linear group the
  ``k x k`` matrix ``C = A^T A - B B^T``.
* ``g_k`` is the minibatch gradient WITHOUT weight decay, ``d_k = g_k + lambda w_k`` with it.
* Heavy ball (coupled weight decay): ``v_{k+1} = beta v_k + d_k``, ``w_{k+1} = w_k - eta v_{k+1}``,
  ``v_0 = 0`` (this is ``optax.chain(optax.add_decayed_weights(lam), optax.sgd(eta, beta))``).
* Heavy ball (decoupled weight decay): ``m_{k+1} = beta m_k + g_k``,
  ``w_{k+1} = (1 - eta lambda) w_k - eta m_{k+1}`` (``optax.chain(optax.trace(beta),
  optax.add_decayed_weights(lam), optax.scale(-eta))``).
* Continuous time is ``t = eta * step``.

Tags: [paper: NLD] / [paper: NM] are stated in the papers, [derived] follows from them by algebra
(:doc:`/concepts/index`). The exact recursions hold for any step size, batch and data, given the
symmetry; the continuous (NM / NLD integral) forms are approximations with error O(eta).

References:
    Tanaka & Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
    Networks", NeurIPS 2021, https://arxiv.org/abs/2105.02716 ([NLD]).

    Kunin, Sagastuy-Brena, Ganguli, Yamins & Tanaka, "Neural Mechanics: Symmetry and Broken
    Conservation Laws in Deep Learning Dynamics", ICLR 2021, https://arxiv.org/abs/2012.04728
    ([NM]).
"""

from ksbopt._src.theory.adaptive_metric import (
    adam_metric_charge_step,
    metric_charge,
    metric_charge_step,
)
from ksbopt._src.theory.arguments import NLD_COEFFICIENTS
from ksbopt._src.theory.equilibrium import (
    equilibrium_angular_update,
    equilibrium_update_ratio,
    winding_fixed_point,
)
from ksbopt._src.theory.heavy_ball import (
    heavy_ball_decoupled_step,
    heavy_ball_second_order_step,
    heavy_ball_step,
)
from ksbopt._src.theory.linear import linear_sgd_step
from ksbopt._src.theory.nld import (
    nld_coefficient,
    nld_exact_radius4_step,
    nld_radius4,
    nld_steady_state_radius4,
    rmsprop_analogy,
    rmsprop_sqrt_accumulator,
)
from ksbopt._src.theory.nm_oscillator import (
    nm_damped_scale_charge,
    nm_damped_translation_charge,
    nm_oscillator_kernels,
)
from ksbopt._src.theory.scale_sgd import direction_step, effective_learning_rate, scale_sgd_step
from ksbopt._src.theory.translation import translation_heavy_ball_step, translation_sgd_step

__all__ = [
    "NLD_COEFFICIENTS",
    "adam_metric_charge_step",
    "direction_step",
    "effective_learning_rate",
    "equilibrium_angular_update",
    "equilibrium_update_ratio",
    "heavy_ball_decoupled_step",
    "heavy_ball_second_order_step",
    "heavy_ball_step",
    "linear_sgd_step",
    "metric_charge",
    "metric_charge_step",
    "nld_coefficient",
    "nld_exact_radius4_step",
    "nld_radius4",
    "nld_steady_state_radius4",
    "nm_damped_scale_charge",
    "nm_damped_translation_charge",
    "nm_oscillator_kernels",
    "rmsprop_analogy",
    "rmsprop_sqrt_accumulator",
    "scale_sgd_step",
    "translation_heavy_ball_step",
    "translation_sgd_step",
    "winding_fixed_point",
]
