"""``alpagym-ray scenes show SCENE_ID --scenes DIR``: draw one scene of a set to a PNG."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alpagym-ray scenes show",
        description="Draw a scene (map, tracks, boxes at a step, the ego's log) to PNG.")
    p.add_argument("scene_id", metavar="SCENE_ID")
    p.add_argument("--scenes", required=True, metavar="DIR", help="scene-set directory")
    p.add_argument("--out", default=None, metavar="PNG", help="output file (default: <scene_id>.png)")
    p.add_argument("--step", type=int, default=None, help="step whose boxes are drawn (default 0)")
    p.add_argument("--size", type=int, default=1024, help="image side in pixels")
    return p


def main(argv: list[str]) -> int:
    from envs.drivesim.render import draw_scene_png
    from envs.drivesim.scene import SceneError, SceneSet, scene_file_name

    args = _parser().parse_args(argv)

    def fail(msg: str) -> int:
        print(f"alpagym-ray scenes show: {msg}", file=sys.stderr)
        return 2

    try:
        scene = SceneSet.open(args.scenes).load(args.scene_id)
    except KeyError as e:              # unknown id: the set's did-you-mean message
        return fail(str(e.args[0]) if e.args else str(e))
    except SceneError as e:
        return fail(str(e))
    out = Path(args.out) if args.out else Path(f"{scene_file_name(scene.scene_id)}.png")
    try:
        path = draw_scene_png(scene, out, size=args.size, step=args.step)
    except ValueError as e:
        return fail(str(e))
    print(f"wrote {path}")
    return 0
