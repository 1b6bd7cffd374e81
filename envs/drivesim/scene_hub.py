"""Scene sets on the Hugging Face Hub (dataset repos) and ``scenes.path=DIR_OR_HUB_ID`` resolution.

A scene set on the Hub is a dataset repo holding the set's directory as is: ``index.json``,
``scenes/*.npz`` and a ``README.md`` dataset card (generated on push when the set has none, with
the licences of the source datasets). Downloads go to the Hub cache (``HF_HUB_CACHE``, default
``~/.cache/huggingface/hub``) through ``huggingface_hub.snapshot_download``, so a set is fetched
once and shared between runs; ``HF_HUB_OFFLINE=1`` (or ``offline=True``) uses the cache only.
``HF_TOKEN`` (or ``huggingface-cli login``) authenticates private and gated repos and pushes;
``HF_ENDPOINT`` points the client at another Hub server.

A subset (scene ids matching glob patterns) is materialised as its own small scene set under
``<cache>/alpagym-ray-subsets/`` (or ``out``): its ``index.json`` lists only the selected scenes and
its scene files link to the cached snapshot, so every later stage reads it like any other set.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from envs.drivesim.scene import FORMAT_NAME, FORMAT_VERSION, SceneError, SceneSet

HUB_ID = re.compile(r"^(?:hf://(?:datasets/)?)?(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")
"""``user/name[@revision]``, optionally prefixed ``hf://`` or ``hf://datasets/``."""
REPO_TYPE = "dataset"
SET_FILES = ("index.json", "README.md")


def parse_hub_id(text: str) -> tuple[str, str | None]:
    """``"user/name@rev"`` -> ``("user/name", "rev")``; raises ValueError when it is not a Hub id."""
    m = HUB_ID.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a Hugging Face dataset id (expected user/name[@revision])")
    return m.group("repo"), m.group("rev")


def _hub_error_types() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    return (HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError)


def _download(repo_id: str, revision: str | None, patterns: list[str], cache_dir: str | Path | None,
              token: str | None, offline: bool) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, repo_type=REPO_TYPE, revision=revision, cache_dir=cache_dir,
                                      allow_patterns=patterns, token=token, local_files_only=offline))
    except _hub_error_types() as e:
        mode = " (offline: only the local cache was searched)" if offline or _env_offline() else ""
        at = f"@{revision}" if revision else ""
        raise SceneError(f"cannot get scene set {repo_id}{at} from the Hugging Face Hub{mode}: "
                         f"{type(e).__name__}: {e}") from None


def _env_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _select(entries: list[dict], include: Sequence[str] | None) -> list[dict]:
    if not include:
        return entries
    return [e for e in entries if any(fnmatch.fnmatchcase(e["scene_id"], p) for p in include)]


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    real = src.resolve()  # Hub snapshots hold symlinks into blobs/
    try:
        os.link(real, tmp)
    except OSError:
        shutil.copy2(real, tmp)
    os.replace(tmp, dst)


def write_subset(snapshot: Path, entries: list[dict], out: Path) -> Path:
    """A scene set at ``out`` holding ``entries`` of the set at ``snapshot`` (hard links or copies)."""
    for e in entries:
        _link_or_copy(snapshot / e["file"], out / e["file"])
    SceneSet.write_index(out, entries)
    return out


def pull_scene_set(
    repo: str,
    revision: str | None = None,
    include: Sequence[str] | None = None,
    out: str | Path | None = None,
    cache_dir: str | Path | None = None,
    token: str | None = None,
    offline: bool = False,
) -> Path:
    """Download a scene set (or the scenes whose ids match ``include`` glob patterns) from a Hub
    dataset repo and return the directory of a readable scene set.

    Without ``include`` and ``out`` this is the cached snapshot itself; with ``include`` it is a
    subset set (under ``out``, or a stable folder in the cache); with ``out`` only, a copy of the
    whole set in ``out`` (hard links where possible).
    """
    if revision is None and "@" in repo:
        repo, revision = parse_hub_id(repo)
    snapshot = _download(repo, revision, ["index.json"], cache_dir, token, offline)
    index = SceneSet.open(snapshot)
    selected = _select(index.entries, include)
    if include and not selected:
        raise SceneError(f"no scene of {repo} matches {list(include)} ({len(index)} scenes, "
                         f"e.g. {index.ids[:3]})")
    files = sorted({e["file"] for e in selected})
    snapshot = _download(repo, revision, list(SET_FILES) + files, cache_dir, token, offline)
    missing = [f for f in files if not (snapshot / f).is_file()]
    if missing:
        why = " (offline: not in the local cache)" if offline or _env_offline() else ""
        raise SceneError(f"scene set {repo}: {len(missing)} scene file(s) listed in index.json are missing "
                         f"from the download{why}: {missing[:3]}")
    if not include and out is None:
        return snapshot
    if out is None:
        from huggingface_hub import constants

        key = hashlib.sha256(json.dumps(sorted(include or [])).encode()).hexdigest()[:12]
        base = Path(cache_dir or constants.HF_HUB_CACHE) / "alpagym-ray-subsets"
        out = base / f"{repo.replace('/', '--')}--{snapshot.name[:12]}--{key}"
    return write_subset(snapshot, selected, Path(out))


