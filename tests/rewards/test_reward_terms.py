"""The arithmetic of terms on small hand-built arrays."""

from __future__ import annotations

import numpy as np
import pytest

from rewards import terms

V = np.array([5.0, 1.0, 3.0, 2.0, 4.0, 7.0])
KEEP = np.array([False, True, True, True, True, False])  # counts 1, 3, 2, 4


@pytest.mark.parametrize(("how", "expected"), [
    ("last", 4.0), ("max", 4.0), ("min", 1.0), ("mean", 2.5), ("sum", 10.0), ("median", 2.5),
])
def test_reduce_known_values(how, expected):
    assert terms.reduce(V, KEEP, how) == pytest.approx(expected)


@pytest.mark.parametrize("how", ["last", "max", "min", "mean", "sum", "median"])
def test_reduce_nothing_kept_is_zero(how):
    assert terms.reduce(V, np.zeros(6, bool), how) == 0.0


@pytest.mark.parametrize(("how", "expected"), [
    ("sum", [0, 1, 3, 2, 4, 0]),
    ("mean", [0, 0.25, 0.75, 0.5, 1.0, 0]),
    ("last", [0, 1, 2, -1, 2, 0]),          # increments of the value: 1, 3, 2, 4
    ("max", [0, 1, 2, 0, 1, 0]),            # running max 1, 3, 3, 4
    ("min", [0, 1, 0, 0, 0, 0]),            # running min 1, 1, 1, 1
])
def test_densify_known_values_sum_to_reduce(how, expected):
    dense = terms.densify(V, KEEP, how)
    np.testing.assert_allclose(dense, expected)
    assert dense.sum() == pytest.approx(terms.reduce(V, KEEP, how))


def test_densify_min_decreasing_and_failure_flag():
    v = np.array([3.0, 2.0, 2.5, 1.0])
    np.testing.assert_allclose(terms.densify(v, np.ones(4, bool), "min"), [3, -1, 0, -1])
    failure = np.array([0.0, 0.0, 1.0, 1.0, 0.0])
    np.testing.assert_allclose(terms.densify(failure, np.ones(5, bool), "max"), [0, 0, 1, 0, 0])


def test_densify_refuses_median():
    with pytest.raises(ValueError, match="median"):
        terms.densify(V, KEEP, "median")


def test_rms_and_threshold():
    assert terms.rms(np.array([3.0, 4.0, 100.0]), np.array([True, True, False])) == pytest.approx(
        np.sqrt(12.5))
    assert terms.rms(V, np.zeros(6, bool)) == 0.0
    v = np.array([0.5, 1.0, 2.0, -3.0, 4.0])
    keep = np.array([True, True, True, True, False])
    # strict bounds: 1.0 is not above 1.0; 4.0 is beyond but not kept
    assert terms.threshold(v, keep, above=1.0, below=None, mode="count") == 1.0
    assert terms.threshold(v, keep, above=1.0, below=0.0, mode="count") == 2.0
    assert terms.threshold(v, keep, above=1.0, below=0.0, mode="fraction") == 0.5
    assert terms.threshold(v, np.zeros(5, bool), above=1.0, below=None, mode="fraction") == 0.0
    np.testing.assert_allclose(terms.threshold_dense(v, keep, 1.0, 0.0, "fraction"), [0, 0, 0.25, 0.25, 0])
    np.testing.assert_allclose(terms.threshold_dense(v, keep, 1.0, 0.0, "count"), [0, 0, 1, 1, 0])
