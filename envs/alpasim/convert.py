"""Conversions between AlpaSim messages and our arrays: frames, quaternions, trajectories, routes,
ego history, ground truth, camera JPEGs and metric series.

Frames (DESIGN.md, "Frames and actions"): the *local* frame is the scene's metric frame (AlpaSim's
local/ENU frame); the *rig* (ego) frame has its origin at the rear-axle centre, x forward, y left,
yaw counter-clockwise. A pose ``(x, y, yaw)`` here is always the rig pose; ``common.Pose`` carries it
as translation + quaternion (rotation about z only; roll and pitch are dropped when read).

Time: AlpaSim timestamps are absolute microseconds (``fixed64``). One drivesim tick is
``TICK_US`` = 100 000 µs. An action is H rig-frame poses at ``now + k * TICK_US``, k = 1..H (the current
pose excluded); a ``DriveResponse`` trajectory is local-frame poses at absolute timestamps with the
current pose first.

Every function is numpy (float64 inside, float32 where an observation comes out); shapes in the
docstrings; no state except :class:`EgoTrack`, the accumulator of a session's egomotion.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from alpagym_ray.metrics import Aggregation, MetricSeries, series_to_arrays
from alpagym_ray.observations import EGO_HISTORY_LEN, GT_LEN, ROUTE_LEN
from envs.alpasim import messages as m

TICK_US = 100_000
"""One drivesim tick (0.1 s) in microseconds."""
ROUTE_WAYPOINTS = ROUTE_LEN
"""AlpaSim sends 20 route waypoints (NaN-padded)."""
TIME_TOLERANCE_US = 1_000
"""Timestamps within 1 ms of a sample time count as that time (clock rounding between peers)."""


class ConversionError(ValueError):
    """A message cannot be turned into arrays (empty, non-finite, timestamps out of order...)."""


# ---- angles, quaternions, poses -----------------------------------------------------------------
def wrap_angle(a: np.ndarray | float) -> np.ndarray:
    """Angles wrapped to [-pi, pi)."""
    return (np.asarray(a, dtype=np.float64) + np.pi) % (2 * np.pi) - np.pi


def yaw_to_quat(yaw: np.ndarray | float) -> np.ndarray:
    """Quaternion ``[..., 4]`` (w, x, y, z) of a rotation by ``yaw [...]`` about z."""
    half = 0.5 * np.asarray(yaw, dtype=np.float64)
    zero = np.zeros_like(half)
    return np.stack([np.cos(half), zero, zero, np.sin(half)], axis=-1)


def quat_to_yaw(q: np.ndarray) -> np.ndarray:
    """Yaw ``[...]`` (rotation about z, ZYX convention) of quaternions ``[..., 4]`` (w, x, y, z);
    need not be normalised. A zero quaternion (an unset ``Quat``) reads as yaw 0."""
    q = np.asarray(q, dtype=np.float64)
    w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    n2 = w * w + x * x + y * y + z * z
    unset = n2 == 0
    w = np.where(unset, 1.0, w)
    n2 = np.where(unset, 1.0, n2)
    return np.arctan2(2.0 * (w * z + x * y), n2 - 2.0 * (y * y + z * z))


def pose_msg(x: float, y: float, yaw: float, z: float = 0.0) -> m.Pose:
    """A ``common.Pose`` (translation then rotation about z)."""
    w, qx, qy, qz = yaw_to_quat(yaw)
    return m.Pose(vec=m.Vec3(x=x, y=y, z=z), quat=m.Quat(w=w, x=qx, y=qy, z=qz))


def pose_xyyaw(pose: m.Pose) -> np.ndarray:
    """``[3]`` (x, y, yaw) of a ``common.Pose`` (z, roll and pitch dropped)."""
    q = pose.quat
    return np.array([pose.vec.x, pose.vec.y, float(quat_to_yaw(np.array([q.w, q.x, q.y, q.z])))])


def to_frame(poses: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """Poses ``[..., 3]`` (or points ``[..., 2]``) given in frame F, expressed in the frame of the pose
    ``origin [3]`` (also given in F). E.g. local-frame poses -> the rig frame of the ego at ``origin``."""
    poses = np.asarray(poses, dtype=np.float64)
    ox, oy, oyaw = (float(v) for v in np.asarray(origin, dtype=np.float64).reshape(3))
    c, s = np.cos(oyaw), np.sin(oyaw)
    dx, dy = poses[..., 0] - ox, poses[..., 1] - oy
    xy = np.stack([c * dx + s * dy, -s * dx + c * dy], axis=-1)
    if poses.shape[-1] == 2:
        return xy
    return np.concatenate([xy, wrap_angle(poses[..., 2:3] - oyaw), poses[..., 3:]], axis=-1)


def from_frame(poses: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_frame`: poses ``[..., 3]`` (or points ``[..., 2]``) in the frame of ``origin``
    expressed in the frame ``origin`` is given in."""
    poses = np.asarray(poses, dtype=np.float64)
    ox, oy, oyaw = (float(v) for v in np.asarray(origin, dtype=np.float64).reshape(3))
    c, s = np.cos(oyaw), np.sin(oyaw)
    x, y = poses[..., 0], poses[..., 1]
    xy = np.stack([ox + c * x - s * y, oy + s * x + c * y], axis=-1)
    if poses.shape[-1] == 2:
        return xy
    return np.concatenate([xy, wrap_angle(poses[..., 2:3] + oyaw), poses[..., 3:]], axis=-1)


