"""Throughput of drivesim's batched env against B (env-steps/s = ticks/s, agent-steps/s).

Workload (issue 2): generated scenes with 32 agents each, 256 map points and 16 agents observed,
H = 20, observations and metrics on; log replay, then reactive IDM. The policy replays the logged
future through the controller (the cheapest "real" action). Writes JSON.

    python scripts/bench_drivesim.py --device cpu --threads 1 --batch 64 256 1024 --out bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from envs.drivesim.batched import DriveSimBatch
from envs.drivesim.config import DriveSimConfig
from envs.drivesim.generate import GeneratorConfig, generate_scenes


def run(scenes, B: int, agents: str, device: str, decisions: int, horizon: int) -> dict:
    cfg = DriveSimConfig(agents=agents, horizon=horizon,
                         obs_keys=("ego_history", "route", "map_points", "agents", "gt_trajectory"))
    sim = DriveSimBatch(scenes, num_envs=B, config=cfg, device=device)
    ids = sim.st.scene_ids
    options = [{"scene_id": ids[i % len(ids)], "start_step": 0} for i in range(B)]
    obs = sim.reset(options=options)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    # warm-up decision (allocations, kernels)
    obs, *_ = sim.step(obs["gt_trajectory"][:, :horizon])
    sync()
    t0 = time.perf_counter()
    steps = 0
    for _ in range(decisions):
        if bool(sim.done.all()):
            obs = sim.reset(options=options)
        obs, *_ = sim.step(obs["gt_trajectory"][:, :horizon])
        steps += 1
    sync()
    dt = time.perf_counter() - t0
    ticks = B * steps * cfg.decision_every
    n_agents = int(sim.st.agent_state.shape[1])
    return {"B": B, "agents_mode": agents, "device": device, "decisions": steps, "seconds": dt,
            "env_steps_per_s": ticks / dt, "decisions_per_s": B * steps / dt,
            "agent_steps_per_s": ticks * n_agents / dt, "agents_per_scene": n_agents}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--batch", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--scenes", type=int, default=16)
    p.add_argument("--decisions", type=int, default=20)
    p.add_argument("--horizon", type=int, default=20)
    p.add_argument("--agents", nargs="+", default=["log", "idm"])
    p.add_argument("--out", default="bench_drivesim.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    scenes = list(generate_scenes(args.scenes, seed=1, cfg=GeneratorConfig(num_agents=32, num_steps=121)))
    results = []
    for agents in args.agents:
        for B in args.batch:
            r = run(scenes, B, agents, args.device, args.decisions, args.horizon)
            print(json.dumps(r))
            results.append(r)
    meta = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "threads": args.threads, "scenes": args.scenes,
            "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
