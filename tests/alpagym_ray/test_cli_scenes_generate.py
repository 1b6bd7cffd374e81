"""``alpagym-ray scenes generate`` and ``scenes show`` through the CLI entry point."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from alpagym_ray.cli import main
from envs.drivesim.scene import SceneSet


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("cli") / "set"
    assert main(["scenes", "generate", "4", str(out), "--seed", "3", "--agents", "8", "--steps", "40"]) == 0
    return str(out)


def test_generate_writes_a_scene_set(scene_dir: str, capsys: pytest.CaptureFixture) -> None:
    ss = SceneSet.open(scene_dir)
    assert len(ss) == 4
    assert [e["scene_id"].rsplit("-", 1)[1] for e in ss.entries] == ["000003", "000004", "000005", "000006"]
    scenes = ss.load_many()
    assert all(s.num_steps == 40 and s.num_agents <= 9 for s in scenes)
    index = json.loads((ss.root / "index.json").read_text())
    assert index["format"] == "alpagym-ray/scene-set" and index["version"] == 1


def test_generate_reports_rate_and_rejections(tmp_path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "s"
    assert main(["scenes", "generate", "2", str(out), "--layouts", "merge,straight", "--agents", "4"]) == 0
    printed = capsys.readouterr().out
    assert "scenes/s" in printed and "rejected and re-drawn:" in printed
    layouts = {s.extra["layout"] for s in SceneSet.open(out).load_many()}
    assert layouts <= {"merge", "straight"}
    # an existing set is not overwritten unless appended to
    assert main(["scenes", "generate", "1", str(out)]) == 2
    assert "--append" in capsys.readouterr().err
    assert main(["scenes", "generate", "1", str(out), "--seed", "10", "--append", "--agents", "4"]) == 0
    assert len(SceneSet.open(out)) == 3


@pytest.mark.parametrize("args, message", [
    (["--layouts", "straight,roundabout"], "unknown ['roundabout']"),
    (["--steps", "10"], "num_steps"),
    (["--agents", "-2"], "num_agents"),
    (["--seed", "-1"], "--seed"),
])
def test_generate_bad_arguments(tmp_path, capsys: pytest.CaptureFixture, args: list[str],
                                message: str) -> None:
    assert main(["scenes", "generate", "1", str(tmp_path / "x"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "x" / "index.json").exists()


def test_show_writes_png(scene_dir: str, tmp_path, monkeypatch: pytest.MonkeyPatch,
                         capsys: pytest.CaptureFixture) -> None:
    sid = SceneSet.open(scene_dir).ids[1]
    monkeypatch.chdir(tmp_path)
    assert main(["scenes", "show", sid, "--scenes", scene_dir]) == 0
    default = tmp_path / f"{sid}.png"
    assert default.is_file() and f"wrote {sid}.png" in capsys.readouterr().out
    assert np.asarray(Image.open(default)).shape[:2] == (1024, 1024)
    out = tmp_path / "pics" / "x.png"
    assert main(["scenes", "show", sid, "--scenes", scene_dir, "--out", str(out), "--step", "39",
                 "--size", "300"]) == 0
    assert Image.open(out).size == (300, 300)


def test_show_unknown_scene_is_a_clean_error(scene_dir: str, capsys: pytest.CaptureFixture, tmp_path) -> None:
    sid = SceneSet.open(scene_dir).ids[0]
    typo = sid[:-1] + ("9" if sid[-1] != "9" else "8")
    assert main(["scenes", "show", typo, "--scenes", scene_dir]) == 2
    err = capsys.readouterr().err
    assert "did you mean" in err and sid in err and "Traceback" not in err
    assert main(["scenes", "show", sid, "--scenes", str(tmp_path / "nowhere")]) == 2
    assert "not a scene set" in capsys.readouterr().err
    assert main(["scenes", "show", sid, "--scenes", scene_dir, "--step", "400", "--out",
                 str(tmp_path / "y.png")]) == 2
    assert "out of range" in capsys.readouterr().err
