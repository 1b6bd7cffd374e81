"""An AlpaSim ``RuntimeService`` backed by drivesim: AlpaSim's runtime loop over our scene sets.

``simulate`` runs every requested rollout the way AlpaSim's runtime does, against the drivers named
in the request (``available_drivers``, at most ``n_concurrent_per_driver`` sessions each):

1. ``start_session`` (``random_seed``: the spec's ``random_seed + k``, a random one when 0; the camera
   definitions of the vehicle; ``debug_info.scene_id``).
2. The first ``start_time_offset_us`` of the clip are skipped (rounded to a 0.1 s tick); then a
   warm-up of ``warmup_ticks`` (AlpaSim's 1.7 s) replays the recorded ego ("force GT").
3. Per decision (every ``control_step_us``): a camera frame (a JPEG of a top-down rendering,
   ``render_frame``; north-up, centred on the ego box), the egomotion (the first submission carries the
   whole recorded history from the clip start, later ones the poses since the previous one, each with
   a rig-frame dynamic state), the route (20 waypoints 4 m apart along the recorded path, rig frame,
   NaN-padded), optionally the recorded ground truth (64 poses, rig frame), then ``drive``.
4. The returned trajectory (local frame, absolute timestamps, current pose first) is resampled to
   ``horizon`` rig-frame poses at 0.1 s and tracked by drivesim's controller for one control step.
   A response with ``terminate_session`` ends the rollout there (a success, with the ticks so far).
5. ``close_session``; the ``RolloutReturn`` carries every drivesim per-tick series as
   ``timestep_metrics`` (warm-up ticks included with ``eval_relevant`` = 0) and ``aggregated_metrics``
   (raw time aggregations over all valid ticks, nothing cut).

``skip_driver_during_force_gt`` (default True, as AlpaGym runs AlpaSim): no observation or ``drive`` is
sent during the warm-up; the first ``drive`` is the first decision with the policy in control, and its
egomotion carries the history up to then. With False, every warm-up decision is sent like any
other and the driver's answer is ignored (an empty trajectory is fine then; after the warm-up it
fails the rollout, as in AlpaSim).

Time: step ``t`` of a clip is at ``CLIP_START_US + t * 100 000`` µs. Per-tick metrics are stamped with
the time at the end of the tick; warm-up ticks are evaluated on the recorded ego pose (collisions of
the recorded ego are contacts of the log and never count), and drivesim measures
``dist_traveled_m`` from the moment the policy takes control, so that series is invalid during the
warm-up (as is ``plan_deviation``).

Faults: an unknown scene or a malformed request fails the whole call with ``INVALID_ARGUMENT`` (the
server keeps serving); every call to a driver has a deadline, and a driver that fails or does not
answer fails that rollout only (``success`` False, ``error`` naming the session, the call and the last
call answered); others continue. Messages over ``max_message_bytes`` get ``RESOURCE_EXHAUSTED``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import queue
import secrets
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from alpagym_ray.metrics import MetricSeries
from envs.alpasim import convert
from envs.alpasim import messages as m
from envs.alpasim.convert import TICK_US
from envs.drivesim import agents as agents_mod
from envs.drivesim import checks, observe, render
from envs.drivesim.batched import DriveSimBatch
from envs.drivesim.config import DriveSimConfig
from envs.drivesim.metric_names import DRIVESIM_METRICS
from envs.drivesim.scene import SceneSet

log = logging.getLogger(__name__)

CLIP_START_US = 1_700_000_000_000_000
"""Absolute time of step 0 of every clip (AlpaSim's timestamps are epoch microseconds)."""
CAMERA_ID = "camera_bev_top_down"
"""Logical id of the one camera: a north-up top-down rendering (not a perspective camera)."""
RUNTIME_VERSION = "alpagym-ray drivesim runtime 0.1.0"
SEED_MOD = 2**63


@dataclass(frozen=True)
class RuntimeConfig:
    """How the drivesim-backed runtime runs rollouts."""

    scenes_dir: str
    """Scene-set directory (``index.json`` + ``scenes/``) whose scenes the runtime offers."""
    control_step_us: int = 200_000
    """Time between two ``drive`` calls (a positive multiple of 100 000 µs; default 2 ticks = 5 Hz)."""
    warmup_ticks: int = 17
    """Ticks of recorded-ego replay before the policy is in control (AlpaSim: 1.7 s)."""
    max_steps: int | None = None
    """Cap on in-control ticks per rollout (None: until the end of the clip; AlpaSim: 200)."""
    horizon: int = 20
    """Poses (0.1 s apart) taken from each driver trajectory for the controller (AlpaSim tracks 2 s)."""
    skip_driver_during_force_gt: bool = True
    """No observations or ``drive`` during the warm-up (see the module docstring)."""
    send_ground_truth: bool = True
    """Send the recorded future (``submit_recording_ground_truth``) before each ``drive``."""
    camera_px: int = 128
    """Side of the camera frame in pixels; 0 sends no camera."""
    camera_view_m: float = 60.0
    """Metres covered by the camera frame's side."""
    jpeg_quality: int = 85
    """JPEG quality of camera frames (1-95)."""
    driver_timeout_s: float = 30.0
    """Deadline of every call to a driver."""
    max_concurrent_rollouts: int = 16
    """Rollouts run at once across all ``simulate`` calls."""
    agents: str = "log"
    """Other agents: ``log`` replay or reactive ``idm`` (drivesim's)."""
    default_driver: str | None = None
    """``host:port`` of a driver used when a request names none (None: such a request is invalid)."""
    max_message_bytes: int = m.DEFAULT_MAX_MESSAGE_BYTES
    """Largest gRPC message accepted or sent."""
    drivesim: dict = field(default_factory=dict)
    """Further drivesim options (``DriveSimConfig`` fields, e.g. ``agents``-independent checks)."""

    def __post_init__(self) -> None:
        if self.control_step_us <= 0 or self.control_step_us % TICK_US:
            raise ValueError(f"RuntimeConfig.control_step_us must be a positive multiple of {TICK_US} "
                             f"(one 0.1 s tick), got {self.control_step_us}")
        if self.warmup_ticks < 0:
            raise ValueError(f"RuntimeConfig.warmup_ticks must be >= 0, got {self.warmup_ticks}")
        if self.max_steps is not None and self.max_steps < self.decision_every:
            raise ValueError(f"RuntimeConfig.max_steps ({self.max_steps}) must cover one control step "
                             f"({self.decision_every} ticks)")
        if self.horizon < 5:
            raise ValueError(f"RuntimeConfig.horizon must be >= 5, got {self.horizon}")
        if self.camera_px and self.camera_px < 16:
            raise ValueError(f"RuntimeConfig.camera_px must be 0 (no camera) or >= 16, got {self.camera_px}")
        if not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"RuntimeConfig.jpeg_quality must be in 1..95, got {self.jpeg_quality}")
        if not self.driver_timeout_s > 0:
            raise ValueError(f"RuntimeConfig.driver_timeout_s must be > 0, got {self.driver_timeout_s}")
        if self.max_concurrent_rollouts < 1:
            raise ValueError("RuntimeConfig.max_concurrent_rollouts must be >= 1")
        if self.default_driver is not None:
            parse_address(self.default_driver)
        bad = {"decision_every", "warmup_ticks", "max_ticks", "horizon", "obs_keys", "agents"} & set(self.drivesim)
        if bad:
            raise ValueError(f"RuntimeConfig.drivesim must not set {sorted(bad)}: they are runtime settings")
        self.drivesim_config()  # raises on unknown drivesim options

    @property
    def decision_every(self) -> int:
        """Ticks per control step."""
        return self.control_step_us // TICK_US

    def drivesim_config(self) -> DriveSimConfig:
        return DriveSimConfig.from_dict({
            **self.drivesim, "obs_keys": ("ego_history",), "horizon": self.horizon,
            "decision_every": self.decision_every, "warmup_ticks": self.warmup_ticks,
            "max_ticks": self.max_steps, "agents": self.agents})


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) -> (host, port); ValueError naming the address."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"driver address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def time_us(step: int) -> int:
    """Absolute time of clip step ``step``."""
    return CLIP_START_US + int(step) * TICK_US


