"""``alpagym-ray scenes list | split | stats``: look at and divide scene sets.

    alpagym-ray scenes list scenes/nuscenes                   # one line per scene (from index.json)
    alpagym-ray scenes split scenes/nuscenes --out scenes/nu_split --heldout-fraction 0.2
    alpagym-ray scenes split scenes/nuscenes --out scenes/nu_split --heldout-list heldout.txt
    alpagym-ray scenes stats scenes/nuscenes --json

Every command takes a directory or a Hub dataset id (``user/name[@revision]``). ``split`` writes two
scene sets, ``<out>/train`` and ``<out>/heldout`` (scene files hard-linked when possible), plus
``<out>/split.json``. The hash split is stable: a scene's side depends only on its id and the salt,
so adding scenes never moves existing ones.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from envs.drivesim.scene import DT, AgentType, MapType, PolygonType, SceneError, SceneSet


def _open(path: str) -> SceneSet:
    from envs.drivesim.scene_hub import resolve_scene_set

    return SceneSet.open(resolve_scene_set(path))


def heldout_by_hash(scene_id: str, fraction: float, salt: str = "") -> bool:
    """True when the scene belongs to the held-out side: the first 64 bits of
    ``sha256(salt + scene_id)``, as a fraction of 2^64, fall below ``fraction``."""
    h = int.from_bytes(hashlib.sha256(f"{salt}{scene_id}".encode()).digest()[:8], "big")
    return h / 2.0**64 < fraction


# ---- list ----------------------------------------------------------------------------------------
def list_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="alpagym-ray scenes list", description="List the scenes of a set.")
    p.add_argument("path", help="scene-set directory or Hub dataset id")
    p.add_argument("--include", action="append", default=None, metavar="PATTERN", help="glob on scene ids")
    p.add_argument("--json", action="store_true", help="print the index entries as JSON")
    args = p.parse_args(argv)
    try:
        sset = _open(args.path)
    except SceneError as e:
        print(f"alpagym-ray scenes list: {e}", file=sys.stderr)
        return 1
    import fnmatch

    entries = [row for row in sset.entries
               if not args.include or any(fnmatch.fnmatchcase(row["scene_id"], pat) for pat in args.include)]
    if args.json:
        print(json.dumps(entries, indent=1))
        return 0
    width = max([len("scene_id")] + [len(row["scene_id"]) for row in entries])
    print(f"{'scene_id':<{width}}  {'dataset':<10} {'steps':>5} {'sec':>6} {'agents':>6} {'lines':>6} "
          f"{'ego_m':>8}")
    for entry in entries:
        steps = int(entry.get("num_steps", 0))
        print(f"{entry['scene_id']:<{width}}  {str(entry.get('dataset', '?')):<10} {steps:>5} "
              f"{steps * DT:>6.1f} "
              f"{entry.get('num_agents', '?'):>6} {entry.get('num_polylines', '?'):>6} "
              f"{entry.get('ego_path_m', 0.0):>8.1f}")
    print(f"{len(entries)} scene(s) in {sset.root}")
    return 0


# ---- split ---------------------------------------------------------------------------------------
def _read_id_list(path: Path) -> list[str]:
    text = path.read_text()
    if text.lstrip().startswith("["):
        ids = json.loads(text)
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise SceneError(f"{path}: a JSON id list must be a list of strings")
        return ids
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def split_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="alpagym-ray scenes split",
                                description="Split a scene set into train and held-out sets.")
    p.add_argument("path", help="scene-set directory or Hub dataset id")
    p.add_argument("--out", type=Path, required=True,
                   help="writes <out>/train, <out>/heldout and <out>/split.json")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--heldout-fraction", type=float, default=0.1,
                       help="expected fraction held out by the stable id hash (default %(default)s)")
    group.add_argument("--heldout-list", type=Path, default=None,
                       help="file of held-out scene ids (one per line, or a JSON list)")
    p.add_argument("--salt", default="", help="hash salt: another salt gives another split")
    args = p.parse_args(argv)
    if not 0.0 <= args.heldout_fraction <= 1.0:
        print("alpagym-ray scenes split: --heldout-fraction must be in [0, 1]", file=sys.stderr)
        return 2
    try:
        sset = _open(args.path)
        if args.heldout_list is not None:
            wanted = _read_id_list(args.heldout_list)
            unknown = [i for i in wanted if i not in sset]
            if unknown:
                import difflib

                hints = {u: difflib.get_close_matches(u, sset.ids, n=1) for u in unknown[:5]}
                raise SceneError(f"{args.heldout_list}: {len(unknown)} id(s) not in {sset.root}: {hints}")
            held = set(wanted)
            method = {"method": "list", "list": str(args.heldout_list)}
        else:
            held = {i for i in sset.ids if heldout_by_hash(i, args.heldout_fraction, args.salt)}
            method = {"method": "hash", "hash": "sha256(salt + scene_id)[:8] / 2^64 < fraction",
                      "fraction": args.heldout_fraction, "salt": args.salt}
        from envs.drivesim.scene_hub import write_subset

        sides = {"train": [e for e in sset.entries if e["scene_id"] not in held],
                 "heldout": [e for e in sset.entries if e["scene_id"] in held]}
        for name, entries in sides.items():
            write_subset(sset.root, entries, args.out / name)
        record = {**method, "source": str(sset.root),
                  **{name: [e["scene_id"] for e in entries] for name, entries in sides.items()}}
        (args.out / "split.json").write_text(json.dumps(record, indent=1))
    except (SceneError, OSError, ValueError) as e:
        print(f"alpagym-ray scenes split: {e}", file=sys.stderr)
        return 1
    print(f"train: {len(sides['train'])} scene(s) -> {args.out / 'train'}")
    print(f"heldout: {len(sides['heldout'])} scene(s) -> {args.out / 'heldout'}")
    return 0


# ---- stats ---------------------------------------------------------------------------------------
def _summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"min": 0.0, "median": 0.0, "max": 0.0, "total": 0.0}
    a = np.asarray(values, dtype=np.float64)
    return {"min": round(float(a.min()), 3), "median": round(float(np.median(a)), 3),
            "max": round(float(a.max()), 3), "total": round(float(a.sum()), 3)}


def scene_set_stats(sset: SceneSet, fast: bool = False) -> dict:
    """Counts, durations, agents and map sizes of a set (``fast``: index fields only)."""
    entries = sset.entries
    stats: dict = {
        "path": str(sset.root),
        "scenes": len(entries),
        "datasets": dict(Counter(str(e.get("dataset", "unknown")) for e in entries)),
        "duration_s": _summary([int(e.get("num_steps", 0)) * DT for e in entries]),
        "agents_per_scene": _summary([int(e.get("num_agents", 0)) for e in entries]),
        "polylines_per_scene": _summary([int(e.get("num_polylines", 0)) for e in entries]),
        "map_points_per_scene": _summary([int(e.get("num_map_points", 0)) for e in entries]),
        "ego_path_m": _summary([float(e.get("ego_path_m", 0.0)) for e in entries]),
    }
    if fast:
        return stats
    agent_types: Counter[str] = Counter()
    map_types: Counter[str] = Counter()
    polygon_types: Counter[str] = Counter()
    lane_km, lights, valid_frac, unreadable = 0.0, 0, [], []
    for e in entries:
        try:
            scene = sset.load(e["scene_id"])
        except SceneError as err:
            unreadable.append(f"{e['scene_id']}: {err}")
            continue
        for t in scene.agent_type:
            agent_types[AgentType(int(t)).name.lower()] += 1
        for t in scene.map_type:
            map_types[MapType(int(t)).name.lower()] += 1
        for t in scene.polygon_type:
            polygon_types[PolygonType(int(t)).name.lower()] += 1
        for _, line in scene.polylines(MapType.LANE):
            lane_km += float(np.linalg.norm(np.diff(line, axis=0), axis=1).sum()) / 1000.0
        lights += len(scene.tl_lane)
        valid_frac.append(float(scene.agent_valid.mean()))
    stats.update({
        "agents_by_type": dict(agent_types),
        "polylines_by_type": dict(map_types),
        "polygons_by_type": dict(polygon_types),
        "lane_km": round(lane_km, 3),
        "traffic_lights": lights,
        "agent_valid_fraction": _summary(valid_frac),
        "unreadable": unreadable,
    })
    return stats


def stats_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="alpagym-ray scenes stats", description="Statistics of a scene set.")
    p.add_argument("path", help="scene-set directory or Hub dataset id")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--fast", action="store_true", help="index only (do not open the scene files)")
    args = p.parse_args(argv)
    try:
        stats = scene_set_stats(_open(args.path), fast=args.fast)
    except SceneError as e:
        print(f"alpagym-ray scenes stats: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(stats, indent=1))
    else:
        for key, value in stats.items():
            if isinstance(value, dict) and {"min", "median", "max"} <= set(value):
                value = (f"min {value['min']:g}  median {value['median']:g}  max {value['max']:g}  "
                         f"total {value['total']:g}")
            elif isinstance(value, list):
                value = f"{len(value)}" + (f": {value[:3]}" if value else "")
            print(f"{key:<22} {value}")
    return 1 if stats.get("unreadable") else 0
