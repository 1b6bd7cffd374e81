"""Importing many files into a scene set: reports, parallel workers, resuming, collisions, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from alpagym_ray.commands import scenes_import
from envs.drivesim.importers.batch import STAGING, import_scene_set
from envs.drivesim.importers.common import ImportOptions
from envs.drivesim.importers.report import FIXED, IMPORTED, PRESENT, SKIPPED, FileReport, summarize
from envs.drivesim.scene import SceneSet
from tests.envs.drivesim.importers.importer_builders import sd_scene, womd_scene, write_json, write_pickle


def womd_sources(root, n_good=2, bad=True):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_good):
        d = womd_scene()
        d["scenario_id"] = f"womd-{i}"
        write_json(root / f"s{i}.json", d)
    if bad:
        (root / "broken.json").write_text('{"objects": [')
    return root


def by_name(reports):
    return {r.source.rsplit("/", 1)[-1]: r for r in reports}


def test_import_reports_every_file_and_writes_a_consistent_set(tmp_path):
    src = womd_sources(tmp_path / "src")
    out = tmp_path / "set"
    seen = []
    reports = import_scene_set("womd-json", [src], out, workers=1, on_report=seen.append)
    r = by_name(reports)
    assert r["s0.json"].status == IMPORTED and r["s1.json"].status == IMPORTED
    assert r["broken.json"].status == SKIPPED and "invalid or truncated JSON" in r["broken.json"].notes[0]
    assert len(seen) == 3
    sset = SceneSet.open(out)
    assert sorted(sset.ids) == ["womd-0", "womd-1"]
    assert sset.load("womd-0").num_steps == 91
    entry = sset.entry("womd-1")
    assert entry["source"] == str((src / "s1.json").resolve()) and entry["source_bytes"] > 0
    assert not (out / STAGING).exists()
    assert "3 file(s): 2 imported, 0 fixed, 1 skipped, 0 present" in summarize(reports)


def test_check_reports_offroad_and_overlaps(tmp_path):
    src = womd_sources(tmp_path / "src", n_good=1, bad=False)
    (rep,) = import_scene_set("womd-json", [src], tmp_path / "set", workers=1, check=True)
    assert "check: logged ego off-road on 0/91 steps, overlapping other agents on 0" in rep.info
    assert SceneSet.open(tmp_path / "set").entry("womd-0")["qa_offroad_fraction"] == 0.0


def test_rerun_skips_imported_sources_and_overwrite_reimports(tmp_path):
    src = womd_sources(tmp_path / "src")
    out = tmp_path / "set"
    import_scene_set("womd-json", [src], out, workers=1)
    again = by_name(import_scene_set("womd-json", [src], out, workers=1))
    assert again["s0.json"].status == PRESENT and again["s1.json"].status == PRESENT
    assert again["broken.json"].status == SKIPPED  # still reported, still bad
    # a changed source is imported again
    d = womd_scene()
    d["scenario_id"] = "womd-1"
    d["objects"][0]["length"] = 2.5
    write_json(src / "s1.json", d)
    changed = by_name(import_scene_set("womd-json", [src / "s1.json"], out, workers=1))
    assert changed["s1.json"].status == IMPORTED
    assert SceneSet.open(out).load("womd-1").agent_size[0, 0] == pytest.approx(2.5)
    forced = by_name(import_scene_set("womd-json", [src / "s0.json"], out, workers=1, overwrite=True))
    assert forced["s0.json"].status == IMPORTED and len(SceneSet.open(out)) == 2


def test_an_interrupted_import_leaves_a_consistent_set(tmp_path, monkeypatch):
    src = womd_sources(tmp_path / "src", n_good=3, bad=False)
    out = tmp_path / "set"
    from envs.drivesim.importers import batch

    real = batch.convert_one
    calls = []

    def flaky(*args):
        calls.append(args[1])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(batch, "convert_one", flaky)
    with pytest.raises(KeyboardInterrupt):
        import_scene_set("womd-json", [src], out, workers=1)
    sset = SceneSet.open(out)
    assert sorted(sset.ids) == ["womd-0", "womd-1"]
    assert all((out / e["file"]).is_file() for e in sset.entries)
    monkeypatch.setattr(batch, "convert_one", real)
    statuses = sorted(r.status for r in import_scene_set("womd-json", [src], out, workers=1))
    assert statuses == [IMPORTED, PRESENT, PRESENT] and len(SceneSet.open(out)) == 3


def test_same_scene_id_from_two_sources_is_not_overwritten(tmp_path):
    a = write_pickle(tmp_path / "a.pkl", sd_scene())
    b_dir = tmp_path / "other"
    b_dir.mkdir()
    b = write_pickle(b_dir / "a.pkl", sd_scene(ego_speed=3.0))
    out = tmp_path / "set"
    opts = ImportOptions(min_steps=10)
    import_scene_set("scenarionet", [a], out, opts, workers=1)
    (rep,) = import_scene_set("scenarionet", [b], out, opts, workers=1)
    assert rep.status == SKIPPED and "scene id 'sd-test-0001' is already in" in rep.notes[0]
    np.testing.assert_allclose(SceneSet.open(out).load("sd-test-0001").agent_state[1, 1, 3], 5.0)


def test_parallel_workers_give_the_same_set(tmp_path):
    src = womd_sources(tmp_path / "src", n_good=3)
    serial = import_scene_set("womd-json", [src], tmp_path / "serial", workers=1)
    parallel = import_scene_set("womd-json", [src], tmp_path / "parallel", workers=2)
    assert sorted((r.source, r.status) for r in serial) == sorted((r.source, r.status) for r in parallel)
    a, b = SceneSet.open(tmp_path / "serial"), SceneSet.open(tmp_path / "parallel")
    assert sorted(a.ids) == sorted(b.ids)
    for sid in a.ids:
        np.testing.assert_array_equal(a.load(sid).agent_state, b.load(sid).agent_state)


def test_missing_sources_and_empty_directories_are_reported(tmp_path):
    (tmp_path / "empty").mkdir()
    reports = import_scene_set("nurec", [tmp_path / "nope.usdz", tmp_path / "empty"], tmp_path / "set")
    assert [r.status for r in reports] == [SKIPPED, SKIPPED]
    assert "no such file or directory" in reports[0].notes[0] and "no .usdz files" in reports[1].notes[0]


def test_file_report_rules():
    with pytest.raises(ValueError, match="needs a reason"):
        FileReport("x", SKIPPED)
    with pytest.raises(ValueError, match="status must be one of"):
        FileReport("x", "done")
    assert FileReport("x", FIXED, "s", ("swapped",)).line() == "fixed    x -> s\n         - swapped"


def test_cli_import_exit_codes_and_report(tmp_path, capsys):
    src = womd_sources(tmp_path / "src", n_good=1)
    out = tmp_path / "set"
    rc = scenes_import.main(
        [
            "--format",
            "womd-json",
            str(src),
            "--out",
            str(out),
            "--workers",
            "1",
            "--no-progress",
            "--min-steps",
            "10",
        ]
    )
    assert rc == 0
    text = capsys.readouterr()
    assert "2 file(s): 1 imported, 0 fixed, 1 skipped, 0 present" in text.out
    assert "skipped" in text.err and "broken.json" in text.err
    report = json.loads((out / "import_report.json").read_text())
    assert report["summary"] == {"imported": 1, "skipped": 1}
    assert (
        scenes_import.main(
            ["--format", "womd-json", str(src / "broken.json"), "--out", str(tmp_path / "x"), "--no-progress"]
        )
        == 1
    )
    assert scenes_import.main(["--format", "womd-json", str(src), "--out", str(out), "--workers", "0"]) == 2
    with pytest.raises(SystemExit):
        scenes_import.main(["--format", "csv", str(src), "--out", str(out)])
