"""The observation table (DESIGN.md, "Observations"): one place for every key, shape and feature.

Both simulators and the driver server build observations from these specs. Every key is a
fixed-size float32 array ``[*shape]`` with a boolean mask ``[shape[0]]`` stored under
``mask_key(key)`` (``"<key>_mask"``); batched envs add a leading ``B`` dimension.

Frames: everything is in the *ego frame* (AlpaSim's rig frame): origin at the rear-axle centre,
x forward, y left, yaw counter-clockwise, metres and radians.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ObsSpec:
    """One observation key."""

    key: str
    """Dictionary key."""
    shape: tuple[int, ...]
    """Shape without the batch dimension; ``shape[0]`` is the masked (time or element) axis."""
    features: tuple[str, ...]
    """Names of the last axis (empty for images)."""
    doc: str
    """What it holds."""
    alpasim: bool
    """True when AlpaSim can provide it (a policy that reads only such keys can be served)."""
    dtype: str = "float32"


EGO_HISTORY_LEN = 16
ROUTE_LEN = 20
GT_LEN = 64
MAP_POINTS = 256
AGENTS = 16
BEV_CHANNELS = 3
BEV_SIZE = 64

MAP_FEATURES = (
    "x", "y",             # segment start, ego frame (m)
    "dx", "dy",           # segment vector to its end (m)
    "half_width",         # lane half width (m), 0 for non-lanes
    "speed_limit",        # m/s, 0 when unknown
    "is_lane", "is_lane_boundary", "is_road_edge", "is_crosswalk",
    "tl_stop",            # 1 when the lane's traffic light is red/stop now
)
AGENT_FEATURES = (
    "x", "y",             # box centre, ego frame (m)
    "cos_yaw", "sin_yaw",  # heading relative to the ego
    "vx", "vy",           # velocity, ego frame (m/s)
    "length", "width",    # m
    "is_vehicle", "is_pedestrian", "is_cyclist",
)

SPECS: dict[str, ObsSpec] = {
    s.key: s
    for s in (
        ObsSpec(
            "ego_history", (EGO_HISTORY_LEN, 7),
            ("x", "y", "cos_yaw", "sin_yaw", "speed", "accel_lon", "yaw_rate"),
            "ego rear-axle poses 0.1 s apart, oldest first, last = now, current ego frame", True,
        ),
        ObsSpec(
            "route", (ROUTE_LEN, 3), ("x", "y", "z"),
            "AlpaSim route: waypoints 3.5-4.5 m apart ahead of the ego, ego frame", True,
        ),
        ObsSpec(
            "gt_trajectory", (GT_LEN, 3), ("x", "y", "yaw"),
            "recorded ego future at 0.1 s steps, ego frame", True,
        ),
        ObsSpec(
            "map_points", (MAP_POINTS, len(MAP_FEATURES)), MAP_FEATURES,
            "nearest map segments (privileged, drivesim only)", False,
        ),
        ObsSpec(
            "agents", (AGENTS, len(AGENT_FEATURES)), AGENT_FEATURES,
            "nearest other agents (privileged, drivesim only)", False,
        ),
        ObsSpec(
            "bev", (BEV_CHANNELS, BEV_SIZE, BEV_SIZE), (),
            "raster around the ego: drivable area, agents, route (drivesim only)", False,
        ),
    )
}

ALPASIM_KEYS = frozenset(k for k, s in SPECS.items() if s.alpasim) | {"cameras"}
"""Keys a policy may read and still be served to AlpaSim (``cameras`` are images, not in SPECS)."""


def mask_key(key: str) -> str:
    """Name of the boolean mask that goes with ``key``."""
    return f"{key}_mask"


def unknown_keys(keys: list[str] | tuple[str, ...]) -> list[str]:
    """Keys not in the table (``cameras`` counts as known)."""
    return [k for k in keys if k not in SPECS and k != "cameras"]


def drivesim_only(keys: list[str] | tuple[str, ...]) -> list[str]:
    """Keys AlpaSim cannot provide: a policy reading any of them cannot be served to AlpaSim."""
    return [k for k in keys if k not in ALPASIM_KEYS]


def empty(key: str, batch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Zero array and all-False mask for ``key`` (optionally with a leading batch dim)."""
    spec = SPECS[key]
    lead = () if batch is None else (batch,)
    return (
        np.zeros(lead + spec.shape, dtype=np.float32),
        np.zeros(lead + spec.shape[:1], dtype=bool),
    )
