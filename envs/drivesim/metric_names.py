"""Names and aggregations of every per-tick metric drivesim reports: AlpaSim's names verbatim
plus drivesim's own (comfort against nuPlan's thresholds, time-to-collision, lane keeping)."""

from __future__ import annotations

from alpagym_ray.metrics import ALPASIM_METRICS, DERIVED_EPISODE_METRICS, Aggregation

A = Aggregation

# nuPlan comfort thresholds (nuplan-devkit, ego_is_comfortable statistics)
MIN_ACCEL_LON = -4.05   # m/s^2
MAX_ACCEL_LON = 2.40    # m/s^2
MAX_ACCEL_LAT = 4.89    # m/s^2 (absolute)
MAX_JERK_LON = 4.13     # m/s^3 (absolute)
MAX_JERK = 8.37         # m/s^3 (magnitude of the jerk vector)
MAX_YAW_RATE = 0.95     # rad/s (absolute)
MAX_YAW_ACCEL = 1.93    # rad/s^2 (absolute)
TTC_HORIZON_S = 10.0    # time-to-collision is capped here (no conflict = horizon)

DRIVESIM_EXTRA_METRICS: dict[str, Aggregation] = {
    "speed_mps": A.MEAN,
    "accel_lon_mps2": A.MEAN,
    "accel_lat_mps2": A.MEAN,
    "jerk_lon_mps3": A.MEAN,
    "jerk_mps3": A.MEAN,
    "yaw_rate_rps": A.MEAN,
    "yaw_accel_rps2": A.MEAN,
    "comfort_violation": A.MAX,      # 1 on a tick where any comfort quantity exceeds its threshold
    "ttc_s": A.MIN,                  # constant-velocity time to collision, capped at TTC_HORIZON_S
    "lane_center_distance_m": A.MEAN,  # distance from the ego rear axle to the nearest lane centre line
    "collision_at_fault_tick": A.MAX,  # front or lateral collision on this tick
}

DRIVESIM_METRICS: dict[str, Aggregation] = {**ALPASIM_METRICS, **DRIVESIM_EXTRA_METRICS}
"""Every per-tick series drivesim reports, with its default time aggregation."""

EPISODE_METRIC_NAMES: tuple[str, ...] = tuple(DRIVESIM_METRICS) + DERIVED_EPISODE_METRICS
"""Every name that can appear in drivesim's ``episode_metrics``."""
