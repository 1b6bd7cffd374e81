"""The drivesim-backed RuntimeService against a scripted driver on 127.0.0.1: the call sequence
AlpaSim's runtime makes, the RolloutReturn's metrics, warm-up semantics, start offset and seeds,
and faults (unknown scene, malformed and oversized messages, a driver that never answers or is
not listening, shut_down)."""

from __future__ import annotations

import threading
from collections import defaultdict
from concurrent import futures

import grpc
import numpy as np
import pytest

from envs.alpasim import convert
from envs.alpasim import messages as m
from envs.alpasim.runtime_server import CAMERA_ID, CLIP_START_US, RuntimeConfig, RuntimeServer
from envs.drivesim.generate import small_scene_set
from envs.drivesim.metric_names import DRIVESIM_METRICS

TICK = convert.TICK_US
MAX_STEPS = 6          # in-control ticks per rollout: 3 decisions at the default 2 ticks each


class ScriptedDriver:
    """An EgodriverService that records every call and drives at constant speed straight ahead.

    ``empty``: answer every drive with an empty trajectory; ``hang``: session ids whose drive never
    returns (until ``release`` is set); ``terminate_at``: the drive (0-based) answered with
    terminate_session."""

    def __init__(self, empty: bool = False, hang: tuple[str, ...] = (), terminate_at: int | None = None):
        self.calls: dict[str, list[tuple[str, object]]] = defaultdict(list)
        self.tracks: dict[str, convert.EgoTrack] = {}
        self.empty, self.hang, self.terminate_at = empty, set(hang), terminate_at
        self.release = threading.Event()
        self.lock = threading.Lock()

    def _log(self, rpc, request):
        with self.lock:
            self.calls[request.session_uuid].append((rpc, request))

    def start_session(self, request, context):
        self._log("start_session", request)
        self.tracks[request.session_uuid] = convert.EgoTrack()
        return m.SessionRequestStatus()

    def close_session(self, request, context):
        self._log("close_session", request)
        return m.Empty()

    def submit_image_observation(self, request, context):
        self._log("submit_image_observation", request)
        return m.Empty()

    def submit_egomotion_observation(self, request, context):
        self._log("submit_egomotion_observation", request)
        self.tracks[request.session_uuid].add(request)
        return m.Empty()

    def submit_route(self, request, context):
        self._log("submit_route", request)
        return m.Empty()

    def submit_recording_ground_truth(self, request, context):
        self._log("submit_recording_ground_truth", request)
        return m.Empty()

    def drive(self, request, context):
        self._log("drive", request)
        if request.session_uuid in self.hang:
            self.release.wait(30)
        if self.empty:
            return m.DriveResponse()
        n = sum(c[0] == "drive" for c in self.calls[request.session_uuid]) - 1
        if n == self.terminate_at:
            return m.DriveResponse(terminate_session=True)
        track = self.tracks[request.session_uuid]
        _, _, kin = track.arrays()
        speed = float(kin[-1, 0])
        k = np.arange(1, 21) * 0.1
        action = np.stack([speed * k, np.zeros(20), np.zeros(20)], -1)
        return m.DriveResponse(trajectory=convert.action_to_trajectory(
            action, track.pose_at(request.time_now_us), request.time_now_us))


