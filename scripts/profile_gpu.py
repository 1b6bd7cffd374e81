"""Where the GPU time of one decision goes: acting, the learner's update and the simulator step,
each under ``torch.profiler`` (device time per operator, kernel launches, wall time).

    python scripts/profile_gpu.py --device cuda --size default --batch 4096 --micro 16384 \
        --out scripts/results/profile_gpu_h100.json

Phases (bf16 autocast for the network, as ``topology.precision=bf16``; fp32 on CPU):

- ``act``: ``policy.act`` on ``--batch`` random observations (no grad), as a rollout worker calls it.
- ``update``: one GRPO step (forward, backward, Adam) on ``--micro`` rows.
- ``trunk``: the Transformer trunk alone on ``--micro`` rows under each attention backend.
- ``env``: one decision of drivesim's batched env (``decision_every`` ticks, observations, metrics)
  for ``--batch`` envs on generated scenes; on a GPU also ``env_eager``, without the tick's CUDA
  graph (``DriveSimConfig.cuda_graph``).

Per phase: wall seconds per call (synchronised), device seconds per call (sum of kernel times),
kernels per call, and the top operators by device time. The gap between wall and device time is
launch / host overhead, which is what suffers when several processes time-slice one GPU.
Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_learner import minibatch  # noqa: E402
from bench_policy import random_obs, timed  # noqa: E402
from bench_weights import machine_meta, write_result  # noqa: E402

from alpagym_ray.learner import grpo_update  # noqa: E402
from alpagym_ray.precision import autocast, set_matmul_precision  # noqa: E402
from learners.grpo import GRPO  # noqa: E402
from learners.trajectory_policy import ALL_DRIVESIM_KEYS, TrajectoryPolicy, TrajectoryPolicyConfig  # noqa: E402


def profiled(fn, device: torch.device, calls: int, top: int) -> dict:
    """Wall and device time per call of ``fn`` and its top operators (after two warm-up calls)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    wall = (time.perf_counter() - t0) / calls
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
        sync()
    events = prof.key_averages()
    if device.type == "cuda":
        # kernels (device events) give the total; operators (host events) carry the device time of
        # the kernels they launched themselves, which names the work
        kernel_events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        total_us = sum(e.self_device_time_total for e in kernel_events)
        kernels = sum(e.count for e in kernel_events)
        ops = [e for e in events if e.device_type != torch.autograd.DeviceType.CUDA]
        time_of = lambda e: e.self_device_time_total  # noqa: E731
    else:
        ops, kernels = list(events), 0
        total_us = sum(e.self_cpu_time_total for e in ops)
        time_of = lambda e: e.self_cpu_time_total  # noqa: E731
    rows = sorted(ops, key=time_of, reverse=True)
    return {
        "wall_s_per_call": wall,
        "device_s_per_call": total_us / 1e6 / calls,
        "kernels_per_call": kernels / calls,
        "top": [{"op": e.key, "device_ms_per_call": time_of(e) / 1e3 / calls,
                 "share": time_of(e) / max(total_us, 1e-9), "count_per_call": e.count / calls}
                for e in rows[:top]],
    }


def env_phase(batch: int, device: torch.device, calls: int, top: int, cuda_graph: bool) -> dict:
    from envs.drivesim.batched import DriveSimBatch
    from envs.drivesim.config import DriveSimConfig
    from envs.drivesim.generate import GeneratorConfig, generate_scenes

    scenes = list(generate_scenes(16, seed=1, cfg=GeneratorConfig(num_agents=32, num_steps=121)))
    cfg = DriveSimConfig(horizon=20, obs_keys=tuple(ALL_DRIVESIM_KEYS), cuda_graph=cuda_graph)
    sim = DriveSimBatch(scenes, num_envs=batch, config=cfg, device=str(device))
    ids = sim.st.scene_ids
    options = [{"scene_id": ids[i % len(ids)], "start_step": 0} for i in range(batch)]
    state = {"obs": sim.reset(options=options), "n": 0}

    def step():
        if state["n"] >= 40:  # stay inside the scenes' 121 ticks
            state["obs"], state["n"] = sim.reset(options=options), 0
        action = torch.zeros(batch, 20, 3, device=device)
        action[..., 0] = torch.arange(1, 21, device=device) * 0.5  # 5 m/s straight ahead
        state["obs"], *_ = sim.step(action)
        state["n"] += 1

    return profiled(step, device, calls, top)


