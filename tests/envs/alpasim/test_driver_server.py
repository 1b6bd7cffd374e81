"""The EgodriverService serving a policy: observations built from submissions, answers in the local
frame with absolute timestamps, batching across sessions, session life cycle and faults, the refusal
of drivesim-only policies, and end to end against our drivesim-backed runtime (several concurrent
sessions; the same episode metrics as drivesim itself)."""

from __future__ import annotations

import math
import threading

import grpc
import numpy as np
import pytest
import torch

from alpagym_ray.metrics import episode_metrics
from envs.alpasim import convert
from envs.alpasim import messages as m
from envs.alpasim.driver_server import DriverConfig, DriverServer, PolicyNotServable
from envs.alpasim.runtime_server import RuntimeConfig, RuntimeServer
from envs.drivesim.batched import DriveSimBatch
from envs.drivesim.generate import small_scene_set

NOW = 1_700_000_000_000_000
TICK = convert.TICK_US


class RecordingPolicy:
    """Constant velocity from ego_history's last row; records every batch of observations it sees."""

    kind = "tests.RecordingPolicy"
    deterministic = True

    def __init__(self, obs_keys=("ego_history", "route", "gt_trajectory"), horizon: int = 5):
        from alpagym_ray.policy import ActionSpec

        self.obs_keys = tuple(obs_keys)
        self.horizon = horizon
        self.action_spec = ActionSpec(horizon=horizon)
        self.seen: list[dict] = []

    def act(self, obs, generator=None, deterministic=None):
        self.seen.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in obs.items()})
        speed = obs["ego_history"][:, -1, 4]
        k = torch.arange(1, self.horizon + 1, dtype=torch.float32) * 0.1
        x = speed[:, None] * k
        action = torch.stack([x, torch.zeros_like(x), torch.zeros_like(x)], -1)
        return action, torch.zeros(len(speed)), {}


def straight_egomotion(session: str, n: int = 10, speed: float = 5.0, yaw: float = math.pi / 2,
                       origin=(100.0, 50.0)):
    ts = NOW - TICK * np.arange(n - 1, -1, -1)
    d = speed * 0.1 * (np.arange(n) - (n - 1))          # metres along the heading; 0 = now
    poses = np.stack([origin[0] + d * math.cos(yaw), origin[1] + d * math.sin(yaw), np.full(n, yaw)], -1)
    return convert.egomotion_msg(session, poses, ts, np.tile([speed, 0.0, 0.0], (n, 1)))


@pytest.fixture()
def driver():
    policy = RecordingPolicy()
    server = DriverServer(policy, DriverConfig(batch_window_s=0.3))
    port = server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield server, policy, m.egodriver_stub(channel), channel
    channel.close()
    server.stop()


def open_session(stub, sid: str, n_route: int = 30):
    stub.start_session(m.DriveSessionRequest(session_uuid=sid, random_seed=3), timeout=10)
    stub.submit_egomotion_observation(straight_egomotion(sid), timeout=10)
    route = m.Route(timestamp_us=NOW, waypoints=[m.Vec3(x=4.0 * k, y=0.0) for k in range(1, n_route + 1)])
    stub.submit_route(m.RouteRequest(session_uuid=sid, route=route), timeout=10)


def test_drive_answers_in_the_local_frame_with_absolute_timestamps(driver):
    _, policy, stub, _ = driver
    open_session(stub, "a")
    gt = convert.ground_truth_msg(np.array([[0.5 * k, 0.0, 0.0] for k in range(1, 65)]), None, NOW)
    stub.submit_recording_ground_truth(m.GroundTruthRequest(session_uuid="a", ground_truth=gt), timeout=10)
    resp = stub.drive(m.DriveRequest(session_uuid="a", time_now_us=NOW, time_query_us=NOW + 2 * TICK), timeout=10)
    poses, ts = convert.trajectory_arrays(resp.trajectory)
    assert ts.tolist() == [NOW + k * TICK for k in range(6)]
    # heading north at 5 m/s from (100, 50): the current pose first, then 0.5 m per 0.1 s along +y
    np.testing.assert_allclose(poses[:, 0], 100.0, atol=1e-4)
    np.testing.assert_allclose(poses[:, 1], 50.0 + 0.5 * np.arange(6), atol=1e-4)
    np.testing.assert_allclose(poses[:, 2], math.pi / 2, atol=1e-5)
    obs = policy.seen[-1]
    hist, hmask = obs["ego_history"][0].numpy(), obs["ego_history_mask"][0].numpy()
    assert hmask.tolist() == [False] * 6 + [True] * 10
    np.testing.assert_allclose(hist[-1], [0, 0, 1, 0, 5, 0, 0], atol=1e-5)
    np.testing.assert_allclose(hist[-3, 0], -1.0, atol=1e-4)
    route, rmask = obs["route"][0].numpy(), obs["route_mask"][0].numpy()
    assert rmask.all() and route.shape == (20, 3)                 # 30 waypoints sent: the first 20
    np.testing.assert_allclose(route[:, 0], 4.0 * np.arange(1, 21))
    np.testing.assert_allclose(obs["gt_trajectory"][0, :3, 0].numpy(), [0.5, 1.0, 1.5], atol=1e-5)
    assert obs["gt_trajectory_mask"][0].all()


