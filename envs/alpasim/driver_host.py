"""The ``EgodriverService`` an AlpaSim env hosts (``envs/alpasim/env.py``).

AlpaSim has no step API: its runtime calls the driver. So an env that trains against AlpaSim *is* a
driver server, turned inside out: each incoming ``drive`` becomes a decision the env hands to the
policy, and the ``drive`` call blocks until the env answers it with the policy's trajectory.

* :class:`DriverHost`: one gRPC server per process (``DriverHost.acquire``), shared by every env
  instance of the process (a rollout worker's B envs and any other env in it); sessions are routed
  by ``session_uuid``. Binds 127.0.0.1 unless told otherwise.
* :class:`DriverSession`: one rollout's state, fed by the gRPC handler threads (``start_session``,
  the ``submit_*`` observations, ``drive``, ``close_session``) and read by the env thread
  (:meth:`DriverSession.wait_event`, :meth:`DriverSession.answer`, :meth:`DriverSession.observe`).

Warm-up: a ``drive`` before the policy is in control (``time_now_us`` earlier than
``warmup_until_us``) is answered at once with an empty trajectory, which AlpaSim accepts only then.
With ``skip_driver_during_force_gt=true`` (as AlpaGym runs AlpaSim) the runtime sends no such drive.

Re-sent ``start_session`` for a known id (the runtime retries a failed rollout under the same id)
starts the session afresh and counts ``attempt``; the env decides whether that is acceptable.
Every blocking wait has a timeout; errors name the session and the last call seen.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from alpagym_ray.observations import mask_key
from envs.alpasim import convert
from envs.alpasim import messages as m

log = logging.getLogger(__name__)

DEFAULT_MAX_WORKERS = 256
"""Server threads: every session waiting for its action holds one while the policy runs."""
POLL_S = 0.25
"""How often a blocked ``drive`` checks that its caller is still there."""
DRIVER_VERSION = "alpagym-ray-env"


class SessionError(RuntimeError):
    """A session cannot go on (unknown id, aborted, out-of-order calls)."""


@dataclass(frozen=True)
class Decision:
    """One ``drive`` that waits for the env's action."""

    index: int
    """Decision number within the session attempt (0 = the first drive after warm-up)."""
    time_now_us: int
    """``DriveRequest.time_now_us``: the time of the current pose."""
    time_query_us: int
    """``DriveRequest.time_query_us``: when the runtime next asks (the control step's end)."""
    attempt: int
    """The session attempt (1 for the first ``start_session``, +1 per re-sent one) it belongs to."""