# ---- trajectories ------------------------------------------------------------------------------
def trajectory_msg(poses: np.ndarray, timestamps_us: Sequence[int] | np.ndarray) -> m.Trajectory:
    """A ``common.Trajectory`` of ``poses [N, 3]`` (x, y, yaw) at ``timestamps_us [N]``."""
    poses = np.asarray(poses, dtype=np.float64).reshape(-1, 3)
    ts = np.asarray(timestamps_us, dtype=np.int64).reshape(-1)
    if len(ts) != len(poses):
        raise ConversionError(f"trajectory_msg: {len(poses)} poses but {len(ts)} timestamps")
    quats = yaw_to_quat(poses[:, 2])
    return m.Trajectory(poses=[
        m.PoseAtTime(pose=m.Pose(vec=m.Vec3(x=p[0], y=p[1], z=0.0), quat=m.Quat(w=q[0], x=q[1], y=q[2], z=q[3])),
                     timestamp_us=int(t))
        for p, q, t in zip(poses.tolist(), quats.tolist(), ts.tolist(), strict=True)
    ])


def trajectory_arrays(traj: m.Trajectory) -> tuple[np.ndarray, np.ndarray]:
    """``(poses [N, 3] float64 (x, y, yaw), timestamps_us [N] int64)`` of a ``common.Trajectory``."""
    n = len(traj.poses)
    poses = np.zeros((n, 3))
    ts = np.zeros(n, dtype=np.int64)
    quats = np.zeros((n, 4))
    for i, p in enumerate(traj.poses):
        poses[i, 0], poses[i, 1] = p.pose.vec.x, p.pose.vec.y
        q = p.pose.quat
        quats[i] = (q.w, q.x, q.y, q.z)
        ts[i] = p.timestamp_us
    poses[:, 2] = quat_to_yaw(quats) if n else poses[:, 2]
    return poses, ts


