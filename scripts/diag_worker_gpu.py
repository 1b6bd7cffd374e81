"""Diagnostic: one rollout worker's group batch in-process (no Ray actors), timing each phase.

    python scripts/diag_worker_gpu.py --device cuda --envs 64 --size default
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings

import ray

from alpagym_ray.rollout_worker import GroupRequest, RolloutWorker
from envs.drivesim.generate import small_scene_set


class _Broadcaster:
    """Stands in for the WeightBroadcaster: no newer weights ever."""

    class _Pull:
        def remote(self, version):
            return (version, None)

    pull_if_newer = _Pull()


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
    reward = {"terms": [{"kind": "metric", "metric_name": "progress", "scale": 1.0}]}
    ray.get = lambda x, **_: x  # the stand-in broadcaster answers directly
    t0 = time.perf_counter()
    w = RolloutWorker("diag", env, policy, reward, _Broadcaster(), args.group, args.envs, args.device, 4)
    w.version = 0
    print(f"worker built in {time.perf_counter() - t0:.1f} s", flush=True)
    reqs = [GroupRequest(f"g{i}", i, {"scene_id": scenes.ids[i % 4]}) for i in range(args.envs // args.group)]
    t0 = time.perf_counter()
    metas, batches = w._run(reqs)
    dt = time.perf_counter() - t0
    rows = sum(m.num_rows for m in metas)
    print(f"{len(reqs)} groups, {rows} decisions in {dt:.1f} s ({rows / dt:.0f} decisions/s)", flush=True)


if __name__ == "__main__":
    main()
