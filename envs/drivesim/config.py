"""drivesim's configuration: one frozen dataclass, a docstring per field, checks in __post_init__."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from alpagym_ray.observations import SPECS, unknown_keys


@dataclass(frozen=True)
class DriveSimConfig:
    """How drivesim simulates, observes and ends episodes."""

    obs_keys: tuple[str, ...] = ("ego_history", "route", "map_points", "agents", "gt_trajectory")
    """Observation keys to build (alpagym_ray.observations.SPECS); ``bev`` is optional."""
    horizon: int = 20
    """H, the number of future poses in a trajectory action (≥ 5; Alpamayo's 64 accepted)."""
    decision_every: int = 2
    """Ticks (0.1 s each) per decision: 2 = 5 Hz as AlpaGym's AlpaSim runs, 1 = 10 Hz."""
    warmup_ticks: int = 17
    """Ticks of logged-ego replay before the policy is in control (AlpaSim: 1.7 s)."""
    max_ticks: int | None = None
    """Cap on in-control ticks per episode (None: until the end of the log)."""
    agents: str = "log"
    """Other agents: ``log`` replay or reactive ``idm`` along each agent's logged path."""
    tracking: str = "controller"
    """``controller`` tracks the trajectory every tick; ``perfect`` puts the ego on it."""
    action_mode: str = "trajectory"
    """``trajectory`` ([H, 3] ego-frame poses) or ``accel_curvature`` ([2] applied every tick)."""
    invalid_action: str = "clip"
    """Non-finite or out-of-range actions: ``clip`` (replace / clip, counted) or ``reject`` (raise)."""
    terminate_on_collision: bool = False
    """End the episode on an at-fault collision (front or lateral)."""
    terminate_on_offroad: bool = False
    """End the episode on off-road."""
    cut_after_failure: bool = True
    """Episode metrics ignore ticks after the first collision / off-road (AlpaSim's aggregation)."""
    offroad_tolerance_m: float = 0.3
    """A box corner farther than this outside the drivable area is off-road (DESIGN.md)."""
    raster_resolution_m: float = 0.25
    """Cell size of the drivable-area signed-distance raster."""
    max_agents: int | None = 64
    """Cap on agents per scene when padding (nearest to the ego's start are kept); None = no cap."""
    max_map_points: int | None = 20000
    """Cap on map segments per scene when padding (nearest to the ego path kept); None = no cap."""
    map_segment_m: float = 2.0
    """Map polylines are cut into segments of at most this length for observations."""
    route_spacing_m: float = 4.0
    """Spacing of route waypoints (AlpaSim: 3.5-4.5 m)."""
    render_size: int = 400
    """Side of ``render()`` frames in pixels."""
    cuda_graph: bool = True
    """On a GPU, replay each tick from a CUDA graph (envs/drivesim/cuda_graph.py): same results,
    one launch instead of hundreds. Ignored on the CPU."""
    extra: dict = field(default_factory=dict)
    """Free-form options passed through (kept for forward compatibility of configs)."""

    def __post_init__(self) -> None:
        bad = unknown_keys(self.obs_keys)
        if bad:
            raise ValueError(f"DriveSimConfig.obs_keys: unknown keys {bad}; valid: {sorted(SPECS)}")
        if "cameras" in self.obs_keys:
            raise ValueError("DriveSimConfig.obs_keys: drivesim renders no cameras; use 'bev'")
        if self.horizon < 5:
            raise ValueError(f"DriveSimConfig.horizon must be >= 5, got {self.horizon}")
        if self.decision_every < 1:
            raise ValueError(f"DriveSimConfig.decision_every must be >= 1, got {self.decision_every}")
        if self.warmup_ticks < 0:
            raise ValueError(f"DriveSimConfig.warmup_ticks must be >= 0, got {self.warmup_ticks}")
        if self.max_ticks is not None and self.max_ticks < self.decision_every:
            raise ValueError("DriveSimConfig.max_ticks must be >= decision_every")
        choices = {
            "agents": ("log", "idm"),
            "tracking": ("controller", "perfect"),
            "action_mode": ("trajectory", "accel_curvature"),
            "invalid_action": ("clip", "reject"),
        }
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"DriveSimConfig.{name}={getattr(self, name)!r}; valid: {list(valid)}")
        if self.offroad_tolerance_m < 0 or self.raster_resolution_m <= 0:
            raise ValueError("DriveSimConfig: offroad_tolerance_m >= 0 and raster_resolution_m > 0 required")

    @classmethod
    def from_dict(cls, d: dict) -> DriveSimConfig:
        """Build from a plain dict (e.g. a Hydra node), naming unknown keys."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            import difflib

            hints = {k: difflib.get_close_matches(k, names, n=1) for k in unknown}
            raise ValueError(f"unknown drivesim option(s) {unknown} (did you mean {hints}); valid: {sorted(names)}")
        d = dict(d)
        if "obs_keys" in d:
            d["obs_keys"] = tuple(d["obs_keys"])
        return cls(**d)
