"""Scene sets on the Hugging Face Hub, without the network: pulls read a folder laid out as a Hub
cache (offline mode), pushes go to a stand-in for ``huggingface_hub.HfApi``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from alpagym_ray.commands import scenes_hub
from envs.drivesim.importers.batch import import_scene_set
from envs.drivesim.scene import SceneError, SceneSet
from envs.drivesim.scene_hub import parse_hub_id, pull_scene_set, push_scene_set, resolve_scene_set
from tests.envs.drivesim.importers.importer_builders import womd_scene, write_json

ROOT = Path(__file__).resolve().parents[4]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
COMMIT_V1 = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture(scope="module")
def scene_set(tmp_path_factory) -> Path:
    """A local set of three WOMD scenes: womd-0, womd-1, other-2."""
    base = tmp_path_factory.mktemp("hubset")
    (base / "src").mkdir()
    for i, sid in enumerate(("womd-0", "womd-1", "other-2")):
        d = womd_scene()
        d["scenario_id"] = sid
        write_json(base / "src" / f"{i}.json", d)
    import_scene_set("womd-json", [base / "src"], base / "set", workers=1)
    return base / "set"


def hub_cache(
    cache: Path,
    scene_set: Path,
    repo: str = "user/scenes",
    refs=(("main", COMMIT),),
    drop: tuple[str, ...] = (),
) -> Path:
    """Lay ``scene_set`` out as huggingface_hub caches it: blobs, snapshots of symlinks, refs."""
    folder = cache / f"datasets--{repo.replace('/', '--')}"
    for ref, commit in refs:
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / ref).write_text(commit)
        for f in [scene_set / "index.json", *sorted((scene_set / "scenes").glob("*.npz"))]:
            rel = f.relative_to(scene_set).as_posix()
            if rel in drop:
                continue
            blob = folder / "blobs" / f"{commit[:8]}-{rel.replace('/', '_')}"
            blob.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, blob)
            link = folder / "snapshots" / commit / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(blob, link.parent), link)
    return cache


def test_parse_hub_id():
    assert parse_hub_id("user/name") == ("user/name", None)
    assert parse_hub_id("user/name@v1.0") == ("user/name", "v1.0")
    assert parse_hub_id("hf://datasets/org/set@refs/pr/1") == ("org/set", "refs/pr/1")
    for bad in ("name", "/abs/path", "./rel/path", "a/b/c", "user/name@"):
        with pytest.raises(ValueError, match="not a Hugging Face dataset id"):
            parse_hub_id(bad)


def test_pull_whole_set_and_revision_from_the_cache(tmp_path, scene_set):
    cache = hub_cache(tmp_path / "hub", scene_set, refs=(("main", COMMIT), ("v1", COMMIT_V1)))
    path = pull_scene_set("user/scenes", cache_dir=cache, offline=True)
    assert path.name == COMMIT and sorted(SceneSet.open(path).ids) == ["other-2", "womd-0", "womd-1"]
    np.testing.assert_array_equal(
        SceneSet.open(path).load("womd-1").agent_state, SceneSet.open(scene_set).load("womd-1").agent_state
    )
    assert pull_scene_set("user/scenes@v1", cache_dir=cache, offline=True).name == COMMIT_V1


def test_pull_a_subset_by_pattern(tmp_path, scene_set):
    cache = hub_cache(tmp_path / "hub", scene_set)
    sub = pull_scene_set("user/scenes", include=["womd-*"], cache_dir=cache, offline=True)
    assert sub.parent == cache / "alpagym-ray-subsets"
    sset = SceneSet.open(sub)
    assert sorted(sset.ids) == ["womd-0", "womd-1"] and sset.load("womd-0").num_steps == 91
    out = pull_scene_set(
        "user/scenes", include=["other-*"], out=tmp_path / "mine", cache_dir=cache, offline=True
    )
    assert out == tmp_path / "mine" and SceneSet.open(out).ids == ["other-2"]
    with pytest.raises(SceneError, match=r"no scene of user/scenes matches \['nothing\*'\]"):
        pull_scene_set("user/scenes", include=["nothing*"], cache_dir=cache, offline=True)


def test_pull_errors_name_the_problem(tmp_path, scene_set):
    cache = hub_cache(tmp_path / "hub", scene_set, drop=("scenes/womd-1.npz",))
    with pytest.raises(SceneError, match=r"1 scene file\(s\) listed in index.json are missing .*offline"):
        pull_scene_set("user/scenes", cache_dir=cache, offline=True)
    assert SceneSet.open(
        pull_scene_set("user/scenes", include=["womd-0"], cache_dir=cache, offline=True)
    ).ids == ["womd-0"]
    with pytest.raises(SceneError, match="cannot get scene set user/missing from the Hugging Face Hub"):
        pull_scene_set("user/missing", cache_dir=cache, offline=True)


def test_resolve_scene_set(tmp_path, scene_set):
    assert resolve_scene_set(str(scene_set)) == scene_set
    cache = hub_cache(tmp_path / "hub", scene_set)
    assert resolve_scene_set("user/scenes", cache_dir=cache, offline=True).name == COMMIT
    with pytest.raises(SceneError, match="no such directory, and not a Hugging Face dataset id"):
        resolve_scene_set(str(tmp_path / "no" / "such" / "dir"))
    with pytest.raises(SceneError, match="user/absent: no such local directory, and as a Hub dataset id"):
        resolve_scene_set("user/absent", cache_dir=cache, offline=True)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(SceneError, match="is a file"):
        resolve_scene_set(str(tmp_path / "file.txt"))


def test_cli_pull_and_list_honour_hf_hub_offline_and_hf_hub_cache(tmp_path, scene_set):
    cache = hub_cache(tmp_path / "hub", scene_set)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "alpagym_ray.cli", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)

    pulled = run("scenes", "pull", "user/scenes", "--include", "womd-1")
    assert pulled.returncode == 0, pulled.stderr
    assert "1 scene(s) at" in pulled.stdout and "alpagym-ray-subsets" in pulled.stdout
    listed = run("scenes", "list", "user/scenes")
    assert listed.returncode == 0, listed.stderr
    assert "womd-0" in listed.stdout and "3 scene(s)" in listed.stdout
    missing = run("scenes", "pull", "user/other")
    assert missing.returncode == 1 and "offline" in missing.stderr


class FakeHfApi:
    """Stands in for huggingface_hub.HfApi: records calls, 'uploads' by copying the folder."""

    calls: list = []
    remote: Path | None = None

    def __init__(self, endpoint=None, token=None, **_):
        FakeHfApi.calls.append(("init", endpoint, token))

    def create_repo(self, repo_id, *, repo_type=None, private=None, exist_ok=False, **_):
        FakeHfApi.calls.append(("create_repo", repo_id, repo_type, private, exist_ok))

    def upload_folder(
        self,
        *,
        repo_id,
        folder_path,
        repo_type=None,
        revision=None,
        commit_message=None,
        allow_patterns=None,
        **_,
    ):
        import fnmatch

        FakeHfApi.calls.append(("upload_folder", repo_id, repo_type, revision, commit_message))
        for f in Path(folder_path).rglob("*"):
            rel = f.relative_to(folder_path).as_posix()
            if f.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                (FakeHfApi.remote / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, FakeHfApi.remote / rel)  # follows the staging symlinks

        class Info:
            commit_url = f"https://huggingface.co/datasets/{repo_id}/commit/{COMMIT}"

        return Info()


@pytest.fixture
def fake_api(tmp_path, monkeypatch):
    import huggingface_hub

    FakeHfApi.calls, FakeHfApi.remote = [], tmp_path / "remote"
    FakeHfApi.remote.mkdir()
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    return FakeHfApi


def test_push_uploads_exactly_the_set_and_a_dataset_card(tmp_path, scene_set, fake_api):
    url = push_scene_set(scene_set, "user/pushed", private=True)
    assert url.endswith(COMMIT)
    assert ("create_repo", "user/pushed", "dataset", True, True) in fake_api.calls
    files = sorted(
        p.relative_to(fake_api.remote).as_posix() for p in fake_api.remote.rglob("*") if p.is_file()
    )
    assert files == [
        "README.md",
        "index.json",
        "scenes/other-2.npz",
        "scenes/womd-0.npz",
        "scenes/womd-1.npz",
    ]
    card = (fake_api.remote / "README.md").read_text()
    assert "alpagym-ray scenes pull user/pushed" in card and "`waymo`: Waymo Open Dataset License" in card
    assert not (scene_set / "README.md").exists()  # the user's folder is left as it was
    # what was pushed pulls back unchanged
    cache = hub_cache(tmp_path / "hub", fake_api.remote, repo="user/pushed")
    back = SceneSet.open(pull_scene_set("user/pushed", cache_dir=cache, offline=True))
    np.testing.assert_array_equal(
        back.load("womd-0").agent_state, SceneSet.open(scene_set).load("womd-0").agent_state
    )


def test_push_a_subset_and_refuse_an_inconsistent_set(tmp_path, scene_set, fake_api):
    push_scene_set(scene_set, "user/sub", include=["other-*"])
    assert SceneSet.open(fake_api.remote).ids == ["other-2"]
    broken = tmp_path / "broken"
    shutil.copytree(scene_set, broken)
    (broken / "scenes" / "womd-0.npz").unlink()
    with pytest.raises(SceneError, match="index.json lists 1 missing scene file"):
        push_scene_set(broken, "user/broken")
    with pytest.raises(SceneError, match="no scene to push"):
        push_scene_set(scene_set, "user/none", include=["zzz*"])


def test_cli_push(scene_set, fake_api, capsys):
    assert scenes_hub.push_main([str(scene_set), "user/cli", "--message", "hello"]) == 0
    assert "pushed: https://huggingface.co/datasets/user/cli/commit/" in capsys.readouterr().out
    assert ("upload_folder", "user/cli", "dataset", None, "hello") in fake_api.calls
    assert scenes_hub.push_main([str(scene_set), "not-a-repo-id"]) == 1
