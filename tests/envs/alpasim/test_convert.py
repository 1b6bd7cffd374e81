"""Frame, quaternion, trajectory, route, ego-history, ground-truth, image and metric conversions on
small hand-built inputs with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from alpagym_ray.metrics import Aggregation, MetricSeries, episode_metrics
from envs.alpasim import convert
from envs.alpasim import messages as m
from envs.alpasim.convert import TICK_US

NOW = 1_700_000_000_000_000


def test_yaw_quaternion_known_values():
    q = convert.yaw_to_quat(math.pi / 2)
    np.testing.assert_allclose(q, [math.sqrt(0.5), 0, 0, math.sqrt(0.5)], atol=1e-12)
    assert convert.quat_to_yaw(q) == pytest.approx(math.pi / 2)
    # not normalised: same rotation
    assert convert.quat_to_yaw(3.0 * q) == pytest.approx(math.pi / 2)
    # yaw pi and -pi are one rotation; an unset (zero) quaternion reads as yaw 0
    assert abs(convert.quat_to_yaw(convert.yaw_to_quat(math.pi))) == pytest.approx(math.pi)
    assert convert.quat_to_yaw(np.zeros(4)) == 0.0
    # a 90 degree roll (about x) leaves yaw at 0
    assert convert.quat_to_yaw(np.array([math.sqrt(0.5), math.sqrt(0.5), 0, 0])) == pytest.approx(0.0)


def test_pose_message_roundtrip():
    p = convert.pose_msg(3.0, -4.0, 2.5, z=1.0)
    assert p.vec.z == 1.0
    np.testing.assert_allclose(convert.pose_xyyaw(p), [3.0, -4.0, 2.5], atol=1e-6)


def test_frames_known_answer():
    origin = np.array([10.0, 5.0, math.pi / 2])   # ego at (10, 5) heading north (+y)
    # 2 m north of the ego is 2 m ahead; 1 m east is 1 m to the right
    np.testing.assert_allclose(convert.to_frame(np.array([[10.0, 7.0], [11.0, 5.0]]), origin),
                               [[2.0, 0.0], [0.0, -1.0]], atol=1e-12)
    pose = convert.to_frame(np.array([10.0, 7.0, math.pi / 2 + 0.1]), origin)
    np.testing.assert_allclose(pose, [2.0, 0.0, 0.1], atol=1e-12)
    back = convert.from_frame(pose, origin)
    np.testing.assert_allclose(back, [10.0, 7.0, math.pi / 2 + 0.1], atol=1e-12)


def test_action_to_trajectory_known_answer():
    ego = np.array([10.0, 5.0, math.pi / 2])
    action = np.array([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [3.0, 0.5, 0.2]])
    traj = convert.action_to_trajectory(action, ego, NOW)
    poses, ts = convert.trajectory_arrays(traj)
    assert ts.tolist() == [NOW + k * TICK_US for k in range(4)]
    np.testing.assert_allclose(poses[0], ego, atol=1e-5)                     # the current pose first
    np.testing.assert_allclose(poses[1], [10.0, 6.0, math.pi / 2], atol=1e-5)
    np.testing.assert_allclose(poses[3], [9.5, 8.0, math.pi / 2 + 0.2], atol=1e-5)
    with pytest.raises(convert.ConversionError, match="non-finite"):
        convert.action_to_trajectory(np.full((5, 3), np.nan), ego, NOW)


def test_trajectory_to_action_inverts_action_to_trajectory():
    ego = np.array([-3.0, 7.0, 2.9])
    rng = np.random.default_rng(0)
    action = np.cumsum(rng.uniform(0.1, 1.0, size=(20, 3)) * [1, 0.1, 0.02], axis=0)
    traj = convert.action_to_trajectory(action, ego, NOW)
    back = convert.trajectory_to_action(traj, ego, NOW, horizon=20)
    np.testing.assert_allclose(back, action, atol=2e-5)


def test_trajectory_to_action_resamples_and_extrapolates():
    ego = np.zeros(3)
    # poses every 0.05 s at 10 m/s straight ahead, only 0.2 s long
    ts = NOW + 50_000 * np.arange(5)
    traj = convert.trajectory_msg(np.stack([0.5 * np.arange(5), np.zeros(5), np.zeros(5)], -1), ts)
    action = convert.trajectory_to_action(traj, ego, NOW, horizon=6)
    np.testing.assert_allclose(action[:, 0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], atol=1e-5)   # 10 m/s continued
    np.testing.assert_allclose(action[:, 1:], 0.0, atol=1e-6)
    # a trajectory starting after now gets the current pose in front: halfway at 0.1 s
    late = convert.trajectory_msg(np.array([[2.0, 0.0, 0.0], [4.0, 0.0, 0.0]]), [NOW + 200_000, NOW + 400_000])
    np.testing.assert_allclose(convert.trajectory_to_action(late, ego, NOW, horizon=5)[:, 0],
                               [1.0, 2.0, 3.0, 4.0, 5.0], atol=1e-5)
    # a turn at constant yaw rate keeps turning past the end
    turn = convert.trajectory_msg(np.array([[0, 0, 0.0], [1, 0, 0.1]]), [NOW, NOW + TICK_US])
    assert convert.trajectory_to_action(turn, ego, NOW, horizon=5)[-1, 2] == pytest.approx(0.5, abs=1e-5)


def test_trajectory_to_action_rejects_bad_trajectories():
    ego = np.zeros(3)
    with pytest.raises(convert.ConversionError, match="empty"):
        convert.trajectory_to_action(m.Trajectory(), ego, NOW, 5)
    bad = convert.trajectory_msg(np.zeros((2, 3)), [NOW + 5, NOW + 5])
    with pytest.raises(convert.ConversionError, match="strictly increasing"):
        convert.trajectory_to_action(bad, ego, NOW, 5)
    old = convert.trajectory_msg(np.zeros((2, 3)), [NOW - 200_000, NOW - 100_000])
    with pytest.raises(convert.ConversionError, match="not after now"):
        convert.trajectory_to_action(old, ego, NOW, 5)
    nan = convert.trajectory_msg(np.array([[0, 0, 0], [np.nan, 0, 0]]), [NOW, NOW + 1])
    with pytest.raises(convert.ConversionError, match="non-finite"):
        convert.trajectory_to_action(nan, ego, NOW, 5)


def test_route_padding_and_any_length():
    wp = np.array([[4.0 * k, 0.0] for k in range(1, 4)])
    msg = convert.route_msg(wp, None, NOW)
    assert len(msg.waypoints) == 20 and msg.timestamp_us == NOW
    assert msg.waypoints[2].x == 12.0 and math.isnan(msg.waypoints[3].x)
    obs, mask = convert.route_obs(msg)
    assert obs.shape == (20, 3) and obs.dtype == np.float32
    assert mask.tolist() == [True] * 3 + [False] * 17
    np.testing.assert_allclose(obs[:3, 0], [4, 8, 12])
    # 30 waypoints: the first 20 in order; NaN rows dropped wherever they are
    long = m.Route(waypoints=[m.Vec3(x=float(k)) for k in range(30)])
    long.waypoints[1].x = float("nan")
    obs, mask = convert.route_obs(long)
    assert mask.all() and obs[:3, 0].tolist() == [0.0, 2.0, 3.0] and obs[-1, 0] == 20.0
    # a route written in an earlier rig frame: that frame sits 1 m behind the current one
    obs, _ = convert.route_obs(m.Route(waypoints=[m.Vec3(x=5.0, y=1.0)]), rig_change=np.array([-1.0, 0.0, 0.0]))
    np.testing.assert_allclose(obs[0], [4.0, 1.0, 0.0])
    masked = convert.route_msg(wp, np.array([True, False, True]), NOW)
    assert math.isnan(masked.waypoints[1].y) and masked.waypoints[2].x == 12.0


def _straight_track(n: int = 20, speed: float = 5.0, yaw: float = math.pi / 2, with_states: bool = True):
    ts = NOW - TICK_US * np.arange(n - 1, -1, -1)
    d = speed * 0.1 * np.arange(n)
    poses = np.stack([d * math.cos(yaw), d * math.sin(yaw), np.full(n, yaw)], -1)
    kin = np.tile([speed, 0.0, 0.0], (n, 1)) if with_states else None
    return convert.egomotion_msg("s", poses, ts, kin)


def test_ego_track_history_known_answer():
    track = convert.EgoTrack()
    msg = _straight_track(n=10)
    # split over two submissions like AlpaSim (history first, then the newest poses)
    first = m.RolloutEgoTrajectory(session_uuid="s")
    first.trajectory.poses.extend(msg.trajectory.poses[:8])
    first.dynamic_states.extend(msg.dynamic_states[:8])
    rest = m.RolloutEgoTrajectory(session_uuid="s")
    rest.trajectory.poses.extend(msg.trajectory.poses[8:])
    rest.dynamic_states.extend(msg.dynamic_states[8:])
    track.add(first)
    track.add(rest)
    assert len(track) == 10 and track.last_time_us == NOW
    hist, mask = track.history(NOW)
    assert hist.shape == (16, 7) and hist.dtype == np.float32
    assert mask.tolist() == [False] * 6 + [True] * 10
    np.testing.assert_allclose(hist[-1], [0, 0, 1, 0, 5, 0, 0], atol=1e-5)
    np.testing.assert_allclose(hist[-2, :4], [-0.5, 0, 1, 0], atol=1e-5)    # 0.5 m behind, same heading
    np.testing.assert_allclose(hist[6, 0], -4.5, atol=1e-4)
    assert (hist[:6] == 0).all()
    # pose look-up in the local frame
    np.testing.assert_allclose(track.pose_at(NOW - 50_000), [0, 4.25, math.pi / 2], atol=1e-5)


def test_ego_track_without_dynamic_states_uses_finite_differences():
    track = convert.EgoTrack()
    track.add(_straight_track(n=6, speed=3.0, with_states=False))
    hist, mask = track.history(NOW)
    assert mask[-6:].all()
    np.testing.assert_allclose(hist[-6:, 4], 3.0, atol=1e-4)
    np.testing.assert_allclose(hist[-6:, 5:], 0.0, atol=1e-3)
    with pytest.raises(convert.ConversionError, match="no egomotion"):
        convert.EgoTrack().history(NOW)


def test_ground_truth_roundtrip():
    gt = np.stack([np.arange(1, 65) * 0.8, np.zeros(64), np.linspace(0, 0.3, 64)], -1)
    mask = np.arange(64) < 40
    msg = convert.ground_truth_msg(gt, mask, NOW)
    assert len(msg.trajectory.poses) == 40
    assert msg.trajectory.poses[0].timestamp_us == NOW + TICK_US
    obs, got_mask = convert.gt_trajectory_obs(msg, NOW)
    assert got_mask.tolist() == mask.tolist()
    np.testing.assert_allclose(obs[mask], gt[mask], atol=1e-5)
    assert (obs[~mask] == 0).all()
    # at a later now, the samples shift by one
    obs2, mask2 = convert.gt_trajectory_obs(msg, NOW + TICK_US)
    assert mask2.sum() == 39
    np.testing.assert_allclose(obs2[0], gt[1], atol=1e-5)


def test_jpeg_roundtrip_and_bad_bytes():
    frame = np.zeros((32, 48, 3), np.uint8)
    frame[:, :24] = (200, 30, 30)
    data = convert.encode_jpeg(frame, 90)
    assert data[:2] == b"\xff\xd8"
    back = convert.decode_image(data)
    assert back.shape == (32, 48, 3)
    assert np.abs(back.astype(int) - frame).mean() < 4
    with pytest.raises(convert.ConversionError, match="not a readable image"):
        convert.decode_image(b"not an image")


def test_pinhole_camera_definition():
    cam = convert.pinhole_camera("cam", 64, 48, 100.0, (1.0, 0.0, 1.5, 1.0, 0.0, 0.0, 0.0))
    assert cam.logical_id == "cam" and cam.intrinsics.resolution_w == 64 and cam.intrinsics.resolution_h == 48
    assert cam.intrinsics.WhichOneof("camera_param") == "opencv_pinhole_param"
    assert cam.intrinsics.opencv_pinhole_param.principal_point_x == 32.0
    assert cam.rig_to_camera.vec.z == 1.5


def test_metric_series_roundtrip_and_raw_aggregates():
    ts = NOW + TICK_US * np.arange(5)
    prog = MetricSeries("progress", ts, np.array([0.1, 0.2, 0.3, 0.4, 0.0]),
                        np.array([True, True, True, True, False]), Aggregation.LAST)
    tm = convert.series_to_timestep_metric(prog)
    assert tm.time_aggregation == m.TIME_AGGREGATION_LAST and list(tm.valid) == [True] * 4 + [False]
    back = convert.timestep_metric_to_series(m.SimulationReturn.TimestepMetric.FromString(tm.SerializeToString()))
    assert back.name == "progress" and back.aggregation == Aggregation.LAST
    np.testing.assert_array_equal(back.timestamps_us, ts)
    np.testing.assert_allclose(back.values, prog.values)
    np.testing.assert_array_equal(back.valid, prog.valid)
    dist = MetricSeries("min_distance_to_obstacle_m", ts, np.array([5.0, 1.0, 3.0, 0.5, 9.0]),
                        np.array([False, True, True, True, True]), Aggregation.MIN)
    none = MetricSeries("plan_deviation", ts, np.zeros(5), np.zeros(5, bool), Aggregation.MEAN)
    # raw: over every valid tick, nothing masked
    assert convert.raw_aggregates([prog, dist, none]) == {"progress": 0.4, "min_distance_to_obstacle_m": 0.5}
    with pytest.raises(convert.ConversionError, match="timestamps"):
        convert.timestep_metric_to_series(m.SimulationReturn.TimestepMetric(name="x", timestamps_us=[1], values=[]))


def test_rollout_return_series_feed_episode_metrics():
    """Warm-up ticks (eval_relevant 0) and ticks after a collision are cut by the shared mask."""
    ts = NOW + TICK_US * np.arange(1, 7)
    ev = np.array([0, 0, 1, 1, 1, 1.0])
    coll = np.array([1, 0, 0, 1, 0, 0.0])     # a collision during the warm-up does not count
    prog = np.array([0.0, 0.1, 0.2, 0.3, 0.9, 1.0])
    series = {"eval_relevant": (ev, Aggregation.MAX), "collision_front": (coll, Aggregation.MAX),
              "collision_lateral": (np.zeros(6), Aggregation.MAX), "collision_any": (coll, Aggregation.MAX),
              "offroad": (np.zeros(6), Aggregation.MAX), "progress": (prog, Aggregation.LAST),
              "gt_dist_traveled_m": (np.full(6, 50.0), Aggregation.LAST)}
    rr = m.SimulationReturn.RolloutReturn(success=True)
    for name, (v, agg) in series.items():
        rr.timestep_metrics.append(convert.series_to_timestep_metric(MetricSeries(name, ts, v, np.ones(6, bool), agg)))
    out = episode_metrics(convert.rollout_series_arrays(rr))
    assert out["collision_any"] == 1.0 and out["collision_at_fault"] == 1.0
    assert out["progress"] == pytest.approx(0.3)            # last kept tick: the collision tick
    assert out["scene_score"] == 0.0