def serve_driver(driver) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((m.service_handler(m.EGODRIVER_RPCS, driver),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    d = tmp_path_factory.mktemp("alpasim_scenes")
    return small_scene_set(d, n=2), str(d)


@pytest.fixture(scope="module")
def runtime(scenes):
    _, d = scenes
    server = RuntimeServer(RuntimeConfig(scenes_dir=d, max_steps=MAX_STEPS, camera_px=32, driver_timeout_s=2.0))
    port = server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield server, m.runtime_stub(channel), channel
    channel.close()
    server.stop()


def request(port: int, specs, n_concurrent: int = 4):
    return m.SimulationRequest(available_drivers=[m.SimulationRequest.DriverAddress(ip="127.0.0.1", port=port)],
                               rollout_specs=specs, n_concurrent_per_driver=n_concurrent)


def test_runtime_info_lists_scenes(runtime, scenes):
    ss, _ = scenes
    _, stub, _ = runtime
    info = stub.get_runtime_info(m.Empty(), timeout=10)
    assert [s.scene_id for s in info.scenes] == ss.ids
    s0 = info.scenes[0]
    assert list(s0.metadata.camera_ids) == [CAMERA_ID]
    assert s0.metadata.start_time_us == CLIP_START_US
    assert s0.metadata.end_time_us == CLIP_START_US + (ss.entry(ss.ids[0])["num_steps"] - 1) * TICK
    assert info.runtime_version.grpc_api_version.minor == 54


def test_simulate_runs_alpasim_call_sequence(runtime, scenes):
    ss, _ = scenes
    _, stub, _ = runtime
    driver = ScriptedDriver()
    dserver, dport = serve_driver(driver)
    try:
        spec = m.RolloutSpec(scenario_id=ss.ids[0], nr_rollouts=2, session_uuids=["s-a", "s-b"],
                             start_time_offset_us=3 * TICK, random_seed=41)
        ret = stub.simulate(request(dport, [spec]), timeout=120)
    finally:
        dserver.stop(None)
    assert [r.rollout_uuid for r in ret.rollout_returns] == ["s-a", "s-b"]
    assert all(r.success for r in ret.rollout_returns), [r.error for r in ret.rollout_returns]
    t0 = 3 + 17                                               # offset + warm-up, in ticks
    for k, sid in enumerate(("s-a", "s-b")):
        calls = driver.calls[sid]
        names = [c[0] for c in calls]
        assert names[0] == "start_session" and names[-1] == "close_session"
        start = calls[0][1]
        assert start.random_seed == 41 + k                        # random_seed + k
        assert start.debug_info.scene_id == ss.ids[0]
        cams = start.rollout_spec.vehicle.available_cameras
        assert [c.logical_id for c in cams] == [CAMERA_ID] and cams[0].intrinsics.resolution_w == 32
        # per decision: image, egomotion, route, ground truth, then drive; no calls during the warm-up
        per = ["submit_image_observation", "submit_egomotion_observation", "submit_route",
               "submit_recording_ground_truth", "drive"]
        assert names[1:-1] == per * 3
        drives = [c[1] for c in calls if c[0] == "drive"]
        assert [d.time_now_us for d in drives] == [CLIP_START_US + (t0 + 2 * j) * TICK for j in range(3)]
        assert all(d.time_query_us == d.time_now_us + 2 * TICK for d in drives)
        ego = [c[1] for c in calls if c[0] == "submit_egomotion_observation"]
        first_ts = [p.timestamp_us for p in ego[0].trajectory.poses]
        # the first submission carries the whole recorded history from the clip start up to now
        assert first_ts == [CLIP_START_US + t * TICK for t in range(t0 + 1)]
        assert len(ego[0].dynamic_states) == len(first_ts)
        # later ones the poses since the previous one (2 ticks per decision)
        assert [[p.timestamp_us for p in e.trajectory.poses] for e in ego[1:]] == [
            [CLIP_START_US + (t0 + 1) * TICK, CLIP_START_US + (t0 + 2) * TICK],
            [CLIP_START_US + (t0 + 3) * TICK, CLIP_START_US + (t0 + 4) * TICK]]
        route = [c[1] for c in calls if c[0] == "submit_route"][0].route
        assert len(route.waypoints) == 20 and route.timestamp_us == drives[0].time_now_us
        w = np.array([(p.x, p.y) for p in route.waypoints])
        finite = np.isfinite(w).all(1)
        assert finite[:5].all()
        gaps = np.linalg.norm(np.diff(w[finite], axis=0), axis=1)
        assert np.all((gaps > 3.5) & (gaps < 4.5))
        gt = [c[1] for c in calls if c[0] == "submit_recording_ground_truth"][0].ground_truth
        assert gt.trajectory.poses[0].timestamp_us == drives[0].time_now_us + TICK
        image = [c[1] for c in calls if c[0] == "submit_image_observation"][0].camera_image
        assert image.logical_id == CAMERA_ID and convert.decode_image(image.image_bytes).shape == (32, 32, 3)


def test_rollout_return_metrics(runtime, scenes):
    ss, _ = scenes
    _, stub, _ = runtime
    driver = ScriptedDriver()
    dserver, dport = serve_driver(driver)
    try:
        ret = stub.simulate(request(dport, [m.RolloutSpec(scenario_id=ss.ids[1], nr_rollouts=1)]), timeout=120)
    finally:
        dserver.stop(None)
    rr = ret.rollout_returns[0]
    assert rr.success, rr.error
    assert rr.error_code == m.ROLLOUT_ERROR_CODE_NONE
    assert rr.rollout_spec.scenario_id == ss.ids[1]
    names = [tm.name for tm in rr.timestep_metrics]
    assert names == list(DRIVESIM_METRICS)
    by = {tm.name: convert.timestep_metric_to_series(tm) for tm in rr.timestep_metrics}
    ev = by["eval_relevant"]
    assert len(ev.values) == 17 + MAX_STEPS                    # warm-up ticks included
    assert ev.values.tolist() == [0.0] * 17 + [1.0] * MAX_STEPS and ev.valid.all()
    assert (np.diff(ev.timestamps_us) == TICK).all() and ev.timestamps_us[0] == CLIP_START_US + TICK
    assert by["progress"].valid.all() and by["offroad"].valid.all()
    assert not by["dist_traveled_m"].valid[:17].any() and by["dist_traveled_m"].valid[17:].all()
    for tm in rr.timestep_metrics:
        assert tm.time_aggregation == int(DRIVESIM_METRICS[tm.name])
    agg = dict(rr.aggregated_metrics)
    # the warm-up replays the recorded ego: it is on its recorded pose at every warm-up tick
    np.testing.assert_allclose(by["dist_to_gt_location"].values[:17], 0.0, atol=1e-3)
    assert agg["eval_relevant"] == 1.0
    assert agg["progress"] == pytest.approx(by["progress"].values[-1])
    assert agg["min_distance_to_obstacle_m"] == pytest.approx(
        by["min_distance_to_obstacle_m"].values[by["min_distance_to_obstacle_m"].valid].min())
    # driving straight at the logged speed: progress grows over the rollout
    assert by["progress"].values[-1] > by["progress"].values[17]


def test_warmup_drives_when_not_skipped(scenes):
    """skip_driver_during_force_gt=False: the warm-up sends observations and drive too, and their (empty)
    answers are ignored; an empty answer after the warm-up fails the rollout."""
    ss, d = scenes
    server = RuntimeServer(RuntimeConfig(scenes_dir=d, max_steps=4, camera_px=0, send_ground_truth=False,
                                         skip_driver_during_force_gt=False, driver_timeout_s=5.0))
    port = server.start()
    driver = ScriptedDriver(empty=True)
    dserver, dport = serve_driver(driver)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            spec = m.RolloutSpec(scenario_id=ss.ids[0], nr_rollouts=1, session_uuids=["w"])
            rr = m.runtime_stub(channel).simulate(request(dport, [spec]), timeout=120).rollout_returns[0]
    finally:
        dserver.stop(None)
        server.stop()
    drives = [c[1] for c in driver.calls["w"] if c[0] == "drive"]
    # warm-up decisions at ticks 0, 2, ..., 16 (9 of them) answered empty, then the first in control
    assert [(d.time_now_us - CLIP_START_US) // TICK for d in drives] == list(range(0, 17, 2)) + [17]
    assert not rr.success
    assert "empty trajectory after the warm-up" in rr.error and "session w" in rr.error
    names = [c[0] for c in driver.calls["w"]]
    assert "submit_image_observation" not in names and "submit_recording_ground_truth" not in names
    assert names[-1] == "close_session"


def test_terminate_session_ends_the_rollout_early(runtime, scenes):
    ss, _ = scenes
    _, stub, _ = runtime
    driver = ScriptedDriver(terminate_at=1)
    dserver, dport = serve_driver(driver)
    try:
        ret = stub.simulate(request(dport, [m.RolloutSpec(scenario_id=ss.ids[0], nr_rollouts=1,
                                                          session_uuids=["t"])]), timeout=120)
    finally:
        dserver.stop(None)
    rr = ret.rollout_returns[0]
    assert rr.success, rr.error
    names = [c[0] for c in driver.calls["t"]]
    assert names.count("drive") == 2 and names[-1] == "close_session"
    ev = {tm.name: tm for tm in rr.timestep_metrics}["eval_relevant"]
    assert list(ev.values) == [0.0] * 17 + [1.0] * 2              # one decision of 2 ticks was driven


def test_unknown_scene_and_bad_requests_are_invalid_argument(runtime, scenes):
    ss, _ = scenes
    _, stub, channel = runtime
    cases = [
        (m.SimulationRequest(rollout_specs=[m.RolloutSpec(scenario_id=ss.ids[0][:-1], nr_rollouts=1)]),
         "unknown scene"),
        (request(1, [m.RolloutSpec(scenario_id=ss.ids[0], nr_rollouts=0)]), "nr_rollouts"),
        (request(1, [m.RolloutSpec(scenario_id=ss.ids[0], nr_rollouts=2, session_uuids=["x"])]), "session_uuids"),
        (request(1, [m.RolloutSpec(scenario_id=ss.ids[0], nr_rollouts=1, start_time_offset_us=10**9)]),
         "start_time_offset_us"),
        (request(1, [m.RolloutSpec(scenario_id=ss.ids[0], nr_rollouts=1)], n_concurrent=0), "n_concurrent"),
        (m.SimulationRequest(rollout_specs=[m.RolloutSpec(scenario_id=ss.ids[0], nr_rollouts=1)]),
         "available_drivers"),
        (request(1, []), "rollout_specs is empty"),
    ]
    for req, words in cases:
        with pytest.raises(grpc.RpcError) as e:
            stub.simulate(req, timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, words
        assert words in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.prefetch_scene(m.ScenePrefetchRequest(scene_id="nope"), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "nope" in e.value.details()
    # malformed bytes: a SimulationRequest whose field 2 claims 100 bytes
    raw = channel.unary_unary("/RuntimeService/simulate")
    with pytest.raises(grpc.RpcError) as e:
        raw(b"\x12\x64\x0a", timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # the server keeps serving
    assert stub.prefetch_scene(m.ScenePrefetchRequest(scene_id=ss.ids[0]), timeout=60) == m.Empty()
    assert len(stub.get_runtime_info(m.Empty(), timeout=10).scenes) == 2


def test_oversized_message_is_rejected(scenes):
    _, d = scenes
    server = RuntimeServer(RuntimeConfig(scenes_dir=d, max_message_bytes=2048))
    port = server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = m.runtime_stub(channel)
            with pytest.raises(grpc.RpcError) as e:
                stub.simulate(m.SimulationRequest(rollout_specs=[m.RolloutSpec(scenario_id="x" * 5000)]), timeout=10)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert len(stub.get_runtime_info(m.Empty(), timeout=10).scenes) == 2
    finally:
        server.stop()


def test_driver_that_never_answers_fails_its_rollout_only(runtime, scenes):
    ss, _ = scenes
    _, stub, _ = runtime                                       # driver_timeout_s = 2
    driver = ScriptedDriver(hang=("stuck",))
    dserver, dport = serve_driver(driver)
    try:
        spec = m.RolloutSpec(scenario_id=ss.ids[0], nr_rollouts=2, session_uuids=["stuck", "fine"])
        ret = stub.simulate(request(dport, [spec]), timeout=120)
    finally:
        driver.release.set()
        dserver.stop(None)
    stuck, fine = ret.rollout_returns
    assert fine.success and fine.timestep_metrics
    assert not stuck.success and stuck.error_code == m.ROLLOUT_ERROR_CODE_UNSPECIFIED
    assert "session stuck" in stuck.error and "drive got no answer within 2 s" in stuck.error
    assert "last call answered: submit_recording_ground_truth" in stuck.error
    assert not stuck.timestep_metrics


def test_driver_not_listening_fails_the_rollout(runtime, scenes):
    ss, _ = scenes
    _, stub, _ = runtime
    dserver, dport = serve_driver(ScriptedDriver())
    dserver.stop(None)                                         # nothing listens on dport now
    ret = stub.simulate(request(dport, [m.RolloutSpec(scenario_id=ss.ids[0], nr_rollouts=1,
                                                      session_uuids=["gone"])]), timeout=60)
    rr = ret.rollout_returns[0]
    assert not rr.success
    assert "session gone" in rr.error and "start_session failed: UNAVAILABLE" in rr.error
    assert "last call answered: none" in rr.error


def test_runtime_not_listening_is_unavailable_within_the_deadline():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as e:
        m.runtime_stub(channel).get_runtime_info(m.Empty(), timeout=3)
    assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_shut_down_stops_the_server(scenes):
    _, d = scenes
    server = RuntimeServer(RuntimeConfig(scenes_dir=d))
    port = server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = m.runtime_stub(channel)
        assert stub.shut_down(m.Empty(), timeout=10) == m.Empty()
        assert server.wait(timeout=10)
        with pytest.raises(grpc.RpcError) as e:
            stub.get_runtime_info(m.Empty(), timeout=3)
    assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_scene_pool_envs_share_scene_tensors_not_state(scenes):
    import torch

    from envs.alpasim.runtime_server import _ScenePool

    ss, d = scenes
    pool = _ScenePool(ss, RuntimeConfig(scenes_dir=d).drivesim_config())
    a, b = pool.acquire(ss.ids[0]), pool.acquire(ss.ids[0])
    assert a is not b and a.st is b.st
    a.reset([0], [{"scene_id": ss.ids[0], "start_step": 0}])
    b.reset([0], [{"scene_id": ss.ids[0], "start_step": 5}])
    pose_b = b.pose.clone()
    a.step(torch.zeros(1, 20, 3))
    assert int(a.t[0]) == 17 + 2 and int(b.t[0]) == 5 + 17
    assert torch.equal(b.pose, pose_b)
    pool.release(ss.ids[0], a)
    assert pool.acquire(ss.ids[0]) is a


def test_config_checks(scenes):
    _, d = scenes
    with pytest.raises(ValueError, match="multiple of 100000"):
        RuntimeConfig(scenes_dir=d, control_step_us=150_000)
    with pytest.raises(ValueError, match="host:port"):
        RuntimeConfig(scenes_dir=d, default_driver="nope")
    with pytest.raises(ValueError, match="runtime settings"):
        RuntimeConfig(scenes_dir=d, drivesim={"horizon": 5})
    with pytest.raises(ValueError, match="unknown drivesim option"):
        RuntimeConfig(scenes_dir=d, drivesim={"no_such_option": 1})
    assert RuntimeConfig(scenes_dir=d, control_step_us=100_000).decision_every == 1
