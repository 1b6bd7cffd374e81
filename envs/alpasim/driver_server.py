"""An AlpaSim ``EgodriverService`` serving any policy (``alpagym_ray.policy.Policy``).

Many sessions at once; each keeps what the simulator submitted (egomotion, route, recorded ground
truth, latest camera frame per logical id) and turns it into the observation keys of
``alpagym_ray/observations.py`` at each ``drive``: ``ego_history`` (from the egomotion, dynamic states
for speed / acceleration / yaw rate), ``route`` (any number of waypoints; NaN padding dropped, the
first 20 kept), ``gt_trajectory`` (when sent), ``cameras`` (``{logical_id: [B, H, W, 3] uint8}`` with
``cameras_mask`` ``{logical_id: [B]}``). ``drive`` calls that arrive within ``batch_window_s`` of each other
are answered by one batched ``policy.act``. The answer is the action converted to the local frame:
the current pose first, then the H poses, at absolute timestamps 0.1 s apart.

A policy that reads drivesim-only keys (``alpagym_ray.observations.drivesim_only``) is refused with the
keys named. ``start_session`` for an id already open or closed starts it afresh (AlpaSim retries a
failed rollout under the same id); ``close_session`` is idempotent. Calls for a session that is not
open get ``NOT_FOUND``; ``drive`` before any egomotion gets ``FAILED_PRECONDITION``; undecodable messages
``INVALID_ARGUMENT``. The CLI (``alpagym-ray serve-driver``) loads the policy and passes it in.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import torch

from alpagym_ray.observations import drivesim_only, empty, mask_key
from envs.alpasim import convert
from envs.alpasim import messages as m

log = logging.getLogger(__name__)

SERVED_KEYS = ("ego_history", "route", "gt_trajectory", "cameras")
"""Observation keys this server builds from a session's submissions."""


class PolicyNotServable(ValueError):
    """The policy reads observation keys AlpaSim cannot provide."""


def check_servable(obs_keys: tuple[str, ...] | list[str]) -> None:
    """Raise :class:`PolicyNotServable` naming the drivesim-only keys among ``obs_keys``."""
    bad = drivesim_only(list(obs_keys))
    if bad:
        raise PolicyNotServable(
            f"the policy reads {bad}, which only drivesim provides; an AlpaSim driver can build only "
            f"{list(SERVED_KEYS)} (policy obs_keys: {list(obs_keys)})")


@dataclass(frozen=True)
class DriverConfig:
    """How the driver server batches and answers."""

    batch_window_s: float = 0.005
    """After the first pending ``drive``, wait this long for more before running the policy."""
    max_batch: int = 64
    """Most ``drive`` calls answered by one forward pass."""
    device: str = "cpu"
    """Torch device of the policy's inputs."""
    deterministic: bool | None = True
    """``act(deterministic=...)``: True the most likely trajectory, False a sample, None the policy's default."""
    seed: int = 0
    """Seed of the sampling generator (batches mix sessions, so samples are reproducible per server run)."""
    drive_timeout_s: float = 60.0
    """A ``drive`` waiting longer than this for the policy fails with ``DEADLINE_EXCEEDED``."""
    max_message_bytes: int = m.DEFAULT_MAX_MESSAGE_BYTES
    """Largest gRPC message accepted or sent."""
    max_workers: int = 64
    """gRPC handler threads (concurrent calls in flight)."""
    version: str = ""
    """Reported by ``get_version`` (default: the policy's class and version)."""
    extra: dict = field(default_factory=dict)
    """Free-form settings kept for forward compatibility of configs."""

    def __post_init__(self) -> None:
        if not 0 <= self.batch_window_s <= 1.0:
            raise ValueError(f"DriverConfig.batch_window_s must be in [0, 1] s, got {self.batch_window_s}")
        if self.max_batch < 1 or self.max_workers < 1:
            raise ValueError("DriverConfig.max_batch and max_workers must be >= 1")
        if not self.drive_timeout_s > 0:
            raise ValueError(f"DriverConfig.drive_timeout_s must be > 0, got {self.drive_timeout_s}")