def test_route_of_any_length_and_none(driver):
    _, policy, stub, _ = driver
    open_session(stub, "short", n_route=3)
    stub.drive(m.DriveRequest(session_uuid="short", time_now_us=NOW), timeout=10)
    assert policy.seen[-1]["route_mask"][0].tolist() == [True] * 3 + [False] * 17
    stub.start_session(m.DriveSessionRequest(session_uuid="noroute"), timeout=10)
    stub.submit_egomotion_observation(straight_egomotion("noroute"), timeout=10)
    stub.drive(m.DriveRequest(session_uuid="noroute", time_now_us=NOW), timeout=10)
    assert not policy.seen[-1]["route_mask"][0].any()


def test_concurrent_drives_are_batched(driver):
    server, policy, stub, _ = driver                          # batch window 0.3 s
    sids = [f"s{i}" for i in range(4)]
    for sid in sids:
        open_session(stub, sid)
    answers = {}

    def call(sid):
        answers[sid] = stub.drive(m.DriveRequest(session_uuid=sid, time_now_us=NOW), timeout=20)

    threads = [threading.Thread(target=call, args=(sid,)) for sid in sids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(answers) == sids and all(len(a.trajectory.poses) == 6 for a in answers.values())
    assert server.servicer.batches[-1] == 4 and len(policy.seen[-1]["ego_history"]) == 4


def test_session_life_cycle_and_errors(driver):
    server, _, stub, channel = driver
    with pytest.raises(grpc.RpcError) as e:
        stub.submit_route(m.RouteRequest(session_uuid="ghost", route=m.Route()), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "ghost" in e.value.details()
    stub.start_session(m.DriveSessionRequest(session_uuid="r"), timeout=10)
    with pytest.raises(grpc.RpcError) as e:
        stub.drive(m.DriveRequest(session_uuid="r", time_now_us=NOW), timeout=10)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "no egomotion" in e.value.details()
    stub.submit_egomotion_observation(straight_egomotion("r"), timeout=10)
    assert stub.drive(m.DriveRequest(session_uuid="r", time_now_us=NOW), timeout=10).trajectory.poses
    stub.close_session(m.DriveSessionCloseRequest(session_uuid="r"), timeout=10)
    stub.close_session(m.DriveSessionCloseRequest(session_uuid="r"), timeout=10)     # idempotent
    # AlpaSim retries a failed rollout under the same id: a re-sent start_session starts afresh
    stub.start_session(m.DriveSessionRequest(session_uuid="r"), timeout=10)
    with pytest.raises(grpc.RpcError) as e:
        stub.drive(m.DriveRequest(session_uuid="r", time_now_us=NOW), timeout=10)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    bad = m.RolloutEgoTrajectory(session_uuid="r", trajectory=convert.trajectory_msg(
        np.array([[np.nan, 0, 0]]), [NOW]))
    with pytest.raises(grpc.RpcError) as e:
        stub.submit_egomotion_observation(bad, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "non-finite" in e.value.details()
    raw = channel.unary_unary("/egodriver.EgodriverService/drive")
    with pytest.raises(grpc.RpcError) as e:
        raw(b"\x0a\xff", timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    version = stub.get_version(m.Empty(), timeout=10)
    assert "tests.RecordingPolicy" in version.version_id and version.grpc_api_version.minor == 54
    assert stub.shut_down(m.Empty(), timeout=10) == m.Empty()
    assert server.wait(timeout=10)


def test_drivesim_only_policy_is_refused():
    with pytest.raises(PolicyNotServable, match=r"\['map_points', 'agents'\]"):
        DriverServer(RecordingPolicy(obs_keys=("ego_history", "map_points", "agents")))


def test_camera_policy_gets_decoded_frames():
    policy = RecordingPolicy(obs_keys=("ego_history", "cameras"))
    server = DriverServer(policy, DriverConfig(batch_window_s=0.0))
    port = server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = m.egodriver_stub(channel)
            cam = convert.pinhole_camera("front", 16, 8, 10.0, (0, 0, 1.5, 1, 0, 0, 0))
            side = convert.pinhole_camera("side", 4, 4, 10.0, (0, 0, 1.5, 1, 0, 0, 0))
            req = m.DriveSessionRequest(session_uuid="c")
            req.rollout_spec.vehicle.available_cameras.extend([cam, side])
            stub.start_session(req, timeout=10)
            stub.submit_egomotion_observation(straight_egomotion("c"), timeout=10)
            frame = np.full((8, 16, 3), 200, np.uint8)
            stub.submit_image_observation(m.RolloutCameraImage(session_uuid="c", camera_image=(
                m.RolloutCameraImage.CameraImage(logical_id="front", image_bytes=convert.encode_jpeg(frame)))),
                timeout=10)
            with pytest.raises(grpc.RpcError) as e:
                stub.submit_image_observation(m.RolloutCameraImage(session_uuid="c", camera_image=(
                    m.RolloutCameraImage.CameraImage(logical_id="front", image_bytes=b"junk"))), timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            stub.drive(m.DriveRequest(session_uuid="c", time_now_us=NOW), timeout=10)
    finally:
        server.stop()
    cams, masks = policy.seen[-1]["cameras"], policy.seen[-1]["cameras_mask"]
    assert cams["front"].shape == (1, 8, 16, 3) and cams["front"].dtype == torch.uint8
    assert abs(float(cams["front"].float().mean()) - 200) < 3 and masks["front"].tolist() == [True]
    assert cams["side"].shape == (1, 4, 4, 3) and masks["side"].tolist() == [False]


# ---- end to end: our runtime <-> our driver --------------------------------------------------------
@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("driver_e2e_scenes")
    small_scene_set(d, n=2)
    return str(d)


def simulate(runtime_port: int, driver_port: int, specs, n_concurrent: int):
    with grpc.insecure_channel(f"127.0.0.1:{runtime_port}") as channel:
        req = m.SimulationRequest(
            available_drivers=[m.SimulationRequest.DriverAddress(ip="127.0.0.1", port=driver_port)],
            rollout_specs=specs, n_concurrent_per_driver=n_concurrent)
        return m.runtime_stub(channel).simulate(req, timeout=300)


def test_runtime_and_driver_end_to_end_with_a_checkpoint(scene_dir, tmp_path):
    from learners.checkpoint import load_checkpoint, save_checkpoint
    from learners.trajectory_policy import TrajectoryPolicy, TrajectoryPolicyConfig

    torch.manual_seed(0)
    ckpt = save_checkpoint(TrajectoryPolicy(TrajectoryPolicyConfig(obs_keys=("ego_history", "route"), size="tiny")),
                           tmp_path / "ckpt")
    policy = load_checkpoint(ckpt)
    runtime = RuntimeServer(RuntimeConfig(scenes_dir=scene_dir, max_steps=6, camera_px=32))
    driver = DriverServer(policy, DriverConfig(batch_window_s=0.02, deterministic=False, seed=1))
    rport, dport = runtime.start(), driver.start()
    try:
        ids = [e["scene_id"] for e in runtime.servicer.scene_set.entries]
        specs = [m.RolloutSpec(scenario_id=ids[0], nr_rollouts=2, random_seed=9, start_time_offset_us=2 * TICK),
                 m.RolloutSpec(scenario_id=ids[1], nr_rollouts=2)]
        ret = simulate(rport, dport, specs, n_concurrent=4)
    finally:
        runtime.stop()
        driver.stop()
    assert len(ret.rollout_returns) == 4
    assert all(r.success for r in ret.rollout_returns), [r.error for r in ret.rollout_returns]
    for r in ret.rollout_returns:
        ep = episode_metrics(convert.rollout_series_arrays(r))
        assert np.isfinite(ep["progress"]) and 0.0 <= ep["scene_score"] <= 1.0
    # 4 sessions x 3 decisions, answered in forward passes of one or more sessions
    assert sum(driver.servicer.batches) == 12
    assert not driver.servicer.sessions                              # every session was closed


def test_runtime_and_driver_give_drivesim_episode_metrics(scene_dir):
    """A deterministic policy served over gRPC scores the same episode as drivesim running it directly:
    the driver's observations and the trajectory round trip reproduce drivesim's inputs."""
    from learners.baselines import ConstantVelocityPolicy

    config = RuntimeConfig(scenes_dir=scene_dir, max_steps=20, camera_px=0, send_ground_truth=False)
    runtime = RuntimeServer(config)
    driver = DriverServer(ConstantVelocityPolicy())
    rport, dport = runtime.start(), driver.start()
    try:
        sid = runtime.servicer.scene_set.ids[1]
        ret = simulate(rport, dport, [m.RolloutSpec(scenario_id=sid, nr_rollouts=1, start_time_offset_us=2 * TICK)],
                       n_concurrent=1)
        scene = runtime.servicer.scene_set.load(sid)
    finally:
        runtime.stop()
        driver.stop()
    rr = ret.rollout_returns[0]
    assert rr.success, rr.error
    served = episode_metrics(convert.rollout_series_arrays(rr))
    env = DriveSimBatch([scene], 1, config.drivesim_config())
    obs = env.reset([0], [{"scene_id": sid, "start_step": 2}])
    policy = ConstantVelocityPolicy()
    while True:
        action, _, _ = policy.act(obs)
        obs, _, _, _, info = env.step(action)
        if bool(info["ended"][0]):
            break
    direct = {k: float(v[0]) for k, v in info["episode_metrics"].items()}
    assert direct["dist_traveled_m"] > 5.0
    for name in ("progress", "dist_traveled_m", "dist_to_gt_location", "min_distance_to_obstacle_m", "speed_mps",
                 "collision_any", "offroad", "scene_score", "min_distance_to_lane_boundary_m"):
        assert served[name] == pytest.approx(direct[name], abs=1e-3), name
