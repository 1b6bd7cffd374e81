"""Known answers for drivesim's other agents: log replay, agent paths and reactive IDM traffic."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from envs.drivesim.agents import (
    IDMParams,
    build_agent_paths,
    idm_accel,
    idm_assign,
    idm_reset,
    idm_step,
    replay,
)

DT = 0.1
PARAMS = IDMParams()
CAR = (4.5, 2.0)


def line(x0: float, v: float, steps: int, y: float = 0.0, heading: float = 0.0) -> np.ndarray:
    """``[steps, 5]`` track at constant speed ``v`` from (x0, y) along ``heading``."""
    t = np.arange(steps) * DT
    c, s = math.cos(heading), math.sin(heading)
    out = np.zeros((steps, 5), np.float32)
    out[:, 0], out[:, 1] = x0 + c * v * t, y + s * v * t
    out[:, 2], out[:, 3], out[:, 4] = heading, c * v, s * v
    return out


def arc(radius: float, v: float, steps: int, phase: float = 0.0) -> np.ndarray:
    """``[steps, 5]`` counter-clockwise track on a circle around the origin from angle ``phase``."""
    th = phase + v * np.arange(steps) * DT / radius
    out = np.zeros((steps, 5), np.float32)
    out[:, 0], out[:, 1] = radius * np.cos(th), radius * np.sin(th)
    out[:, 2] = th + np.pi / 2
    out[:, 3], out[:, 4] = -v * np.sin(th), v * np.cos(th)
    return out


def scene(*tracks, valid=None, sizes=None):
    """One scene ``[1, N, T, 5]`` from agent tracks; row 0 is the (logged) ego."""
    state = np.stack(tracks)[None]
    valid = np.ones(state.shape[:3], bool) if valid is None else np.asarray(valid)[None]
    sizes = np.array([sizes or [CAR] * len(tracks)], np.float32)
    return torch.as_tensor(state), torch.as_tensor(valid), torch.as_tensor(sizes)


def far_ego(B: int = 1):
    """An ego box parked far from everyone."""
    return (torch.tensor([[0.0, 500.0]] * B), torch.zeros(B), torch.full((B,), CAR[0]), torch.full((B,), CAR[1]))


def simulate(state, valid, size, ticks, ego=None, ego_speed=None, start=0, scene_idx=None):
    """Run IDM from log step ``start``; outputs ``[ticks, B, N, 5]``, valid, speeds ``[ticks, B, N]``."""
    paths = build_agent_paths(state, valid, size)
    sc = torch.zeros(1, dtype=torch.long) if scene_idx is None else scene_idx
    B = len(sc)
    t = torch.full((B,), start, dtype=torch.long) if np.isscalar(start) else torch.as_tensor(start)
    t = t.to(sc.device)
    ego = ego or far_ego(B)
    ego_speed = torch.zeros(B, device=sc.device) if ego_speed is None else ego_speed
    st = idm_reset(paths, state, valid, sc, t)
    outs, valids, speeds = [], [], []
    for _ in range(ticks):
        t = t + 1
        st, out, ok = idm_step(st, paths, state, valid, size, sc, t, ego, ego_speed, PARAMS, DT)
        outs.append(out)
        valids.append(ok)
        speeds.append(st.v)
    return torch.stack(outs), torch.stack(valids), torch.stack(speeds)


def bumper_gap(out, back: int, front: int, length: float = CAR[0]) -> torch.Tensor:
    return torch.linalg.vector_norm(out[..., front, :2] - out[..., back, :2], dim=-1) - length


# ---- replay -------------------------------------------------------------------------------------
def test_replay_gathers_clamps_and_invalidates_outside_the_log():
    state = torch.arange(2 * 2 * 3 * 5, dtype=torch.float32).reshape(2, 2, 3, 5)
    valid = torch.ones(2, 2, 3, dtype=torch.bool)
    valid[1, 1, 0] = False
    out, ok = replay(state, valid, torch.tensor([1, 0, 1, 0]), torch.tensor([0, 2, 5, -1]))
    assert torch.equal(out[0], state[1, :, 0]) and ok[0].tolist() == [True, False]
    assert torch.equal(out[1], state[0, :, 2]) and ok[1].all()
    assert torch.equal(out[2], state[1, :, 2]) and not ok[2].any()   # past the log: clamped, invalid
    assert not ok[3].any()


# ---- paths --------------------------------------------------------------------------------------
def test_paths_follow_a_logged_circle_and_extend_straight():
    radius, v, steps = 20.0, 5.0, 100
    state, valid, size = scene(line(0, 0, steps, y=300.0), arc(radius, v, steps))
    paths = build_agent_paths(state, valid, size)
    assert not paths.controlled[0, 0] and paths.controlled[0, 1]     # row 0 is the ego
    n = 1
    log_len = paths.log_length[0, n].item()
    assert log_len == pytest.approx(v * (steps - 1) * DT, rel=1e-3)
    spacing = paths.spacing[0, n].item()
    r = torch.arange(paths.num_points) * spacing
    on_log = r <= log_len
    rad = torch.hypot(paths.x[0, n], paths.y[0, n])[on_log]
    assert (rad - radius).abs().max() < 0.01
    th = r[on_log] / radius + np.pi / 2
    assert torch.allclose(paths.heading[0, n][on_log], torch.atan2(torch.sin(th), torch.cos(th)), atol=1e-3)
    assert torch.allclose(paths.step_arc[0, n], torch.arange(steps) * v * DT, atol=0.02)
    assert paths.v_max[0, n].item() == pytest.approx(v, rel=1e-4)
    # beyond the log the path goes straight on along the final tangent
    end_th = v * (steps - 1) * DT / radius
    end = np.array([radius * np.cos(end_th), radius * np.sin(end_th)])
    tangent = np.array([-np.sin(end_th), np.cos(end_th)])
    j = int(math.ceil((log_len + 5.0) / spacing))
    expected = end + (j * spacing - log_len) * tangent
    assert np.allclose([paths.x[0, n, j].item(), paths.y[0, n, j].item()], expected, atol=0.05)
    assert paths.length[0, n].item() >= log_len + 10.0


def test_jittering_stationary_agent_has_no_path():
    jitter = line(50.0, 0.0, 200)
    jitter[:, :2] += 0.05 * np.random.default_rng(0).standard_normal((200, 2))
    state, valid, size = scene(line(0, 0, 200, y=300.0), jitter)
    paths = build_agent_paths(state, valid, size)
    assert paths.log_length[0, 1].item() < PARAMS.parked_length


def test_candidates_are_agents_whose_paths_come_close():
    state, valid, size = scene(line(0, 10, 100), line(20, 10, 100), line(0, 10, 100, y=-50.0), line(60, 5, 100),
                               line(10, 10, 100, y=3.7), line(80, 5, 100, y=-10.0, heading=math.pi / 2))
    paths = build_agent_paths(state, valid, size)
    cand = [set(row) - {-1} for row in paths.candidates[0].tolist()]
    assert cand[1] == {3, 5} and cand[3] == {1, 5}  # same road + a crossing; never the ego's row
    assert cand[2] == set()                          # 50 m away
    assert cand[4] == {5}                            # the next lane (3.7 m) is not on the road
    assert cand[5] == {1, 3, 4}                      # the crossing agent crosses both lanes
    assert paths.candidates.shape[2] == 3            # only as many columns as some agent needs
    with pytest.raises(ValueError, match="agent_size"):
        build_agent_paths(state, valid, size[:, :2])


# ---- IDM ----------------------------------------------------------------------------------------
def test_idm_accel_known_values():
    v0, inf = torch.tensor([10.0]), torch.tensor([math.inf])
    assert idm_accel(torch.tensor([0.0]), v0, inf, torch.tensor([0.0]), PARAMS).item() == pytest.approx(1.5)
    assert idm_accel(v0, v0, inf, torch.tensor([0.0]), PARAMS).item() == pytest.approx(0.0, abs=1e-6)
    # v = 5, leader at 5, gap 10: s* = 2 + 7.5 = 9.5 → 1.5 (1 - (1/2)^4 - 0.95²)
    acc = idm_accel(torch.tensor([5.0]), v0, torch.tensor([10.0]), torch.tensor([5.0]), PARAMS)
    assert acc.item() == pytest.approx(1.5 * (1 - 0.0625 - 0.95**2), rel=1e-5)
    # closing in fast on a stopped obstacle: braking is capped
    acc = idm_accel(torch.tensor([20.0]), torch.tensor([20.0]), torch.tensor([5.0]), torch.tensor([0.0]), PARAMS)
    assert acc.item() == pytest.approx(-PARAMS.max_decel)


def test_idm_params_are_checked():
    with pytest.raises(ValueError, match="headway"):
        IDMParams(headway=0.0)
    with pytest.raises(ValueError, match="max_decel"):
        IDMParams(max_decel=1.0)


def test_follower_behind_slower_leader_settles_at_a_safe_gap():
    steps = 400                                                     # the logs outlast the 25 s run
    state, valid, size = scene(line(0, 0, steps, y=300.0), line(60.0, 5.0, steps), line(0.0, 15.0, steps))
    out, ok, v = simulate(state, valid, size, 250)
    gap = bumper_gap(out[:, 0], back=2, front=1)
    assert ok[:, 0, 1:].all()
    assert gap.min() > PARAMS.min_gap                               # never closer than the jam gap
    # IDM equilibrium behind a leader at 5 m/s with v0 = 15: (s0 + vT) / sqrt(1 - (v/v0)^4)
    expected = (2.0 + 5.0 * 1.5) / math.sqrt(1 - (5.0 / 15.0) ** 4)
    assert gap[-1].item() == pytest.approx(expected, abs=0.3)
    assert v[-1, 0, 2].item() == pytest.approx(5.0, abs=0.1)
    assert v[-1, 0, 1].item() == pytest.approx(5.0, abs=1e-3)       # the leader is free at its v0
    # agents move along their path: the follower stays on y = 0 and faces +x
    assert out[:, 0, 2, 1].abs().max() < 1e-3 and out[:, 0, 2, 2].abs().max() < 1e-3


def test_free_agent_approaches_its_desired_speed():
    steps = 300
    t = np.arange(steps) * DT
    accel = line(0.0, 0.0, steps)
    v_log = np.minimum(2.0 * t, 12.0)
    accel[:, 0] = np.where(t < 6.0, t * t, 36.0 + 12.0 * (t - 6.0))
    accel[:, 3] = v_log
    state, valid, size = scene(line(0, 0, steps, y=300.0), accel)
    _, _, v = simulate(state, valid, size, 250)
    assert v[0, 0, 1].item() < 0.5                                  # starts from its logged standstill
    assert v[:, 0, 1].max().item() <= 12.0 + 1e-4
    assert v[200, 0, 1].item() > 0.95 * 12.0


def test_agent_stops_behind_the_stopped_ego():
    steps = 300
    state, valid, size = scene(line(0, 0, steps, y=300.0), line(0.0, 10.0, steps))
    ego = (torch.tensor([[80.0, 0.3]]), torch.zeros(1), torch.tensor([CAR[0]]), torch.tensor([CAR[1]]))
    out, _, v = simulate(state, valid, size, 250, ego=ego)
    gap = 80.0 - out[:, 0, 1, 0] - CAR[0]
    assert gap.min() > 1.0                                          # no collision
    assert gap[-1].item() == pytest.approx(PARAMS.min_gap, abs=0.5)
    assert v[-1, 0, 1].item() < 0.05
    assert (v >= 0).all()


def test_parked_agent_stays_put_and_the_ego_row_is_log_replay():
    steps = 200
    parked = line(30.0, 0.0, steps, y=0.0)
    parked[:, :2] += 0.03 * np.random.default_rng(1).standard_normal((steps, 2))
    ego_log = line(0, 3.0, steps, y=300.0)
    state, valid, size = scene(ego_log, parked, line(0.0, 8.0, steps))
    out, ok, _ = simulate(state, valid, size, 150)
    assert torch.equal(out[:, 0, 1], out[:1, 0, 1].expand(150, 5))  # never moves
    assert torch.linalg.vector_norm(out[0, 0, 1, :2] - torch.tensor([30.0, 0.0])) < 0.25
    assert torch.allclose(out[:, 0, 0], state[0, 0, 1:151])         # ego row: the log
    # and the moving agent stops behind the parked one
    assert (30.0 - out[:, 0, 2, 0] - CAR[0]).min() > 1.0


def test_agent_stops_for_a_car_standing_across_its_path():
    steps = 250
    across = line(60.0, 0.0, steps, y=0.0, heading=math.pi / 2)      # 4.5 m long across the lane
    state, valid, size = scene(line(0, 0, steps, y=300.0), across, line(0.0, 10.0, steps))
    out, _, v = simulate(state, valid, size, 200)
    # bumper to side: centre distance - own half length - the crossing car's half width
    gap = 60.0 - out[:, 0, 2, 0] - 0.5 * CAR[0] - 0.5 * CAR[1]
    assert gap.min() > 1.0
    assert gap[-1].item() == pytest.approx(PARAMS.min_gap, abs=0.5)
    assert v[-1, 0, 2].item() < 0.05


def test_agents_appear_and_disappear_as_in_the_log():
    steps = 120
    valid = np.ones((3, steps), bool)
    valid[2, :30] = False
    valid[2, 81:] = False
    track = line(0.0, 7.0, steps, y=-20.0)
    state, valid, size = scene(line(0, 0, steps, y=300.0), line(0, 5.0, steps), track, valid=valid)
    out, ok, v = simulate(state, valid, size, 100)                  # ticks enter steps 1..100
    seen = ok[:, 0, 2]
    assert not seen[:29].any() and seen[29:80].all() and not seen[80:].any()
    first = out[29, 0, 2]                                           # step 30: its logged state
    assert torch.allclose(first[:3], state[0, 2, 30, :3], atol=0.26)
    assert v[29, 0, 2].item() == pytest.approx(7.0)


def test_agent_in_the_next_lane_is_no_leader():
    steps = 250
    state, valid, size = scene(line(0, 0, steps, y=300.0), line(20.0, 4.0, steps, y=3.7), line(0.0, 12.0, steps))
    _, _, v = simulate(state, valid, size, 200)
    assert v[:, 0, 2].min().item() == pytest.approx(12.0, abs=1e-3)


def test_follower_on_a_curve_keeps_its_distance():
    radius, steps = 40.0, 400
    leader = arc(radius, 4.0, steps, phase=1.0)                     # 40 m of arc ahead
    follower = arc(radius, 10.0, steps, phase=0.0)
    state, valid, size = scene(line(0, 0, steps, y=300.0), leader, follower)
    out, _, v = simulate(state, valid, size, 300)
    th = torch.atan2(out[..., 1], out[..., 0])[:, 0]
    arc_gap = torch.remainder(th[:, 1] - th[:, 2], 2 * math.pi) * radius - CAR[0]
    assert arc_gap.min() > PARAMS.min_gap
    expected = (2.0 + 4.0 * 1.5) / math.sqrt(1 - (4.0 / 10.0) ** 4)
    assert arc_gap[-1].item() == pytest.approx(expected, abs=0.5)
    rad = torch.hypot(out[..., 0], out[..., 1])[:, 0, 1:]
    assert (rad - radius).abs().max() < 0.05                        # still on their circles


def test_batched_envs_match_single_env_runs():
    steps = 200
    s1 = scene(line(0, 0, steps, y=300.0), line(40.0, 4.0, steps), line(0.0, 12.0, steps))
    s2 = scene(line(0, 0, steps, y=300.0), arc(30.0, 6.0, steps), arc(30.0, 3.0, steps, phase=1.5))
    state = torch.cat([s1[0], s2[0]])
    valid, size = torch.cat([s1[1], s2[1]]), torch.cat([s1[2], s2[2]])
    sc, start = torch.tensor([0, 1, 0]), torch.tensor([0, 10, 50])
    ego = (torch.tensor([[0.0, 500.0], [0.0, 0.0], [100.0, 0.0]]), torch.zeros(3),
           torch.full((3,), CAR[0]), torch.full((3,), CAR[1]))
    batched, ok_b, _ = simulate(state, valid, size, 100, ego=ego, start=start, scene_idx=sc)
    for b in range(3):
        one = (ego[0][b : b + 1], ego[1][b : b + 1], ego[2][b : b + 1], ego[3][b : b + 1])
        single, ok_s, _ = simulate(state, valid, size, 100, ego=one, start=start[b : b + 1].tolist(),
                                   scene_idx=sc[b : b + 1])
        assert torch.allclose(batched[:, b], single[:, 0], atol=1e-4)
        assert torch.equal(ok_b[:, b], ok_s[:, 0])


def test_idm_assign_replaces_rows():
    steps = 50
    state, valid, size = scene(line(0, 0, steps, y=300.0), line(0.0, 10.0, steps))
    paths = build_agent_paths(state, valid, size)
    st = idm_reset(paths, state, valid, torch.zeros(3, dtype=torch.long), torch.tensor([0, 0, 0]))
    fresh = idm_reset(paths, state, valid, torch.zeros(1, dtype=torch.long), torch.tensor([20]))
    out = idm_assign(st, torch.tensor([1]), fresh)
    assert out.s[:, 1].tolist() == pytest.approx([0.0, 20.0, 0.0], abs=0.26)
    assert st.s[1, 1].item() == 0.0                                  # the input is not modified


@pytest.mark.gpu
def test_idm_on_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    steps = 200
    state, valid, size = scene(line(0, 0, steps, y=300.0), line(60.0, 5.0, steps), line(0.0, 15.0, steps))
    cpu, _, _ = simulate(state, valid, size, 150)
    ego = tuple(x.cuda() for x in far_ego())
    gpu, _, _ = simulate(state.cuda(), valid.cuda(), size.cuda(), 150, ego=ego, ego_speed=torch.zeros(1).cuda(),
                         scene_idx=torch.zeros(1, dtype=torch.long).cuda())
    assert torch.allclose(cpu, gpu.cpu(), atol=1e-3)