class _Session:
    def __init__(self, request: Any):
        self.uuid: str = request.session_uuid
        self.seed: int = request.random_seed
        self.scene_id = request.debug_info.scene_id if request.HasField("debug_info") else ""
        self.cameras = {c.logical_id: c for c in request.rollout_spec.vehicle.available_cameras}
        self.track = convert.EgoTrack()
        self.route: Any = None
        self.ground_truth: Any = None
        self.images: dict[str, np.ndarray] = {}
        self.lock = threading.Lock()
        self.drives = 0


class _Pending:
    """One ``drive`` waiting for the batched forward pass."""

    def __init__(self, session: str, now_us: int, pose: np.ndarray, obs: dict[str, Any]):
        self.session, self.now_us, self.pose, self.obs = session, now_us, pose, obs
        self.done = threading.Event()
        self.response: Any = None
        self.error: str | None = None

    def signature(self) -> tuple:
        cams = self.obs.get("cameras", {})
        return tuple(sorted((k, v.shape) for k, v in cams.items()))


class DriverServicer:
    """The ``EgodriverService`` rpcs over one policy."""

    def __init__(self, policy: Any, config: DriverConfig | None = None):
        self.config = config or DriverConfig()
        obs_keys = tuple(getattr(policy, "obs_keys", ()))
        if not obs_keys:
            raise PolicyNotServable(f"{type(policy).__name__} declares no obs_keys")
        check_servable(obs_keys)
        self.policy = policy
        self.obs_keys = obs_keys
        self.horizon = int(policy.action_spec.horizon) if hasattr(policy, "action_spec") else int(policy.horizon)
        self.dt_us = int(round(getattr(getattr(policy, "action_spec", None), "dt", 0.1) * 1e6))
        self.sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()
        self._queue: list[_Pending] = []
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self.shutdown_requested = threading.Event()
        self.generator = torch.Generator(device=self.config.device).manual_seed(self.config.seed)
        self.batches: list[int] = []   # sizes of the forward passes run (for tests and logs)
        self._worker = threading.Thread(target=self._batch_loop, daemon=True, name="driver-batcher")
        self._worker.start()

    # ---- sessions ------------------------------------------------------------------------------
    def _session(self, session_uuid: str, context: grpc.ServicerContext, rpc: str) -> _Session:
        with self._lock:
            s = self.sessions.get(session_uuid)
        if s is None:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"{rpc}: session {session_uuid!r} is not open (call start_session first)")
        return s

    def start_session(self, request: Any, context: grpc.ServicerContext) -> Any:
        if not request.session_uuid:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "start_session: session_uuid is empty")
        with self._lock:
            again = request.session_uuid in self.sessions
            self.sessions[request.session_uuid] = _Session(request)
        if again:
            log.info("session %s restarted by a re-sent start_session", request.session_uuid)
        return m.SessionRequestStatus()

    def close_session(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._lock:
            self.sessions.pop(request.session_uuid, None)
        return m.Empty()

    def submit_image_observation(self, request: Any, context: grpc.ServicerContext) -> Any:
        s = self._session(request.session_uuid, context, "submit_image_observation")
        if "cameras" in self.obs_keys:  # decode only when the policy looks at images
            try:
                frame = convert.decode_image(request.camera_image.image_bytes)
            except convert.ConversionError as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"submit_image_observation (session {s.uuid}, camera "
                              f"{request.camera_image.logical_id!r}): {e}")
            with s.lock:
                s.images[request.camera_image.logical_id] = frame
        return m.Empty()

    def submit_egomotion_observation(self, request: Any, context: grpc.ServicerContext) -> Any:
        s = self._session(request.session_uuid, context, "submit_egomotion_observation")
        try:
            with s.lock:
                s.track.add(request)
        except convert.ConversionError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"submit_egomotion_observation (session {s.uuid}): {e}")
        return m.Empty()

    def submit_route(self, request: Any, context: grpc.ServicerContext) -> Any:
        s = self._session(request.session_uuid, context, "submit_route")
        with s.lock:
            s.route = request.route
        return m.Empty()

    def submit_recording_ground_truth(self, request: Any, context: grpc.ServicerContext) -> Any:
        s = self._session(request.session_uuid, context, "submit_recording_ground_truth")
        with s.lock:
            s.ground_truth = request.ground_truth
        return m.Empty()

    def get_version(self, request: Any, context: grpc.ServicerContext) -> Any:
        info = getattr(self.policy, "checkpoint_info", {}) or {}
        version = self.config.version or (
            f"alpagym-ray driver: {getattr(self.policy, 'kind', type(self.policy).__name__)}"
            f" policy_version {info.get('policy_version', 0)}")
        return m.version_id(version)

    def shut_down(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.shutdown_requested.set()
        return m.Empty()

    # ---- drive ---------------------------------------------------------------------------------
    def _observe(self, s: _Session, now_us: int) -> tuple[np.ndarray, dict[str, Any]]:
        """(current local-frame pose [3], observation {key: array} of one session)."""
        keys = self.obs_keys
        pose_now = s.track.pose_at(now_us)
        obs: dict[str, Any] = {}
        if "ego_history" in keys:
            obs["ego_history"], obs[mask_key("ego_history")] = s.track.history(now_us)

        def change(ts: int) -> np.ndarray | None:
            # the rig frame a message was written in, expressed in the rig frame at now
            if abs(int(ts) - int(now_us)) <= convert.TIME_TOLERANCE_US:
                return None
            return convert.to_frame(s.track.pose_at(ts), pose_now)

        if "route" in keys:
            if s.route is None:
                obs["route"], obs[mask_key("route")] = empty("route")
            else:
                obs["route"], obs[mask_key("route")] = convert.route_obs(
                    s.route, rig_change=change(s.route.timestamp_us))
        if "gt_trajectory" in keys:
            if s.ground_truth is None:
                obs["gt_trajectory"], obs[mask_key("gt_trajectory")] = empty("gt_trajectory")
            else:
                obs["gt_trajectory"], obs[mask_key("gt_trajectory")] = convert.gt_trajectory_obs(
                    s.ground_truth, now_us, rig_change=change(s.ground_truth.timestamp_us))
        if "cameras" in keys:
            ids = sorted(set(s.cameras) | set(s.images))
            cams, masks = {}, {}
            for cid in ids:
                if cid in s.images:
                    cams[cid], masks[cid] = s.images[cid], True
                else:
                    spec = s.cameras[cid].intrinsics
                    cams[cid] = np.zeros((max(spec.resolution_h, 1), max(spec.resolution_w, 1), 3), np.uint8)
                    masks[cid] = False
            obs["cameras"], obs[mask_key("cameras")] = cams, masks
        return pose_now, obs

    def drive(self, request: Any, context: grpc.ServicerContext) -> Any:
        s = self._session(request.session_uuid, context, "drive")
        now = int(request.time_now_us)
        with s.lock:
            if not len(s.track):
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"drive (session {s.uuid}, time_now_us {now}): no egomotion was submitted yet")
            try:
                pose, obs = self._observe(s, now)
            except convert.ConversionError as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"drive (session {s.uuid}): {e}")
            s.drives += 1
        pending = _Pending(s.uuid, now, pose, obs)
        with self._cv:
            self._queue.append(pending)
            self._cv.notify()
        if not pending.done.wait(self.config.drive_timeout_s):
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                          f"drive (session {s.uuid}): the policy gave no answer within {self.config.drive_timeout_s} s")
        if pending.error is not None:
            context.abort(grpc.StatusCode.INTERNAL, f"drive (session {s.uuid}): {pending.error}")
        return pending.response

    def _batch_loop(self) -> None:
        while not self._stop.is_set():
            with self._cv:
                while not self._queue and not self._stop.is_set():
                    self._cv.wait(0.5)
                if self._stop.is_set():
                    break
            # let more sessions join this forward pass
            deadline = time.monotonic() + self.config.batch_window_s
            with self._cv:
                while len(self._queue) < self.config.max_batch and time.monotonic() < deadline:
                    self._cv.wait(max(deadline - time.monotonic(), 0.0))
                batch, self._queue = self._queue[:self.config.max_batch], self._queue[self.config.max_batch:]
            groups: dict[tuple, list[_Pending]] = {}
            for p in batch:
                groups.setdefault(p.signature(), []).append(p)
            for group in groups.values():
                self._run(group)
        with self._cv:
            for p in self._queue:
                p.error = "the driver is shutting down"
                p.done.set()
            self._queue.clear()

    def _batch_obs(self, group: list[_Pending]) -> dict[str, Any]:
        dev = self.config.device
        out: dict[str, Any] = {}
        for key in group[0].obs:
            first = group[0].obs[key]
            if isinstance(first, Mapping):
                out[key] = {cid: torch.as_tensor(np.stack([np.asarray(p.obs[key][cid]) for p in group]), device=dev)
                            for cid in first}
            else:
                out[key] = torch.as_tensor(np.stack([p.obs[key] for p in group]), device=dev)
        return out

    def _run(self, group: list[_Pending]) -> None:
        try:
            obs = self._batch_obs(group)
            with torch.no_grad():
                action, _, _ = self.policy.act(obs, generator=self.generator, deterministic=self.config.deterministic)
            action = action.detach().float().cpu().numpy()
            if action.shape[:1] != (len(group),) or action.ndim != 3 or action.shape[2] != 3:
                raise ValueError(f"the policy returned actions of shape {list(action.shape)}, expected "
                                 f"[{len(group)}, H, 3]")
            for i, p in enumerate(group):
                p.response = m.DriveResponse(trajectory=convert.action_to_trajectory(
                    action[i], p.pose, p.now_us, self.dt_us))
        except Exception as e:  # answer every waiting call; keep serving
            log.exception("policy forward pass failed")
            for p in group:
                p.error = f"policy failed: {type(e).__name__}: {e}"
        self.batches.append(len(group))
        for p in group:
            p.done.set()

    def close(self) -> None:
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        self._worker.join(timeout=5)


