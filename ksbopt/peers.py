"""Other projects' symmetry-aware optimizers: SGDP, AdamP, Nero, rotational, Path-SGD.

They live in their own namespace, as optax keeps other people's optimizers in
``optax.contrib``, so that ``ksbopt``'s top level holds ksbopt's own transforms only. Each
optimizer is a ready ``optax.chain`` (``ksbopt.peers.sgdp``) plus its ``scale_by_*`` block
where the paper's rule is one, written for the Flax layout (the output unit is the last axis
of a kernel), jit-safe and NaN-free on zero-norm units. The API page
(:doc:`/api/optimizers`) says which reference implementation each default follows.
"""

from ksbopt._src.peers.adamp import (
    ScaleByAdampState,
    ScaleBySgdpState,
    adamp,
    radial_projection,
    scale_by_adamp,
    scale_by_sgdp,
    sgdp,
)
from ksbopt._src.peers.nero import (
    NeroRetractionState,
    ScaleByNeroState,
    balance_params,
    nero,
    nero_retraction,
    scale_by_nero,
)
from ksbopt._src.peers.path_sgd import (
    ScaleByPathNormState,
    path_preconditioner,
    path_sgd,
    scale_by_path_norm,
)
from ksbopt._src.peers.rotational import RotationalState, center_params, rotational

__all__ = [
    "NeroRetractionState",
    "RotationalState",
    "ScaleByAdampState",
    "ScaleByNeroState",
    "ScaleByPathNormState",
    "ScaleBySgdpState",
    "adamp",
    "balance_params",
    "center_params",
    "nero",
    "nero_retraction",
    "path_preconditioner",
    "path_sgd",
    "radial_projection",
    "rotational",
    "scale_by_adamp",
    "scale_by_nero",
    "scale_by_path_norm",
    "scale_by_sgdp",
    "sgdp",
]