class DriverSession:
    """One driver session: what the runtime sent, and the drive waiting for an answer.

    Thread-safe: handler threads call the ``on_*`` methods, the env calls the others.
    """

    def __init__(self, session_uuid: str, scene_id: str = "", warmup_us: int = 0,
                 warmup_until_us: int | None = None, drive_timeout_s: float = 120.0):
        self.session_uuid = session_uuid
        self.scene_id = scene_id
        self.warmup_us = int(warmup_us)
        """Warm-up length; from ``warmup_until_us`` when known, else from the first drive seen."""
        self.warmup_until_us = warmup_until_us
        """Drives before this time are warm-up (None: the first drive's time + ``warmup_us``)."""
        self.drive_timeout_s = float(drive_timeout_s)
        self._cond = threading.Condition()
        self.attempt = 0
        self.random_seed = 0
        self.cameras: dict[str, tuple[int, int]] = {}
        """``{logical id: (height, width)}`` from ``start_session``'s vehicle definition."""
        self.track = convert.EgoTrack()
        self.route: Any = None
        """The latest ``Route`` message (None until one came)."""
        self.ground_truth: Any = None
        """The latest ``GroundTruth`` message (None until one came)."""
        self.images: dict[str, tuple[int, bytes]] = {}
        self.decisions = 0
        self.warmup_drives = 0
        self.pending: Decision | None = None
        self._answer: Any = None   # the DriveResponse the env handed over, until the drive call takes it
        self.closed = False
        self.aborted = ""
        self.simulate_done = False
        self.last_call = "none"
        self._last_call_t = time.monotonic()
        self.drive_times_us: list[int] = []

    # ---- bookkeeping ---------------------------------------------------------------------
    def _saw(self, call: str) -> None:
        self.last_call = call
        self._last_call_t = time.monotonic()

    def describe_last_call(self) -> str:
        """``"<call> (<s> s ago)"`` for error messages."""
        with self._cond:
            return f"{self.last_call} ({time.monotonic() - self._last_call_t:.1f} s ago)"

    def who(self) -> str:
        return f"session {self.session_uuid}" + (f" (scene {self.scene_id})" if self.scene_id else "")

    # ---- handler side --------------------------------------------------------------------
    def on_start(self, req: Any) -> None:
        with self._cond:
            self.attempt += 1
            self.random_seed = int(req.random_seed)
            if req.HasField("debug_info") and req.debug_info.scene_id and not self.scene_id:
                self.scene_id = req.debug_info.scene_id
            self.cameras = {}
            for cam in req.rollout_spec.vehicle.available_cameras:
                lid = cam.logical_id or cam.intrinsics.logical_id
                self.cameras[lid] = (int(cam.intrinsics.resolution_h), int(cam.intrinsics.resolution_w))
            # a re-sent start_session is a retried rollout: forget the failed attempt's data
            self.track = convert.EgoTrack()
            self.route, self.ground_truth, self.images = None, None, {}
            self.decisions = self.warmup_drives = 0
            self.pending, self._answer = None, None
            self.closed = False
            self.drive_times_us = []
            self._saw(f"start_session(attempt {self.attempt})")
            self._cond.notify_all()

    def on_egomotion(self, req: Any) -> None:
        with self._cond:
            self.track.add(req)   # ConversionError -> INVALID_ARGUMENT in the handler
            self._saw(f"submit_egomotion_observation({len(req.trajectory.poses)} poses)")

    def on_route(self, req: Any) -> None:
        with self._cond:
            self.route = m.Route()
            self.route.CopyFrom(req.route)
            self._saw(f"submit_route(t={req.route.timestamp_us})")

    def on_ground_truth(self, req: Any) -> None:
        with self._cond:
            self.ground_truth = m.GroundTruth()
            self.ground_truth.CopyFrom(req.ground_truth)
            self._saw(f"submit_recording_ground_truth(t={req.ground_truth.timestamp_us})")

    def on_image(self, req: Any) -> None:
        with self._cond:
            img = req.camera_image
            self.images[img.logical_id] = (int(img.frame_end_us), bytes(img.image_bytes))
            self._saw(f"submit_image_observation({img.logical_id}, t={img.frame_end_us})")

    def on_close(self) -> None:
        with self._cond:
            self.closed = True
            self._saw("close_session")
            self._cond.notify_all()

    def in_warmup(self, time_now_us: int) -> bool:
        """Whether a drive at ``time_now_us`` comes before the policy is in control (lock held)."""
        if self.warmup_until_us is None:
            if self.warmup_us <= 0:
                return False
            first = self.drive_times_us[0] if self.drive_times_us else time_now_us
            return time_now_us < first + self.warmup_us - convert.TIME_TOLERANCE_US
        return time_now_us < self.warmup_until_us - convert.TIME_TOLERANCE_US

    def on_drive(self, req: Any, context: grpc.ServicerContext) -> Any:
        """Answer a warm-up drive at once; else post the decision and block until the env answers."""
        t_now = int(req.time_now_us)
        with self._cond:
            if self.aborted:
                self._saw(f"drive(t={t_now}) after the env stopped the session: terminate_session")
                return m.DriveResponse(terminate_session=True)
            if self.attempt == 0:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"{self.who()}: drive before start_session")
            warm = self.in_warmup(t_now)
            self.drive_times_us.append(t_now)
            if warm:
                self.warmup_drives += 1
                self._saw(f"drive(t={t_now}, warm-up: empty trajectory)")
                return m.DriveResponse()
            if len(self.track) == 0:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"{self.who()}: drive(t={t_now}) before any egomotion observation")
            decision = Decision(self.decisions, t_now, int(req.time_query_us), self.attempt)
            self.decisions += 1
            self.pending, self._answer = decision, None
            self._saw(f"drive(t={t_now}, decision {decision.index})")
            self._cond.notify_all()
            deadline = time.monotonic() + self.drive_timeout_s
            while self._answer is None and not self.aborted and self.pending is decision:
                if not context.is_active():   # the runtime gave up on this call
                    self.pending = None
                    self._saw(f"drive(t={t_now}, decision {decision.index}) cancelled by the runtime")
                    self._cond.notify_all()
                    return m.DriveResponse(terminate_session=True)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.pending = None
                    self._saw(f"drive(t={t_now}, decision {decision.index}) unanswered")
                    self._cond.notify_all()
                    context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                  f"{self.who()}: the env gave no action for decision {decision.index} "
                                  f"(t={t_now}) within {self.drive_timeout_s} s")
                self._cond.wait(min(remaining, POLL_S))
            if self._answer is None:   # aborted, or a re-sent start_session replaced the decision
                self._saw(f"drive(t={t_now}, decision {decision.index}): terminate_session")
                return m.DriveResponse(terminate_session=True)
            resp, self._answer = self._answer, None
            return resp

    # ---- env side ------------------------------------------------------------------------
    def mark_simulate_done(self) -> None:
        """Called when the env's ``simulate`` call for this session returned or failed."""
        with self._cond:
            self.simulate_done = True
            self._cond.notify_all()

    def abort(self, reason: str) -> None:
        """Stop the session from the env's side: a waiting or later drive gets ``terminate_session``."""
        with self._cond:
            self.aborted = reason or "aborted"
            self._cond.notify_all()

    def wait_event(self, timeout_s: float, after: Decision | None = None,
                   limit_s: float | None = None) -> Decision | None:
        """Block until a decision newer than ``after`` is pending (returned) or ``simulate`` ended
        (None). Raises TimeoutError naming the session, the time limit (``limit_s``, default
        ``timeout_s``) and the last call seen."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                p = self.pending
                if p is not None and self._answer is None and (after is None or p != after):
                    return p
                if self.simulate_done:
                    return None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"{self.who()}: no drive and no end of simulate within {limit_s or timeout_s:g} s "
                        f"(decisions so far {self.decisions}, warm-up drives {self.warmup_drives}); last call "
                        f"seen: {self.last_call} ({time.monotonic() - self._last_call_t:.1f} s ago)")
                self._cond.wait(min(remaining, 1.0))

    def answer(self, decision: Decision, response: Any) -> None:
        """Hand the ``DriveResponse`` for ``decision`` to its waiting ``drive`` call."""
        with self._cond:
            if self.pending is not decision:
                raise SessionError(f"{self.who()}: decision {decision.index} is no longer waiting (the "
                                   f"runtime cancelled it or restarted the session); last call seen: "
                                   f"{self.last_call}")
            self._answer = response
            self.pending = None
            self._cond.notify_all()

    def ego_pose(self, time_us: int) -> np.ndarray:
        """The local-frame rig pose ``[3]`` (x, y, yaw) at ``time_us``."""
        with self._cond:
            return self.track.pose_at(time_us)

    def observe(self, keys: tuple[str, ...], now_us: int,
                camera_size: dict[str, tuple[int, int]] | None = None) -> dict[str, Any]:
        """Observations at ``now_us`` for ``keys`` (``alpagym_ray.observations`` table): ``{key: array,
        mask_key(key): mask}``; ``cameras`` gives ``{logical id: [H, W, 3] uint8}`` and
        ``cameras_mask`` ``{logical id: bool}`` (False when no frame came)."""
        from alpagym_ray.observations import empty

        out: dict[str, Any] = {}
        with self._cond:
            now_pose = self.track.pose_at(now_us)
            if "ego_history" in keys:
                out["ego_history"], out[mask_key("ego_history")] = self.track.history(now_us)
            if "route" in keys:
                if self.route is None:
                    out["route"], out[mask_key("route")] = empty("route")
                else:
                    change = self._rig_change(int(self.route.timestamp_us), now_pose, now_us)
                    out["route"], out[mask_key("route")] = convert.route_obs(self.route, rig_change=change)
            if "gt_trajectory" in keys:
                if self.ground_truth is None:
                    out["gt_trajectory"], out[mask_key("gt_trajectory")] = empty("gt_trajectory")
                else:
                    change = self._rig_change(int(self.ground_truth.timestamp_us), now_pose, now_us)
                    out["gt_trajectory"], out[mask_key("gt_trajectory")] = convert.gt_trajectory_obs(
                        self.ground_truth, now_us, rig_change=change)
            images = dict(self.images)
            declared = dict(self.cameras)
        if "cameras" in keys:
            sizes = dict(declared)
            sizes.update(camera_size or {})
            frames, present = {}, {}
            for lid, (h, w) in sizes.items():
                frame = np.zeros((max(h, 1), max(w, 1), 3), dtype=np.uint8)
                ok = lid in images
                if ok:
                    frame = _fit(convert.decode_image(images[lid][1]), h, w)
                frames[lid], present[lid] = frame, ok
            out["cameras"], out[mask_key("cameras")] = frames, present
        return out

    def _rig_change(self, sent_us: int, now_pose: np.ndarray, now_us: int) -> np.ndarray | None:
        """The rig pose at ``sent_us`` in the rig frame at ``now_us`` (None when the same time)."""
        if abs(sent_us - now_us) <= convert.TIME_TOLERANCE_US or len(self.track) == 0:
            return None
        return convert.to_frame(self.track.pose_at(sent_us), now_pose)


def _fit(frame: np.ndarray, h: int, w: int) -> np.ndarray:
    """``frame`` resized to ``[h, w, 3]`` when a declared size differs from the decoded one."""
    if h <= 0 or w <= 0 or frame.shape[:2] == (h, w):
        return frame
    from PIL import Image

    return np.asarray(Image.fromarray(frame).resize((w, h), Image.Resampling.BILINEAR), dtype=np.uint8)


class _Service:
    """``egodriver.EgodriverService`` over the host's sessions (``messages.service_handler`` calls these)."""

    def __init__(self, host: DriverHost):
        self.host = host

    def _session(self, uuid: str, context: grpc.ServicerContext, rpc: str) -> DriverSession:
        s = self.host.get(uuid)
        if s is None:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"{rpc}: no env in this process runs session {uuid!r} "
                          f"({len(self.host.session_ids())} sessions open)")
            raise AssertionError("unreachable: abort raises")
        return s

    def start_session(self, req: Any, context: grpc.ServicerContext) -> Any:
        self._session(req.session_uuid, context, "start_session").on_start(req)
        return m.SessionRequestStatus()

    def close_session(self, req: Any, context: grpc.ServicerContext) -> Any:
        s = self.host.get(req.session_uuid)
        if s is not None:   # closing an unknown (already dropped) session is harmless
            s.on_close()
        return m.Empty()

    def submit_image_observation(self, req: Any, context: grpc.ServicerContext) -> Any:
        self._session(req.session_uuid, context, "submit_image_observation").on_image(req)
        return m.Empty()

    def submit_egomotion_observation(self, req: Any, context: grpc.ServicerContext) -> Any:
        s = self._session(req.session_uuid, context, "submit_egomotion_observation")
        try:
            s.on_egomotion(req)
        except convert.ConversionError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"submit_egomotion_observation, {s.who()}: {e}")
        return m.Empty()

    def submit_route(self, req: Any, context: grpc.ServicerContext) -> Any:
        self._session(req.session_uuid, context, "submit_route").on_route(req)
        return m.Empty()

    def submit_recording_ground_truth(self, req: Any, context: grpc.ServicerContext) -> Any:
        self._session(req.session_uuid, context, "submit_recording_ground_truth").on_ground_truth(req)
        return m.Empty()

    def drive(self, req: Any, context: grpc.ServicerContext) -> Any:
        return self._session(req.session_uuid, context, "drive").on_drive(req, context)

    def get_version(self, req: Any, context: grpc.ServicerContext) -> Any:
        return m.VersionId(version_id=DRIVER_VERSION, git_hash="",
                           grpc_api_version=m.VersionId.APIVersion(major=0, minor=54, patch=0))

    def shut_down(self, req: Any, context: grpc.ServicerContext) -> Any:
        # the env owns this server's lifetime (it lives inside a training process): acknowledge only
        log.warning("AlpaSim env driver host: shut_down received and ignored (the env stops the server)")
        return m.Empty()


