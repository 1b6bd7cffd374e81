"""Speed of the built-in trajectory policy per size: acting, a training step, weight transfer, checkpoints.

    python scripts/bench_policy.py --device cuda --sizes tiny default large --out runs/bench_policy.json

For each size: parameter count; ``act`` latency at several batch sizes (sampling, no grad); one
behaviour-cloning step (``log_prob`` forward + backward + AdamW) at ``--train-batch``; ``flatten_params``
and ``load_flat_params`` (the GRPO weight hand-over); checkpoint save and load. Inputs are random
observations of the full drivesim key set. Medians of ``--repeats`` timed runs after warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from alpagym_ray.flat_params import flatten_params, host_buffer, load_flat_params
from alpagym_ray.observations import SPECS, mask_key
from learners.bc import bc_loss
from learners.checkpoint import load_checkpoint, save_checkpoint
from learners.trajectory_policy import ALL_DRIVESIM_KEYS, TrajectoryPolicy, TrajectoryPolicyConfig


def random_obs(batch: int, keys, device) -> dict[str, torch.Tensor]:
    obs = {k: torch.randn(batch, *SPECS[k].shape, device=device) for k in keys}
    obs |= {mask_key(k): torch.ones(batch, SPECS[k].shape[0], dtype=torch.bool, device=device) for k in keys}
    return obs


def timed(fn, device, repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``fn()``."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def bench_size(size: str, args: argparse.Namespace, device: torch.device) -> dict[str, float | int]:
    torch.manual_seed(0)
    policy = TrajectoryPolicy(TrajectoryPolicyConfig(size=size, obs_keys=ALL_DRIVESIM_KEYS)).to(device)
    r: dict[str, float | int] = {"parameters": sum(q.numel() for q in policy.parameters())}
    gen = torch.Generator(device=device).manual_seed(0)
    for b in args.act_batches:
        obs = random_obs(b, policy.obs_keys, device)
        with torch.no_grad():
            r[f"act_ms_b{b}"] = 1e3 * timed(lambda o=obs: policy.act(o, gen), device, args.repeats)
    batch = random_obs(args.train_batch, policy.obs_keys, device)
    with torch.no_grad():
        batch["target"] = policy.act(batch, gen)[0]
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-5)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        bc_loss(policy, batch, 1.0).backward()
        opt.step()

    r[f"train_step_ms_b{args.train_batch}"] = 1e3 * timed(train_step, device, args.repeats)
    flat = flatten_params(policy)
    r["flat_mb"] = flat.numel() * flat.element_size() / 2**20
    r["flatten_ms"] = 1e3 * timed(lambda: flatten_params(policy), device, args.repeats)
    host = host_buffer(policy)  # what the learner publishes from: one reused (pinned on CUDA) host buffer
    r["flatten_host_ms"] = 1e3 * timed(lambda: flatten_params(policy, out=host), device, args.repeats)
    r["load_flat_ms"] = 1e3 * timed(lambda: load_flat_params(policy, flat), device, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        save_checkpoint(policy, Path(tmp) / "c", optimizer=opt)
        r["save_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        load_checkpoint(Path(tmp) / "c", map_location=device)
        r["load_s"] = time.perf_counter() - t0
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", nargs="+", default=["tiny", "default", "large"])
    p.add_argument("--act-batches", nargs="+", type=int, default=[1, 64, 1024])
    p.add_argument("--train-batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default="runs/bench_policy.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    results = {"device": str(device), "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "sizes": {}}
    for size in args.sizes:
        results["sizes"][size] = bench_size(size, args, device)
        print(size, results["sizes"][size], flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
