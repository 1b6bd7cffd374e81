"""Acceptance on the six real nuScenes-mini scenes (ScenarioNet pickles in ../shared, never copied here).

All six import (each "fixed": nuScenes swaps the ego's length and width); the logged ego, replayed
through drivesim's controller, is off-road on at most 1 % of the in-control ticks and collides with
nothing. What the import does to get there, per scene:

- every scene: ego 1.73 x 4.08 m swapped to 4.08 x 1.73 m; ego positions are rear-axle poses (nuScenes'
  ego frame), moved 1.385 m forward to the box centre; no lane graph in the source, successors
  inferred from lane end points; the city-wide map cropped to 80 m around the agents;
- scene-0655: one other vehicle annotated wider than long (swapped back, reported);
- scene-0553: the ego stands still for the whole 20 s (0.007 m of motion), so it is trivially on-road.

Measured (this import, drivesim at the time of writing): 0 off-road ticks and 0 collision ticks in all
six scenes; the numpy check of the logged boxes agrees (0 off-road steps, no overlaps). Without the
centre-line buffer (lane polygons only) 32-92 % of the steps would be off-road, as the spec warns.
"""

from __future__ import annotations

import numpy as np
import pytest

from envs.drivesim.importers.batch import import_scene_set
from envs.drivesim.importers.qa import check_scene
from envs.drivesim.importers.report import FIXED
from envs.drivesim.scene import SceneSet

SCENES = ("scene-0061", "scene-0103", "scene-0553", "scene-0655", "scene-0757", "scene-0796")
EXTRA_FIXES = {"scene-0655": ["1 other vehicle(s) with width > length swapped"]}
"""Fixes beyond the ego size swap, by scene."""
ALLOWED = {sid: {"offroad_ticks": 0, "collision_ticks": 0} for sid in SCENES}
"""What remains after the import, per scene (nothing: see the module docstring)."""


@pytest.fixture(scope="module")
def imported(nuscenes_mini_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("nuscenes_mini_set")
    reports = import_scene_set("scenarionet", [nuscenes_mini_dir], out, workers=1)
    return reports, SceneSet.open(out)


def test_all_six_scenes_import_with_the_expected_fixes(imported):
    reports, sset = imported
    assert sorted(r.scene_id for r in reports) == list(SCENES)
    for r in reports:
        assert r.status == FIXED, r.line()
        assert (
            r.notes[0]
            == "ego length/width swapped (1.73 x 4.08 -> 4.08 x 1.73): a vehicle is longer than wide"
        )
        extra = [n for n in r.notes[1:]]
        assert [n.split(":")[0] for n in extra] == EXTRA_FIXES.get(r.scene_id, []), r.line()
        assert any("rear-axle poses: moved 1.385 m forward" in n for n in r.info)
    for sid in SCENES:
        s = sset.load(sid)
        assert s.dataset == "nuscenes" and s.num_steps >= 191 and s.agent_valid[s.ego_index].all()
        assert s.ego_rear_axle_to_center == pytest.approx(1.385)
        np.testing.assert_allclose(s.agent_size[s.ego_index], [4.08, 1.73], rtol=1e-6)
        assert len(s.map_points) < 10_000  # cropped from whole-city maps (up to 18 659 points)


def test_logged_ego_boxes_are_on_the_road_and_touch_nobody(imported):
    _, sset = imported
    for sid in SCENES:
        qa = check_scene(sset.load(sid))
        assert qa.offroad_fraction <= 0.01, (sid, qa)
        assert qa.overlap_steps == ALLOWED[sid]["collision_ticks"], (sid, qa)


# ~8-25 s on 2 cores; in the default suite when the data is present (it skips otherwise)
def test_replaying_the_logged_ego_through_drivesim(imported):
    batched = pytest.importorskip("envs.drivesim.batched", reason="drivesim's batched env is not available")
    from envs.drivesim.config import DriveSimConfig

    _, sset = imported
    scenes = sset.load_many(SCENES)
    cfg = DriveSimConfig(obs_keys=("ego_history", "gt_trajectory"))
    sim = batched.DriveSimBatch(scenes, num_envs=len(scenes), config=cfg, device="cpu")
    obs = sim.reset(
        seeds=[0] * len(scenes), options=[{"scene_id": s.scene_id, "start_step": 0} for s in scenes]
    )
    offroad = {sid: [] for sid in SCENES}
    collision = {sid: [] for sid in SCENES}
    dist = {sid: [] for sid in SCENES}
    done = np.zeros(len(scenes), dtype=bool)
    while not done.all():
        obs, _, terminated, truncated, info = sim.step(obs["gt_trajectory"][:, : cfg.horizon])
        m = info["metrics"]
        for i, s in enumerate(scenes):
            if not done[i]:
                offroad[s.scene_id] += m["offroad"][i].tolist()
                collision[s.scene_id] += m["collision_any"][i].tolist()
                dist[s.scene_id] += m["dist_to_gt_location"][i].tolist()
        done |= (terminated | truncated).cpu().numpy()
    for sid in SCENES:
        ticks = np.asarray(offroad[sid], dtype=float)
        ticks = ticks[np.isfinite(ticks)]
        assert len(ticks) >= 150, sid
        n_off = int(ticks.sum())
        assert n_off <= max(ALLOWED[sid]["offroad_ticks"], int(0.01 * len(ticks))), (sid, n_off, len(ticks))
        assert int(np.nansum(collision[sid])) == ALLOWED[sid]["collision_ticks"], sid
        assert np.nanmean(dist[sid]) < 0.25, (sid, np.nanmean(dist[sid]))  # the controller tracks the log
