"""drivesim's batched env on hand-built and generated scenes, with known answers."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from envs.drivesim.batched import DriveSimBatch
from envs.drivesim.config import DriveSimConfig
from envs.drivesim.generate import GeneratorConfig, generate_scenes
from envs.drivesim.metric_names import EPISODE_METRIC_NAMES
from learners.baselines import ConstantVelocityPolicy, LoggedReplayPolicy

from .scenes_by_hand import straight_road_scene

H = 20


def run_episode(sim: DriveSimBatch, policy, options):
    obs = sim.reset(options=options)
    episode, series = {}, [None] * sim.num_envs
    steps = 0
    while not bool(sim.done.all()):
        obs, reward, term, trunc, info = sim.step(policy(obs))
        steps += 1
        if "episode_metrics" in info:
            ended = info["ended"].numpy()
            for k, v in info["episode_metrics"].items():
                episode.setdefault(k, np.full(sim.num_envs, np.nan))[ended] = v[ended]
            for b in np.nonzero(ended)[0]:
                series[b] = info["episode_series"][b]
    return episode, series, steps


def replay(obs):
    return LoggedReplayPolicy(H).act(obs)[0]


def straight_ahead(speed: float):
    def policy(obs):
        B = obs["ego_history"].shape[0]
        t = torch.arange(1, H + 1, dtype=torch.float32) * 0.1
        traj = torch.zeros(B, H, 3)
        traj[..., 0] = speed * t
        return traj
    return policy


@pytest.fixture(scope="module")
def generated():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return list(generate_scenes(5, seed=3, cfg=GeneratorConfig()))


def test_logged_replay_through_controller_tracks_the_log(generated):
    sim = DriveSimBatch(generated, num_envs=len(generated), config=DriveSimConfig(tracking="controller"))
    episode, series, _ = run_episode(sim, replay, [{"scene_id": s.scene_id} for s in generated])
    for b, s in enumerate(series):
        d = s["dist_to_gt_location"][0]
        assert d.max() < 0.5, (generated[b].scene_id, d.max())
    assert np.all(episode["collision_any"] == 0)
    assert np.all(episode["offroad"] == 0)
    assert np.all(episode["scene_score"] == 1)
    assert np.all(episode["progress"] > 0.95)


def test_reset_is_deterministic(generated):
    cfg = DriveSimConfig(obs_keys=("ego_history", "route", "map_points", "agents", "gt_trajectory", "bev"))
    sim = DriveSimBatch(generated, num_envs=2, config=cfg)
    opts = [{"scene_id": generated[1].scene_id, "start_step": 5}] * 2
    a = sim.reset(seeds=[7, 7], options=opts)
    sim.step(straight_ahead(20.0)(a))
    b = sim.reset(seeds=[7, 7], options=opts)
    for k in a:
        assert torch.equal(a[k], b[k]), k
        assert torch.equal(a[k][0], a[k][1]), k


def test_rear_end_collision_is_front_and_at_fault_and_terminates():
    scene = straight_road_scene(others=[{"x": 60.0, "y": 0.0, "speed": 0.0}])
    cfg = DriveSimConfig(terminate_on_collision=True)
    sim = DriveSimBatch([scene], num_envs=1, config=cfg)
    episode, series, _ = run_episode(sim, straight_ahead(15.0), [{"scene_id": scene.scene_id}])
    assert episode["collision_front"][0] == 1
    assert episode["collision_at_fault"][0] == 1
    assert episode["scene_score"][0] == 0
    assert series[0]["collision_rear"][0].max() == 0


def test_being_hit_from_behind_is_rear_not_at_fault():
    # a faster car behind in the same lane; the ego crawls, so the other car drives into it
    scene = straight_road_scene(ego_speed=2.0, others=[{"x": -30.0, "y": 0.0, "speed": 15.0}])
    sim = DriveSimBatch([scene], num_envs=1, config=DriveSimConfig())
    episode, _, _ = run_episode(sim, replay, [{"scene_id": scene.scene_id}])
    assert episode["collision_rear"][0] == 1
    assert episode["collision_at_fault"][0] == 0


def test_side_swipe_is_lateral():
    # a car alongside, slightly behind, drifts into the ego: its front corner hits the ego's left side
    scene = straight_road_scene(ego_speed=10.0, others=[
        {"x": -1.0, "y": 2.6, "speed": 10.0, "heading": -0.12}])
    sim = DriveSimBatch([scene], num_envs=1, config=DriveSimConfig(warmup_ticks=0))
    episode, series, _ = run_episode(sim, replay, [{"scene_id": scene.scene_id}])
    assert episode["collision_lateral"][0] == 1
    assert episode["collision_front"][0] == 0


def test_head_on_is_front():
    scene = straight_road_scene(others=[{"x": 80.0, "y": 0.0, "speed": 10.0, "heading": math.pi}])
    sim = DriveSimBatch([scene], num_envs=1, config=DriveSimConfig(warmup_ticks=0))
    episode, _, _ = run_episode(sim, replay, [{"scene_id": scene.scene_id}])
    assert episode["collision_front"][0] == 1


def test_contacts_present_at_the_start_are_ignored():
    scene = straight_road_scene(others=[{"x": 2.0, "y": 1.0, "speed": 10.0}])  # overlapping all along
    sim = DriveSimBatch([scene], num_envs=1, config=DriveSimConfig())
    episode, _, _ = run_episode(sim, replay, [{"scene_id": scene.scene_id}])
    assert episode["collision_any"][0] == 0


@pytest.mark.parametrize("lateral, offroad", [(0.0, 0), (0.95 + 0.2, 0), (6.0, 1)])
def test_offroad_inside_touching_and_off_the_road(lateral, offroad):
    # drive parallel to the lane at a lateral offset: centred, corners 0.2 m past the edge line
    # (the road edge is crossed -> off-road), and fully off the road
    scene = straight_road_scene(road_edges=False)
    sim = DriveSimBatch([scene], num_envs=1, config=DriveSimConfig(tracking="perfect", warmup_ticks=0))

    def policy(obs):
        traj = straight_ahead(10.0)(obs)
        y_now = sim.pose[:, 1]
        traj[..., 1] = lateral - y_now[:, None]
        return traj
    episode, series, _ = run_episode(sim, policy, [{"scene_id": scene.scene_id}])
    assert series[0]["offroad"][0][3:].max() == offroad


def test_crossing_a_road_edge_is_offroad_even_inside_the_tolerance():
    scene = straight_road_scene(road_edges=True)
    sim = DriveSimBatch([scene], num_envs=1, config=DriveSimConfig(tracking="perfect", warmup_ticks=0))

    def policy(obs):
        traj = straight_ahead(10.0)(obs)
        traj[..., 1] = 0.95 + 0.2 - sim.pose[:, 1][:, None]
        return traj
    _, series, _ = run_episode(sim, policy, [{"scene_id": scene.scene_id}])
    assert series[0]["offroad"][0][3:].min() == 1


def test_progress_along_a_curve():
    scene = straight_road_scene(curve_radius=40.0, steps=81, ego_speed=8.0)
    sim = DriveSimBatch([scene], num_envs=1, config=DriveSimConfig(warmup_ticks=0))
    _, series, _ = run_episode(sim, replay, [{"scene_id": scene.scene_id}])
    prog = series[0]["progress"][0]
    assert prog[-1] == pytest.approx(1.0, abs=0.02)
    assert prog[len(prog) // 2 - 1] == pytest.approx(0.5, abs=0.03)   # constant speed: linear progress
    assert series[0]["offroad"][0].max() == 0


def test_invalid_actions_are_clipped_or_rejected(generated):
    obs_sim = DriveSimBatch(generated[:1], num_envs=2, config=DriveSimConfig())
    obs = obs_sim.reset(options=[{"scene_id": generated[0].scene_id}] * 2)
    action = replay(obs)
    action[0, 3, 0] = float("nan")
    action[1, :, 1] = 1e9
    _, _, _, _, info = obs_sim.step(action)
    assert info["invalid_action"].tolist() == [True, True]
    assert torch.isfinite(obs_sim.pose).all() and torch.isfinite(obs_sim.speed).all()
    strict = DriveSimBatch(generated[:1], num_envs=1, config=DriveSimConfig(invalid_action="reject"))
    obs = strict.reset(options=[{"scene_id": generated[0].scene_id}])
    bad = replay(obs)
    bad[0, 0, 2] = float("inf")
    with pytest.raises(ValueError):
        strict.step(bad)


def test_accel_curvature_mode_and_episode_metric_names(generated):
    sim = DriveSimBatch(generated[:1], num_envs=1, config=DriveSimConfig(action_mode="accel_curvature"))
    sim.reset(options=[{"scene_id": generated[0].scene_id}])
    info = {}
    while not bool(sim.done.all()):
        _, _, _, _, info = sim.step(torch.tensor([[1.0, 0.01]]))
    assert set(info["episode_metrics"]) <= set(EPISODE_METRIC_NAMES)
    assert {"scene_score", "collision_at_fault", "progress", "ttc_s"} <= set(info["episode_metrics"])


def test_idm_agents_yield_to_a_stopped_ego():
    # the ego stops in its lane; a follower 40 m behind at 10 m/s must brake instead of hitting it
    scene = straight_road_scene(ego_speed=0.0, others=[{"x": -40.0, "y": 0.0, "speed": 10.0}], steps=101)
    for agents, hit in (("log", 1), ("idm", 0)):
        sim = DriveSimBatch([scene], num_envs=1, config=DriveSimConfig(agents=agents))
        episode, _, _ = run_episode(sim, replay, [{"scene_id": scene.scene_id}])
        assert episode["collision_any"][0] == hit, agents


def test_bad_reset_options_are_reported(generated):
    sim = DriveSimBatch(generated[:1], num_envs=1)
    with pytest.raises(KeyError, match="not loaded"):
        sim.reset(options=[{"scene_id": "nope"}])
    with pytest.raises(ValueError, match="start_step"):
        sim.reset(options=[{"scene_id": generated[0].scene_id, "start_step": 10_000}])
    with pytest.raises(ValueError, match="unknown keys"):
        sim.reset(options=[{"scene": generated[0].scene_id}])


def test_render_gives_rgb_frames(generated):
    sim = DriveSimBatch(generated[:1], num_envs=1)
    obs = sim.reset(options=[{"scene_id": generated[0].scene_id}])
    sim.step(ConstantVelocityPolicy(H).act(obs)[0])
    frame = sim.render(0)
    assert frame.dtype == np.uint8 and frame.shape == (400, 400, 3)
    assert frame.std() > 0


def test_render_works_for_scenes_with_fewer_agents_than_the_batch(generated):
    """Agent slots are padded to the largest scene of the batch: every env renders, whatever its
    scene's own number of agents (a video iteration used to fail every group of such a scene)."""
    counts = [s.num_agents for s in generated]
    assert len(set(counts)) > 1, counts  # the fixture mixes scene sizes
    sim = DriveSimBatch(generated, num_envs=len(generated))
    obs = sim.reset(options=[{"scene_id": s.scene_id} for s in generated])
    sim.step(ConstantVelocityPolicy(H).act(obs)[0])
    for b in range(len(generated)):
        frame = sim.render(b, size=64)
        assert frame.shape == (64, 64, 3) and frame.std() > 0