class DriverHost:
    """The process's ``EgodriverService`` server, shared by every AlpaSim env instance in it.

    ``DriverHost.acquire(host, port)`` returns the running server for ``(host, port)`` (``port=0``:
    any free port, one server per host) and counts a reference; ``release()`` drops it and stops the
    server with the last one.
    """

    _hosts: dict[tuple[str, int], DriverHost] = {}
    _hosts_lock = threading.Lock()

    def __init__(self, host: str = "127.0.0.1", port: int = 0, max_workers: int = DEFAULT_MAX_WORKERS,
                 max_message_bytes: int = m.DEFAULT_MAX_MESSAGE_BYTES):
        self.bind_host = host
        self._sessions: dict[str, DriverSession] = {}
        self._lock = threading.Lock()
        self._refs = 0
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers,
                                                              thread_name_prefix="alpasim-env-driver"),
                                   options=m.server_options(max_message_bytes))
        self._server.add_generic_rpc_handlers((m.service_handler(m.EGODRIVER_RPCS, _Service(self)),))
        bound = self._server.add_insecure_port(f"{_grpc_host(host)}:{port}")
        if bound == 0:
            raise OSError(f"AlpaSim env driver host: cannot bind {host}:{port}")
        self.port = bound
        self._server.start()
        self._key = (host, port)

    @classmethod
    def acquire(cls, host: str = "127.0.0.1", port: int = 0, max_workers: int = DEFAULT_MAX_WORKERS,
                max_message_bytes: int = m.DEFAULT_MAX_MESSAGE_BYTES) -> DriverHost:
        with cls._hosts_lock:
            h = cls._hosts.get((host, port))
            if h is None:
                h = cls(host, port, max_workers, max_message_bytes)
                cls._hosts[(host, port)] = h
            h._refs += 1
            return h

    def release(self) -> None:
        with DriverHost._hosts_lock:
            self._refs -= 1
            if self._refs > 0:
                return
            if DriverHost._hosts.get(self._key) is self:
                del DriverHost._hosts[self._key]
        with self._lock:
            sessions = list(self._sessions.values())
        for s in sessions:
            s.abort("driver host stopped")
        self._server.stop(grace=0.5)

    def address(self, advertise_host: str | None = None) -> tuple[str, int]:
        """``(host, port)`` the runtime should call (``advertise_host`` or the bind host)."""
        host = advertise_host or self.bind_host
        if host in ("0.0.0.0", "::", "[::]", ""):
            raise ValueError("the driver host binds every interface: give driver_advertise_host, the "
                             "address the AlpaSim runtime can reach this process on")
        return host, self.port

    # ---- sessions ------------------------------------------------------------------------
    def open_session(self, session: DriverSession) -> DriverSession:
        with self._lock:
            if session.session_uuid in self._sessions:
                raise SessionError(f"session {session.session_uuid} is already open in this process")
            self._sessions[session.session_uuid] = session
        return session

    def drop_session(self, session_uuid: str) -> None:
        with self._lock:
            self._sessions.pop(session_uuid, None)

    def get(self, session_uuid: str) -> DriverSession | None:
        with self._lock:
            return self._sessions.get(session_uuid)

    def session_ids(self) -> list[str]:
        with self._lock:
            return list(self._sessions)


def _grpc_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