def resolve_scene_set(path_or_hub_id: str | os.PathLike, **pull_kwargs) -> Path:
    """The directory of a scene set: ``path_or_hub_id`` itself when it is an existing directory,
    else a Hub dataset repo id ``user/name[@revision]`` downloaded to the cache (see
    :func:`pull_scene_set` for ``pull_kwargs``). Raises SceneError when it is neither."""
    text = str(path_or_hub_id)
    local = Path(text).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise SceneError(f"{text}: is a file; a scene set is a directory holding index.json")
    try:
        repo, revision = parse_hub_id(text)
    except ValueError:
        raise SceneError(f"{text}: no such directory, and not a Hugging Face dataset id "
                         "(user/name[@revision])") from None
    try:
        return pull_scene_set(repo, revision, **pull_kwargs)
    except SceneError as e:
        raise SceneError(f"{text}: no such local directory, and as a Hub dataset id: {e}") from None


# ---- pushing -------------------------------------------------------------------------------------
def dataset_card(root: Path, entries: list[dict], repo_id: str) -> str:
    """A README.md for the dataset repo: what it is, how to use it, and the source licences."""
    datasets: dict[str, str] = {}
    sset = SceneSet(root, entries)
    for e in entries:  # the licence lives in the scenes: read one scene per source dataset
        name = e.get("dataset", "unknown")
        if name not in datasets:
            try:
                datasets[name] = sset.load(e["scene_id"]).license
            except (SceneError, KeyError, OSError):
                datasets[name] = "unknown"
    lines = [
        "---", "tags:", "- alpagym-ray", "- driving", "- scene-set", "---", "",
        f"# {repo_id}", "",
        f"An alpagym-ray scene set ({FORMAT_NAME} version {FORMAT_VERSION}): {len(entries)} logged drives "
        "as pickle-free `.npz` files plus `index.json`.", "",
        "```bash", f"alpagym-ray scenes pull {repo_id}", f"alpagym-ray train scenes.path={repo_id}",
        "```", "",
        "## Sources and licences", "",
        "Each scene keeps the licence of the dataset it was imported from:", "",
    ]
    lines += [f"- `{name}`: {lic}" for name, lic in sorted(datasets.items())]
    return "\n".join(lines) + "\n"


def push_scene_set(
    path: str | Path,
    repo_id: str,
    include: Sequence[str] | None = None,
    revision: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Upload the scene set at ``path`` (or the scenes matching ``include``) to the dataset repo
    ``repo_id`` (created when missing). Only indexed scene files, ``index.json`` and ``README.md``
    are sent. Returns the commit URL."""
    from huggingface_hub import HfApi

    root = Path(path)
    sset = SceneSet.open(root)
    entries = _select(sset.entries, include)
    if not entries:
        raise SceneError(f"{root}: no scene to push{f' matches {list(include)}' if include else ''}")
    missing = [e["file"] for e in entries if not (root / e["file"]).is_file()]
    if missing:
        raise SceneError(f"{root}: index.json lists {len(missing)} missing scene file(s), e.g. "
                         f"{missing[:3]}; re-import or fix the set before pushing")
    api = HfApi(endpoint=endpoint, token=token)
    with tempfile.TemporaryDirectory(prefix="alpagym-push-") as tmp:
        stage = Path(tmp)
        for e in entries:  # a staging folder of links: exactly the files of the (sub)set
            (stage / e["file"]).parent.mkdir(parents=True, exist_ok=True)
            os.symlink((root / e["file"]).resolve(), stage / e["file"])
        SceneSet.write_index(stage, entries)
        readme = root / "README.md"
        (stage / "README.md").write_text(readme.read_text() if readme.is_file()
                                         else dataset_card(root, entries, repo_id))
        api.create_repo(repo_id, repo_type=REPO_TYPE, private=private, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=stage, repo_type=REPO_TYPE, revision=revision,
            commit_message=commit_message or f"Upload {len(entries)} scene(s) with alpagym-ray",
            allow_patterns=["index.json", "README.md", "scenes/*.npz"],
        )
    return str(getattr(info, "commit_url", info))
