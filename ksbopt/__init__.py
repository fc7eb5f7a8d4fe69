"""ksbopt: symmetry-aware Optax transformations and Noether-charge diagnostics for JAX.

The learning rule of a network is a kinetic energy and the loss a potential; when the kinetic
energy breaks a symmetry of the loss, the matching Noether charge moves in a predictable way.
ksbopt lets you declare the symmetries (:class:`Scale`, :class:`Rescale`,
:class:`Translation`, :class:`Linear`), read their charges (:func:`charges`), and choose what
the optimiser does with them (:func:`project`, :func:`retract`, :func:`steer`).
"""

from ksbopt import dynamics, peers, targets, theory
from ksbopt._src.detection.detect import detect, verify
from ksbopt._src.detection.report import SymmetryCheck, SymmetryReport
from ksbopt._src.diagnostics.charges import charges
from ksbopt._src.diagnostics.monitor import (
    MonitorState,
    NoetherDiagnostics,
    RecursionState,
    monitor,
)
from ksbopt._src.diagnostics.recorder import History, Recorder, summarize
from ksbopt._src.diagnostics.symmetry_profile import SymmetryProfile, profile
from ksbopt._src.symmetries.declarations import Linear, Rescale, Scale, Symmetry, Translation
from ksbopt._src.transforms.charge_control import (
    ProjectState,
    RetractState,
    SteerState,
    project,
    retract,
    steer,
)
from ksbopt._src.transforms.noether_rmsprop import (
    NoetherRmspropState,
    noether_rmsprop,
    scale_by_noether_rmsprop,
)
from ksbopt._src.transforms.symmetrize import SymmetrizeState, symmetrize
from ksbopt._src.transforms.teleport import TeleportState, teleport

__version__ = "0.1.0"

__all__ = [
    "History",
    "Linear",
    "MonitorState",
    "NoetherDiagnostics",
    "NoetherRmspropState",
    "ProjectState",
    "Recorder",
    "RecursionState",
    "Rescale",
    "RetractState",
    "Scale",
    "SteerState",
    "SymmetrizeState",
    "Symmetry",
    "SymmetryCheck",
    "SymmetryProfile",
    "SymmetryReport",
    "TeleportState",
    "Translation",
    "charges",
    "detect",
    "dynamics",
    "monitor",
    "noether_rmsprop",
    "peers",
    "profile",
    "project",
    "retract",
    "scale_by_noether_rmsprop",
    "steer",
    "summarize",
    "symmetrize",
    "targets",
    "teleport",
    "theory",
    "verify",
]
