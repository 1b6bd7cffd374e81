"""Synchronous GRPO in one process, without Ray, to compare learning configurations quickly.

    python scripts/learning_sweep.py iterations=16 learner.lr=1e-4 learner.groups_per_iteration=16 \\
        --out scripts/results/learning_lr1e-4.json

Takes the ``alpagym-ray train`` overrides and runs the iteration of a synchronous one-worker run
(``learner.max_staleness=0``, ``topology.num_rollout_workers=1``): the same scenes, pre-trained start
(cached), rollout worker, GRPO update (``alpagym_ray.learner.grpo_update``) and held-out evaluation,
without the actors, so a configuration costs its rollouts and updates only. Group draws follow the
buffer's rule (uniform over training (scene, start) pairs) but not its exact stream, so a run here
and a Ray run of the same seed see different groups. Writes per-iteration training stats and the
held-out evaluation before and after (with the paired change) as JSON. Sandbox (2 cores, tiny policy):
5-6 s per iteration of 16 groups x 8, 13 s of 64 groups, against 10-20 s through Ray (BENCHMARKS.md).

``--train-starts N`` trains on the first N (scene, start) pairs only: an overfitting check that the
update raises what it sees again and again. ``--reward-to-go`` tries another advantage
(:func:`reward_to_go_advantage`, with the reward's metric terms made dense).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from alpagym_ray import columns as C  # noqa: E402

FAILURES = ("collision_any", "offroad")


def _episode_means(metas) -> dict[str, float]:
    """Mean return and failure rates of the iteration's episodes (from the groups' episode batches)."""
    out = {"return": float(np.mean([r for m in metas for r in m.returns]))}
    for name in FAILURES:
        col = C.METRIC_PREFIX + name
        vals = [v for m in metas if m.episodes is not None and col in m.episodes.schema.names
                for v in m.episodes.column(col).to_pylist()]
        if vals:
            out[name] = float(np.mean(vals))
    return out


def reward_to_go_advantage(metas, batches) -> torch.Tensor:
    """A variant of the advantage tried here (not in the learner): reward-to-go with the group's baseline at
    each decision, ``A[i, t] = R[i, >=t] - mean_j R[j, >=t]`` per row (DeepSeekMath's process-supervised
    GRPO sums the following steps' rewards the same way). With dense reward terms a failure weighs only on
    the decisions up to it, not on the ones after; the decisions of one group are aligned by step index."""
    out = []
    for m, b in zip(metas, batches, strict=True):
        G = len(m.returns)
        ep = b.column(C.EPISODE_ID).to_pylist()
        step = np.asarray(b.column(C.STEP).to_numpy())
        rew = np.asarray(b.column(C.REWARD).to_numpy(), dtype=np.float64)
        j = np.array([int(e.rsplit("/", 1)[1]) for e in ep])
        D = int(step.max()) + 1
        r = np.zeros((G, D))
        r[j, step] = rew
        rtg = np.flip(np.cumsum(np.flip(r, 1), 1), 1)
        adv = rtg - rtg.mean(0, keepdims=True)
        out.append(torch.from_numpy(adv[j, step]).float())
    return torch.cat(out)


def run(argv: list[str], train_starts: int = 0, reward_to_go: bool = False) -> dict:
    from omegaconf import OmegaConf

    from alpagym_ray.commands.pretrain import compose_config
    from alpagym_ray.commands.train import (
        evaluate_checkpoint,
        form_groups,
        reward_node,
        starting_checkpoint,
        with_checkpoint,
    )
    from alpagym_ray.evaluate import paired_difference
    from alpagym_ray.learner import (
        build_algorithm,
        fill_old_and_reference,
        groups_to_tensors,
        grpo_update,
        head_entropy,
    )
    from alpagym_ray.rollout_worker import GroupRequest, RolloutWorker
    from alpagym_ray.targets import instantiate, to_plain
    from learners.checkpoint import save_checkpoint

    cfg = compose_config(argv, "train")
    OmegaConf.set_struct(cfg, False)
    seed, iterations = int(cfg.seed), int(cfg.iterations)
    torch.manual_seed(seed)
    groups = form_groups(to_plain(cfg.env), to_plain(cfg.policy), cfg)
    if train_starts:  # an overfitting check: GRPO must raise the return on a few starts it sees again and again
        groups.train = groups.train[:train_starts]
    run_dir = Path(cfg.run_dir or "runs/learning-sweep").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.policy.model.path = starting_checkpoint(cfg, groups.scenes_path, run_dir)
    policy_node, reward = to_plain(cfg.policy), reward_node(cfg, argv)
    if reward_to_go:  # failures and progress land on the decisions where they happen
        reward = dict(reward, terms=[dict(t, dense=True) if t.get("kind") == "metric" else t for t in reward["terms"]])
    lc = to_plain(cfg.learner)
    G, n_groups, M = int(lc["group_size"]), int(lc["groups_per_iteration"]), int(lc["minibatches"])
    if n_groups % M:
        raise ValueError(f"learner.groups_per_iteration={n_groups} is not a multiple of learner.minibatches={M}")

    summary: dict = {"argv": argv, "config": {"learner": lc, "seed": seed, "iterations": iterations}}
    eval_env = groups.eval_env if groups.holdout else None
    if eval_env is not None:
        summary["eval_before"] = evaluate_checkpoint(eval_env, policy_node, reward, cfg, groups.holdout)
    worker = RolloutWorker("w0", groups.env, policy_node, reward, None, G, n_groups * G, "cpu",
                           torch_threads=torch.get_num_threads())
    policy = instantiate(policy_node).train()
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lc["lr"], eps=1e-6)
    algorithm = build_algorithm(lc)
    reference = None
    if getattr(algorithm, "needs_reference", False):
        reference = instantiate(policy_node).eval()
    rng = np.random.default_rng(seed)
    obs_keys, horizon, micro = tuple(policy.obs_keys), int(policy.action_spec.horizon), int(lc["micro_batch_rows"])
    history = []
    for it in range(iterations):
        t0 = time.perf_counter()
        worker.policy.load_state_dict(policy.state_dict())
        worker.version = it
        requests = [GroupRequest(f"i{it}-g{g}", int(rng.integers(2**31)),
                                 dict(groups.train[int(rng.integers(len(groups.train)))])) for g in range(n_groups)]
        metas, batches = worker._run(requests)
        t_roll = time.perf_counter()
        per = n_groups // M
        parts = [(metas[m * per:(m + 1) * per], batches[m * per:(m + 1) * per]) for m in range(M)]
        mbs = [groups_to_tensors(ms, bs, obs_keys, horizon, "cpu", algorithm) for ms, bs in parts]
        if reward_to_go:
            for mb, (ms, bs) in zip(mbs, parts, strict=True):
                mb["advantage"] = reward_to_go_advantage(ms, bs)
        fill_old_and_reference(policy, reference, mbs, micro)
        stats = grpo_update(policy, optimizer, params, mbs, [int(mb["action"].shape[0]) for mb in mbs], algorithm,
                            int(lc["epochs"]), float(lc["max_grad_norm"]), 1, micro)
        stats["entropy"] = head_entropy(policy, mbs[0], micro)
        row = {"iteration": it, **_episode_means(metas), **{k: float(v) for k, v in stats.items()},
               "rollout_s": t_roll - t0, "update_s": time.perf_counter() - t_roll}
        history.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    summary["history"] = history
    ckpt = run_dir / "checkpoint"
    save_checkpoint(policy, ckpt, policy_version=iterations)
    if eval_env is not None:
        after = with_checkpoint(policy_node, str(ckpt))
        summary["eval_after"] = evaluate_checkpoint(eval_env, after, reward, cfg, groups.holdout)
        summary["eval_delta"] = paired_difference(summary["eval_before"], summary["eval_after"])
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="JSON file of the results")
    parser.add_argument("--reward-to-go", action="store_true",
                        help="reward-to-go advantages with dense reward terms (reward_to_go_advantage)")
    parser.add_argument("--train-starts", type=int, default=0,
                        help="train on the first N training (scene, start) pairs only (0: all)")
    args, overrides = parser.parse_known_args()
    summary = run(overrides, args.train_starts, args.reward_to_go)
    for key in ("eval_before", "eval_after"):
        m = summary.get(key)
        if m:
            print(key, {k: round(m[k], 4) for k in ("return", "return_sem", "collision_any", "offroad",
                                                     "offroad_or_collision") if k in m and math.isfinite(m[k])})
    if summary.get("eval_delta"):
        print("paired change", summary["eval_delta"])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        slim = dict(summary)
        for key in ("eval_before", "eval_after"):
            if key in slim:
                slim[key] = {k: v for k, v in slim[key].items() if k != "returns"}
        args.out.write_text(json.dumps(slim, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
