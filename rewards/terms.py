"""The arithmetic of reward terms on one episode's per-tick arrays.

A tick *counts* for a term when it is in the shared tick mask (``alpagym_ray.metrics.tick_mask``)
and the term's metric is valid on it: ``keep = mask & valid``, both ``[T]`` bool. Raw term values
(before ``clip`` and ``scale``); a term with no counted tick is worth 0:

* ``metric``: the counted values reduced by ``last | max | min | mean | median`` exactly as
  ``alpagym_ray.metrics.aggregate`` does for the episode metrics, or by ``sum``;
* ``distance_to_gt``: ``sqrt(mean(d_t ** 2))`` over the counted ticks;
* ``threshold``: the counted ticks with ``value > above`` or ``value < below`` (strict), as a
  ``count`` or as a ``fraction`` of the counted ticks.

Dense forms give per-tick contributions ``c [T]`` (0 on ticks that do not count) whose sum is the
raw value, so grouping the ticks by decision spreads the episodic value over the decisions that
earned it:

============  ============================================================================
aggregation   ``c_t`` on counted tick ``t`` (``n`` counted ticks, ``t'`` the previous counted one)
============  ============================================================================
``sum``       ``v_t``
``mean``      ``v_t / n``
``last``      ``v_t - v_t'`` (``v_t`` on the first): increments, e.g. of ``progress``; the first
              counted tick carries the value reached when the policy took control
``max``       increase of the running max (first counted tick: its own value); a 0/1 failure
              flag gives 1 on its first failing tick
``min``       decrease of the running min (first counted tick: its own value)
threshold     ``1`` (count) or ``1 / n`` (fraction) on each tick beyond the bound
============  ============================================================================

``median``, ``distance_to_gt`` (an RMS), episode-only metrics and ``python`` terms have no dense
form; :mod:`rewards.spec` refuses ``dense: true`` for them.
"""

from __future__ import annotations

import numpy as np

from alpagym_ray.metrics import Aggregation, aggregate


def reduce(values: np.ndarray, keep: np.ndarray, how: str) -> float:
    """Reduce ``values [T]`` over the ticks where ``keep [T]``; 0.0 when none is kept.

    ``how``: ``last | max | min | mean | median | sum``."""
    if not keep.any():
        return 0.0
    if how == "sum":
        return float(np.where(keep, values, 0.0).sum())
    agg = Aggregation[how.upper()]
    # through the shared aggregation so that a metric term equals the logged episode metric
    return float(aggregate({"x": (values, np.ones_like(keep), agg)}, keep)["x"])


def densify(values: np.ndarray, keep: np.ndarray, how: str) -> np.ndarray:
    """Per-tick contributions ``[T]`` float64 summing to ``reduce(values, keep, how)``."""
    out = np.zeros(values.shape, dtype=np.float64)
    idx = np.flatnonzero(keep)
    if idx.size == 0:
        return out
    v = values[idx].astype(np.float64)
    if how == "sum":
        out[idx] = v
    elif how == "mean":
        out[idx] = v / idx.size
    elif how in ("last", "max", "min"):
        running = v if how == "last" else (np.maximum if how == "max" else np.minimum).accumulate(v)
        out[idx] = np.diff(running, prepend=0.0)
    else:
        raise ValueError(f"aggregation {how!r} has no dense form; valid: ['last', 'max', 'min', 'mean', "
                         f"'sum']")
    return out


def rms(values: np.ndarray, keep: np.ndarray) -> float:
    """Root mean square of ``values [T]`` over the kept ticks; 0.0 when none is kept."""
    if not keep.any():
        return 0.0
    v = values[keep].astype(np.float64)
    return float(np.sqrt(np.mean(v * v)))


def beyond(values: np.ndarray, keep: np.ndarray, above: float | None, below: float | None) -> np.ndarray:
    """``[T]`` bool: kept ticks strictly above ``above`` or strictly below ``below``."""
    hit = np.zeros(values.shape, dtype=bool)
    if above is not None:
        hit |= values > above
    if below is not None:
        hit |= values < below
    return hit & keep


def threshold(values: np.ndarray, keep: np.ndarray, above: float | None, below: float | None,
              mode: str) -> float:
    """Ticks beyond the bounds: their ``count`` or ``fraction`` of the kept ticks (0.0 when none)."""
    n = int(keep.sum())
    hits = int(beyond(values, keep, above, below).sum())
    if mode == "count":
        return float(hits)
    return hits / n if n else 0.0


def threshold_dense(values: np.ndarray, keep: np.ndarray, above: float | None, below: float | None,
                    mode: str) -> np.ndarray:
    """Per-tick contributions ``[T]`` summing to :func:`threshold`."""
    hit = beyond(values, keep, above, below).astype(np.float64)
    if mode == "count":
        return hit
    n = int(keep.sum())
    return hit / n if n else hit
