"""``alpagym-ray train`` (the default command): closed-loop GRPO post-training on Ray.

    python -m alpagym_ray.cli policy=trajectory policy.model.path=CKPT reward=progress_safety \\
        scenes.path=DIR topology=local_cpu

Hydra overrides of ``alpagym_ray/conf/train.yaml``. This module is the composition root of a run:
it prepares the scene set (generated and cached when ``scenes.path`` is null), pre-trains a starting
policy when none is given (cached), evaluates it on held-out scenes, runs the Ray system
(``alpagym_ray.train_loop``), evaluates again and writes ``summary.json``.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

CACHE = Path("runs") / "cache"


def prepare_scenes(sc: dict, seed: int) -> tuple[str, list[str], list[str]]:
    """(scene-set path, training ids, held-out ids)."""
    from alpagym_ray.commands.pretrain import split_ids
    from envs.drivesim.scene import SceneSet
    from envs.drivesim.scene_hub import resolve_scene_set

    if sc.get("path"):
        root = Path(resolve_scene_set(sc["path"]))
    else:
        gen = sc["generate"]
        root = CACHE / f"scenes-gen-{gen['num_scenes']}-{gen['seed']}-{gen['num_agents']}"
        if not (root / "index.json").is_file():
            from envs.drivesim.generate import GeneratorConfig, generate_scene_set

            tmp = root.with_name(root.name + f".tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            generate_scene_set(int(gen["num_scenes"]), tmp, seed=int(gen["seed"]),
                               cfg=GeneratorConfig(num_agents=int(gen["num_agents"])))
            os.replace(tmp, root)
    ids = SceneSet.open(root).ids
    train_ids, holdout_ids = split_ids(ids, float(sc["holdout_fraction"]), seed)
    return str(root.resolve()), train_ids, holdout_ids


def starting_checkpoint(cfg: Any, scenes_path: str, run_dir: Path) -> str | None:
    """The policy's start: ``policy.model.path``, or a cached short pre-training on the scene set."""
    from alpagym_ray.commands.pretrain import compose_config, pretrain

    if cfg.policy.get("model", {}).get("path") or not cfg.pretrain.enabled:
        return None
    if cfg.policy["_target_"].startswith("learners.baselines"):
        return None
    from omegaconf import OmegaConf

    overrides = [f"scenes.path={scenes_path}", f"scenes.val_fraction={cfg.scenes.holdout_fraction}",
                 f"seed={cfg.seed}", f"run_dir={CACHE / 'pretrain'}", *cfg.pretrain.overrides]
    pcfg = compose_config(overrides, "pretrain")
    OmegaConf.set_struct(pcfg, False)
    pcfg.policy = OmegaConf.create(OmegaConf.to_container(cfg.policy, resolve=True))
    pcfg.env.agents = cfg.env.config.get("agents", "log")
    print(f"no policy.model.path: pre-training {cfg.policy._target_} (size={cfg.policy.get('size')}) open-loop "
          "first (cached)", flush=True)
    ckpt = pretrain(pcfg, progress=False)
    return str(Path(ckpt).resolve())


def main(argv: list[str]) -> int:
    from omegaconf import OmegaConf

    from alpagym_ray import train_loop
    from alpagym_ray.commands.pretrain import compose_config
    from alpagym_ray.targets import to_plain

    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    cfg = compose_config(argv, "train")
    OmegaConf.set_struct(cfg, False)
    resume_ckpt = None
    if cfg.resume:
        run_dir = Path(cfg.resume)
        latest = run_dir / "checkpoints" / "latest.txt"
        if not latest.is_file():
            print(f"alpagym-ray train: resume={run_dir}: no checkpoint there ({latest} missing)", file=sys.stderr)
            return 2
        resume_ckpt = str((run_dir / "checkpoints" / latest.read_text().strip()).resolve())
    else:
        run_dir = Path(cfg.run_dir or f"runs/train-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.mkdir(parents=True, exist_ok=True)
    run_dir = run_dir.resolve()  # Ray actors do not share this process's working directory
    scenes_path, train_ids, holdout_ids = prepare_scenes(to_plain(cfg.scenes), int(cfg.seed))
    if resume_ckpt:
        cfg.policy.model.path = resume_ckpt
    else:
        ckpt = starting_checkpoint(cfg, scenes_path, run_dir)
        if ckpt:
            cfg.policy.model.path = ckpt
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    policy = to_plain(cfg.policy)
    env = to_plain(cfg.env)
    env["scenes_path"] = scenes_path
    env["config"] = {**env.get("config", {}), "obs_keys": list(policy["obs_keys"]) if "obs_keys" in policy else
                     None, "horizon": policy.get("horizon", 20)}
    if env["config"]["obs_keys"] is None:
        env["config"].pop("obs_keys")
    starts = list(cfg.scenes.start_steps)
    train_groups = [{"scene_id": s, "start_step": int(t)} for s in train_ids for t in starts]
    spec = train_loop.RunSpec(
        run_dir=str(run_dir), env={**env, "scene_ids": train_ids}, policy=policy, reward=to_plain(cfg.reward),
        learner=to_plain(cfg.learner), topology=to_plain(cfg.topology), train_groups=train_groups,
        iterations=int(cfg.iterations), seed=int(cfg.seed), resume_checkpoint=resume_ckpt,
        extra={"video_every": int(cfg.video_every)})
    summary: dict[str, Any] = {"scenes": scenes_path, "train_scenes": len(train_ids),
                               "holdout_scenes": len(holdout_ids)}
    holdout = [{"scene_id": s, "start_step": int(t)} for s in holdout_ids for t in starts]
    if cfg.eval.enabled and holdout:
        summary["eval_before"] = evaluate_checkpoint(env, policy, cfg, holdout_ids, holdout)
        print("held-out before:", _fmt(summary["eval_before"]), flush=True)
    summary.update(train_loop.run(spec))
    if cfg.eval.enabled and holdout and summary.get("checkpoint"):
        after = dict(policy, model={**policy.get("model", {}), "path": summary["checkpoint"]})
        summary["eval_after"] = evaluate_checkpoint(env, after, cfg, holdout_ids, holdout)
        print("held-out after: ", _fmt(summary["eval_after"]), flush=True)
    train_loop.write_json(run_dir / "summary.json", summary)
    print(f"run directory: {run_dir}  (tensorboard --logdir {run_dir / 'tensorboard'} --host 127.0.0.1)")
    return 0


def evaluate_checkpoint(env: dict, policy: dict, cfg, holdout_ids: list[str], options: list[dict]) -> dict:
    from alpagym_ray.evaluate import evaluate
    from alpagym_ray.targets import instantiate, to_plain
    from rewards.compute import RewardFn

    sim = instantiate({**env, "scene_ids": holdout_ids}, num_envs=min(int(cfg.eval.num_envs), len(options)),
                      device="cpu")
    pol = instantiate(policy).eval()
    reward_fn = RewardFn.from_mapping(to_plain(cfg.reward), sim.metric_aggregations)
    return evaluate(sim, pol, options, reward_fn, deterministic=bool(cfg.eval.deterministic), seed=int(cfg.seed))


def _fmt(m: dict) -> str:
    keys = ("return", "scene_score", "progress", "collision_any", "offroad")
    return "  ".join(f"{k} {m[k]:.3f}" for k in keys if k in m)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
