"""What the graph analysis reports, and the exceptions that steer it.

:class:`Finding` is one candidate symmetry, :class:`Analysis` the result for a whole loss.
:class:`Broken`, :class:`Ambiguous` and :class:`NeedUniform` are raised by the primitive rules
and caught by the analysis itself (never seen by users).
"""

from __future__ import annotations

import dataclasses


class Broken(Exception):
    """The candidate action changes the loss (with a reason)."""


class Ambiguous(Exception):
    """The graph cannot be read for this candidate (with the primitive)."""


class NeedUniform(Exception):
    """Restart with a coarser factor: these (leaf_axis, stride, size) ranges are reduced."""

    def __init__(self, ranges):
        super().__init__(ranges)
        self.ranges = ranges


@dataclasses.dataclass
class Absorber:
    """A partner whose inverse action compensates the candidate (rescale / linear)."""

    leaf: int
    contract: dict  # candidate leaf axis -> partner leaf axis (the shared unit axis)
    heads: dict  # candidate leaf axis -> partner leaf axis (batched, never mixed)
    joined: dict  # partner's own co-transformed leaves: leaf -> {leaf axis: partner axis}
    partial: bool = False  # the unit meets several entries of the partner's axis


@dataclasses.dataclass
class Finding:
    """A candidate symmetry read off the graph.

    Attributes:
      kind: "scale", "rescale", "linear" or "translation".
      leaf: the leaf the candidate starts from (a kernel, a normalisation scale, ...).
      unit_axes: the leaf's unit axes.
      members: co-transformed leaves (the leaf itself and its biases): leaf -> {leaf axis:
        axis of ``leaf``}.
      free: per unit axis of ``leaf``, the atoms the factor depends on, ((stride, size), ...).
      absorbers: partners (rescale / linear).
      nonmix: unit axes of ``leaf`` that only allow diagonal (per unit) factors.
      reason: why it should hold, e.g. "BatchNorm epsilon=1e-05".
      approximate: True when a constant (epsilon) makes it hold only approximately.
      certain: False when the graph suggests but does not establish it (verified anyway).
    """

    kind: str
    leaf: int
    unit_axes: tuple
    members: dict
    free: dict
    absorbers: list
    nonmix: frozenset
    reason: str
    approximate: bool
    certain: bool = True


@dataclasses.dataclass
class Analysis:
    """Candidate symmetries of every leaf of a loss, and the leaves that could not be read."""

    findings: list[Finding]
    ambiguous: dict  # leaf -> reason (candidates for it come from the parameter tree)
    broken: dict  # (leaf, kind) -> reason
    notes: list[str]
    starts: dict  # leaf -> unit axes of its first multiplicative use
