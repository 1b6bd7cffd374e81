"""Closed-loop comparison of a pre-trained policy with constant velocity and logged replay.

Drives every held-out scene once per policy in drivesim (one batched env per scene, from
``start_step`` 0, warm-up included) and reports the episode metrics the acceptance asks for:
``collision_at_fault``, ``offroad``, ``progress`` and ``scene_score`` (plus ``collision_any`` and
``dist_to_gt_location``), as means over the scenes. The pre-trained policy is driven both in its
deterministic mode and sampling.

    python scripts/compare_pretrained.py --checkpoint runs/pretrain/pretrain-<hash>/checkpoint
    python scripts/compare_pretrained.py --pretrain policy.size=tiny      # pre-train first (cached)

Without ``--scenes`` the held-out scenes are the ones the pre-training run validated on (from its
``metrics.json``). Writes a JSON file (``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPORTED = ("collision_at_fault", "offroad", "progress", "scene_score", "collision_any",
            "dist_to_gt_location")


def drive(sim, policy, options: list[dict], seed: int, deterministic: bool) -> dict[str, np.ndarray]:
    """One episode per env; episode metrics ``{name: [B]}``."""
    obs = sim.reset(seeds=[seed] * sim.num_envs, options=options)
    gen = torch.Generator(device=sim.device).manual_seed(seed)
    episode: dict[str, np.ndarray] = {}
    while True:
        with torch.no_grad():
            action, _, _ = policy.act(obs, generator=gen, deterministic=deterministic)
        obs, _, _, _, info = sim.step(action)
        if "episode_metrics" in info:
            ended = info["ended"].cpu().numpy()
            for k, v in info["episode_metrics"].items():
                episode.setdefault(k, np.full(sim.num_envs, np.nan))[ended] = v[ended]
        if bool(sim.done.all()):
            return episode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="checkpoint directory or Hub id of the pre-trained policy")
    p.add_argument("--pretrain", nargs="*", default=None, metavar="OVERRIDE",
                   help="run (or reuse) `alpagym-ray pretrain` with these Hydra overrides instead")
    p.add_argument("--scenes", help="held-out scene-set directory (default: the pre-training's own)")
    p.add_argument("--agents", choices=("log", "idm"), default="log")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/compare_pretrained.json")
    args = p.parse_args(argv)

    from alpagym_ray.commands.pretrain import compose_config, pretrain
    from envs.drivesim.batched import DriveSimBatch
    from envs.drivesim.config import DriveSimConfig
    from envs.drivesim.scene import SceneSet
    from learners.baselines import ConstantVelocityPolicy, LoggedReplayPolicy
    from learners.checkpoint import load_checkpoint

    if args.checkpoint is None and args.pretrain is None:
        p.error("give --checkpoint or --pretrain")
    ckpt = Path(args.checkpoint) if args.checkpoint else pretrain(compose_config(args.pretrain))
    policy = load_checkpoint(ckpt, map_location=args.device).eval()
    if args.scenes:
        scene_set = SceneSet.open(args.scenes)
        ids = scene_set.ids
    else:
        meta = json.loads((Path(ckpt).parent / "metrics.json").read_text())["scenes"]
        scene_set = SceneSet.open(meta.get("val_path") or meta["path"])
        ids = scene_set.ids if meta.get("val_path") else meta["val_ids"]
    scenes = scene_set.load_many(ids)
    h = policy.horizon
    keys = tuple(dict.fromkeys([*policy.obs_keys, "ego_history", "gt_trajectory"]))
    sim = DriveSimBatch(scenes, num_envs=len(scenes), config=DriveSimConfig(obs_keys=keys, horizon=h,
                        agents=args.agents), device=args.device)
    options = [{"scene_id": s.scene_id, "start_step": 0} for s in scenes]
    runs = {
        "pretrained (deterministic)": (policy, True),
        "pretrained (sampled)": (policy, False),
        "pretrained (top anchor)": (policy, "top"),
        "constant_velocity": (ConstantVelocityPolicy(h), True),
        "logged_replay": (LoggedReplayPolicy(h), True),
    }
    results = {}
    for name, (pol, det) in runs.items():
        if det == "top" and getattr(pol, "deterministic_mode", None) in (None, "top"):
            continue  # the policy has no other deterministic action
        t0 = time.perf_counter()
        if det == "top":
            mode, pol.deterministic_mode = pol.deterministic_mode, "top"
        ep = drive(sim, pol, options, args.seed, bool(det))
        if det == "top":
            pol.deterministic_mode = mode
        results[name] = {k: float(np.nanmean(ep[k])) for k in REPORTED}
        results[name]["seconds"] = round(time.perf_counter() - t0, 2)
    width = max(map(len, results))
    print(f"{len(scenes)} held-out scenes, agents={args.agents}, checkpoint {ckpt}")
    print(" " * width + "".join(f"{k:>21}" for k in REPORTED))
    for name, r in results.items():
        print(name.ljust(width) + "".join(f"{r[k]:>21.3f}" for k in REPORTED))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"checkpoint": str(ckpt), "scenes": ids, "agents": args.agents,
                               "device": args.device, "results": results}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
