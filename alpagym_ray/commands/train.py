"""``alpagym-ray train`` (the default command): closed-loop GRPO post-training on Ray.

    python -m alpagym_ray.cli policy=trajectory policy.model.path=CKPT reward=progress_safety \\
        scenes.path=DIR topology=local_cpu
    python -m alpagym_ray.cli env=gym policy=trajectory_route    # a Gymnasium env (conf/env/gym.yaml)

Hydra overrides of ``alpagym_ray/conf/train.yaml``. This module is the composition root of a run:
it forms the GRPO groups the way the env node says (``env.groups_from``), pre-trains a starting
policy on a scene set when none is given (cached), evaluates it on held-out scenes, runs the Ray
system (``alpagym_ray.train_loop``), evaluates again and writes ``summary.json``.

``env.groups_from`` (a key of the env node, removed before the node reaches the actors):

* ``scenes`` (drivesim): the scene set of ``scenes.*`` (generated and cached when ``scenes.path`` is
  null), split into training and held-out scenes; a group = one scene and one of ``scenes.start_steps``.
* ``runtime`` (AlpaSim): the scenes the runtime lists (``get_runtime_info``), or ``env.scene_ids``
  when given, split the same way; the runtime owns the scenes.
* ``reset_options`` (any other env, e.g. the gym adapter; the default): a group = one entry of
  ``env.reset_options`` (default ``[{}]``) with a fresh seed, as ``alpagym_ray.api.train`` forms them.
  There are no held-out scenes, so no evaluation before and after, and no pre-training.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CACHE = Path("runs") / "cache"
GROUP_SOURCES = ("scenes", "runtime", "reset_options")
"""Values of ``env.groups_from``."""
REWARD_TARGET = "rewards.compute.reward_fn"
"""The ``_target_`` given to a reward node without one (a user's own YAML reached by searchpath)."""


@dataclass
class Groups:
    """How a run draws its GRPO groups and evaluates, as the env node decides."""

    env: dict
    """The env node for the actors (training scenes set, ``groups_from`` / ``reset_options`` removed)."""
    train: list[dict]
    """Reset options of the training groups."""
    holdout: list[dict] = field(default_factory=list)
    """Reset options of the held-out evaluation (empty: no evaluation)."""
    eval_env: dict | None = None
    """The env node of the held-out evaluation."""
    scenes_path: str | None = None
    """The drivesim scene set (pre-training reads it), when there is one."""
    summary: dict = field(default_factory=dict)


def prepare_scenes(sc: dict, seed: int) -> tuple[str, list[str], list[str]]:
    """(scene-set path, training ids, held-out ids)."""
    from alpagym_ray.commands.pretrain import split_ids
    from envs.drivesim.scene import SceneSet

    root = scene_set_path(sc)
    ids = SceneSet.open(root).ids
    train_ids, holdout_ids = split_ids(ids, float(sc["holdout_fraction"]), seed)
    return root, train_ids, holdout_ids


def scene_set_path(sc: dict) -> str:
    """``scenes.path`` resolved (a directory or Hub id), or the generated set (cached under ``runs/cache``)."""
    from envs.drivesim.scene_hub import resolve_scene_set

    if sc.get("path"):
        return str(Path(resolve_scene_set(sc["path"])).resolve())
    gen = sc["generate"]
    root = CACHE / f"scenes-gen-{gen['num_scenes']}-{gen['seed']}-{gen['num_agents']}"
    if not (root / "index.json").is_file():
        from envs.drivesim.generate import GeneratorConfig, generate_scene_set

        tmp = root.with_name(root.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        generate_scene_set(int(gen["num_scenes"]), tmp, seed=int(gen["seed"]),
                           cfg=GeneratorConfig(num_agents=int(gen["num_agents"])))
        os.replace(tmp, root)
    return str(root.resolve())


def runtime_scene_ids(env: dict) -> list[str]:
    """The scene ids an AlpaSim runtime serves, from its ``get_runtime_info`` (the env node's
    ``runtime_address`` or ``runtime_yaml``). Raises ConnectionError / ValueError naming the runtime."""
    import grpc

    from envs.alpasim import messages as m
    from envs.alpasim.env import resolve_address

    address = resolve_address(env.get("runtime_address"), env.get("runtime_yaml"))
    config = env.get("config") or {}
    timeout = float(config.get("connect_timeout_s", 10.0))
    options = m.channel_options(int(config.get("max_message_bytes", m.DEFAULT_MAX_MESSAGE_BYTES)))
    with grpc.insecure_channel(address, options=options) as channel:
        try:
            info = m.runtime_stub(channel).get_runtime_info(m.Empty(), timeout=timeout, wait_for_ready=True)
        except grpc.RpcError as e:
            if m.is_unimplemented(e):
                raise ValueError(f"the AlpaSim runtime at {address} does not implement get_runtime_info: name the "
                                 "training scenes with env.scene_ids=[...]") from None
            raise ConnectionError(f"the AlpaSim runtime at {address} did not answer get_runtime_info within "
                                  f"{timeout} s ({e.code().name}); is it running (alpagym-ray alpasim-runtime "
                                  "--scenes DIR, or AlpaSim with wizard.run_mode=SERVER)?") from None
    ids = sorted({s.scene_id for s in info.scenes})
    if not ids:
        raise ValueError(f"the AlpaSim runtime at {address} lists no scenes: nothing to train on")
    return ids


def form_groups(env: dict, policy: dict, cfg: Any) -> Groups:
    """Groups, held-out evaluation and the actors' env node, as ``env.groups_from`` says."""
    from alpagym_ray.commands.pretrain import split_ids
    from alpagym_ray.targets import to_plain

    env = dict(env)
    source = env.pop("groups_from", "reset_options")
    reset_options = env.pop("reset_options", None)
    if source not in GROUP_SOURCES:
        raise ValueError(f"env.groups_from={source!r}: valid: {list(GROUP_SOURCES)}")
    if reset_options is not None and source != "reset_options":
        raise ValueError(f"env.reset_options is read only with env.groups_from=reset_options (this env: "
                         f"groups_from={source})")
    _fill_policy_keys(env, policy)
    seed = int(cfg.seed)
    if source == "reset_options":
        options = [dict(o) for o in (reset_options if reset_options is not None else [{}])]
        if not options or any(not isinstance(o, dict) for o in options):
            raise ValueError(f"env.reset_options must be a non-empty list of mappings, got {reset_options!r}")
        return Groups(env=env, train=options, summary={"groups_from": source, "reset_options": len(options)})
    starts = [int(t) for t in cfg.scenes.start_steps]
    scenes_path = None
    if source == "scenes":
        scenes_path, train_ids, holdout_ids = prepare_scenes(to_plain(cfg.scenes), seed)
        env["scenes_path"] = scenes_path
    else:
        ids = [str(s) for s in env.get("scene_ids") or runtime_scene_ids(env)]
        if len(ids) >= 2:
            train_ids, holdout_ids = split_ids(ids, float(cfg.scenes.holdout_fraction), seed)
        else:
            train_ids, holdout_ids = ids, []
    summary = {"groups_from": source, "train_scenes": len(train_ids), "holdout_scenes": len(holdout_ids)}
    if scenes_path:
        summary["scenes"] = scenes_path
    return Groups(
        env={**env, "scene_ids": train_ids},
        train=[{"scene_id": s, "start_step": t} for s in train_ids for t in starts],
        holdout=[{"scene_id": s, "start_step": t} for s in holdout_ids for t in starts],
        eval_env={**env, "scene_ids": holdout_ids} if holdout_ids else None,
        scenes_path=scenes_path, summary=summary)


def _fill_policy_keys(env: dict, policy: dict) -> None:
    """The policy decides what the env observes: ``config.obs_keys`` / ``config.horizon`` for envs
    configured through a ``config`` node (drivesim, AlpaSim), a null top-level ``obs_keys`` otherwise
    (the gym adapter; its horizon is the env's own, e.g. ``env_kwargs.horizon: ${policy.horizon}``)."""
    if isinstance(env.get("config"), dict):
        env["config"] = {**env["config"], "horizon": policy.get("horizon", 20)}
        if "obs_keys" in policy:
            env["config"]["obs_keys"] = list(policy["obs_keys"])
    elif "obs_keys" in env and env["obs_keys"] is None and "obs_keys" in policy:
        env["obs_keys"] = list(policy["obs_keys"])


def reward_node(cfg: Any, argv: list[str]) -> dict:
    """``cfg.reward`` as a plain node the actors build with ``instantiate``: given :data:`REWARD_TARGET`
    when it has no ``_target_``, and a ``source`` naming the preset for error messages."""
    from alpagym_ray.targets import to_plain

    node = dict(to_plain(cfg.reward))
    node.setdefault("_target_", REWARD_TARGET)
    if node["_target_"] == REWARD_TARGET:
        node.setdefault("source", f"reward '{_choice(argv, 'reward')}' (config group reward)")
    return node


def _choice(argv: list[str], group: str) -> str:
    """The option of a config group: the last ``group=NAME`` override, else ``train.yaml``'s default."""
    import yaml

    for arg in reversed(argv):
        key, sep, value = arg.lstrip("+").partition("=")
        if sep and key == group:
            return value
    from alpagym_ray.commands.pretrain import CONF_DIR

    defaults = yaml.safe_load((Path(CONF_DIR) / "train.yaml").read_text()).get("defaults", [])
    return next((str(d[group]) for d in defaults if isinstance(d, dict) and group in d), group)


def check_run(env: dict, policy: dict, reward: dict) -> None:
    """Build one env, the policy and the reward here, as every rollout worker will, so that a bad
    reward, a missing observation key or a wrong horizon fails before Ray starts."""
    from alpagym_ray.targets import instantiate

    probe = instantiate(env, num_envs=1, device="cpu")
    try:
        reward_fn = instantiate(reward, metric_aggregations=probe.metric_aggregations)
        if hasattr(probe, "check_reward"):
            probe.check_reward(reward_fn)
        pol = instantiate(policy)
        missing = [k for k in pol.obs_keys if k not in probe.obs_keys]
        if missing:
            raise ValueError(f"policy {policy.get('_target_')} reads {list(pol.obs_keys)}; env "
                             f"{env.get('_target_')} provides {list(probe.obs_keys)}: missing {missing}")
        expected = getattr(probe, "expected_horizon", None)
        if expected not in (None, int(pol.action_spec.horizon)):
            raise ValueError(f"policy {policy.get('_target_')} emits H = {pol.action_spec.horizon} poses; env "
                             f"{env.get('_target_')} takes [{expected}, 3] (set the policy's horizon)")
    finally:
        if hasattr(probe, "close"):
            probe.close()


def starting_checkpoint(cfg: Any, scenes_path: str | None, run_dir: Path) -> str | None:
    """The policy's start: ``policy.model.path``, or a cached short pre-training on the scene set
    (``scenes_path``; envs without one start from the policy's initialisation)."""
    from alpagym_ray.commands.pretrain import compose_config, pretrain

    if cfg.policy.get("model", {}).get("path") or not cfg.pretrain.enabled:
        return None
    if cfg.policy["_target_"].startswith("learners.baselines"):
        return None
    if scenes_path is None:
        print("no policy.model.path and no scene set to pre-train on (env.groups_from=reset_options): the "
              "policy starts from its initialisation", flush=True)
        return None
    from omegaconf import OmegaConf

    overrides = [f"scenes.path={scenes_path}", f"scenes.val_fraction={cfg.scenes.holdout_fraction}",
                 f"seed={cfg.seed}", f"run_dir={CACHE / 'pretrain'}", *cfg.pretrain.overrides]
    pcfg = compose_config(overrides, "pretrain")
    OmegaConf.set_struct(pcfg, False)
    pcfg.policy = OmegaConf.create(OmegaConf.to_container(cfg.policy, resolve=True))
    pcfg.env.agents = (cfg.env.get("config") or {}).get("agents", "log")
    print(f"no policy.model.path: pre-training {cfg.policy._target_} (size={cfg.policy.get('size')}) open-loop "
          "first (cached)", flush=True)
    ckpt = pretrain(pcfg, progress=False)
    return str(Path(ckpt).resolve())


def main(argv: list[str]) -> int:
    import ray
    from omegaconf import OmegaConf

    from alpagym_ray import cuda_mps
    from alpagym_ray.commands.pretrain import compose_config

    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    # like `python -m`: env factories and policies of the user's project (module:attr) import from here
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    cfg = compose_config(argv, "train")
    OmegaConf.set_struct(cfg, False)
    try:  # before this process or Ray's touch the GPU: their CUDA contexts then go through the daemon
        mps = cuda_mps.start(cfg.topology.get("cuda_mps", False),
                             local_ray=not cfg.topology.get("address") and not ray.is_initialized())
    except (ValueError, RuntimeError) as e:
        print(f"alpagym-ray train: {e}", file=sys.stderr)
        return 2
    try:
        return _train(cfg, argv)
    finally:
        if mps is not None:  # the run's Ray processes are MPS clients: they go first
            ray.shutdown()
            mps.stop()


def _train(cfg, argv: list[str]) -> int:
    """The run of :func:`main` (its config composed, CUDA MPS started if asked for)."""
    from omegaconf import OmegaConf

    from alpagym_ray import train_loop
    from alpagym_ray.targets import to_plain

    if cfg.eval.enabled:
        from alpagym_ray.commands.pretrain import resolve_device

        try:  # before any pre-training or rollout: a GPU named here must exist
            resolve_device(str(cfg.eval.device))
        except (ValueError, RuntimeError) as e:
            print(f"alpagym-ray train: eval.device: {e}", file=sys.stderr)
            return 2
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
    try:
        groups = form_groups(to_plain(cfg.env), to_plain(cfg.policy), cfg)
    except (ValueError, ConnectionError) as e:
        print(f"alpagym-ray train: {e}", file=sys.stderr)
        return 2
    scenes_path = groups.scenes_path
    if scenes_path is None and groups.summary["groups_from"] == "runtime" and cfg.pretrain.enabled \
            and not cfg.policy.get("model", {}).get("path") and not resume_ckpt:
        scenes_path = scene_set_path(to_plain(cfg.scenes))  # pre-training data beside the runtime's scenes
    if resume_ckpt:
        cfg.policy.model.path = resume_ckpt
    else:
        ckpt = starting_checkpoint(cfg, scenes_path, run_dir)
        if ckpt:
            cfg.policy.model.path = ckpt
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    policy = to_plain(cfg.policy)
    obs_specs = groups.env.get("obs_specs")
    if obs_specs:  # custom observation keys: every process registers them before building the policy
        policy = {"_target_": "alpagym_ray.api.make_policy", "policy": policy, "obs_specs": dict(obs_specs)}
    reward = reward_node(cfg, argv)
    try:
        check_run(groups.env, policy, reward)
    except (ValueError, KeyError, ImportError) as e:  # bad reward, keys, horizon or import path
        print(f"alpagym-ray train: {e}", file=sys.stderr)
        return 2
    spec = train_loop.RunSpec(
        run_dir=str(run_dir), env=groups.env, policy=policy, reward=reward,
        learner=to_plain(cfg.learner), topology=to_plain(cfg.topology), train_groups=groups.train,
        iterations=int(cfg.iterations), seed=int(cfg.seed), resume_checkpoint=resume_ckpt,
        extra={"video_every": int(cfg.video_every)})
    summary: dict[str, Any] = dict(groups.summary)
    eval_env = groups.eval_env if cfg.eval.enabled and groups.holdout else None
    if cfg.eval.enabled and eval_env is None:
        print("no held-out scenes for this env: no evaluation before and after training", flush=True)
    if eval_env is not None:
        summary["eval_before"] = evaluate_checkpoint(eval_env, policy, reward, cfg, groups.holdout)
        print("held-out before:", _fmt(summary["eval_before"]), flush=True)
    summary.update(train_loop.run(spec))
    if eval_env is not None and summary.get("checkpoint"):
        after = with_checkpoint(policy, summary["checkpoint"])
        summary["eval_after"] = evaluate_checkpoint(eval_env, after, reward, cfg, groups.holdout)
        print("held-out after: ", _fmt(summary["eval_after"]), flush=True)
        from alpagym_ray.evaluate import paired_difference

        delta = paired_difference(summary["eval_before"], summary["eval_after"])
        if delta is not None:  # same scenes, starts and seed before and after: a paired comparison
            summary["eval_delta"] = delta
            print(f"held-out change (paired, same episodes): return {delta['return']:+.3f} "
                  f"(±{delta['return_sem']:.3f} s.e.)", flush=True)
    train_loop.write_json(run_dir / "summary.json", summary)
    print(f"run directory: {run_dir}  (tensorboard --logdir {run_dir / 'tensorboard'} --host 127.0.0.1)")
    return 0


def with_checkpoint(policy: dict, path: str) -> dict:
    """The policy node loading ``path`` (inside the ``make_policy`` wrapper when there is one)."""
    if "policy" in policy and policy.get("_target_") == "alpagym_ray.api.make_policy":
        return {**policy, "policy": with_checkpoint(policy["policy"], path)}
    return dict(policy, model={**policy.get("model", {}), "path": path})


def evaluate_checkpoint(env: dict, policy: dict, reward: dict, cfg: Any, options: list[dict]) -> dict:
    """Mean held-out episode metrics and return of ``policy`` over ``options`` (``eval.episodes_per_start``
    episodes each), on ``eval.device``."""
    from alpagym_ray.commands.pretrain import resolve_device

    device = resolve_device(str(cfg.eval.get("device", "cpu")))
    # each start several times (sampling differs): failures are rare events, one episode each is too noisy
    options = [o for o in options for _ in range(int(cfg.eval.get("episodes_per_start", 1)))]
    metrics = _evaluate_on(device, env, policy, reward, cfg, options)
    if device.type == "cuda":  # the driver keeps no GPU memory while the actors train
        import gc

        import torch

        gc.collect()  # the env's CUDA graphs and tensors may sit in reference cycles
        torch.cuda.empty_cache()
    return metrics


def _evaluate_on(device: Any, env: dict, policy: dict, reward: dict, cfg: Any, options: list[dict]) -> dict:
    from alpagym_ray.evaluate import evaluate
    from alpagym_ray.targets import instantiate

    sim = instantiate(env, num_envs=min(int(cfg.eval.num_envs), len(options)), device=str(device))
    try:
        pol = instantiate(policy).to(device).eval()
        return evaluate(sim, pol, options, reward, deterministic=bool(cfg.eval.deterministic), seed=int(cfg.seed))
    finally:
        if hasattr(sim, "close"):
            sim.close()


def _fmt(m: dict) -> str:
    keys = ("return", "scene_score", "progress", "collision_any", "offroad")
    sem = f" (±{m['return_sem']:.3f} s.e., {m.get('episodes', 0)} episodes)" if "return_sem" in m else ""
    return "  ".join(f"{k} {m[k]:.3f}" + (sem if k == "return" else "") for k in keys if k in m)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
