"""The procedural generator: config checks, determinism, every layout valid, logs free of collisions
and off-road egos (checked here with geometry written from the scene arrays alone), lane graph
content, a smooth ego log, signals obeyed, rejection bookkeeping, and a scene-set round trip."""

from __future__ import annotations

import time

import numpy as np
import pytest

from envs.drivesim import generate as gen
from envs.drivesim.generate import (
    LAYOUTS,
    GenerationError,
    GeneratorConfig,
    find_collisions,
    generate_scene,
    generate_scene_set,
    generate_scenes,
    small_scene_set,
)
from envs.drivesim.scene import DT, AgentType, LightState, LinkKind, MapType, PolygonType, Scene, SceneSet

SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def by_layout() -> dict[str, list[Scene]]:
    return {lay: [generate_scene(s, GeneratorConfig(layouts=(lay,))) for s in SEEDS] for lay in LAYOUTS}


def all_scenes(by_layout: dict[str, list[Scene]]) -> list[Scene]:
    return [s for scenes in by_layout.values() for s in scenes]


# ---- independent geometry for the checks -----------------------------------------------------------
def corners(xy: np.ndarray, yaw: np.ndarray, length: float, width: float) -> np.ndarray:
    """``[T, 4, 2]`` box corners."""
    f = np.stack([np.cos(yaw), np.sin(yaw)], -1)
    lft = np.stack([-np.sin(yaw), np.cos(yaw)], -1)
    out = [xy + sx * length / 2 * f + sy * width / 2 * lft for sx, sy in ((1, 1), (1, -1), (-1, -1), (-1, 1))]
    return np.stack(out, 1)


def lane_excess(scene: Scene, pts: np.ndarray) -> np.ndarray:
    """Distance of each point ``[M, 2]`` outside the union of lanes (centre distance − half width)."""
    best = np.full(len(pts), np.inf)
    for i, line in scene.polylines(MapType.LANE):
        w = scene.map_width[scene.map_offsets[i]:scene.map_offsets[i + 1]]
        a, b = line[:-1].astype(np.float64), line[1:].astype(np.float64)
        ab = b - a
        t = np.clip(((pts[:, None] - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12), 0, 1)
        d = np.linalg.norm(a + t[..., None] * ab - pts[:, None], axis=-1)
        best = np.minimum(best, (d - w[:-1] / 2).min(1))
    return best


def points_in_boxes(pts: np.ndarray, xy: np.ndarray, yaw: np.ndarray, length: float,
                    width: float) -> np.ndarray:
    """``[T, M]``: point m lies inside the box at step t."""
    d = pts[None] - xy[:, None]
    c, s = np.cos(yaw)[:, None], np.sin(yaw)[:, None]
    lon = d[..., 0] * c + d[..., 1] * s
    lat = -d[..., 0] * s + d[..., 1] * c
    return (np.abs(lon) < length / 2) & (np.abs(lat) < width / 2)


def densify(line: np.ndarray, step: float = 0.1) -> np.ndarray:
    out = [line[:1]]
    for a, b in zip(line[:-1], line[1:], strict=True):
        n = max(int(np.ceil(np.linalg.norm(b - a) / step)), 1)
        out.append(a + (b - a) * (np.arange(1, n + 1) / n)[:, None])
    return np.concatenate(out)


# ---- config ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field", [
    ({"num_agents": -1}, "num_agents"),
    ({"num_steps": 29}, "num_steps"),
    ({"layouts": ()}, "layouts"),
    ({"layouts": ("straight", "roundabout")}, "layouts"),
    ({"layout_weights": (1.0,)}, "layout_weights"),
    ({"layouts": ("straight", "merge"), "layout_weights": (1.0, -1.0)}, "layout_weights"),
    ({"layouts": ("straight", "merge"), "layout_weights": (0.0, 0.0)}, "layout_weights"),
    ({"lanes_per_direction": (3, 2)}, "lanes_per_direction"),
    ({"junction_lanes": (0, 2)}, "junction_lanes"),
    ({"lane_width": (3.8, 3.2)}, "lane_width"),
    ({"curve_radius": (10.0, 300.0)}, "curve_radius"),
    ({"pedestrian_fraction": 1.5}, "pedestrian_fraction"),
    ({"agent_fill": (0.5, 1.5)}, "agent_fill"),
    ({"max_attempts": 0}, "max_attempts"),
])
def test_config_rejects_bad_values(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"GeneratorConfig.{field}"):
        GeneratorConfig(**kwargs)