def interpolate_poses(poses: np.ndarray, ts_us: np.ndarray, query_us: np.ndarray,
                      extrapolate: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Poses ``[Q, 3]`` at ``query_us [Q]`` from ``poses [N, 3]`` at strictly increasing ``ts_us [N]``.

    Linear in x, y and the unwrapped yaw between samples. Past the last sample, with ``extrapolate``,
    the last segment's velocity and yaw rate continue (a single pose is held). Returns the poses and
    ``inside [Q]`` (True where the query lies within the samples, 1 ms tolerance)."""
    poses = np.asarray(poses, dtype=np.float64).reshape(-1, 3)
    ts = np.asarray(ts_us, dtype=np.int64).reshape(-1)
    q = np.asarray(query_us, dtype=np.int64).reshape(-1)
    if len(ts) == 0:
        raise ConversionError("interpolate_poses: no poses")
    if len(ts) > 1 and not (np.diff(ts) > 0).all():
        raise ConversionError(f"interpolate_poses: timestamps are not strictly increasing: {ts.tolist()[:8]}...")
    yaw = np.unwrap(poses[:, 2])
    t = (ts - ts[0]).astype(np.float64)
    tq = (q - ts[0]).astype(np.float64)
    inside = (q >= ts[0] - TIME_TOLERANCE_US) & (q <= ts[-1] + TIME_TOLERANCE_US)
    if len(ts) == 1:
        return np.repeat(poses[:1], len(q), axis=0), inside
    out = np.stack([np.interp(tq, t, poses[:, 0]), np.interp(tq, t, poses[:, 1]), np.interp(tq, t, yaw)], -1)
    if extrapolate:
        after = tq > t[-1]
        if after.any():
            rate = (np.array([poses[-1, 0], poses[-1, 1], yaw[-1]]) - np.array([poses[-2, 0], poses[-2, 1], yaw[-2]]))
            rate = rate / (t[-1] - t[-2])
            last = np.array([poses[-1, 0], poses[-1, 1], yaw[-1]])
            out[after] = last + (tq[after] - t[-1])[:, None] * rate
    out[:, 2] = wrap_angle(out[:, 2])
    return out, inside


def action_to_trajectory(action: np.ndarray, ego_pose: np.ndarray, time_now_us: int,
                         dt_us: int = TICK_US) -> m.Trajectory:
    """A ``DriveResponse`` trajectory from an action.

    ``action [H, 3]``: rig-frame poses at ``now + k * dt_us``, k = 1..H; ``ego_pose [3]``: the current rig
    pose in the local frame. Returns H + 1 local-frame poses, the current pose first, at absolute
    timestamps ``time_now_us + k * dt_us``, k = 0..H."""
    action = np.asarray(action, dtype=np.float64).reshape(-1, 3)
    if not np.isfinite(action).all():
        raise ConversionError("action_to_trajectory: the action has non-finite values")
    ego_pose = np.asarray(ego_pose, dtype=np.float64).reshape(3)
    local = np.concatenate([ego_pose[None], from_frame(action, ego_pose)], axis=0)
    ts = int(time_now_us) + dt_us * np.arange(len(local), dtype=np.int64)
    return trajectory_msg(local, ts)


def trajectory_to_action(traj: m.Trajectory, ego_pose: np.ndarray, time_now_us: int, horizon: int,
                         dt_us: int = TICK_US) -> np.ndarray:
    """An action ``[horizon, 3]`` (rig frame of ``ego_pose``, poses at ``now + k * dt_us``, k = 1..H) from a
    ``DriveResponse`` trajectory (local frame, absolute timestamps, current pose first).

    Poses are interpolated in time; past the trajectory's end its last velocity and yaw rate are
    continued (a trajectory shorter than the horizon still gives a full action); when its first
    timestamp is after ``time_now_us``, the ego's current pose is put in front."""
    poses, ts = trajectory_arrays(traj)
    if len(ts) == 0:
        raise ConversionError("the trajectory is empty")
    if not np.isfinite(poses).all():
        raise ConversionError("the trajectory has non-finite poses")
    if len(ts) > 1 and not (np.diff(ts) > 0).all():
        raise ConversionError(f"the trajectory's timestamps are not strictly increasing (first ones: "
                              f"{ts.tolist()[:6]})")
    ego_pose = np.asarray(ego_pose, dtype=np.float64).reshape(3)
    if ts[0] > time_now_us + TIME_TOLERANCE_US:
        poses = np.concatenate([ego_pose[None], poses], axis=0)
        ts = np.concatenate([[int(time_now_us)], ts])
    if ts[-1] <= time_now_us:
        raise ConversionError(f"the trajectory ends at {int(ts[-1])} us, not after now ({int(time_now_us)} us)")
    query = int(time_now_us) + dt_us * np.arange(1, horizon + 1, dtype=np.int64)
    local, _ = interpolate_poses(poses, ts, query, extrapolate=True)
    return to_frame(local, ego_pose).astype(np.float32)


# ---- egomotion -----------------------------------------------------------------------------------
def dynamic_state_msg(speed: float, accel_lon: float, yaw_rate: float) -> m.DynamicState:
    """A rig-frame ``common.DynamicState`` of planar motion: velocity (speed, 0, 0), acceleration
    (accel_lon, speed * yaw_rate, 0), angular velocity (0, 0, yaw_rate)."""
    return m.DynamicState(
        linear_velocity=m.Vec3(x=speed, y=0.0, z=0.0),
        linear_acceleration=m.Vec3(x=accel_lon, y=speed * yaw_rate, z=0.0),
        angular_velocity=m.Vec3(x=0.0, y=0.0, z=yaw_rate),
        angular_acceleration=m.Vec3(),
    )


def egomotion_msg(session_uuid: str, poses: np.ndarray, timestamps_us: np.ndarray,
                  kinematics: np.ndarray | None = None) -> m.RolloutEgoTrajectory:
    """A ``RolloutEgoTrajectory``: local-frame rig ``poses [N, 3]`` at ``timestamps_us [N]`` and, when
    given, ``kinematics [N, 3]`` (speed, accel_lon, yaw_rate) as one dynamic state per pose."""
    msg = m.RolloutEgoTrajectory(session_uuid=session_uuid, trajectory=trajectory_msg(poses, timestamps_us))
    if kinematics is not None:
        kin = np.asarray(kinematics, dtype=np.float64).reshape(-1, 3)
        if len(kin) != len(msg.trajectory.poses):
            raise ConversionError(f"egomotion_msg: {len(kin)} dynamic states for {len(msg.trajectory.poses)} poses")
        msg.dynamic_states.extend(dynamic_state_msg(*row) for row in kin.tolist())
    return msg


class EgoTrack:
    """A session's egomotion as received: local-frame rig poses with timestamps, and kinematics.

    ``add`` takes each ``RolloutEgoTrajectory`` (the first carries the whole recorded history, later
    ones the poses since); repeated or older timestamps replace earlier samples. Kinematics come from
    the dynamic states when sent, else from finite differences of the poses.
    """

    def __init__(self) -> None:
        self._poses: dict[int, np.ndarray] = {}
        self._kin: dict[int, np.ndarray | None] = {}
        self._cache: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self._poses)

    def add(self, msg: m.RolloutEgoTrajectory) -> None:
        poses, ts = trajectory_arrays(msg.trajectory)
        if not np.isfinite(poses).all():
            raise ConversionError("egomotion has non-finite poses")
        states = list(msg.dynamic_states)
        if states and len(states) != len(ts):
            raise ConversionError(f"egomotion has {len(states)} dynamic states for {len(ts)} poses")
        for i, t in enumerate(ts.tolist()):
            self._poses[t] = poses[i]
            if states:
                s = states[i]
                self._kin[t] = np.array([s.linear_velocity.x, s.linear_acceleration.x, s.angular_velocity.z])
            else:
                self._kin[t] = None
        self._cache = None

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(timestamps_us [N] int64, poses [N, 3], kinematics [N, 3])`` sorted by time."""
        if self._cache is None:
            ts = np.array(sorted(self._poses), dtype=np.int64)
            poses = np.array([self._poses[t] for t in ts.tolist()]).reshape(-1, 3)
            kin = np.full((len(ts), 3), np.nan)
            for i, t in enumerate(ts.tolist()):
                if self._kin[t] is not None:
                    kin[i] = self._kin[t]
            missing = ~np.isfinite(kin).all(1)
            if missing.any():
                kin[missing] = finite_difference_kinematics(poses, ts)[missing]
            self._cache = (ts, poses, kin)
        return self._cache

    @property
    def last_time_us(self) -> int:
        if not self._poses:
            raise ConversionError("no egomotion received yet")
        return max(self._poses)

    def pose_at(self, time_us: int) -> np.ndarray:
        """The local-frame rig pose ``[3]`` at ``time_us`` (interpolated; held past the ends)."""
        ts, poses, _ = self.arrays()
        if not len(ts):
            raise ConversionError("no egomotion received yet")
        out, _ = interpolate_poses(poses, ts, np.array([time_us]), extrapolate=False)
        return out[0]

    def history(self, now_us: int, length: int = EGO_HISTORY_LEN,
                dt_us: int = TICK_US) -> tuple[np.ndarray, np.ndarray]:
        """The ``ego_history`` observation at ``now_us``: ``([length, 7] float32, mask [length] bool)``.

        Rows sample the track at ``now - (length - 1 - i) * dt_us`` (oldest first, last = now): x, y,
        cos yaw, sin yaw in the rig frame at now, speed, longitudinal acceleration, yaw rate (the
        nearest received sample's). Rows before the first pose or after the last are masked."""
        ts, poses, kin = self.arrays()
        if not len(ts):
            raise ConversionError("no egomotion received yet")
        query = int(now_us) - dt_us * np.arange(length - 1, -1, -1, dtype=np.int64)
        sampled, inside = interpolate_poses(poses, ts, query, extrapolate=False)
        now_pose, _ = interpolate_poses(poses, ts, np.array([now_us]), extrapolate=False)
        rel = to_frame(sampled, now_pose[0])
        nearest = np.clip(np.searchsorted(ts, query), 0, len(ts) - 1)
        prev = np.clip(nearest - 1, 0, len(ts) - 1)
        use_prev = np.abs(ts[prev] - query) < np.abs(ts[nearest] - query)
        k = kin[np.where(use_prev, prev, nearest)]
        out = np.stack([rel[:, 0], rel[:, 1], np.cos(rel[:, 2]), np.sin(rel[:, 2]), k[:, 0], k[:, 1], k[:, 2]], -1)
        out = np.where(inside[:, None], out, 0.0)
        return out.astype(np.float32), inside


def finite_difference_kinematics(poses: np.ndarray, ts_us: np.ndarray) -> np.ndarray:
    """``[N, 3]`` (speed, accel_lon, yaw_rate) of poses ``[N, 3]`` at ``ts_us [N]`` by central
    differences (zeros for a single pose)."""
    poses = np.asarray(poses, dtype=np.float64).reshape(-1, 3)
    n = len(poses)
    if n < 2:
        return np.zeros((n, 3))
    t = (np.asarray(ts_us, dtype=np.int64) - int(ts_us[0])) / 1e6
    vx = np.gradient(poses[:, 0], t)
    vy = np.gradient(poses[:, 1], t)
    speed = vx * np.cos(poses[:, 2]) + vy * np.sin(poses[:, 2])
    accel = np.gradient(speed, t)
    yaw_rate = np.gradient(np.unwrap(poses[:, 2]), t)
    return np.stack([speed, accel, yaw_rate], -1)


# ---- routes and ground truth -----------------------------------------------------------------------
def route_msg(waypoints: np.ndarray, mask: np.ndarray | None, timestamp_us: int,
              length: int = ROUTE_WAYPOINTS) -> m.Route:
    """A ``Route`` of ``length`` rig-frame waypoints from ``waypoints [K, 2 or 3]``; masked-out rows and
    rows past K are NaN (AlpaSim's padding)."""
    w = np.asarray(waypoints, dtype=np.float64).reshape(len(waypoints), -1)
    if w.shape[1] == 2:
        w = np.concatenate([w, np.zeros((len(w), 1))], axis=1)
    keep = np.ones(len(w), bool) if mask is None else np.asarray(mask, dtype=bool).reshape(-1)
    rows = np.full((length, 3), np.nan)
    n = min(length, len(w))
    rows[:n] = np.where(keep[:n, None], w[:n, :3], np.nan)
    return m.Route(waypoints=[m.Vec3(x=x, y=y, z=z) for x, y, z in rows.tolist()], timestamp_us=int(timestamp_us))


def route_obs(route: m.Route, length: int = ROUTE_LEN,
              rig_change: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``route`` observation ``([length, 3] float32, mask [length])`` from a ``Route`` of any length.

    Non-finite waypoints are dropped (AlpaSim NaN-pads); the first ``length`` finite ones are kept in
    order. ``rig_change [3]``: the rig pose at the route's timestamp expressed in the current rig frame,
    to move waypoints sent for an earlier time into the current frame (None: same time)."""
    w = np.array([(p.x, p.y, p.z) for p in route.waypoints], dtype=np.float64).reshape(-1, 3)
    w = w[np.isfinite(w).all(1)][:length]
    if rig_change is not None and len(w):
        w[:, :2] = from_frame(w[:, :2], rig_change)
    out = np.zeros((length, 3), dtype=np.float32)
    mask = np.zeros(length, dtype=bool)
    out[:len(w)] = w
    mask[:len(w)] = True
    return out, mask


def ground_truth_msg(gt: np.ndarray, mask: np.ndarray | None, timestamp_us: int,
                     dt_us: int = TICK_US) -> m.GroundTruth:
    """A ``GroundTruth`` from the recorded future ``gt [K, 3]`` (rig frame at ``timestamp_us``, pose k at
    ``timestamp_us + (k + 1) * dt_us``); masked-out poses are left out."""
    gt = np.asarray(gt, dtype=np.float64).reshape(-1, 3)
    keep = np.ones(len(gt), bool) if mask is None else np.asarray(mask, dtype=bool).reshape(-1)
    ts = int(timestamp_us) + dt_us * np.arange(1, len(gt) + 1, dtype=np.int64)
    return m.GroundTruth(trajectory=trajectory_msg(gt[keep], ts[keep]), timestamp_us=int(timestamp_us))


def gt_trajectory_obs(gt: m.GroundTruth, now_us: int, length: int = GT_LEN, dt_us: int = TICK_US,
                      rig_change: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``gt_trajectory`` observation ``([length, 3] float32, mask [length])``: the recorded poses at
    ``now + k * dt_us``, k = 1..length, in the rig frame (interpolated between the sent poses, masked
    outside them). ``rig_change`` as in :func:`route_obs`."""
    poses, ts = trajectory_arrays(gt.trajectory)
    out = np.zeros((length, 3), dtype=np.float32)
    mask = np.zeros(length, dtype=bool)
    if not len(ts):
        return out, mask
    if rig_change is not None:
        poses = from_frame(poses, rig_change)
    order = np.argsort(ts, kind="stable")
    poses, ts = poses[order], ts[order]
    keep = np.concatenate([[True], np.diff(ts) > 0])
    poses, ts = poses[keep], ts[keep]
    query = int(now_us) + dt_us * np.arange(1, length + 1, dtype=np.int64)
    val, inside = interpolate_poses(poses, ts, query, extrapolate=False)
    out[inside] = val[inside]
    mask[:] = inside
    return out, mask


# ---- cameras ----------------------------------------------------------------------------------------
def encode_jpeg(frame: np.ndarray, quality: int = 85) -> bytes:
    """JPEG bytes of an RGB frame ``[H, W, 3]`` uint8."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(frame, dtype=np.uint8)).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """An RGB frame ``[H, W, 3]`` uint8 from JPEG / PNG bytes (``ConversionError`` when unreadable)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ConversionError(f"image bytes are not a readable image ({len(data)} bytes: {e})") from None


def pinhole_camera(logical_id: str, width: int, height: int, focal_px: float,
                   rig_to_camera: tuple[float, float, float, float, float, float, float]
                   ) -> m.AvailableCamerasReturn.AvailableCamera:
    """A camera definition with OpenCV pinhole intrinsics (principal point at the image centre, no
    distortion, global shutter). ``rig_to_camera``: (x, y, z, qw, qx, qy, qz), the camera's pose in
    the rig frame."""
    x, y, z, qw, qx, qy, qz = rig_to_camera
    spec = m.CameraSpec(
        logical_id=logical_id, resolution_w=width, resolution_h=height, shutter_type=m.SHUTTER_TYPE_GLOBAL,
        opencv_pinhole_param=m.OpenCVPinholeCameraParam(
            principal_point_x=width / 2.0, principal_point_y=height / 2.0,
            focal_length_x=focal_px, focal_length_y=focal_px),
    )
    return m.AvailableCamerasReturn.AvailableCamera(
        intrinsics=spec, logical_id=logical_id,
        rig_to_camera=m.Pose(vec=m.Vec3(x=x, y=y, z=z), quat=m.Quat(w=qw, x=qx, y=qy, z=qz)))


# ---- metrics -------------------------------------------------------------------------------------
def series_to_timestep_metric(series: MetricSeries) -> m.SimulationReturn.TimestepMetric:
    """A ``TimestepMetric`` from a :class:`MetricSeries` (invalid ticks carry value 0)."""
    values = np.where(series.valid, np.nan_to_num(np.asarray(series.values, dtype=np.float64)), 0.0)
    return m.SimulationReturn.TimestepMetric(
        name=series.name, timestamps_us=np.asarray(series.timestamps_us, dtype=np.int64).tolist(),
        values=values.tolist(), valid=np.asarray(series.valid, dtype=bool).tolist(),
        time_aggregation=int(series.aggregation))


def timestep_metric_to_series(tm: m.SimulationReturn.TimestepMetric) -> MetricSeries:
    """A :class:`MetricSeries` from a ``TimestepMetric``; an empty ``valid`` list means all valid."""
    ts = np.asarray(tm.timestamps_us, dtype=np.int64)
    values = np.asarray(tm.values, dtype=np.float64)
    valid = np.asarray(tm.valid, dtype=bool) if len(tm.valid) else np.ones(len(values), dtype=bool)
    if not (len(ts) == len(values) == len(valid)):
        raise ConversionError(f"TimestepMetric {tm.name!r}: {len(ts)} timestamps, {len(values)} values, "
                              f"{len(valid)} valid flags")
    try:
        agg = Aggregation(int(tm.time_aggregation))
    except ValueError:
        raise ConversionError(f"TimestepMetric {tm.name!r}: unknown time_aggregation {tm.time_aggregation}") from None
    return MetricSeries(tm.name, ts, values, valid & np.isfinite(values), agg)


def rollout_series(rollout: m.SimulationReturn.RolloutReturn) -> list[MetricSeries]:
    """Every ``timestep_metrics`` entry of a ``RolloutReturn`` as a :class:`MetricSeries`."""
    return [timestep_metric_to_series(tm) for tm in rollout.timestep_metrics]


def rollout_series_arrays(rollout: m.SimulationReturn.RolloutReturn
                          ) -> dict[str, tuple[np.ndarray, np.ndarray, Aggregation]]:
    """The ``{name: (values [T], valid [T], aggregation)}`` form that ``alpagym_ray.metrics.episode_metrics``
    takes, aligned on the union of timestamps."""
    return series_to_arrays(rollout_series(rollout))


def series_from_arrays(series: Mapping[str, tuple[np.ndarray, np.ndarray, Aggregation]],
                       timestamps_us: np.ndarray) -> list[MetricSeries]:
    """:class:`MetricSeries` list from ``{name: (values [T], valid [T], aggregation)}`` at ``timestamps_us [T]``."""
    ts = np.asarray(timestamps_us, dtype=np.int64)
    return [MetricSeries(name, ts, np.asarray(v, dtype=np.float64), np.asarray(ok, dtype=bool), Aggregation(a))
            for name, (v, ok, a) in series.items()]


def raw_aggregates(items: Iterable[MetricSeries]) -> dict[str, float]:
    """AlpaSim's ``aggregated_metrics``: each series reduced by its own aggregation over all its valid
    ticks (warm-up included, nothing cut after a failure); series with no valid tick are left out."""
    from alpagym_ray.metrics import aggregate

    out = {}
    for s in items:
        v = aggregate({s.name: (s.values, s.valid, s.aggregation)}, np.ones(len(s.values), dtype=bool))[s.name]
        if np.isfinite(v):
            out[s.name] = float(v)
    return out
