"""Per-tick metric series, the shared tick mask and episode aggregation (DESIGN.md, "Metrics").

Both simulators report metrics as per-tick series in the shape of AlpaSim's ``TimestepMetric``
(name, timestamps, values, valid, time aggregation). Episode metrics always come from these series
through :func:`episode_metrics`, so drivesim and AlpaSim episodes are scored by the same code:

* only ticks with the policy in control (``eval_relevant`` = 1) count, and
* none after the first ``collision_any`` or ``offroad`` tick (that tick itself still counts), as
  AlpaSim's offline aggregation does; ``cut_after_failure=False`` keeps them.

Every function here is vectorised over leading batch dimensions: ``values [..., T]``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


class Aggregation(enum.IntEnum):
    """AlpaSim's ``TimeAggregation`` (values are the proto enum numbers)."""

    UNSPECIFIED = 0
    MEAN = 1
    MEDIAN = 2
    MAX = 3
    MIN = 4
    LAST = 5

    @classmethod
    def parse(cls, name: str) -> Aggregation:
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(
                f"unknown aggregation {name!r}; valid: {[a.name.lower() for a in cls][1:]}"
            ) from None


A = Aggregation
ALPASIM_METRICS: dict[str, Aggregation] = {
    "collision_front": A.MAX,
    "collision_rear": A.MAX,
    "collision_lateral": A.MAX,
    "collision_any": A.MAX,
    "offroad": A.MAX,
    "wrong_lane": A.MAX,
    "min_distance_to_lane_boundary_m": A.MIN,
    "min_distance_to_obstacle_m": A.MIN,
    "progress": A.LAST,
    "progress_rel": A.MIN,
    "dist_to_gt_trajectory": A.MAX,
    "dist_to_gt_location": A.MAX,
    "dist_traveled_m": A.LAST,
    "gt_dist_traveled_m": A.LAST,
    "plan_deviation": A.MEAN,
    "eval_relevant": A.MAX,
}
"""AlpaSim's per-tick metrics and their own time aggregation (specs/alpasim_protocol.md)."""

DERIVED_EPISODE_METRICS = ("collision_at_fault", "offroad_or_collision", "scene_score")
"""Episode metrics computed from the aggregates, never reported per tick."""

SHORT_PATH_M = 5.0
"""A recorded path shorter than this scores 1 (AlpaSim)."""
PROGRESS_FOR_FULL_SCORE = 0.8


@dataclass(frozen=True)
class MetricSeries:
    """One metric over an episode's ticks (AlpaSim's ``TimestepMetric``)."""

    name: str
    """Metric name (AlpaSim's where it exists)."""
    timestamps_us: np.ndarray
    """``[T]`` int64 tick times in microseconds."""
    values: np.ndarray
    """``[T]`` float64 values."""
    valid: np.ndarray
    """``[T]`` bool: the value exists at that tick."""
    aggregation: Aggregation
    """How the series reduces to one episode value."""

    def __post_init__(self) -> None:
        shapes = {self.timestamps_us.shape, self.values.shape, self.valid.shape}
        if len(shapes) != 1 or self.values.ndim != 1:
            raise ValueError(
                f"metric {self.name!r}: timestamps {self.timestamps_us.shape}, values "
                f"{self.values.shape} and valid {self.valid.shape} must be equal 1-D shapes"
            )


def _reduce(values: np.ndarray, keep: np.ndarray, agg: Aggregation) -> np.ndarray:
    """Reduce ``values [..., T]`` over the ticks where ``keep [..., T]``; NaN where none is kept."""
    v = values.astype(np.float64)
    any_kept = keep.any(axis=-1)
    if agg == Aggregation.LAST:
        t = values.shape[-1]
        last = t - 1 - np.argmax(keep[..., ::-1], axis=-1)
        out = np.take_along_axis(v, last[..., None], axis=-1)[..., 0]
    elif agg == Aggregation.MAX:
        out = np.where(keep, v, -np.inf).max(axis=-1)
    elif agg == Aggregation.MIN:
        out = np.where(keep, v, np.inf).min(axis=-1)
    elif agg == Aggregation.MEDIAN:
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                out = np.nanmedian(np.where(keep, v, np.nan), axis=-1)
    else:  # MEAN, and UNSPECIFIED as AlpaSim's default
        n = keep.sum(axis=-1)
        out = np.where(keep, v, 0.0).sum(axis=-1) / np.maximum(n, 1)
    return np.where(any_kept, out, np.nan)


