"""``alpagym-ray scenes pull`` / ``scenes push``: scene sets in Hugging Face Hub dataset repos.

    alpagym-ray scenes pull user/nuscenes-mini                     # whole set, into the Hub cache
    alpagym-ray scenes pull user/nuscenes-mini@v1 --include 'scene-00*' --out scenes/mini
    HF_HUB_OFFLINE=1 alpagym-ray scenes pull user/nuscenes-mini    # from the cache only
    HF_TOKEN=hf_... alpagym-ray scenes push scenes/mini user/nuscenes-mini --private

Authentication uses ``HF_TOKEN`` (or ``huggingface-cli login``); ``HF_HUB_CACHE`` sets the cache,
``HF_ENDPOINT`` another Hub server. Any stage takes the repo id directly: ``scenes.path=user/name``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from envs.drivesim.scene import SceneError


def pull_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="alpagym-ray scenes pull", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("repo", help="dataset repo id: user/name[@revision]")
    p.add_argument("--revision", default=None, help="branch, tag or commit (or use user/name@revision)")
    p.add_argument("--include", action="append", default=None, metavar="PATTERN",
                   help="only scenes whose id matches this glob (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="write the (sub)set here instead of the cache")
    p.add_argument("--cache-dir", type=Path, default=None, help="Hub cache (default HF_HUB_CACHE)")
    p.add_argument("--offline", action="store_true", help="use the local cache only (like HF_HUB_OFFLINE=1)")
    args = p.parse_args(argv)
    from envs.drivesim.scene_hub import parse_hub_id, pull_scene_set

    try:
        repo, revision = parse_hub_id(args.repo)
        path = pull_scene_set(repo, args.revision or revision, include=args.include, out=args.out,
                              cache_dir=args.cache_dir, offline=args.offline)
    except (SceneError, ValueError, OSError) as e:
        print(f"alpagym-ray scenes pull: {e}", file=sys.stderr)
        return 1
    from envs.drivesim.scene import SceneSet

    print(f"{len(SceneSet.open(path))} scene(s) at {path}")
    return 0


def push_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="alpagym-ray scenes push", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", type=Path, help="scene-set directory")
    p.add_argument("repo", help="dataset repo id: user/name (created when missing)")
    p.add_argument("--include", action="append", default=None, metavar="PATTERN",
                   help="only scenes whose id matches this glob (repeatable)")
    p.add_argument("--revision", default=None, help="branch to commit to (default main)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--message", default=None, help="commit message")
    args = p.parse_args(argv)
    from envs.drivesim.scene_hub import parse_hub_id, push_scene_set

    try:
        repo, revision = parse_hub_id(args.repo)
        url = push_scene_set(args.path, repo, include=args.include, revision=args.revision or revision,
                             private=args.private or None, commit_message=args.message)
    except (SceneError, ValueError, OSError) as e:
        print(f"alpagym-ray scenes push: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - Hub errors (auth, network) are reported, not tracebacks
        print(f"alpagym-ray scenes push: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"pushed: {url}")
    return 0