def _noisy_replay(obs, gen):
    """The logged future with a little noise: varied plans, collisions and off-road now and then."""
    act = obs["gt_trajectory"][:, :20].clone()
    return act + 0.3 * torch.randn(act.shape, generator=gen, device="cpu").to(act.device)


@pytest.mark.gpu
@pytest.mark.parametrize("agents", ["log", "idm"])
def test_cuda_graph_tick_matches_eager(generated, agents):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    B = 12
    sims = [DriveSimBatch(generated, B, DriveSimConfig(agents=agents, cuda_graph=g), device="cuda")
            for g in (False, True)]
    options = [{"scene_id": generated[i % len(generated)].scene_id, "start_step": i % 3} for i in range(B)]
    obs = [s.reset(seeds=list(range(B)), options=options) for s in sims]
    gen = torch.Generator().manual_seed(0)
    for d in range(30):
        action = _noisy_replay(obs[0], gen)
        outs = [s.step(action) for s in sims]
        obs = [o[0] for o in outs]
        for k in obs[0]:
            assert torch.equal(obs[0][k], obs[1][k]), (d, k)
        for a, b in zip(outs[0][1:4], outs[1][1:4], strict=True):
            assert torch.equal(a, b)
        assert torch.equal(sims[0].series.nan_to_num(-7), sims[1].series.nan_to_num(-7))
        if d == 10:  # reset a subset in place between ticks
            ids = [1, 5, 7]
            obs = [s.reset(seeds=ids, options=[options[i] for i in ids], env_ids=ids) for s in sims]
            obs = [{k: v for k, v in o.items()} for o in obs]
    assert isinstance(sims[1]._tick_fn, __import__("envs.drivesim.cuda_graph").drivesim.cuda_graph.GraphedTick)
    assert not sims[1]._tick_fn.failed