def tick_mask(
    eval_relevant: np.ndarray,
    collision_any: np.ndarray,
    offroad: np.ndarray,
    cut_after_failure: bool = True,
) -> np.ndarray:
    """The shared tick mask ``[..., T]`` bool.

    Args:
        eval_relevant: ``[..., T]`` 1 where the policy is in control.
        collision_any, offroad: ``[..., T]`` per-tick failure flags.
        cut_after_failure: drop ticks *after* the first in-control failure tick.
    """
    keep = eval_relevant > 0.5
    if cut_after_failure:
        fail = ((collision_any > 0.5) | (offroad > 0.5)) & keep
        # failures strictly before t: cumulative count shifted by one tick
        before: np.ndarray = np.cumsum(fail, axis=-1) - fail
        keep = keep & (before == 0)
    return keep


def aggregate(
    series: Mapping[str, tuple[np.ndarray, np.ndarray, Aggregation]],
    mask: np.ndarray,
) -> dict[str, np.ndarray]:
    """Reduce each ``(values [..., T], valid [..., T], aggregation)`` over ``mask & valid``."""
    return {name: _reduce(v, valid & mask, agg) for name, (v, valid, agg) in series.items()}


def scene_score(
    collision_at_fault: np.ndarray, offroad: np.ndarray, progress: np.ndarray, gt_length_m: np.ndarray
) -> np.ndarray:
    """AlpaSim's scene score: 0 on at-fault collision or off-road, 1 for a recorded path under
    5 m, else ``min(clamp(progress, 0, 1) / 0.8, 1)``. Shapes ``[...]``."""
    prog = np.nan_to_num(np.asarray(progress, dtype=np.float64), nan=0.0)
    score = np.minimum(np.clip(prog, 0.0, 1.0) / PROGRESS_FOR_FULL_SCORE, 1.0)
    score = np.where(np.nan_to_num(gt_length_m, nan=np.inf) < SHORT_PATH_M, 1.0, score)
    failed = (np.nan_to_num(collision_at_fault) > 0.5) | (np.nan_to_num(offroad) > 0.5)
    return np.where(failed, 0.0, score)


def episode_metrics(
    series: Mapping[str, tuple[np.ndarray, np.ndarray, Aggregation]],
    cut_after_failure: bool = True,
) -> dict[str, np.ndarray]:
    """Episode metrics from per-tick series: every series reduced by its own aggregation over the
    shared tick mask, plus ``collision_at_fault``, ``offroad_or_collision`` and ``scene_score``.

    ``series`` must hold ``eval_relevant``, ``collision_front``, ``collision_lateral``,
    ``collision_any``, ``offroad``, ``progress`` and ``gt_dist_traveled_m``.
    """
    required = ("eval_relevant", "collision_front", "collision_lateral", "collision_any", "offroad",
                "progress", "gt_dist_traveled_m")
    missing = [k for k in required if k not in series]
    if missing:
        raise KeyError(f"episode_metrics needs the series {missing}; got {sorted(series)}")
    valid_val = {k: np.where(series[k][1], series[k][0], 0.0) for k in ("eval_relevant",
                                                                        "collision_any", "offroad")}
    mask = tick_mask(valid_val["eval_relevant"], valid_val["collision_any"], valid_val["offroad"],
                     cut_after_failure)
    out = aggregate(series, mask)
    front = np.nan_to_num(out["collision_front"])
    lateral = np.nan_to_num(out["collision_lateral"])
    out["collision_at_fault"] = np.maximum(front, lateral)
    out["offroad_or_collision"] = np.maximum(np.nan_to_num(out["collision_any"]),
                                             np.nan_to_num(out["offroad"]))
    out["scene_score"] = scene_score(out["collision_at_fault"], np.nan_to_num(out["offroad"]),
                                     out["progress"], out["gt_dist_traveled_m"])
    return out


def series_to_arrays(
    items: list[MetricSeries],
) -> dict[str, tuple[np.ndarray, np.ndarray, Aggregation]]:
    """``MetricSeries`` list (AlpaSim's shape) to the array form :func:`episode_metrics` takes.

    Series of different lengths are aligned on the union of their timestamps (invalid where a
    series has no value)."""
    if not items:
        return {}
    times = np.unique(np.concatenate([s.timestamps_us for s in items]).astype(np.int64))
    out = {}
    for s in items:
        idx = np.searchsorted(times, s.timestamps_us.astype(np.int64))
        values = np.zeros(times.shape, dtype=np.float64)
        valid = np.zeros(times.shape, dtype=bool)
        values[idx] = s.values
        valid[idx] = s.valid
        out[s.name] = (values, valid, s.aggregation)
    return out
