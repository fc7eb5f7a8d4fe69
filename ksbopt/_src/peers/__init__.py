"""Symmetry-aware peer optimizers (SGDP, AdamP, Nero, rotational equilibrium, Path-SGD).

Reimplemented from their papers for Flax layouts (the output unit is the LAST axis of a
kernel), jit-safe and NaN-free on zero-norm units.
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
    balance_units,
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
from ksbopt._src.peers.rotational import (
    RotationalState,
    center_params,
    equilibrium_angular_update,
    rotational,
)

__all__ = [
    "NeroRetractionState",
    "RotationalState",
    "ScaleByAdampState",
    "ScaleByNeroState",
    "ScaleByPathNormState",
    "ScaleBySgdpState",
    "adamp",
    "balance_params",
    "balance_units",
    "center_params",
    "equilibrium_angular_update",
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