def trunk_backends(policy, rows: int, device: torch.device, precision: str, repeats: int = 5) -> dict:
    """Seconds per call of the trunk's query output on ``rows`` sequences of the policy's token
    count (forward no-grad, forward + backward), through ``nn.TransformerEncoder.forward`` (``module``,
    what the policy called before) and through ``query_output`` (what it calls now), for each
    scaled-dot-product-attention backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from learners.trajectory_policy import query_output

    tokens = 1 + sum(encoder_tokens(policy, k) for k in policy.obs_keys)
    seq = torch.randn(rows, tokens, policy.config.d_model, device=device)
    paths = {"module": lambda x: policy.trunk(x)[:, 0], "query_output": lambda x: query_output(policy.trunk, x)}
    out: dict = {"rows": rows, "tokens": tokens}
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.MATH):
        for path, fn in paths.items():
            def fwd(backend=backend, fn=fn):
                with torch.no_grad(), autocast(precision, device), sdpa_kernel([backend]):
                    fn(seq)

            def fwd_bwd(backend=backend, fn=fn):
                with autocast(precision, device), sdpa_kernel([backend]):
                    fn(seq.requires_grad_()).float().square().mean().backward()

            try:
                out[f"{backend.name}/{path}"] = {"forward_s": timed(fwd, device, repeats),
                                                 "forward_backward_s": timed(fwd_bwd, device, repeats)}
            except RuntimeError as e:  # a backend that does not support these shapes
                out[f"{backend.name}/{path}"] = {"error": str(e).splitlines()[0][:200]}
    return out


def encoder_tokens(policy, key: str) -> int:
    """Tokens one observation key contributes to the trunk's sequence."""
    encoder = policy.encoders[key]
    return int(encoder.queries.shape[1]) if hasattr(encoder, "queries") else (4 if key == "bev" else 1)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", default="default")
    ap.add_argument("--batch", type=int, default=4096, help="rows of an act call and envs of an env step")
    ap.add_argument("--micro", type=int, default=16384, help="rows of one update step")
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--phases", nargs="+", default=["act", "update", "env"], choices=["act", "update", "env", "trunk"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    precision = "bf16" if device.type == "cuda" else "fp32"
    set_matmul_precision(precision)
    policy = TrajectoryPolicy(TrajectoryPolicyConfig(size=args.size, obs_keys=tuple(ALL_DRIVESIM_KEYS))).to(device)
    out: dict = {"meta": {**machine_meta(), "size": args.size, "precision": precision,
                          "batch": args.batch, "micro": args.micro,
                          "params": sum(p.numel() for p in policy.parameters())}}
    if "act" in args.phases:
        obs = random_obs(args.batch, policy.obs_keys, device)
        gen = torch.Generator(device=device).manual_seed(0)

        def act():
            with torch.no_grad(), autocast(precision, device):
                policy.act(obs, gen)

        out["act"] = profiled(act, device, args.calls, args.top)
    if "update" in args.phases:
        mb = minibatch(policy, args.micro, device)
        params = [p for p in policy.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=0.0, fused=device.type == "cuda")  # as the learner
        algo = GRPO()

        def update():
            grpo_update(policy, opt, params, [dict(mb)], [args.micro], algo, 1, 1.0, 1, args.micro, precision)

        out["update"] = profiled(update, device, args.calls, args.top)
    if "trunk" in args.phases:
        out["trunk_backends"] = trunk_backends(policy, args.micro, device, precision)
        print("trunk", json.dumps(out["trunk_backends"]), flush=True)
    if "env" in args.phases:
        out["env"] = env_phase(args.batch, device, args.calls * 4, args.top, cuda_graph=True)
        if device.type == "cuda":
            out["env_eager"] = env_phase(args.batch, device, args.calls * 4, args.top, cuda_graph=False)
    for k in ("act", "update", "env", "env_eager"):
        if k in out:
            r = out[k]
            print(f"{k}: wall {r['wall_s_per_call'] * 1e3:.1f} ms, device {r['device_s_per_call'] * 1e3:.1f} ms, "
                  f"{r['kernels_per_call']:.0f} kernels/call", flush=True)
            for t in r["top"][:12]:
                op = t["op"][:80]
                print(f"   {t['device_ms_per_call']:8.2f} ms {t['share']:6.1%} x{t['count_per_call']:.0f} {op}")
    if args.out:
        write_result(args.out, out)
    return out


if __name__ == "__main__":
    main()