class RolloutFailed(RuntimeError):
    """A rollout cannot go on; the message names the session and what failed."""


class _Invalid(ValueError):
    """A request the runtime rejects with INVALID_ARGUMENT."""


# ---- scenes and envs ---------------------------------------------------------------------------------
class _ScenePool:
    """Loads scenes on demand and keeps idle drivesim envs (one scene, one env each) for reuse:
    building an env (its padded tensors and rasters) costs far more than resetting one."""

    def __init__(self, scene_set: SceneSet, config: DriveSimConfig):
        self.scene_set = scene_set
        self.config = config
        self._idle: dict[str, list[DriveSimBatch]] = {}
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self._templates: dict[str, DriveSimBatch] = {}

    def _build(self, scene_id: str) -> DriveSimBatch:
        with self._lock:
            lock = self._loading.setdefault(scene_id, threading.Lock())
        with lock:  # one build per scene at a time; later acquirers usually find an idle env
            with self._lock:
                if self._idle.get(scene_id):
                    return self._idle[scene_id].pop()
                template = self._templates.get(scene_id)
            if template is not None:
                return _fresh_copy(template)
            scene = self.scene_set.load(scene_id)
            env = DriveSimBatch([scene], num_envs=1, config=self.config)
            with self._lock:
                self._templates[scene_id] = env
            return env

    def acquire(self, scene_id: str) -> DriveSimBatch:
        with self._lock:
            if self._idle.get(scene_id):
                return self._idle[scene_id].pop()
        return self._build(scene_id)

    def release(self, scene_id: str, env: DriveSimBatch) -> None:
        with self._lock:
            self._idle.setdefault(scene_id, []).append(env)

    def prefetch(self, scene_id: str) -> None:
        with self._lock:
            if self._idle.get(scene_id):
                return
        self.release(scene_id, self._build(scene_id))


