"""The AlpaSim env (envs/alpasim/env.py) against a scripted RuntimeService (known answers: frames,
timestamps, warm-up, restarts, metrics) and against our drivesim-backed runtime server (the same
observations, episodes and rewards as drivesim itself)."""

from __future__ import annotations

import math
import threading
import warnings
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from alpagym_ray.metrics import ALPASIM_METRICS, MetricSeries
from envs.alpasim import convert
from envs.alpasim import messages as m
from envs.alpasim.driver_host import DriverHost
from envs.alpasim.env import (
    AlpaSimBatch,
    AlpaSimEnv,
    AlpaSimEnvConfig,
    RolloutFailed,
    episode_from_series,
    read_runtime_yaml,
    resolve_address,
)
from envs.alpasim.factory import make_batched_env
from envs.alpasim.runtime_server import CAMERA_ID, CLIP_START_US, RuntimeConfig, RuntimeServer, write_server_yaml
from envs.drivesim.batched import DriveSimBatch
from envs.drivesim.config import DriveSimConfig
from envs.drivesim.generate import small_scene_set
from envs.drivesim.scene import SceneSet
from learners.baselines import ConstantVelocityPolicy, LoggedReplayPolicy
from rewards.compute import RewardFn

T0 = 1_000_000_000_000
"""Clip start of the scripted runtime's one scene."""
SCENE = "scripted-scene"
WARMUP_END = T0 + 1_700_000
REWARD = {"terms": [
    {"kind": "metric", "metric_name": "progress", "scale": 1.0},
    {"kind": "metric", "metric_name": "collision_any", "scale": -10.0},
    {"kind": "metric", "metric_name": "offroad", "scale": -5.0},
    {"kind": "distance_to_gt", "clip": [0.0, 10.0], "scale": -0.1},
    {"kind": "threshold", "metric_name": "min_distance_to_obstacle_m", "below": 30.0, "mode": "fraction",
     "scale": -1.0},
    {"kind": "metric", "metric_name": "scene_score", "scale": 2.0},
]}