def test_plan_deviation_compares_the_overlapping_poses(generated):
    """Per env: the mean distance between the new plan's poses 1.. and the old plan's poses at the
    same times (the old plan shifted by the time since it was made)."""
    from envs.drivesim import dynamics

    B = 4
    sim = DriveSimBatch(generated[:2], B, DriveSimConfig(decision_every=2))
    sim.reset(options=[{"scene_id": generated[i % 2].scene_id} for i in range(B)])
    gen = torch.Generator().manual_seed(1)
    plan = torch.zeros(B, 20, 3)
    plan[..., 0] = torch.arange(1, 21) * 1.0
    _, _, _, _, info = sim.step(plan)
    assert torch.isnan(info["plan_deviation"]).all()                 # no earlier plan
    for _ in range(3):
        new = plan + 0.4 * torch.randn(plan.shape, generator=gen)
        world = dynamics.plan_to_world(new, sim.pose)                 # [B, 21, 3]
        steps = int(round(float(sim.tau[0]) / 0.1))                   # every env: 2 ticks ago
        old = sim.plan[:, 1 + steps:, :2]
        n = min(old.shape[1], world.shape[1] - 1)
        expected = torch.linalg.vector_norm(world[:, 1:1 + n, :2] - old[:, :n], dim=-1).mean(1)
        _, _, _, _, info = sim.step(new)
        assert torch.allclose(info["plan_deviation"], expected, atol=1e-5)


def test_a_tick_that_cannot_be_captured_runs_eagerly_with_a_warning(generated):
    """GraphedTick's fallback (here: no CUDA at all) warns once and changes no result."""
    from envs.drivesim.cuda_graph import GraphedTick

    B = 6
    sims = [DriveSimBatch(generated, B, DriveSimConfig()) for _ in range(2)]
    sims[1]._tick_fn = GraphedTick(sims[1], sims[1]._tick, sims[1]._tick_state())
    options = [{"scene_id": generated[i % len(generated)].scene_id} for i in range(B)]
    obs = [s.reset(seeds=list(range(B)), options=options) for s in sims]
    gen = torch.Generator().manual_seed(0)
    with pytest.warns(UserWarning, match="could not be captured as a CUDA graph"):
        for _ in range(5):
            action = _noisy_replay(obs[0], gen)
            outs = [s.step(action) for s in sims]
            obs = [o[0] for o in outs]
            for k in obs[0]:
                assert torch.equal(obs[0][k], obs[1][k]), k
    assert sims[1]._tick_fn.failed
