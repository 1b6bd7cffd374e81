"""``alpagym-ray scenes generate N OUT_DIR``: procedural scenes into a scene-set directory.

Prints scenes/s and the number of rejected (re-drawn) attempts at the end. The generator lives in
``envs.drivesim.generate`` (the CLI is the composition root that may import it).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def _parser() -> argparse.ArgumentParser:
    from envs.drivesim.generate import LAYOUTS

    p = argparse.ArgumentParser(prog="alpagym-ray scenes generate",
                                description="Generate procedural driving scenes into a scene-set directory.")
    p.add_argument("n", type=int, metavar="N", help="number of scenes")
    p.add_argument("out_dir", metavar="OUT_DIR", help="scene-set directory to create")
    p.add_argument("--seed", type=int, default=0, help="seed of the first scene (scene i uses seed + i)")
    p.add_argument("--agents", type=int, default=32, help="most agents per scene besides the ego")
    p.add_argument("--steps", type=int, default=91, help="log length in 0.1 s steps (≥ 30)")
    p.add_argument("--layouts", default=",".join(LAYOUTS),
                   help=f"comma-separated subset of {','.join(LAYOUTS)}")
    p.add_argument("--append", action="store_true", help="add to an existing scene set")
    return p


def main(argv: list[str]) -> int:
    from envs.drivesim.generate import GenerationError, GeneratorConfig, generate_scenes
    from envs.drivesim.scene import SceneError, SceneSet

    args = _parser().parse_args(argv)
    err = Console(stderr=True)

    def fail(msg: str, code: int = 2) -> int:
        print(f"alpagym-ray scenes generate: {msg}", file=sys.stderr)
        return code

    if args.n < 1:
        return fail(f"N must be ≥ 1, got {args.n}")
    if args.seed < 0:
        return fail(f"--seed must be ≥ 0, got {args.seed}")
    layouts = tuple(x.strip() for x in args.layouts.split(",") if x.strip())
    try:
        cfg = GeneratorConfig(num_agents=args.agents, num_steps=args.steps, layouts=layouts)
    except ValueError as e:
        return fail(str(e))
    out = Path(args.out_dir)
    if (out / "index.json").exists() and not args.append:
        return fail(f"{out} already holds a scene set; pass --append to add to it")

    rejections: Counter[str] = Counter()
    per_layout: Counter[str] = Counter()
    columns = (TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
               TimeRemainingColumn())
    with Progress(*columns, console=err) as progress:
        task = progress.add_task("scenes", total=args.n, rate="")
        start = time.perf_counter()

        def counted() -> Iterator:
            for i, scene in enumerate(generate_scenes(args.n, args.seed, cfg), 1):
                rejections.update(scene.extra.get("rejections", {}))
                per_layout[scene.extra.get("layout", "?")] += 1
                progress.update(task, advance=1, rate=f"{i / (time.perf_counter() - start):.1f} scenes/s")
                yield scene

        try:
            scene_set = SceneSet.create(out, counted(), append=args.append)
        except GenerationError as e:
            return fail(str(e), code=1)
        except SceneError as e:
            return fail(str(e))
        elapsed = time.perf_counter() - start
    total = sum(rejections.values())
    detail = f" ({', '.join(f'{k}: {v}' for k, v in sorted(rejections.items()))})" if total else ""
    print(f"wrote {args.n} scenes to {out} ({len(scene_set)} in the set) in {elapsed:.1f} s: "
          f"{args.n / elapsed:.1f} scenes/s")
    print(f"layouts: {', '.join(f'{k} {v}' for k, v in sorted(per_layout.items()))}")
    print(f"rejected and re-drawn: {total}{detail}")
    return 0
