"""The abstract values the two interpreters attach to the values of the graph.

The multiplicative interpreter tracks :class:`Scaled` values; the shift interpreter tracks
:class:`Shifted`, :class:`ExpShifted` and :data:`UNCERTAIN`. A value that does not depend on
the candidate action at all is ``None``.
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction

from ksbopt._src.detection.axis_labels import Labels


@dataclasses.dataclass(frozen=True)
class Scaled:
    """Multiplied by f^deg, f varying along the free atoms of ``labels``."""

    deg: Fraction
    labels: Labels


@dataclasses.dataclass(frozen=True)
class Shifted:
    """Shifted by coef * delta; delta is constant along the atoms of ``labels``."""

    coef: Fraction
    labels: Labels


@dataclasses.dataclass(frozen=True)
class ExpShifted:
    """Multiplied by exp(coef * delta) (the exponential of a shift)."""

    coef: Fraction
    labels: Labels


class Uncertain:
    """Might still be invariant (e.g. E[x^2] - E[x]^2 of a shifted x): verify numerically.

    Use the one instance :data:`UNCERTAIN`.
    """

    labels = None

    def __repr__(self):
        return "UNCERTAIN"


UNCERTAIN = Uncertain()


def as_fraction(x) -> Fraction:
    """``x`` as a fraction (a degree or a coefficient), to 1/65536."""
    return Fraction(x).limit_denominator(1 << 16)


def with_labels(value, labels: Labels):
    """The same action (degree or coefficient) on a value with other axes."""
    return dataclasses.replace(value, labels=labels)