# ---- a scripted runtime: simulate runs a test's script against the env's driver ---------------------
class ScriptedRuntime:
    """A ``RuntimeService`` on 127.0.0.1 whose ``simulate`` calls ``script(driver, session_uuid, spec,
    runtime)`` per rollout spec (each ``simulate`` call in its own server thread) and returns what it
    returns; ``get_runtime_info`` lists :data:`SCENE` starting at :data:`T0`."""

    def __init__(self, script, list_scenes: bool = True):
        self.script = script
        self.list_scenes = list_scenes
        self.responses: dict[str, list] = {}
        self.lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        self.server.add_generic_rpc_handlers((m.service_handler(m.RUNTIME_RPCS, self),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def record(self, session: str, response) -> None:
        with self.lock:
            self.responses.setdefault(session, []).append(response)

    def simulate(self, request, context):
        d = request.available_drivers[0]
        with grpc.insecure_channel(m.grpc_target(d.ip, d.port)) as channel:
            driver = m.egodriver_stub(channel)
            returns = [self.script(driver, spec.session_uuids[0], spec, self) for spec in request.rollout_specs]
        return m.SimulationReturn(rollout_returns=returns)

    def get_runtime_info(self, request, context):
        if not self.list_scenes:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "no runtime info")
        return m.RuntimeInfo(scenes=[m.SceneInfo(scene_id=SCENE, metadata=m.SceneMetadata(start_time_us=T0))])

    def stop(self) -> None:
        self.server.stop(0).wait()


def egomotion(session: str, poses, times, speed: float = 3.0):
    kin = [[speed, 0.0, 0.0]] * len(times)
    return convert.egomotion_msg(session, np.asarray(poses, dtype=np.float64), np.asarray(times), kin)


def rollout_return(spec, session: str, warm_ticks: int, control_times, progress, collision=None,
                   extra: dict | None = None):
    """A RolloutReturn with warm-up ticks (eval_relevant 0) ending at ``WARMUP_END`` and control ticks at
    ``control_times``; every series AlpaSim reports, zeros unless given."""
    warm = [WARMUP_END - k * 100_000 for k in range(warm_ticks - 1, -1, -1)]
    times = np.asarray(warm + list(control_times), dtype=np.int64)
    n_w, n_c = len(warm), len(control_times)
    values = {name: np.zeros(len(times)) for name in ALPASIM_METRICS}
    values["eval_relevant"][n_w:] = 1.0
    values["progress"][n_w:] = progress
    values["gt_dist_traveled_m"][:] = 20.0
    values["min_distance_to_obstacle_m"][:] = 50.0
    if collision is not None:
        values["collision_front"][n_w:] = collision
        values["collision_any"][n_w:] = collision
    for k, v in (extra or {}).items():
        values[k][n_w:] = v
    rr = m.SimulationReturn.RolloutReturn(rollout_spec=spec, success=True, rollout_uuid=session)
    for name, v in values.items():
        rr.timestep_metrics.append(convert.series_to_timestep_metric(
            MetricSeries(name, times, v, np.ones(len(times), bool), ALPASIM_METRICS[name])))
    rr.aggregated_metrics["progress"] = float(progress[-1]) if n_c else 0.0
    return rr


def straight_north(driver, sid, spec, rt):
    """Two decisions 0.2 s apart of an ego at (10, 5) heading north at 3 m/s."""
    T = WARMUP_END
    driver.start_session(m.DriveSessionRequest(session_uuid=sid, random_seed=spec.random_seed), timeout=5)
    driver.submit_egomotion_observation(egomotion(
        sid, [[10.0, 5.0 - 0.3 * j, math.pi / 2] for j in (3, 2, 1, 0)], [T - j * 100_000 for j in (3, 2, 1, 0)]),
        timeout=5)
    driver.submit_route(m.RouteRequest(session_uuid=sid, route=convert.route_msg(
        np.array([[4.0, 0.0], [8.0, 0.0]]), None, T)), timeout=5)
    rt.record(sid, driver.drive(m.DriveRequest(session_uuid=sid, time_now_us=T, time_query_us=T + 200_000),
                                timeout=10))
    driver.submit_egomotion_observation(egomotion(
        sid, [[10.0, 5.3, math.pi / 2], [10.0, 5.6, math.pi / 2]], [T + 100_000, T + 200_000]), timeout=5)
    rt.record(sid, driver.drive(m.DriveRequest(session_uuid=sid, time_now_us=T + 200_000,
                                               time_query_us=T + 400_000), timeout=10))
    driver.close_session(m.DriveSessionCloseRequest(session_uuid=sid), timeout=5)
    return rollout_return(spec, sid, 17, [T + k * 100_000 for k in (1, 2, 3, 4)], [0.1, 0.2, 0.3, 0.5])


@pytest.fixture()
def scripted():
    runtimes = []

    def make(script, **kw):
        rt = ScriptedRuntime(script, **kw)
        runtimes.append(rt)
        return rt

    yield make
    for rt in runtimes:
        rt.stop()


def test_actions_go_out_in_the_local_frame_current_pose_first_and_metrics_come_back(scripted):
    rt = scripted(straight_north)
    env = AlpaSimBatch(rt.address, 2, AlpaSimEnvConfig(obs_keys=("ego_history", "route")))
    try:
        obs = env.reset(seeds=[7, 7], options=[{"scene_id": SCENE}] * 2)
        # ego history in the current rig frame: the ego came from 0.3 m behind per 0.1 s, 4 poses known
        np.testing.assert_allclose(obs["ego_history"][0, -1].numpy(), [0, 0, 1, 0, 3, 0, 0], atol=1e-6)
        np.testing.assert_allclose(obs["ego_history"][0, -2].numpy(), [-0.3, 0, 1, 0, 3, 0, 0], atol=1e-6)
        assert obs["ego_history_mask"][0].tolist() == [False] * 12 + [True] * 4
        np.testing.assert_allclose(obs["route"][1, :2].numpy(), [[4, 0, 0], [8, 0, 0]])
        assert obs["route_mask"][1].sum() == 2
        k = torch.arange(1, 21, dtype=torch.float32)
        actions = torch.zeros(2, 20, 3)
        actions[0, :, 0] = 0.3 * k                 # env 0 straight ahead
        actions[1, :, 1] = 0.1 * k                 # env 1 sideways to its left
        obs, reward, term, trunc, info = env.step(actions)
        assert not (term | trunc).any() and "episode_metrics" not in info
        _, reward, term, trunc, info = env.step(actions)
    finally:
        env.close()
    sessions = [s for s in rt.responses]
    assert len(sessions) == 2
    # env 0 and env 1 each answered both drives; rig x (forward) = local +y (north), rig y (left) = local -x
    by_lateral = {}
    for sid in sessions:
        first, second = rt.responses[sid]
        poses, ts = convert.trajectory_arrays(first.trajectory)
        assert len(poses) == 21 and ts[0] == WARMUP_END and np.all(np.diff(ts) == 100_000)
        np.testing.assert_allclose(poses[0], [10.0, 5.0, math.pi / 2], atol=1e-5)
        by_lateral[round(float(poses[20, 0]), 3)] = (poses, second)
    straight, second = by_lateral[10.0]
    np.testing.assert_allclose(straight[1], [10.0, 5.3, math.pi / 2], atol=1e-5)
    np.testing.assert_allclose(straight[20], [10.0, 11.0, math.pi / 2], atol=1e-5)
    sideways, _ = by_lateral[8.0]
    np.testing.assert_allclose(sideways[20], [8.0, 5.0, math.pi / 2], atol=1e-5)
    p2, ts2 = convert.trajectory_arrays(second.trajectory)
    assert ts2[0] == WARMUP_END + 200_000
    np.testing.assert_allclose(p2[0], [10.0, 5.6, math.pi / 2], atol=1e-5)
    # the episode: truncated when simulate returned; metrics over the 4 in-control ticks
    assert trunc.tolist() == [True, True] and not term.any()
    assert env.decision_every == 2
    np.testing.assert_allclose(info["episode_metrics"]["progress"], [0.5, 0.5])
    np.testing.assert_allclose(info["episode_metrics"]["scene_score"], [0.625, 0.625])   # 0.5 / 0.8
    assert info["episode_decision_of_tick"][0].tolist() == [0, 0, 1, 1]
    assert len(info["episode_series"][0]["progress"][0]) == 4       # warm-up ticks trimmed
    assert info["aggregated_metrics"][1] == {"progress": 0.5}
    assert reward.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("listed", [True, False], ids=["start-from-runtime-info", "start-from-first-drive"])
def test_warmup_drives_get_empty_trajectories_and_the_cadence_comes_from_drive_times(scripted, listed):
    def script(driver, sid, spec, rt):
        driver.start_session(m.DriveSessionRequest(session_uuid=sid), timeout=5)
        times = [T0 + j * 300_000 for j in range(8)]    # 0 .. 2.1 s; warm-up ends at 1.7 s
        for t in times:
            driver.submit_egomotion_observation(egomotion(sid, [[3e-6 * (t - T0), 0.0, 0.0]], [t]), timeout=5)
            rt.record(sid, (t, driver.drive(m.DriveRequest(session_uuid=sid, time_now_us=t), timeout=10)))
        return rollout_return(spec, sid, 17, [WARMUP_END + k * 100_000 for k in range(1, 8)],
                              [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])

    rt = scripted(script, list_scenes=listed)   # unlisted: get_runtime_info is UNIMPLEMENTED
    env = AlpaSimBatch(rt.address, 1, AlpaSimEnvConfig(obs_keys=("ego_history",), runtime_skips_warmup=False))
    assert bool(env.scene_infos) == listed
    try:
        env.reset(options=[{"scene_id": SCENE}])
        assert env.decision_every == 2                  # the configured guess until two drives are seen
        done, steps = False, 0
        while not done:
            _, _, term, trunc, info = env.step(torch.zeros(1, 20, 3))
            done, steps = bool((term | trunc)[0]), steps + 1
    finally:
        env.close()
    (sid, answers), = rt.responses.items()
    warm = [r for t, r in answers if t < WARMUP_END]
    assert len(warm) == 6 and all(len(r.trajectory.poses) == 0 and not r.terminate_session for r in warm)
    decided = [r for t, r in answers if t >= WARMUP_END]
    assert len(decided) == 2 and all(len(r.trajectory.poses) == 21 for r in decided)
    assert steps == 2 and env.decision_every == 3 and env.control_step_us == 300_000
    # ticks at 1.8, 1.9, 2.0 s came from decision 0 (at 1.8 s), 2.1.. from decision 1 (at 2.1 s)
    assert info["episode_decision_of_tick"][0].tolist() == [-1, 0, 0, 0, 1, 1, 1]


def test_resent_start_session_before_the_first_decision_is_fine_after_it_fails_the_episode(scripted):
    def script(driver, sid, spec, rt):
        T = WARMUP_END
        start = m.DriveSessionRequest(session_uuid=sid)
        driver.start_session(start, timeout=5)
        driver.submit_egomotion_observation(egomotion(sid, [[99.0, 0.0, 0.0]], [T]), timeout=5)
        driver.start_session(start, timeout=5)          # retried before any decision: data of try 1 dropped
        driver.submit_egomotion_observation(egomotion(sid, [[1.0, 2.0, 0.0]], [T]), timeout=5)
        rt.record(sid, driver.drive(m.DriveRequest(session_uuid=sid, time_now_us=T), timeout=10))
        driver.start_session(start, timeout=5)          # retried after a decision
        driver.submit_egomotion_observation(egomotion(sid, [[1.0, 2.0, 0.0]], [T]), timeout=5)
        rt.record(sid, driver.drive(m.DriveRequest(session_uuid=sid, time_now_us=T), timeout=10))
        return rollout_return(spec, sid, 17, [T + 100_000], [0.1])

    rt = scripted(script)
    env = AlpaSimBatch(rt.address, 1, AlpaSimEnvConfig(obs_keys=("ego_history",)))
    try:
        env.reset(options=[{"scene_id": SCENE}])
        slot = env._slots[0]
        assert slot.decision.attempt == 2 and slot.pose.tolist() == [1.0, 2.0, 0.0]
        with pytest.raises(RolloutFailed, match=r"restarted the rollout \(start_session attempt 3\) after 1 decisions"):
            env.step(torch.zeros(1, 20, 3))
        # the failed session's waiting drive was told to terminate, so the runtime's rollout ends
        assert slot.session.aborted == "failed" and env._slots[0] is None
        slot.future.result(timeout=10)
    finally:
        env.close()
    (sid, answers), = rt.responses.items()
    assert len(answers[0].trajectory.poses) == 21 and answers[1].terminate_session


def test_config_and_reset_options_are_checked_with_clear_errors(scripted):
    with pytest.raises(ValueError, match=r"\['map_points'\] cannot come from AlpaSim"):
        AlpaSimEnvConfig(obs_keys=("ego_history", "map_points"))
    with pytest.raises(ValueError, match="unknown AlpaSim env option.*'decison_every'.*decision_every"):
        AlpaSimEnvConfig.from_dict({"decison_every": 2})
    with pytest.raises(ValueError, match="needs camera_ids"):
        AlpaSimEnvConfig(obs_keys=("cameras",))
    with pytest.raises(ValueError, match="extra_metrics.*unknown aggregation"):
        AlpaSimEnvConfig(extra_metrics={"speed_mps": "average"})
    rt = scripted(straight_north)
    with pytest.raises(KeyError, match="not served by the AlpaSim runtime"):
        AlpaSimBatch(rt.address, 1, scene_ids=["nope"])
    env = AlpaSimBatch(rt.address, 1)
    try:
        with pytest.raises(KeyError, match="scene 'scripted-scen' is not served.*did you mean"):
            env.reset(options=[{"scene_id": "scripted-scen"}])
        with pytest.raises(ValueError, match=r"options\[0\]: give start_time_offset_us or start_step"):
            env.reset(options=[{"scene_id": SCENE, "start_step": 1, "start_time_offset_us": 100_000}])
        with pytest.raises(ValueError, match=r"options\[0\]: unknown keys \['start'\]"):
            env.reset(options=[{"start": 1}])
        with pytest.raises(ValueError, match=r"actions must be \[B=1, H>=5, 3\]"):
            env.step(torch.zeros(1, 3, 3))
    finally:
        env.close()


def test_runtime_address_from_alpasim_yaml_or_direct(tmp_path):
    p = write_server_yaml(tmp_path / "generated-runtime-server.yaml", "127.0.0.1", 50123)
    assert read_runtime_yaml(str(p)) == "127.0.0.1:50123"
    nested = tmp_path / "nested.yaml"
    nested.write_text("runtime:\n  host: 10.0.0.2\n  port: 7000\n")
    assert resolve_address(runtime_yaml=str(nested)) == "10.0.0.2:7000"
    assert resolve_address("[::1]:5000") == "[::1]:5000"
    bad = tmp_path / "bad.yaml"
    bad.write_text("hello: world\n")
    with pytest.raises(ValueError, match="bad.yaml: no host/port entries"):
        read_runtime_yaml(str(bad))
    with pytest.raises(ValueError, match="exactly one of runtime_address"):
        resolve_address("127.0.0.1:1", str(p))
    with pytest.raises(ValueError, match="is not host:port"):
        resolve_address("localhost")
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        read_runtime_yaml(str(tmp_path / "missing.yaml"))


def test_env_instances_of_a_process_share_one_driver_server(scripted):
    rt = scripted(straight_north)
    a = AlpaSimBatch(rt.address, 1)
    b = AlpaSimBatch(rt.address, 1)
    try:
        assert a.host is b.host and a.driver_address == b.driver_address
        a.close()
        b.reset(options=[{"scene_id": SCENE}])          # still served after the other env left
        b.step(torch.zeros(1, 20, 3))
    finally:
        b.close()
    assert DriverHost._hosts.get(("127.0.0.1", 0)) is None   # stopped with its last env


# ---- against our drivesim-backed runtime server -----------------------------------------------------
@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = tmp_path_factory.mktemp("alpasim_scenes")
        s = small_scene_set(root, n=2, seed=0)
    return str(Path(root).resolve()), s.ids


@pytest.fixture(scope="module")
def runtime(scenes):
    server = RuntimeServer(RuntimeConfig(scenes_dir=scenes[0], max_steps=20, camera_px=64))
    server.start()
    yield server
    server.stop(0)


def drivesim_env(root: str, scene_id: str, keys: tuple[str, ...]) -> DriveSimBatch:
    scene = SceneSet.open(root).load(scene_id)
    return DriveSimBatch([scene], 1, DriveSimConfig(obs_keys=keys, decision_every=2, warmup_ticks=17, max_ticks=20))


def run_episode(env, policy, options):
    obs = env.reset(seeds=[3], options=[options])
    first = obs
    decisions = 0
    while True:
        action, _, _ = policy.act(obs)
        obs, _, term, trunc, info = env.step(action)
        decisions += 1
        if bool((term | trunc)[0]):
            return first, decisions, info


def test_first_observation_equals_drivesims_own(runtime, scenes):
    root, ids = scenes
    keys = ("ego_history", "route", "gt_trajectory")
    env = AlpaSimBatch(runtime.address, 1, AlpaSimEnvConfig(obs_keys=keys))
    try:
        obs = env.reset(seeds=[0], options=[{"scene_id": ids[0], "start_step": 3}])
        # the offset is honoured: the first decision comes at clip step 3 + 17 warm-up ticks
        assert env._slots[0].decision.time_now_us == CLIP_START_US + 20 * 100_000
    finally:
        env.close()
    ref = drivesim_env(root, ids[0], keys).reset(seeds=[0], options=[{"scene_id": ids[0], "start_step": 3}])
    for key in keys:
        assert obs[key + "_mask"].tolist() == ref[key + "_mask"].tolist(), key
        np.testing.assert_allclose(obs[key].numpy(), ref[key].numpy(), atol=2e-4, err_msg=key)


@pytest.fixture(scope="module")
def both_episodes(runtime, scenes):
    """The same policy (logged replay) on scene 0 through the runtime and directly in drivesim."""
    root, ids = scenes
    keys = ("ego_history", "gt_trajectory")
    policy = LoggedReplayPolicy(horizon=20)
    env = AlpaSimBatch(runtime.address, 1, AlpaSimEnvConfig(obs_keys=keys))
    try:
        _, d_alpasim, info_a = run_episode(env, policy, {"scene_id": ids[0], "start_step": 0})
    finally:
        env.close()
    _, d_drivesim, info_d = run_episode(drivesim_env(root, ids[0], keys), policy, {"scene_id": ids[0]})
    return (d_alpasim, info_a), (d_drivesim, info_d)


def test_episode_through_the_runtime_matches_drivesim(both_episodes):
    (d_a, info_a), (d_d, info_d) = both_episodes
    assert d_a == d_d == 10                            # 20 in-control ticks, 2 per decision
    ep_a, ep_d = info_a["episode_metrics"], info_d["episode_metrics"]
    for name in ("progress", "dist_traveled_m", "dist_to_gt_location", "collision_any", "offroad", "scene_score",
                 "min_distance_to_obstacle_m"):
        np.testing.assert_allclose(ep_a[name][0], ep_d[name][0], atol=1e-4, err_msg=name)
    reward = RewardFn.from_mapping(REWARD, ALPASIM_METRICS)
    series_a, series_d = info_a["episode_series"][0], info_d["episode_series"][0]
    assert len(series_a["progress"][0]) == len(series_d["progress"][0]) == 20
    r_a = reward.evaluate(series_a, info_a["episode_decision_of_tick"][0], d_a)
    r_d = reward.evaluate(series_d, np.arange(20) // 2, d_d)
    np.testing.assert_allclose(r_a.total, r_d.total, atol=1e-4)
    assert info_a["episode_decision_of_tick"][0].tolist() == (np.arange(20) // 2).tolist()


def test_a_converted_rollout_return_gives_the_same_reward_as_drivesims_series(both_episodes):
    _, (decisions, info) = both_episodes
    series = info["episode_series"][0]
    T = len(series["progress"][0])
    # AlpaSim's shape: warm-up ticks first (eval_relevant 0, with a "collision" that must not count),
    # then the drivesim ticks, all on the wire as a RolloutReturn
    warm, start = 17, CLIP_START_US
    times = start + 100_000 * np.arange(1, warm + T + 1, dtype=np.int64)
    rr = m.SimulationReturn.RolloutReturn(success=True)
    for name, (v, ok, agg) in series.items():
        wv = np.zeros(warm)
        if name in ("collision_any", "collision_front", "progress"):
            wv[:] = 1.0
        rr.timestep_metrics.append(convert.series_to_timestep_metric(MetricSeries(
            name, times, np.concatenate([wv, v]), np.concatenate([np.ones(warm, bool), ok]), agg)))
    wire = m.SimulationReturn.RolloutReturn.FromString(rr.SerializeToString())
    decision_times = [int(start + 100_000 * (warm + 2 * d)) for d in range(decisions)]
    got, ep, dec = episode_from_series(convert.rollout_series(wire), decision_times)
    assert dec.tolist() == (np.arange(T) // 2).tolist()
    reward = RewardFn.from_mapping(REWARD, ALPASIM_METRICS)
    want = reward.evaluate(series, np.arange(T) // 2, decisions)
    have = reward.evaluate(got, dec, decisions)
    assert have.total == pytest.approx(want.total, abs=1e-12)
    assert have.terms == pytest.approx(want.terms, abs=1e-12)
    np.testing.assert_allclose(have.per_decision, want.per_decision, atol=1e-12)
    for name, value in info["episode_metrics"].items():
        if name in ep:
            np.testing.assert_allclose(ep[name], value[0], atol=1e-12, err_msg=name)


def test_max_decisions_stops_the_rollout_with_terminate_session(runtime, scenes):
    env = AlpaSimBatch(runtime.address, 1, AlpaSimEnvConfig(obs_keys=("ego_history",), max_decisions=3))
    try:
        _, decisions, info = run_episode(env, ConstantVelocityPolicy(horizon=20), {"scene_id": scenes[1][0]})
    finally:
        env.close()
    # the drive after the third decision was answered with terminate_session: 3 executed decisions
    assert decisions == 3
    assert info["episode_decision_of_tick"][0].tolist() == [0, 0, 1, 1, 2, 2]


def test_warmup_drives_against_our_runtime_without_skip(scenes):
    server = RuntimeServer(RuntimeConfig(scenes_dir=scenes[0], max_steps=4, camera_px=0,
                                         skip_driver_during_force_gt=False))
    server.start()
    env = AlpaSimBatch(server.address, 1, AlpaSimEnvConfig(obs_keys=("ego_history",), runtime_skips_warmup=False))
    try:
        obs = env.reset(seeds=[1], options=[{"scene_id": scenes[1][1], "start_step": 2}])
        assert env._slots[0].session.warmup_drives == 9    # drives at steps 2, 4, .., 18 < 2 + 17: empty answers
        assert env._slots[0].decision.time_now_us == CLIP_START_US + 19 * 100_000
        assert obs["ego_history_mask"].all()
        policy, decisions = ConstantVelocityPolicy(horizon=20), 0
        while True:
            _, _, term, trunc, info = env.step(policy.act(obs)[0])
            decisions += 1
            if bool((term | trunc)[0]):
                break
        assert decisions == 2 and info["episode_metrics"]["eval_relevant"][0] == 1.0
    finally:
        env.close()
        server.stop(0)


def test_cameras_and_the_gymnasium_view(runtime, scenes):
    cfg = {"obs_keys": ["ego_history", "route", "cameras"], "camera_ids": [CAMERA_ID, "absent"],
           "camera_size": [48, 64]}
    env = AlpaSimEnv(runtime_address=runtime.address, config=cfg, scene_ids=scenes[1])
    try:
        obs, info = env.reset(seed=5, options={"start_step": 1})
        assert info["scene_id"] in scenes[1] and info["start_time_offset_us"] == 100_000
        assert env.observation_space.contains(obs)
        assert obs["cameras"][CAMERA_ID].shape == (48, 64, 3) and obs["cameras"][CAMERA_ID].std() > 0
        assert obs["cameras_mask"].tolist() == [1, 0]
        steps, done = 0, False
        while not done:
            obs, reward, term, trunc, info = env.step(np.zeros((20, 3), dtype=np.float32))
            steps, done = steps + 1, term or trunc
        assert steps == 10 and reward == 0.0 and trunc
        assert set(info["episode_metrics"]) >= {"progress", "scene_score", "collision_at_fault"}
        assert info["aggregated_metrics"]["eval_relevant"] == 1.0
    finally:
        env.close()


def test_factory_builds_from_the_yaml_node_and_reset_stops_running_rollouts(runtime, scenes, tmp_path):
    yaml_path = write_server_yaml(tmp_path / "generated-runtime-server.yaml", "127.0.0.1", runtime.port)
    env = make_batched_env(2, runtime_yaml=str(yaml_path), scene_ids=scenes[1], scenes_path="ignored",
                           config={"obs_keys": ["ego_history", "route"], "horizon": 20,
                                   "extra_metrics": {"comfort_violation": "max"}})
    try:
        assert "comfort_violation" in env.metric_names and env.metric_aggregations["comfort_violation"].name == "MAX"
        env.reset(seeds=[1, 1], options=[{"scene_id": scenes[1][0]}] * 2)
        env.step(torch.zeros(2, 20, 3))
        old = [s for s in env._slots]
        obs = env.reset(seeds=[2, 2], options=[{"scene_id": scenes[1][1], "start_step": 4}] * 2)
        for s in old:                                    # the stopped rollouts end on the runtime side too
            s.future.result(timeout=20)
            assert s.session.aborted == "reset"
        assert obs["ego_history"].shape == (2, 16, 7)
        while True:
            _, _, term, trunc, info = env.step(torch.zeros(2, 20, 3))
            if bool((term | trunc).all()):
                break
        assert np.isfinite(info["episode_metrics"]["comfort_violation"]).all()
    finally:
        env.close()
