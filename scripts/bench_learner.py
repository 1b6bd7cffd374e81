"""The GPU work per decision of the GRPO system, by precision: acting, the learner's update, and how
well acting and learning agree on log-probabilities.

    python scripts/bench_learner.py --device cuda --size default --out scripts/results/bench_learner.json

Per ``topology.precision`` (fp32, tf32, bf16; ``alpagym_ray.precision``):

- ``act``: decisions/s of ``policy.act`` at ``--act-batch`` (sampling, no grad), as a rollout worker calls it.
- ``update``: decisions/s of one learner iteration on ``--rows`` decision rows (one minibatch, one
  epoch): ``logp_old`` as the learner gets it (from the update's own first pass) and, for comparison,
  from a separate no-grad pass first (what the learner did before); for each ``--micro`` size.
- ``agreement``: |log π| differences on the same (observation, action) rows between the acting call
  (batch ``--act-batch``) and the learner's (micro-batch ``--micro[0]``), and against float32. With
  ``max_staleness`` 0 the importance weight π_old / π_behaviour is exp of the first difference.

``--compile P [P ...]`` also times precisions P after ``policy.compile()`` (trunk and per-element MLPs)
(``topology.compile``), compile time excluded (it runs in the warm-up).

Inputs are random observations of the full drivesim key set (the compute does not depend on values).
Medians of ``--repeats`` timed runs after warm-up. Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_policy import random_obs, timed  # noqa: E402
from bench_weights import finish_result, machine_meta  # noqa: E402

from alpagym_ray.learner import grpo_update, log_probs  # noqa: E402
from alpagym_ray.precision import PRECISIONS, autocast, set_matmul_precision  # noqa: E402
from learners.grpo import GRPO  # noqa: E402
from learners.trajectory_policy import ALL_DRIVESIM_KEYS, TrajectoryPolicy, TrajectoryPolicyConfig  # noqa: E402


def minibatch(policy, rows: int, device) -> dict:
    obs = random_obs(rows, policy.obs_keys, device)
    with torch.no_grad():
        action, logp, _ = policy.act(obs, torch.Generator(device=device).manual_seed(0))
    return {"obs": obs, "action": action, "logp_behavior": logp,
            "advantage": torch.randn(rows, device=device)}


def bench_precision(name: str, policy, args, device) -> dict:
    set_matmul_precision(name)
    out: dict = {}
    gen = torch.Generator(device=device).manual_seed(0)
    obs = random_obs(args.act_batch, policy.obs_keys, device)

    def act():
        with torch.no_grad(), autocast(name, device):
            policy.act(obs, gen)

    out["act_decisions_per_s"] = args.act_batch / timed(act, device, args.repeats)
    mb = minibatch(policy, args.rows, device)
    params = [p for p in policy.parameters() if p.requires_grad]
    # lr 0: the weights (and so every repeat) stay the same
    opt = torch.optim.Adam(params, lr=0.0, fused=device.type == "cuda")  # as the learner
    algo = GRPO()
    for micro in args.micro:
        def update(separate_old: bool, micro=micro):
            batch = dict(mb)
            if separate_old:
                batch["logp_old"] = log_probs(policy, batch, micro, precision=name)
            grpo_update(policy, opt, params, [batch], [args.rows], algo, 1, 1.0, 1, micro, name)

        out[f"update_decisions_per_s_micro{micro}"] = args.rows / timed(lambda: update(False), device, args.repeats)
        out[f"update_separate_old_decisions_per_s_micro{micro}"] = (
            args.rows / timed(lambda: update(True), device, args.repeats))
    # agreement of acting and learning on the same rows
    obs_a = {k: v[: args.act_batch] for k, v in mb["obs"].items()}
    with torch.no_grad(), autocast(name, device):
        action, logp_act, _ = policy.act(obs_a, gen)
    learner = log_probs(policy, {"obs": obs_a, "action": action}, args.micro[0], precision=name)
    set_matmul_precision("fp32")
    exact = log_probs(policy, {"obs": obs_a, "action": action}, args.micro[0], precision="fp32")
    set_matmul_precision(name)
    d_learn, d_exact = (learner - logp_act).abs(), (logp_act - exact).abs()
    out.update(
        logp_act_vs_learner_mean=float(d_learn.mean()), logp_act_vs_learner_p99=float(d_learn.quantile(0.99)),
        logp_act_vs_learner_max=float(d_learn.max()),
        logp_vs_fp32_mean=float(d_exact.mean()), logp_vs_fp32_p99=float(d_exact.quantile(0.99)),
        logp_vs_fp32_max=float(d_exact.max()), logp_abs_mean=float(exact.abs().mean()),
    )
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", default="default")
    ap.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    ap.add_argument("--act-batch", type=int, default=8192)
    ap.add_argument("--rows", type=int, default=32768, help="decision rows of one learner iteration")
    ap.add_argument("--micro", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", nargs="*", default=[], choices=PRECISIONS,
                    help="precisions to time again after policy.compile() (topology.compile)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.act_batch > args.rows:
        ap.error("--act-batch must not exceed --rows")
    device = torch.device(args.device)
    torch.manual_seed(0)
    policy = TrajectoryPolicy(TrajectoryPolicyConfig(size=args.size, obs_keys=ALL_DRIVESIM_KEYS)).to(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    result = {"meta": machine_meta(device=args.device, gpu=gpu, size=args.size, act_batch=args.act_batch,
                                   rows=args.rows, parameters=sum(p.numel() for p in policy.parameters())),
              "precisions": {}}
    for name in args.precisions:
        result["precisions"][name] = bench_precision(name, policy, args, device)
        print(name, json.dumps(result["precisions"][name], indent=1), flush=True)
    if args.compile:
        policy.compile()
        for name in args.compile:
            try:
                result["precisions"][f"{name}+compile"] = bench_precision(name, policy, args, device)
            except Exception as e:  # noqa: BLE001 -- a compiler failure is a result too; keep the others
                result["precisions"][f"{name}+compile"] = {"error": f"{type(e).__name__}: {e}"[:500]}
            print(f"{name}+compile", json.dumps(result["precisions"][f"{name}+compile"], indent=1), flush=True)
    return finish_result(args.out, result)


if __name__ == "__main__":
    main()
