"""Diagnostic: one rollout worker's group batch in-process (no Ray actors, fixed initial weights).

    python scripts/diag_worker_gpu.py --device cuda --envs 64 --size default
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings

from alpagym_ray.rollout_worker import GroupRequest, RolloutWorker
from envs.drivesim.generate import small_scene_set


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--envs", type=int, default=64)
    p.add_argument("--group", type=int, default=16)
    p.add_argument("--size", default="tiny")
    args = p.parse_args()
    warnings.simplefilter("ignore")
    root = tempfile.mkdtemp()
    scenes = small_scene_set(root, n=4, seed=0)
    keys = ["ego_history", "route", "map_points", "agents"]
    policy = {"_target_": "learners.trajectory_policy.build_policy", "size": args.size, "obs_keys": keys,
              "horizon": 20, "model": {"path": None}}
    env = {"_target_": "envs.drivesim.factory.make_batched_env", "scenes_path": root,
           "config": {"obs_keys": keys, "horizon": 20}}
    reward = {"_target_": "rewards.compute.reward_fn",
              "terms": [{"kind": "metric", "metric_name": "progress", "scale": 1.0}]}
    t0 = time.perf_counter()
    w = RolloutWorker("diag", env, policy, reward, None, args.group, args.envs, args.device, 4)
    w.version = 0
    w.set_profile(args.device != "cpu")
    print(f"worker built in {time.perf_counter() - t0:.1f} s", flush=True)
    reqs = [GroupRequest(f"g{i}", i, {"scene_id": scenes.ids[i % 4]}) for i in range(args.envs // args.group)]
    t0 = time.perf_counter()
    metas, batches = w._run(reqs)
    dt = time.perf_counter() - t0
    rows = sum(m.num_rows for m in metas)
    print(f"{len(reqs)} groups, {rows} decisions in {dt:.1f} s ({rows / dt:.0f} decisions/s)", flush=True)
    print("phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(w.phase_stats().items())), flush=True)


if __name__ == "__main__":
    main()
