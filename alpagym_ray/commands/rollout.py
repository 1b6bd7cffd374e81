"""``alpagym-ray rollout``: roll scripted policies through drivesim, print metrics, write a video.

The Quickstart's main job until training lands on top of it: generate (or open) a scene set, drive
every scene closed-loop with the logged-replay and constant-velocity policies, print the episode
metrics side by side, and write ``metrics.json`` and an mp4 of one episode.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

REPORTED = ("scene_score", "progress", "collision_at_fault", "collision_any", "offroad",
            "dist_to_gt_location", "comfort_violation", "min_distance_to_obstacle_m")


def rollout(sim, policy, options: list[dict], video_env: int | None = None):
    """Run one episode per env; return (episode metrics {name: [B]}, frames of ``video_env``)."""
    obs = sim.reset(options=options)
    episode: dict[str, np.ndarray] = {}
    frames = []
    while True:
        if video_env is not None and not bool(sim.done[video_env]):
            frames.append(sim.render(video_env))
        with torch.no_grad():
            action, _, _ = policy.act(obs)
        obs, _, _, _, info = sim.step(action)
        if "episode_metrics" in info:
            ended = info["ended"].cpu().numpy()
            for k, v in info["episode_metrics"].items():
                episode.setdefault(k, np.full(sim.num_envs, np.nan))[ended] = v[ended]
        if bool(sim.done.all()):
            return episode, frames


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="alpagym-ray rollout", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/rollout", help="output directory")
    p.add_argument("--scenes", default=None, help="scene-set directory (default: generate into OUT/scenes)")
    p.add_argument("--num-scenes", type=int, default=16, help="scenes to generate when --scenes is not given")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--agents", choices=("log", "idm"), default="log", help="other agents: log replay or IDM")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    from envs.drivesim.batched import DriveSimBatch
    from envs.drivesim.config import DriveSimConfig
    from envs.drivesim.render import write_mp4
    from envs.drivesim.scene import SceneSet
    from learners.baselines import ConstantVelocityPolicy, LoggedReplayPolicy

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.scenes is None:
        scene_dir = out / "scenes"
        if not (scene_dir / "index.json").is_file():
            from envs.drivesim.generate import GeneratorConfig, generate_scene_set

            t0 = time.perf_counter()
            generate_scene_set(args.num_scenes, scene_dir, seed=args.seed, cfg=GeneratorConfig())
            print(f"generated {args.num_scenes} scenes in {time.perf_counter() - t0:.1f} s -> {scene_dir}")
    else:
        scene_dir = Path(args.scenes)
    scenes = SceneSet.open(scene_dir).load_many()
    cfg = DriveSimConfig(agents=args.agents)
    sim = DriveSimBatch(scenes, num_envs=len(scenes), config=cfg, device=args.device)
    options = [{"scene_id": s.scene_id, "start_step": 0} for s in scenes]
    policies = {"logged_replay": LoggedReplayPolicy(cfg.horizon),
                "constant_velocity": ConstantVelocityPolicy(cfg.horizon)}
    results = {}
    for name, policy in policies.items():
        t0 = time.perf_counter()
        episode, frames = rollout(sim, policy, options, video_env=0)
        results[name] = {k: float(np.nanmean(episode[k])) for k in REPORTED}
        results[name]["seconds"] = time.perf_counter() - t0
        video = out / f"episode_{name}.mp4"
        written = write_mp4(frames, video, fps=10 // cfg.decision_every)
        print(f"{name}: video of {scenes[0].scene_id} -> {written}")
    width = max(len(k) for k in REPORTED)
    print(f"\n{len(scenes)} scenes, mean over episodes (drivesim, agents={args.agents})")
    print(" " * width + "".join(f"{n:>20}" for n in results))
    for k in REPORTED:
        print(k.ljust(width) + "".join(f"{results[n][k]:>20.3f}" for n in results))
    (out / "metrics.json").write_text(json.dumps({"scenes": str(scene_dir), "agents": args.agents,
                                                  "results": results}, indent=1))
    print(f"\nmetrics -> {out / 'metrics.json'}")
    return 0
