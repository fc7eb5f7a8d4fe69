"""The label algebra of the graph analysis: reshapes, grouped factors, partners."""

from __future__ import annotations

import pytest

from ksbopt._src.detection.axis_labels import (
    free_atoms,
    initial_labels,
    partner_axes,
    reshape_labels,
)


def _factorisations(n: int) -> list[tuple[int, ...]]:
    """Every ordered factorisation of ``n`` into factors > 1."""
    if n == 1:
        return [()]
    return [(d, *rest) for d in range(2, n + 1) if n % d == 0 for rest in _factorisations(n // d)]


@pytest.mark.parametrize("n", [12, 24, 36])
def test_reshape_there_and_back_gives_the_labels_back(n):
    # Any reshape that keeps the unit's atoms whole (or splits them evenly) can be undone.
    followed = 0
    shapes = _factorisations(n)
    for a in shapes:
        for b in shapes:
            for ax in range(len(a)):
                labels = initial_labels(a, {ax}, {})
                out = reshape_labels(labels, a, b)
                if out is None:
                    continue
                followed += 1
                assert reshape_labels(out, b, a) == labels, (a, b, ax, out)
    assert followed > 0


def test_reshape_that_splits_a_unit_unevenly_is_lost():
    # (2, 6) -> (3, 4): the rows of 4 straddle the two rows of 6 units.
    labels = initial_labels((2, 6), {1}, {})
    assert reshape_labels(labels, (2, 6), (3, 4)) is None
    # (2, 6) -> (4, 3) is fine: the first axis carries the unit index's stride-3 part.
    assert reshape_labels(labels, (2, 6), (4, 3)) == (
        ((None, 0, 2, False), (1, 3, 2, True)),
        ((1, 1, 3, True),),
    )


def test_grouped_factor_depends_on_the_group_index_only():
    # 12 units, factor uniform inside groups of 3 (a GroupNorm with 4 groups).
    labels = initial_labels((12,), {0}, {0: {(1, 3)}})
    assert free_atoms(labels) == (((0, 3, 4),),)
    # Splitting into (groups, members) puts the factor on the group axis only.
    split = reshape_labels(labels, (12,), (4, 3))
    assert free_atoms(split) == (((0, 3, 4),), ())


def test_partner_axes_maps_partner_axis_to_candidate_axis():
    # A (batch, 8) value whose axis 1 is the candidate's axis 1 and the partner's axis 0.
    cand = ((), ((1, 1, 8, True),))
    partner = ((), ((0, 1, 8, True),))
    assert partner_axes(cand, partner) == {0: 1}
    # A partner axis of another size, or none where the factor varies, does not line up.
    assert partner_axes(cand, ((), ((0, 1, 4, True), (2, 1, 2, True)))) is None
    assert partner_axes(cand, ((), ())) is None