class DriverServer:
    """A gRPC server hosting :class:`DriverServicer` (127.0.0.1 by default)."""

    def __init__(self, policy: Any, config: DriverConfig | None = None):
        self.servicer = DriverServicer(policy, config)
        self.config = self.servicer.config
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.config.max_workers, thread_name_prefix="driver"),
            options=m.server_options(self.config.max_message_bytes))
        self._server.add_generic_rpc_handlers((m.service_handler(m.EGODRIVER_RPCS, self.servicer),))
        self.host: str | None = None
        self.port: int | None = None
        self._stopped = threading.Event()

    def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Bind and start; returns the bound port (``port=0``: any free port)."""
        h = f"[{host}]" if ":" in host and not host.startswith("[") else host
        bound = self._server.add_insecure_port(f"{h}:{int(port)}")
        if not bound:
            raise OSError(f"alpasim driver: cannot bind {host}:{port}")
        self._server.start()
        self.host, self.port = host, bound
        threading.Thread(target=self._on_shutdown_request, daemon=True, name="driver-shutdown").start()
        return bound

    @property
    def address(self) -> str:
        return m.grpc_target(self.host or "127.0.0.1", self.port or 0)

    def _on_shutdown_request(self) -> None:
        self.servicer.shutdown_requested.wait()
        if not self._stopped.is_set():
            time.sleep(0.2)  # let the shut_down call be answered
            self.stop()

    def stop(self, grace: float | None = 1.0) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._server.stop(grace).wait()
        self.servicer.close()
        self.servicer.shutdown_requested.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stopped; False on timeout."""
        return not self._server.wait_for_termination(timeout)
