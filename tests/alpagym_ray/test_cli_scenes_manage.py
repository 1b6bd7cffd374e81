"""``alpagym-ray scenes list | split | stats`` on a small hand-built scene set."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from alpagym_ray.cli import main as cli_main
from alpagym_ray.commands.scenes_manage import heldout_by_hash, scene_set_stats
from envs.drivesim.scene import AgentType, MapType, Scene, SceneSet


def make_scene(sid: str, steps: int, n_peds: int, lane_len: float) -> Scene:
    """An ego driving 1 m per step plus ``n_peds`` standing pedestrians; one lane of ``lane_len`` m
    and one road edge."""
    n = 1 + n_peds
    state = np.zeros((n, steps, 5), np.float32)
    state[0, :, 0] = np.arange(steps)
    state[1:, :, 1] = 5.0
    types = np.array([AgentType.VEHICLE] + [AgentType.PEDESTRIAN] * n_peds, np.int8)
    size = np.array([[4.5, 2.0]] + [[0.5, 0.5]] * n_peds, np.float32)
    pts = np.array([[0, 0], [lane_len, 0], [0, 3], [lane_len, 3]], np.float32)
    return Scene(
        sid,
        state,
        size,
        np.ones((n, steps), bool),
        types,
        0,
        map_points=pts,
        map_offsets=np.array([0, 2, 4], np.int32),
        map_type=np.array([MapType.LANE, MapType.ROAD_EDGE], np.int8),
        map_width=np.full(4, np.nan, np.float32),
        lane_speed_limit=np.full(2, np.nan, np.float32),
        dataset="generated",
        license="CC0",
    )


@pytest.fixture
def sset(tmp_path) -> SceneSet:
    scenes = [make_scene(f"s{i:02d}", 20 + 10 * i, i, 100.0 * (i + 1)) for i in range(6)]
    return SceneSet.create(tmp_path / "set", scenes)


def test_list(sset, capsys):
    assert cli_main(["scenes", "list", str(sset.root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["scene_id", "dataset", "steps", "sec", "agents", "lines", "ego_m"]
    assert out[3].split() == ["s02", "generated", "40", "4.0", "3", "2", "39.0"]
    assert out[-1].startswith("6 scene(s) in")
    assert cli_main(["scenes", "list", str(sset.root), "--json", "--include", "s0[12]"]) == 0
    assert [e["scene_id"] for e in json.loads(capsys.readouterr().out)] == ["s01", "s02"]
    assert cli_main(["scenes", "list", str(sset.root / "nope")]) == 1


def test_hash_split_is_stable_and_known(sset, tmp_path):
    expected = {
        sid
        for sid in sset.ids
        if int.from_bytes(hashlib.sha256(f"salt{sid}".encode()).digest()[:8], "big") / 2**64 < 0.5
    }
    assert {sid for sid in sset.ids if heldout_by_hash(sid, 0.5, "salt")} == expected
    assert (
        cli_main(
            [
                "scenes",
                "split",
                str(sset.root),
                "--out",
                str(tmp_path / "split"),
                "--heldout-fraction",
                "0.5",
                "--salt",
                "salt",
            ]
        )
        == 0
    )
    train, held = SceneSet.open(tmp_path / "split" / "train"), SceneSet.open(tmp_path / "split" / "heldout")
    assert set(held.ids) == expected and set(train.ids) == set(sset.ids) - expected
    assert held.load(sorted(expected)[0]).num_steps > 0  # linked scene files load
    record = json.loads((tmp_path / "split" / "split.json").read_text())
    assert (
        record["method"] == "hash"
        and record["fraction"] == 0.5
        and sorted(record["heldout"]) == sorted(expected)
    )
    # the side of a scene depends on its id only: adding scenes never moves existing ones
    bigger = SceneSet.create(sset.root, [make_scene("s99", 20, 0, 10.0)], append=True)
    assert (
        cli_main(
            [
                "scenes",
                "split",
                str(bigger.root),
                "--out",
                str(tmp_path / "split2"),
                "--heldout-fraction",
                "0.5",
                "--salt",
                "salt",
            ]
        )
        == 0
    )
    held2 = set(SceneSet.open(tmp_path / "split2" / "heldout").ids)
    assert held2 - {"s99"} == expected
    # about the requested fraction on many ids
    frac = np.mean([heldout_by_hash(f"scene-{i}", 0.2) for i in range(5000)])
    assert 0.18 < frac < 0.22


def test_split_by_list(sset, tmp_path, capsys):
    (tmp_path / "held.txt").write_text("# held out\ns01\ns04\n")
    assert (
        cli_main(
            [
                "scenes",
                "split",
                str(sset.root),
                "--out",
                str(tmp_path / "o"),
                "--heldout-list",
                str(tmp_path / "held.txt"),
            ]
        )
        == 0
    )
    assert SceneSet.open(tmp_path / "o" / "heldout").ids == ["s01", "s04"]
    assert SceneSet.open(tmp_path / "o" / "train").ids == ["s00", "s02", "s03", "s05"]
    (tmp_path / "bad.json").write_text('["s01", "s1O"]')
    assert (
        cli_main(
            [
                "scenes",
                "split",
                str(sset.root),
                "--out",
                str(tmp_path / "o2"),
                "--heldout-list",
                str(tmp_path / "bad.json"),
            ]
        )
        == 1
    )
    assert "1 id(s) not in" in capsys.readouterr().err
    assert (
        cli_main(
            ["scenes", "split", str(sset.root), "--out", str(tmp_path / "o3"), "--heldout-fraction", "1.5"]
        )
        == 2
    )


def test_stats(sset, capsys):
    stats = scene_set_stats(sset)
    assert stats["scenes"] == 6 and stats["datasets"] == {"generated": 6}
    assert stats["duration_s"] == {"min": 2.0, "median": 4.5, "max": 7.0, "total": 27.0}
    assert stats["agents_per_scene"] == {"min": 1.0, "median": 3.5, "max": 6.0, "total": 21.0}
    assert stats["agents_by_type"] == {"vehicle": 6, "pedestrian": 15}
    assert stats["polylines_by_type"] == {"lane": 6, "road_edge": 6}
    assert stats["lane_km"] == pytest.approx(2.1)
    assert stats["ego_path_m"]["max"] == pytest.approx(69.0)
    fast = scene_set_stats(sset, fast=True)
    assert "agents_by_type" not in fast and fast["map_points_per_scene"]["total"] == 24
    assert cli_main(["scenes", "stats", str(sset.root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["traffic_lights"] == 0
    assert cli_main(["scenes", "stats", str(sset.root)]) == 0
    assert "lane_km" in capsys.readouterr().out
