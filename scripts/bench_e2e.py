"""End-to-end throughput of a GRPO run: env-steps/s and decisions/s through the whole Ray system
(rollout workers, buffer, learner, weight publishing), in steady state, with what bounds it. Writes JSON.

    python scripts/bench_e2e.py --out runs/bench_e2e.json -- topology=1gpu topology.address=null \\
        policy.size=default learner.group_size=16 learner.groups_per_iteration=512 \\
        topology.envs_per_worker=4096 iterations=4

Everything after ``--`` is Hydra overrides of ``alpagym_ray/conf/train.yaml`` (pre-training and the
held-out evaluation are switched off: only the Ray system is timed). Steady state = every iteration
after the first (which includes starting the actors and the first rollouts). Reported: iteration
seconds, decision rows learned per second (= rows collected, every row is learned once), env-steps/s
(decision rows x the env's ticks per decision), the learner's own decisions/s (its compute time only),
the time the learner waited for data (for the rollouts alone: ``learner_buffer_wait_fraction``;
with the load of the data when it is not prefetched: ``learner_data_wait_fraction``), and the
rollout workers' time per phase.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


def scalars(tb_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    ea.Reload()
    return {tag: [e.value for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench_e2e.json")
    p.add_argument("overrides", nargs="*", help="Hydra overrides (after --)")
    args = p.parse_args(argv)
    from alpagym_ray.commands import train

    run_dir = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    overrides = ["pretrain.enabled=false", "eval.enabled=false", "video_every=0", f"run_dir={run_dir}",
                 *args.overrides]
    t0 = time.time()
    rc = train.main(overrides)
    if rc:
        sys.exit(f"bench_e2e: the run failed (exit {rc}); see {run_dir}")
    wall = time.time() - t0
    summary = json.loads((run_dir / "summary.json").read_text())
    tb = scalars(run_dir / "tensorboard")
    iter_s = tb["time/iteration_s"][1:]
    learner_s = tb["learner/learner_s"][1:]
    wait_s = tb["learner/data_wait_s"][1:]
    # waiting for the rollouts alone (without prefetch, data_wait_s also holds the load itself)
    buffer_wait_s = tb.get("learner/buffer_wait_s", [float("nan")] * len(tb["learner/data_wait_s"]))[1:]
    if not iter_s:
        sys.exit("bench_e2e: needs at least 2 iterations (the first is not steady state)")
    buffer = summary["buffer"]
    # decision rows learned per iteration (the learner's decisions/s x its compute seconds)
    rows_per_iter = statistics.mean(
        d * s for d, s in zip(tb["learner/decisions_per_s"][1:], learner_s, strict=True))
    ticks_per_row = buffer["env_steps"] / buffer["produced_decisions"]  # env ticks per decision row
    result = {
        "overrides": args.overrides, "machine": platform.node(), "wall_s": wall,
        "iterations_timed": len(iter_s), "iteration_s": statistics.mean(iter_s),
        "decisions_per_iteration": rows_per_iter,
        "decisions_per_s": rows_per_iter / statistics.mean(iter_s),
        "learner_decisions_per_s": rows_per_iter / statistics.mean(learner_s),
        "learner_data_wait_fraction": statistics.mean(wait_s) / statistics.mean(iter_s),
        "learner_buffer_wait_fraction": statistics.mean(buffer_wait_s) / statistics.mean(iter_s),
        # the learner's time per phase: waiting for the buffer, Arrow -> device tensors, the pi_old /
        # reference passes, the update, publishing the weights (and telling the buffer); the publish's
        # parts: flatten (device -> host), send (to the broadcaster), buffer (its acknowledgement)
        "learner_phase_s": {k: statistics.mean(tb[f"learner/{k}_s"][1:])
                            for k in ("buffer_wait", "load", "old_logp", "update", "publish", "publish_flatten",
                                      "publish_send", "publish_buffer")
                            if f"learner/{k}_s" in tb},
        "rollout_phase_fraction": buffer.get("rollout_phase_fraction", {}),
        "rollout_env_steps_per_s_since_start": buffer.get("rollout_env_steps_per_s"),
        "env_steps_per_decision": ticks_per_row,
    }
    result["env_steps_per_s"] = result["decisions_per_s"] * ticks_per_row
    # the learner's main loop hardly waits for rollouts (in the buffer, or behind a prefetch that does):
    # the learner bounds the run (its load included); otherwise the rollouts do
    waited = min(result["learner_data_wait_fraction"], result["learner_buffer_wait_fraction"])
    result["bound_by"] = "learner" if waited < 0.1 else "rollout"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