def test_config_to_dict_is_json_ready() -> None:
    import json

    d = GeneratorConfig().to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["layouts"] == list(LAYOUTS)


def test_bad_seed_and_count() -> None:
    with pytest.raises(ValueError, match="seed"):
        generate_scene(-1)
    with pytest.raises(ValueError, match="seed"):
        generate_scene(1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n must be"):
        list(generate_scenes(-1))
    assert list(generate_scenes(0)) == []


# ---- determinism, ids, validity -------------------------------------------------------------------
def assert_same(a: Scene, b: Scene) -> None:
    for name, _ in Scene._ARRAYS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert np.array_equal(x, y, equal_nan=True), name
    for key in Scene._META:
        assert getattr(a, key) == getattr(b, key), key


def test_deterministic_per_seed() -> None:
    cfg = GeneratorConfig(num_agents=20)
    for seed in (3, 11):
        assert_same(generate_scene(seed, cfg), generate_scene(seed, cfg))
    a, b = generate_scene(3, cfg), generate_scene(4, cfg)
    assert a.scene_id != b.scene_id
    assert a.agent_state.shape != b.agent_state.shape or not np.array_equal(a.agent_state, b.agent_state)


def test_generate_scenes_uses_consecutive_seeds() -> None:
    cfg = GeneratorConfig(num_agents=8)
    scenes = list(generate_scenes(3, seed=40, cfg=cfg))
    assert [s.extra["seed"] for s in scenes] == [40, 41, 42]
    assert_same(scenes[1], generate_scene(41, cfg))


def test_layout_weights_pick_layouts() -> None:
    cfg = GeneratorConfig(num_agents=4, layouts=("straight", "merge"), layout_weights=(0.0, 1.0))
    assert {s.extra["layout"] for s in generate_scenes(4, 0, cfg)} == {"merge"}


def test_every_layout_valid(by_layout: dict[str, list[Scene]]) -> None:
    for lay, scenes in by_layout.items():
        for seed, s in zip(SEEDS, scenes, strict=True):
            s.validate()
            assert s.scene_id == f"gen-{lay}-{seed:06d}"
            assert s.extra["layout"] == lay and s.extra["seed"] == seed
            assert s.dataset == "generated" and s.license == "CC0-1.0"
            assert s.num_steps == 91
            assert 1 <= s.num_agents <= 33
            assert s.agent_valid[s.ego_index].all(), "the ego is valid for the whole log"
            assert s.agent_type[s.ego_index] == AgentType.VEHICLE
            assert s.ego_rear_axle_to_center == pytest.approx(0.3 * s.agent_size[s.ego_index, 0])
            assert s.agent_ids[s.ego_index] == "ego" and len(set(s.agent_ids)) == s.num_agents
            assert s.agent_state.dtype == np.float32
            # invalid steps hold zeros
            assert (s.agent_state[~s.agent_valid] == 0).all()
            assert "config" in s.extra and "layout_params" in s.extra and "rejections" in s.extra


def test_num_steps_and_agents_follow_config() -> None:
    s = generate_scene(5, GeneratorConfig(num_steps=201, num_agents=6, layouts=("intersection",)))
    assert s.num_steps == 201 and s.agent_valid[s.ego_index].all()
    assert s.num_agents <= 7
    s0 = generate_scene(5, GeneratorConfig(num_agents=0, layouts=("straight",)))
    assert s0.num_agents == 1 and s0.ego_index == 0


def test_agent_kinds_and_sizes(by_layout: dict[str, list[Scene]]) -> None:
    scenes = all_scenes(by_layout)
    sizes = np.concatenate([s.agent_size for s in scenes])
    types = np.concatenate([s.agent_type for s in scenes])
    veh = sizes[types == AgentType.VEHICLE]
    assert (veh[:, 0] > veh[:, 1]).all() and veh[:, 0].min() >= 3.8 and veh[:, 0].max() <= 12.0
    assert 4.2 < np.median(veh[:, 0]) < 5.2 and 1.7 < np.median(veh[:, 1]) < 2.1
    ped = sizes[types == AgentType.PEDESTRIAN]
    assert len(ped) > 0 and ped.max() < 1.0


# ---- safety of the logs ---------------------------------------------------------------------------
def test_find_collisions_known_answers() -> None:
    # two 4 x 2 boxes along x: centres 3.9 m apart overlap, 4.1 m apart do not; a box rotated 45°
    # whose bounding square overlaps the other box's but whose body does not
    st = np.zeros((3, 2, 5), dtype=np.float32)
    st[0, :, :2] = 0.0
    st[1, 0, :2] = (3.9, 0.0)
    st[1, 1, :2] = (4.1, 0.0)
    diag = 1.0 + np.sqrt(2) * 0.5 + 0.05          # just clear of the corner along the diagonal
    st[2, :, :2] = (2.0 + diag / np.sqrt(2), 1.0 + diag / np.sqrt(2))
    st[2, :, 2] = np.pi / 4
    size = np.array([[4.0, 2.0], [4.0, 2.0], [1.0, 1.0]], dtype=np.float32)
    valid = np.ones((3, 2), dtype=bool)
    hits = find_collisions(st, valid, size)
    assert hits.tolist() == [[0, 0, 1]]
    valid[1, 0] = False
    assert len(find_collisions(st, valid, size)) == 0
    st[2, 1, :2] = (1.0, 1.5)          # now the rotated box's lowest corner (1.0, 0.79) is inside box 0
    valid[1, 0] = True
    assert {tuple(h) for h in find_collisions(st, valid, size).tolist()} == {(0, 0, 1), (1, 0, 2)}


def test_no_collisions_in_logs(by_layout: dict[str, list[Scene]]) -> None:
    for s in all_scenes(by_layout):
        assert len(find_collisions(s.agent_state, s.agent_valid, s.agent_size)) == 0, s.scene_id
        # independent check: no agent's box contains a densely sampled point of another's outline
        t_idx = np.arange(0, s.num_steps, 3)
        for i in range(s.num_agents):
            vi = s.agent_valid[i, t_idx]
            for j in range(i + 1, s.num_agents):
                both = vi & s.agent_valid[j, t_idx]
                if not both.any():
                    continue
                ts = t_idx[both]
                d = np.linalg.norm(s.agent_state[i, ts, :2] - s.agent_state[j, ts, :2], axis=-1)
                near = d < (np.hypot(*s.agent_size[i]) + np.hypot(*s.agent_size[j])) / 2
                for t in ts[near]:
                    c = corners(s.agent_state[j, t, :2][None], s.agent_state[j, t, 2:3], *s.agent_size[j])[0]
                    outline = densify(np.concatenate([c, c[:1]]), 0.1)
                    inside = points_in_boxes(outline, s.agent_state[i, t, :2][None], s.agent_state[i, t, 2:3],
                                             *s.agent_size[i])
                    assert not inside.any(), f"{s.scene_id}: agents {i}, {j} overlap at step {t}"


def test_ego_stays_on_the_road(by_layout: dict[str, list[Scene]]) -> None:
    for s in all_scenes(by_layout):
        e = s.ego_index
        st = s.agent_state[e].astype(np.float64)
        c = corners(st[:, :2], st[:, 2], *s.agent_size[e].astype(np.float64))
        excess = lane_excess(s, c.reshape(-1, 2))
        assert excess.max() <= 0.3, f"{s.scene_id}: an ego corner is {excess.max():.2f} m outside the lanes"
        # and never touches a road edge
        for _, edge in s.polylines(MapType.ROAD_EDGE):
            pts = densify(edge.astype(np.float64), 0.2)
            near = np.linalg.norm(pts[None] - st[::2, None, :2], axis=-1).min(0) < 6.0
            if near.any():
                hit = points_in_boxes(pts[near], st[:, :2], st[:, 2], *s.agent_size[e])
                assert not hit.any(), f"{s.scene_id}: the ego crosses a road edge"


def test_pedestrians_stay_off_the_lanes(by_layout: dict[str, list[Scene]]) -> None:
    seen = 0
    for s in all_scenes(by_layout):
        for i in np.nonzero(s.agent_type == AgentType.PEDESTRIAN)[0]:
            pts = s.agent_state[i, s.agent_valid[i], :2].astype(np.float64)
            assert lane_excess(s, pts[::10]).min() > 0.5, s.scene_id
            seen += 1
    assert seen > 0


# ---- map content ----------------------------------------------------------------------------------
def test_lanes_have_widths_limits_links_and_polygons(by_layout: dict[str, list[Scene]]) -> None:
    for s in all_scenes(by_layout):
        lanes = [i for i, _ in s.polylines(MapType.LANE)]
        assert lanes == list(range(len(lanes))), "lanes come first"
        n_lanes = len(lanes)
        w = s.map_width[: s.map_offsets[n_lanes]]
        assert np.isfinite(w).all() and (w >= 3.0).all() and (w <= 4.0).all()
        assert np.isnan(s.map_width[s.map_offsets[n_lanes]:]).all()
        assert np.isfinite(s.lane_speed_limit[:n_lanes]).all() and (s.lane_speed_limit[:n_lanes] > 5).all()
        links = s.lane_links
        succ = links[links[:, 2] == LinkKind.SUCCESSOR]
        assert len(succ) > 0
        for a, b, _ in succ:   # successors continue their lane
            assert np.linalg.norm(s.polyline(a)[-1] - s.polyline(b)[0]) < 0.01, s.scene_id
        rows = {tuple(x) for x in links.tolist()}
        for a, b, kind in links[links[:, 2] != LinkKind.SUCCESSOR].tolist():   # neighbours come in pairs
            assert (b, a, LinkKind.LEFT_NEIGHBOR + LinkKind.RIGHT_NEIGHBOR - kind) in rows
        lane_polys = s.polygon_lane[s.polygon_type == PolygonType.LANE]
        assert sorted(lane_polys.tolist()) == lanes
        assert (s.polygon_lane[s.polygon_type != PolygonType.LANE] == -1).all()
        assert any(True for _ in s.polylines(MapType.ROAD_EDGE))
        assert any(True for _ in s.polylines(MapType.LANE_BOUNDARY))
        # vertex spacing ~1-2 m
        for i in lanes:
            seg = np.linalg.norm(np.diff(s.polyline(i), axis=0), axis=1)
            assert seg.max() <= 2.3, s.scene_id


def test_multi_lane_roads_have_neighbours() -> None:
    s = generate_scene(0, GeneratorConfig(layouts=("straight",), lanes_per_direction=(3, 3), num_agents=4))
    kinds = s.lane_links[:, 2]
    assert (kinds == LinkKind.LEFT_NEIGHBOR).sum() == (kinds == LinkKind.RIGHT_NEIGHBOR).sum() > 0


def turn_angles(s: Scene, lane: int) -> list[float]:
    """Heading change (degrees, + = left) from ``lane`` through each of its successors."""
    out = []
    succ = s.lane_links[(s.lane_links[:, 0] == lane) & (s.lane_links[:, 2] == LinkKind.SUCCESSOR), 1]
    for c in succ:
        p = s.polyline(int(c))
        h0 = np.arctan2(*(p[1] - p[0])[::-1])
        h1 = np.arctan2(*(p[-1] - p[-2])[::-1])
        out.append(float(np.degrees(np.angle(np.exp(1j * (h1 - h0))))))
    return out


def test_intersection_has_all_turns_crosswalks_and_signals() -> None:
    cfg = GeneratorConfig(layouts=("intersection",), junction_lanes=(1, 1), traffic_light_prob=1.0,
                          crosswalk_prob=1.0, num_agents=8)
    s = generate_scene(2, cfg)
    starts = {i for i in range(s.num_polylines) if s.map_type[i] == MapType.LANE}
    angles = sorted(a for i in starts for a in turn_angles(s, i) if len(turn_angles(s, i)) == 3)
    assert len(angles) == 12          # 4 approaches x (left, straight, right)
    assert np.allclose(angles[:4], -90, atol=3) and np.allclose(angles[4:8], 0, atol=1)
    assert np.allclose(angles[8:], 90, atol=3)
    assert (s.polygon_type == PolygonType.CROSSWALK).sum() == 4
    assert len(s.tl_lane) == 12 and s.tl_state.shape == (12, s.num_steps)
    assert set(np.unique(s.tl_state)) <= {LightState.STOP, LightState.CAUTION, LightState.GO}
    assert s.extra["layout_params"]["signalised"] is True


def test_t_junction_and_merge_topology() -> None:
    t = generate_scene(1, GeneratorConfig(layouts=("t_junction",), junction_lanes=(1, 1), num_agents=4))
    n_turns = sorted(len(turn_angles(t, i)) for i in range(t.num_polylines) if t.map_type[i] == MapType.LANE)
    assert n_turns.count(2) == 3           # each of the 3 approaches has 2 movements
    m = generate_scene(1, GeneratorConfig(layouts=("merge",), num_agents=4))
    succ = m.lane_links[m.lane_links[:, 2] == LinkKind.SUCCESSOR]
    targets, counts = np.unique(succ[:, 1], return_counts=True)
    assert (counts == 2).sum() == 1        # exactly one lane is entered from two lanes: the merge


def test_curve_radius_in_range() -> None:
    for seed in range(4):
        s = generate_scene(seed, GeneratorConfig(layouts=("curve",), num_agents=2))
        r = s.extra["layout_params"]["radius_m"]
        assert 30.0 <= r <= 300.0
        # the sharpest lane curvature: the reference radius offset by at most the road half width
        kmax = 0.0
        for _, p in s.polylines(MapType.LANE):
            h = np.unwrap(np.arctan2(*np.diff(p, axis=0).T[::-1]))
            ds = np.linalg.norm(np.diff(p, axis=0), axis=1)
            if len(h) > 2:
                kmax = max(kmax, float(np.abs(np.diff(h) / ds[1:]).max()))
        assert 1 / (r + 20) < kmax < 1 / 11, (seed, r, kmax)


# ---- the ego's log --------------------------------------------------------------------------------
def test_ego_log_is_smooth_and_moves_forward(by_layout: dict[str, list[Scene]]) -> None:
    for s in all_scenes(by_layout):
        st = s.agent_state[s.ego_index].astype(np.float64)
        xy, yaw, vel = st[:, :2], np.unwrap(st[:, 2]), st[:, 3:5]
        step = np.diff(xy, axis=0)
        fwd = (step * np.stack([np.cos(yaw[:-1]), np.sin(yaw[:-1])], -1)).sum(-1)
        assert (fwd > -1e-3).all(), f"{s.scene_id}: the ego moves backwards"
        assert np.linalg.norm(step, axis=1).sum() >= 10.0
        speed = np.linalg.norm(vel, axis=1)
        assert speed.max() < 35.0
        acc = np.diff(speed) / DT
        assert acc.min() > -8.5 and acc.max() < 2.0
        assert np.abs(np.diff(yaw)).max() < 0.12             # rad per 0.1 s
        # positions and velocities agree (central differences of box centres)
        fd = (xy[2:] - xy[:-2]) / (2 * DT)
        assert np.abs(fd - vel[1:-1]).max() < 0.3, s.scene_id
        # kinematic: the rear axle (rear_axle_to_center behind the centre) moves along the heading
        rear = xy - s.ego_rear_axle_to_center * np.stack([np.cos(yaw), np.sin(yaw)], -1)
        fr = (rear[2:] - rear[:-2]) / (2 * DT)
        moving = np.linalg.norm(fr, axis=1) > 1.0
        err = np.abs(np.angle(np.exp(1j * (np.arctan2(fr[:, 1], fr[:, 0]) - st[1:-1, 2]))))[moving]
        assert not len(err) or err.max() < 0.02, (s.scene_id, err.max())


def test_ego_comfort_over_many_seeds() -> None:
    """The expert drives comfortably: few scenes exceed nuPlan's comfort limits."""
    bad = 0
    for s in generate_scenes(25, seed=500, cfg=GeneratorConfig(num_agents=16)):
        st = s.agent_state[s.ego_index].astype(np.float64)
        v = np.linalg.norm(st[:, 3:5], axis=1)
        a = np.gradient(v, DT)
        yaw_rate = np.gradient(np.unwrap(st[:, 2]), DT)
        bad += bool(a.min() < -4.05 or a.max() > 2.4 or np.abs(yaw_rate).max() > 0.95
                    or np.abs(v * yaw_rate).max() > 4.89)
    assert bad <= 2


def test_vehicles_obey_traffic_lights() -> None:
    """No vehicle's front bumper crosses a signalised stop line while its light is STOP."""
    cfg = GeneratorConfig(layouts=("intersection",), traffic_light_prob=1.0, num_agents=32,
                          agent_fill=(1.0, 1.0))
    crossings = 0
    for seed in range(6):
        s = generate_scene(seed, cfg)
        for k, lane in enumerate(s.tl_lane):
            p = s.polyline(int(lane)).astype(np.float64)
            d = (p[1] - p[0]) / np.linalg.norm(p[1] - p[0])
            half = s.map_width[s.map_offsets[lane]] / 2
            for i in np.nonzero(s.agent_type != AgentType.PEDESTRIAN)[0]:
                st = s.agent_state[i].astype(np.float64)
                heading = np.stack([np.cos(st[:, 2]), np.sin(st[:, 2])], -1)
                front = st[:, :2] + s.agent_size[i, 0] / 2 * heading
                along = (front - p[0]) @ d
                lat = np.abs((front - p[0]) @ np.array([-d[1], d[0]]))
                aligned = np.cos(st[:, 2] - np.arctan2(d[1], d[0])) > 0.9
                ok = s.agent_valid[i] & aligned & (lat < half)
                cross = np.nonzero(ok[:-1] & ok[1:] & (along[:-1] < 0) & (along[1:] >= 0))[0] + 1
                for t in cross:
                    crossings += 1
                    assert s.tl_state[k, t] != LightState.STOP, f"{s.scene_id}: agent {i} runs a red at {t}"
    assert crossings > 5


# ---- rejection bookkeeping ------------------------------------------------------------------------
def test_rejected_attempts_are_redrawn_and_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    real = gen.find_collisions
    calls = {"n": 0}

    def first_fails(state, valid, size):
        calls["n"] += 1
        if calls["n"] == 1:
            return np.array([[0, 0, 1]])
        return real(state, valid, size)

    monkeypatch.setattr(gen, "find_collisions", first_fails)
    s = generate_scene(7, GeneratorConfig(num_agents=8))
    assert s.extra["rejections"] == {"collision": 1}
    assert s.extra["attempt"] == 1
    monkeypatch.setattr(gen, "find_collisions", lambda *a: np.array([[0, 0, 1]]))
    with pytest.raises(GenerationError, match="all 2 attempts rejected.*collision"):
        generate_scene(7, GeneratorConfig(num_agents=8, max_attempts=2))


# ---- scene sets -----------------------------------------------------------------------------------
def test_scene_set_round_trip_is_bit_identical(tmp_path) -> None:
    cfg = GeneratorConfig(num_agents=12)
    ss = generate_scene_set(5, tmp_path / "set", seed=20, cfg=cfg)
    assert isinstance(ss, SceneSet) and len(ss) == 5
    reopened = SceneSet.open(tmp_path / "set")
    for sid, fresh in zip(reopened.ids, generate_scenes(5, 20, cfg), strict=True):
        assert sid == fresh.scene_id
        assert_same(reopened.load(sid), fresh)
        assert reopened.entry(sid)["dataset"] == "generated"


def test_small_scene_set(tmp_path) -> None:
    ss = small_scene_set(tmp_path)
    assert len(ss) == 4 and all(sid.startswith("gen-") for sid in ss.ids)
    assert len(ss.load_many()) == 4


def test_throughput_is_reported(record_property) -> None:
    """Scenes per second on this machine (reported, never asserted: tests do not time things)."""
    cfg = GeneratorConfig()
    list(generate_scenes(2, 900, cfg))                  # warm up imports and caches
    t0, c0 = time.perf_counter(), time.process_time()
    scenes = list(generate_scenes(20, 1000, cfg))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rejected = sum(sum(s.extra["rejections"].values()) for s in scenes)
    record_property("scenes_per_s_wall", round(20 / wall, 1))
    record_property("scenes_per_s_cpu", round(20 / cpu, 1))
    print(f"\ngenerator: {20 / wall:.1f} scenes/s wall, {20 / cpu:.1f} scenes/s CPU, {rejected} rejected")
    assert len(scenes) == 20