def _fresh_copy(env: DriveSimBatch) -> DriveSimBatch:
    """A second env over the same scene tensors with its own simulation state. The scene tensors,
    config and parameters are read-only during simulation, so sharing them is safe; ``_alloc`` gives
    the copy fresh state buffers (DriveSimBatch has no public way to do this yet)."""
    new = copy.copy(env)
    new._alloc()
    return new


def log_kinematics(env: DriveSimBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The recorded ego of env 0's scene: rear-axle poses ``[T, 3]``, ``(speed, accel_lon, yaw_rate) [T, 3]``
    by central differences of the logged velocities and headings (as drivesim's warm-up), valid ``[T]``."""
    s = int(env.scene[0])
    T = int(env.st.num_steps[s])
    pose = env.st.ego_log_pose[s, :T].double().cpu().numpy()
    vel = env.st.agent_state[s, 0, :T, 3:5].double().cpu().numpy()
    valid = env.st.agent_valid[s, 0, :T].cpu().numpy()
    speed = np.clip(vel[:, 0] * np.cos(pose[:, 2]) + vel[:, 1] * np.sin(pose[:, 2]), 0.0, None)
    if T > 1:
        accel = np.gradient(speed, 0.1)
        yaw_rate = np.gradient(np.unwrap(pose[:, 2]), 0.1)
    else:
        accel = yaw_rate = np.zeros(T)
    return pose, np.stack([speed, accel, yaw_rate], -1), valid


def warmup_metrics(env: DriveSimBatch, t_start: int, t0: int) -> np.ndarray:
    """Per-tick metrics ``[t0 - t_start, NUM_METRICS]`` (NaN = undefined) of the warm-up ticks
    ``t_start + 1 .. t0`` of env 0, evaluated on the recorded ego (``eval_relevant`` = 0)."""
    W = t0 - t_start
    if W <= 0:
        return np.zeros((0, checks.NUM_METRICS))
    st, dev = env.st, env.device
    s = int(env.scene[0])
    pose_np, kin_np, _ = log_kinematics(env)
    steps = np.arange(t_start + 1, t0 + 1)
    kin = kin_np[steps]
    prev = kin_np[steps - 1]
    ften = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32, device=dev)  # noqa: E731
    accel_lat = kin[:, 0] * kin[:, 2]
    prev_lat = prev[:, 0] * prev[:, 2]
    k = {
        "accel_lon": ften(kin[:, 1]), "accel_lat": ften(accel_lat), "yaw_rate": ften(kin[:, 2]),
        "jerk_lon": ften((kin[:, 1] - prev[:, 1]) / 0.1),
        "jerk": ften(np.hypot(kin[:, 1] - prev[:, 1], accel_lat - prev_lat) / 0.1),
        "yaw_accel": ften((kin[:, 2] - prev[:, 2]) / 0.1),
    }
    scene = torch.full((W,), s, dtype=torch.long, device=dev)
    t = torch.as_tensor(steps, dtype=torch.long, device=dev)
    pose = ften(pose_np[steps])
    state, valid = agents_mod.replay(st.agent_state, st.agent_valid, scene, t)
    ignore = checks.contacts(st, scene, pose, state, valid)   # the recorded ego's contacts never count
    s_log = st.log_s[scene, t]
    values, _, _ = checks.tick_metrics(
        st, scene, t, torch.full_like(t, t_start), env.t_end[:1].expand(W), pose, ften(kin[:, 0]), k,
        state, valid, ignore, s_log, torch.zeros(W, device=dev), env.cfg.offroad_tolerance_m)
    out = values.double().cpu().numpy()
    out[:, checks.METRIC_INDEX["eval_relevant"]] = 0.0
    out[:, checks.METRIC_INDEX["dist_traveled_m"]] = np.nan
    out[:, checks.METRIC_INDEX["plan_deviation"]] = np.nan
    return out


# ---- one rollout -------------------------------------------------------------------------------------
class _DriverCalls:
    """The calls of one session to its driver, each with a deadline; errors name the session, the
    call and the last call that was answered."""

    def __init__(self, stub: m.Stub, session_uuid: str, timeout_s: float, address: str):
        self.stub, self.session, self.timeout, self.address = stub, session_uuid, timeout_s, address
        self.last = "none"

    def __call__(self, rpc: str, request: Any, timeout: float | None = None) -> Any:
        try:
            response = getattr(self.stub, rpc)(request, timeout=timeout or self.timeout)
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                what = f"got no answer within {timeout or self.timeout:g} s"
            else:
                what = f"failed: {code.name if code else 'error'}: {e.details() if hasattr(e, 'details') else e}"
            raise RolloutFailed(f"session {self.session}: driver {self.address} {rpc} {what} "
                                f"(last call answered: {self.last})") from None
        self.last = rpc
        return response


class _Rollout:
    """Runs one rollout of one scene against one driver and returns its ``RolloutReturn``."""

    def __init__(self, runtime: RuntimeServicer, spec: Any, scene_id: str, start_step: int, seed: int,
                 session_uuid: str, calls: _DriverCalls):
        self.rt, self.cfg = runtime, runtime.config
        self.spec, self.scene_id, self.start_step = spec, scene_id, start_step
        self.seed, self.session = seed, session_uuid
        self.calls = calls
        self.ego: dict[int, tuple[np.ndarray, np.ndarray]] = {}   # step -> (pose [3], kinematics [3])
        self.sent_upto = -1

    def run(self) -> Any:
        rr = m.SimulationReturn.RolloutReturn(rollout_spec=self.spec, rollout_uuid=self.session)
        env = None
        started = closed = False
        try:
            env = self.rt.pool.acquire(self.scene_id)
            env.reset(seeds=[self.seed % SEED_MOD], options=[{"scene_id": self.scene_id,
                                                              "start_step": self.start_step}])
            t0 = int(env.t[0])
            self._record_log(env, t0)
            self.calls("start_session", self._session_request())
            started = True
            if not self.cfg.skip_driver_during_force_gt:
                for ts in range(self.start_step, t0, self.cfg.decision_every):
                    self._decide(env, ts, warmup=True)
            while True:
                self._check_running()
                t = int(env.t[0])
                response = self._decide(env, t, warmup=False)
                if response.terminate_session:
                    break
                if not response.trajectory.poses:
                    raise RolloutFailed(f"session {self.session}: the driver answered drive at "
                                        f"{time_us(t)} us with an empty trajectory after the warm-up")
                try:
                    action = convert.trajectory_to_action(response.trajectory, env.pose[0].double().cpu().numpy(),
                                                          time_us(t), self.cfg.horizon)
                except convert.ConversionError as e:
                    raise RolloutFailed(f"session {self.session}: bad trajectory from drive at "
                                        f"{time_us(t)} us: {e}") from None
                _, _, _, _, info = env.step(torch.as_tensor(action, device=env.device)[None])
                self._record_sim(env, t)
                if bool(info["ended"][0]):
                    break
            self.calls("close_session", m.DriveSessionCloseRequest(session_uuid=self.session))
            closed = True
            series = self._series(env, t0)
            rr.timestep_metrics.extend(convert.series_to_timestep_metric(s) for s in series)
            for name, value in convert.raw_aggregates(series).items():
                rr.aggregated_metrics[name] = value
            rr.success = True
            rr.error_code = m.ROLLOUT_ERROR_CODE_NONE
        except RolloutFailed as e:
            rr.success, rr.error, rr.error_code = False, str(e), m.ROLLOUT_ERROR_CODE_UNSPECIFIED
        except Exception as e:  # a bug or a bad scene must fail this rollout only
            log.exception("session %s: rollout failed", self.session)
            rr.success, rr.error_code = False, m.ROLLOUT_ERROR_CODE_UNSPECIFIED
            rr.error = f"session {self.session}: {type(e).__name__}: {e} (last driver call answered: {self.calls.last})"
        finally:
            if started and not closed:
                with contextlib.suppress(RolloutFailed):  # best effort, short: the driver may be why we are here
                    self.calls("close_session", m.DriveSessionCloseRequest(session_uuid=self.session),
                               timeout=min(2.0, self.cfg.driver_timeout_s))
            if env is not None:
                self.rt.pool.release(self.scene_id, env)
        return rr

    def _check_running(self) -> None:
        if self.rt.stopping.is_set():
            raise RolloutFailed(f"session {self.session}: the runtime is shutting down")

    def _session_request(self) -> Any:
        req = m.DriveSessionRequest(session_uuid=self.session, random_seed=self.seed)
        req.debug_info.scene_id = self.scene_id
        if self.cfg.camera_px:
            req.rollout_spec.vehicle.available_cameras.append(self.rt.camera)
        return req

    # egomotion bookkeeping: every step's rear-axle pose and kinematics, sent once each
    def _record_log(self, env: DriveSimBatch, t0: int) -> None:
        pose, kin, valid = log_kinematics(env)
        for step in range(0, t0 + 1):
            if valid[step]:
                self.ego[step] = (pose[step], kin[step])
        self._record_hist(env, t0, len(env.hist[0]))

    def _record_hist(self, env: DriveSimBatch, t: int, n: int) -> None:
        """Steps ``t - n + 1 .. t`` from drivesim's own ego history (what its observations use)."""
        hist = env.hist[0].double().cpu().numpy()
        ok = env.hist_valid[0].cpu().numpy()
        for j in range(1, n + 1):
            if ok[-j] and t - j + 1 >= 0:
                self.ego[t - j + 1] = (hist[-j, :3], hist[-j, 3:6])

    def _record_sim(self, env: DriveSimBatch, t_before: int) -> None:
        t = int(env.t[0])
        self._record_hist(env, t, t - t_before)

    def _decide(self, env: DriveSimBatch, t: int, warmup: bool) -> Any:
        """Send the observations of step ``t`` and call ``drive``; return the response."""
        now = time_us(t)
        st, s = env.st, int(env.scene[0])
        if warmup:
            scene_t = env.scene[:1]
            tt = torch.tensor([t], device=env.device)
            pose_t = st.ego_log_pose[s, t][None]
            s_path = st.log_s[s, t][None]
            agent_state, agent_valid = agents_mod.replay(st.agent_state, st.agent_valid, scene_t, tt)
        else:
            scene_t, tt, pose_t, s_path = env.scene[:1], env.t[:1], env.pose[:1], env.s_proj[:1]
            agent_state, agent_valid = env.agent_state[:1], env.agent_valid[:1]
        pose = pose_t[0].double().cpu().numpy()
        if self.cfg.camera_px:
            frame = self.rt.render(env, pose, agent_state[0, 1:].cpu().numpy(), agent_valid[0, 1:].cpu().numpy())
            image = m.RolloutCameraImage(session_uuid=self.session, camera_image=m.RolloutCameraImage.CameraImage(
                frame_start_us=now, frame_end_us=now, logical_id=CAMERA_ID,
                image_bytes=convert.encode_jpeg(frame, self.cfg.jpeg_quality)))
            self.calls("submit_image_observation", image)
        steps = sorted(k for k in self.ego if self.sent_upto < k <= t)
        if steps:
            poses = np.stack([self.ego[k][0] for k in steps])
            kin = np.stack([self.ego[k][1] for k in steps])
            self.calls("submit_egomotion_observation",
                       convert.egomotion_msg(self.session, poses, [time_us(k) for k in steps], kin))
            self.sent_upto = t
        route, route_mask = observe.route(st, scene_t, s_path, pose_t, env.cfg.route_spacing_m)
        self.calls("submit_route", m.RouteRequest(session_uuid=self.session, route=convert.route_msg(
            route[0].cpu().numpy(), route_mask[0].cpu().numpy(), now)))
        if self.cfg.send_ground_truth:
            gt, gt_mask = observe.gt_trajectory(st, scene_t, tt, pose_t)
            self.calls("submit_recording_ground_truth", m.GroundTruthRequest(
                session_uuid=self.session,
                ground_truth=convert.ground_truth_msg(gt[0].cpu().numpy(), gt_mask[0].cpu().numpy(), now)))
        return self.calls("drive", m.DriveRequest(session_uuid=self.session, time_now_us=now,
                                                  time_query_us=now + self.cfg.control_step_us))

    def _series(self, env: DriveSimBatch, t0: int) -> list[MetricSeries]:
        n = int(env.ticks[0])
        ctrl = env.series[0, :n].double().cpu().numpy()
        values = np.concatenate([warmup_metrics(env, self.start_step, t0), ctrl], axis=0)
        ts = np.array([time_us(k) for k in range(self.start_step + 1, t0 + 1 + n)], dtype=np.int64)
        return [MetricSeries(name, ts, np.nan_to_num(values[:, i]), np.isfinite(values[:, i]), DRIVESIM_METRICS[name])
                for name, i in checks.METRIC_INDEX.items()]


# ---- the service -------------------------------------------------------------------------------------
@dataclass
class _Job:
    spec: Any
    scene_id: str
    start_step: int
    seed: int
    session_uuid: str


class RuntimeServicer:
    """The ``RuntimeService`` rpcs (``simulate``, ``prefetch_scene``, ``get_runtime_info``, ``shut_down``)."""

    def __init__(self, config: RuntimeConfig):
        self.config = config
        self.scene_set = SceneSet.open(config.scenes_dir)
        self.entries = {e["scene_id"]: e for e in self.scene_set.entries}
        self.pool = _ScenePool(self.scene_set, config.drivesim_config())
        self.stopping = threading.Event()
        self.shutdown_requested = threading.Event()
        self._slots = threading.BoundedSemaphore(config.max_concurrent_rollouts)
        self._render_lock = threading.Lock()
        px = config.camera_px
        # a camera 50 m above the ego looking straight down with the image's top to the north: its
        # focal length makes camera_view_m fill the frame at the ground
        height = 50.0
        self.camera = convert.pinhole_camera(
            CAMERA_ID, px, px, focal_px=px * height / config.camera_view_m,
            rig_to_camera=(0.0, 0.0, height, 0.0, 1.0, 0.0, 0.0)) if px else None

    # helpers
    def render(self, env: DriveSimBatch, pose: np.ndarray, agent_state: np.ndarray,
               agent_valid: np.ndarray) -> np.ndarray:
        s = int(env.scene[0])
        st = env.st
        with self._render_lock:  # the renderer's map-layer cache is shared
            return render.render_frame(
                env.scenes[0], ego_pose=pose, ego_size=st.agent_size[s, 0].cpu().numpy(),
                agent_state=agent_state, agent_valid=agent_valid,
                agent_size=st.agent_size[s, 1:].cpu().numpy(), agent_type=st.agent_type[s, 1:].cpu().numpy(),
                view_size_m=self.config.camera_view_m, px=self.config.camera_px,
                rear_axle_to_center=float(st.ego_rac[s]))

    def _scene_steps(self, scene_id: str) -> int:
        return int(self.entries[scene_id].get("num_steps", 0))

    def _unknown_scene(self, scene_id: str, where: str) -> _Invalid:
        import difflib

        close = difflib.get_close_matches(scene_id, list(self.entries), n=3)
        hint = f"; did you mean {close}?" if close else ""
        return _Invalid(f"{where}: unknown scene {scene_id!r} (this runtime serves {len(self.entries)} scenes "
                        f"from {self.config.scenes_dir}; see get_runtime_info){hint}")

    def _jobs(self, request: Any) -> list[_Job]:
        cfg = self.config
        if not request.rollout_specs:
            raise _Invalid("SimulationRequest: rollout_specs is empty")
        jobs = []
        for i, spec in enumerate(request.rollout_specs):
            where = f"rollout_specs[{i}]"
            if spec.scenario_id not in self.entries:
                raise self._unknown_scene(spec.scenario_id, where)
            if spec.nr_rollouts < 1:
                raise _Invalid(f"{where}: nr_rollouts must be >= 1, got {spec.nr_rollouts}")
            if spec.session_uuids and len(spec.session_uuids) != spec.nr_rollouts:
                raise _Invalid(f"{where}: {len(spec.session_uuids)} session_uuids for nr_rollouts={spec.nr_rollouts}")
            start_step = int(round(spec.start_time_offset_us / TICK_US))
            T = self._scene_steps(spec.scenario_id)
            max_start = T - 2 - cfg.warmup_ticks - cfg.decision_every
            if T and start_step > max_start:
                raise _Invalid(f"{where}: start_time_offset_us {spec.start_time_offset_us} leaves no decision in "
                               f"scene {spec.scenario_id!r} ({T} steps of 0.1 s, warm-up {cfg.warmup_ticks} "
                               f"ticks); the largest offset is {max(max_start, 0) * TICK_US} us")
            for k in range(spec.nr_rollouts):
                seed = (spec.random_seed + k) % 2**64 if spec.random_seed else secrets.randbits(63) + 1
                session = spec.session_uuids[k] if spec.session_uuids else uuid.uuid4().hex
                if not session:
                    raise _Invalid(f"{where}: session_uuids[{k}] is empty")
                jobs.append(_Job(spec, spec.scenario_id, start_step, seed, session))
        sessions = [j.session_uuid for j in jobs]
        if len(set(sessions)) != len(sessions):
            raise _Invalid("SimulationRequest: session_uuids repeat across rollouts")
        return jobs

    def _drivers(self, request: Any) -> list[tuple[str, int]]:
        drivers = [(d.ip, d.port) for d in request.available_drivers]
        if not drivers:
            if self.config.default_driver is None:
                raise _Invalid("SimulationRequest: available_drivers is empty and this runtime has no default "
                               "driver (--driver HOST:PORT)")
            drivers = [parse_address(self.config.default_driver)]
            per_driver = max(request.n_concurrent_per_driver, 1)
        else:
            per_driver = request.n_concurrent_per_driver
            if per_driver < 1:
                raise _Invalid("SimulationRequest: n_concurrent_per_driver must be >= 1 when drivers are given")
        for i, (ip, port) in enumerate(drivers):
            try:
                m.grpc_target(ip, port)
            except ValueError as e:
                raise _Invalid(f"SimulationRequest.available_drivers[{i}]: {e}") from None
        return [d for d in drivers for _ in range(per_driver)]

    # rpcs
    def simulate(self, request: Any, context: grpc.ServicerContext) -> Any:
        if self.stopping.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, "the runtime is shutting down")
        try:
            jobs = self._jobs(request)
            slots = self._drivers(request)
        except _Invalid as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        targets = sorted({m.grpc_target(ip, port) for ip, port in slots})
        channels = {t: grpc.insecure_channel(t, options=m.channel_options(self.config.max_message_bytes))
                    for t in targets}
        stubs = {t: m.egodriver_stub(c) for t, c in channels.items()}
        free: queue.Queue[str] = queue.Queue()
        for ip, port in slots:
            free.put(m.grpc_target(ip, port))

        def run(job: _Job) -> Any:
            target = free.get()
            try:
                with self._slots:
                    calls = _DriverCalls(stubs[target], job.session_uuid, self.config.driver_timeout_s, target)
                    return _Rollout(self, job.spec, job.scene_id, job.start_step, job.seed,
                                    job.session_uuid, calls).run()
            finally:
                free.put(target)

        t_begin = time.perf_counter()
        try:
            with futures.ThreadPoolExecutor(max_workers=min(len(jobs), len(slots)),
                                            thread_name_prefix="rollout") as pool:
                returns = list(pool.map(run, jobs))
        finally:
            for c in channels.values():
                c.close()
        ok = sum(r.success for r in returns)
        log.info("simulate: %d/%d rollouts succeeded in %.1f s", ok, len(returns), time.perf_counter() - t_begin)
        version = m.version_id(RUNTIME_VERSION)
        return m.SimulationReturn(runtime_version=version, physics_version=version, traffic_version=version,
                                  rollout_returns=returns)

    def prefetch_scene(self, request: Any, context: grpc.ServicerContext) -> Any:
        if request.scene_id not in self.entries:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          str(self._unknown_scene(request.scene_id, "ScenePrefetchRequest")))
        self.pool.prefetch(request.scene_id)
        return m.Empty()

    def get_runtime_info(self, request: Any, context: grpc.ServicerContext) -> Any:
        cfg = self.config
        info = m.RuntimeInfo(max_supported_concurrent_rollouts=cfg.max_concurrent_rollouts, nr_workers=1,
                             renderer_type="drivesim-top-down-jpeg" if cfg.camera_px else "none",
                             runtime_version=m.version_id(RUNTIME_VERSION))
        for sid, e in self.entries.items():
            T = int(e.get("num_steps", 0))
            meta = m.SceneMetadata(version_string=str(e.get("dataset", "")), uuid=sid,
                                   camera_ids=[CAMERA_ID] if cfg.camera_px else [],
                                   start_time_us=CLIP_START_US, end_time_us=time_us(max(T - 1, 0)))
            info.scenes.append(m.SceneInfo(scene_id=sid, provider_kind="drivesim", metadata=meta))
        return info

    def shut_down(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.shutdown_requested.set()
        return m.Empty()


class RuntimeServer:
    """A gRPC server hosting :class:`RuntimeServicer` (127.0.0.1 by default)."""

    def __init__(self, config: RuntimeConfig, max_workers: int = 32):
        self.servicer = RuntimeServicer(config)
        self.config = config
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="runtime"),
                                   options=m.server_options(config.max_message_bytes))
        self._server.add_generic_rpc_handlers((m.service_handler(m.RUNTIME_RPCS, self.servicer),))
        self.port: int | None = None
        self.host: str | None = None
        self._watch: threading.Thread | None = None
        self._stop_lock = threading.Lock()

    def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Bind and start; returns the bound port (``port=0``: any free port)."""
        bound = self._server.add_insecure_port(f"{_bracket(host)}:{int(port)}")
        if not bound:
            raise OSError(f"alpasim runtime: cannot bind {host}:{port}")
        self._server.start()
        self.host, self.port = host, bound
        self._watch = threading.Thread(target=self._on_shutdown_request, daemon=True, name="runtime-shutdown")
        self._watch.start()
        return bound

    @property
    def address(self) -> str:
        return m.grpc_target(self.host or "127.0.0.1", self.port or 0)

    def _on_shutdown_request(self) -> None:
        self.servicer.shutdown_requested.wait()
        # answer the shut_down call first, then stop (rollouts in flight end with an error)
        time.sleep(0.2)
        self.stop()

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop serving (idempotent); rollouts in flight end with an error at their next decision."""
        with self._stop_lock:
            if self.servicer.stopping.is_set():
                return
            self.servicer.stopping.set()
        self.servicer.shutdown_requested.set()
        self._server.stop(grace).wait()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stopped (``shut_down`` or :meth:`stop`); False on timeout."""
        timed_out = self._server.wait_for_termination(timeout)
        return not timed_out


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def write_server_yaml(path: str | Path, host: str, port: int) -> Path:
    """Write ``host`` / ``port`` like AlpaSim's ``generated-runtime-server.yaml`` (for clients that read it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(f"host: {host}\nport: {int(port)}\n")
    tmp.replace(path)
    return path


def serve(config: RuntimeConfig, host: str = "127.0.0.1", port: int = 0,
          on_start: Sequence[Any] = ()) -> RuntimeServer:
    """Start a runtime server; ``on_start`` callables get ``(host, port)`` once bound."""
    server = RuntimeServer(config)
    bound = server.start(host, port)
    for cb in on_start:
        cb(host, bound)
    return server
