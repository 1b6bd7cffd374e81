"""The paired change of the held-out return between two evaluations of the same episodes."""

from __future__ import annotations

import math

import pytest

from alpagym_ray.evaluate import paired_difference


def test_paired_difference_by_hand():
    before = {"returns": [1.0, -10.0, 0.5, 2.0]}
    after = {"returns": [1.5, -9.0, 0.5, 1.0]}
    d = paired_difference(before, after)  # differences 0.5, 1.0, 0.0, -1.0: mean 0.125
    assert d["return"] == pytest.approx(0.125) and d["episodes"] == 4
    var = ((0.375**2) + (0.875**2) + (0.125**2) + (1.125**2)) / 3
    assert d["return_sem"] == pytest.approx(math.sqrt(var / 4))


def test_pairing_removes_the_spread_between_episodes():
    """A uniform gain over episodes of very different returns: each mean's own standard error is large,
    the paired one is zero."""
    before = {"returns": [-10.0, 0.0, 5.0, 1.0]}
    after = {"returns": [-9.5, 0.5, 5.5, 1.5]}
    assert paired_difference(before, after) == {"return": 0.5, "return_sem": 0.0, "episodes": 4}


def test_episodes_that_did_not_end_are_left_out():
    d = paired_difference({"returns": [1.0, float("nan"), 2.0]}, {"returns": [2.0, 3.0, 2.0]})
    assert d["episodes"] == 2 and d["return"] == pytest.approx(0.5)


@pytest.mark.parametrize("before, after", [({}, {"returns": [1.0, 2.0]}), ({"returns": [1.0]}, {"returns": [1.0]}),
                                           ({"returns": [1.0, 2.0]}, {"returns": [1.0, 2.0, 3.0]})])
def test_nothing_to_pair(before, after):
    assert paired_difference(before, after) is None
