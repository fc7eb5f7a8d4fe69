"""The formulas of the concepts pages as pure, jit-able functions (closed forms, recursions).

Every function takes arrays (any shape, one entry per symmetry group, broadcasting as usual)
and returns arrays in the floating dtype it is given; Python-number hyperparameters are
validated eagerly (``ValueError`` naming the argument), traced values are not inspected.
Every function documents its formula, its tag ([paper: NLD], [paper: NM] or [derived]) and
its item (P1 to P10) on the concepts pages (:ref:`exact-identities`, :ref:`equilibrium`,
:ref:`P2 <p2>`).

Conventions:

- the ``charge`` of a scale group is ``x_k = |w_k|^2``; of a rescale group the in-minus-out
  difference ``|w_in|^2 - |w_out|^2``; of a translation group ``s_k = <1_A, w_k>``; of a
  linear group the ``k x k`` matrix ``C = A^T A - B B^T``;
- ``g_k`` is the minibatch gradient WITHOUT weight decay, ``d_k = g_k + lambda w_k`` with it;
- heavy ball with coupled weight decay: ``v_{k+1} = beta v_k + d_k``,
  ``w_{k+1} = w_k - eta v_{k+1}``, ``v_0 = 0``
  (``optax.chain(optax.add_decayed_weights(lam), optax.sgd(eta, beta))``);
- heavy ball with decoupled weight decay: ``m_{k+1} = beta m_k + g_k``,
  ``w_{k+1} = (1 - eta lambda) w_k - eta m_{k+1}``;
- continuous time is ``t = eta * step``.

The exact recursions hold for any step size, batch and data, given the symmetry; the
continuous (NM / NLD integral) forms are approximations with error O(eta).

References:
  Tanaka, Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
  Networks", NeurIPS 2021, https://arxiv.org/abs/2105.02716 ([NLD]); Kunin,
  Sagastuy-Brena, Ganguli, Yamins, Tanaka, "Neural Mechanics: Symmetry and Broken
  Conservation Laws in Deep Learning Dynamics", ICLR 2021, https://arxiv.org/abs/2012.04728
  ([NM]).
"""

from ksbopt._src.theory import *  # noqa: F403
from ksbopt._src.theory import __all__  # noqa: F401
