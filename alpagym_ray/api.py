"""The Python API: GRPO post-training with any Gymnasium env, reward and policy, without Hydra.

    from alpagym_ray import api

    summary = api.train(
        env_factory="my_pkg.envs:LaneEnv",          # or the class / a function returning a gymnasium.Env
        metric_aggregations={"progress": "last", "collision_any": "max", "offroad": "max"},
        reward={"terms": [{"kind": "metric", "metric_name": "progress", "scale": 1.0},
                          {"kind": "metric", "metric_name": "collision_any", "scale": -10.0}]},
        policy={"_target_": "learners.trajectory_policy.build_policy", "size": "tiny",
                "obs_keys": ["ego_history", "route"], "horizon": 20},
        iterations=10, run_dir="runs/lane")

The env runs in :class:`alpagym_ray.gym_adapter.GymBatchedEnv` (its docstring says what the env must
provide: observation keys of the table or declared ``obs_specs``, trajectory actions, and
``info["metrics"]``). Everything is checked in this process before Ray starts: the env is built once,
the reward is bound to its declared metrics, the policy's keys are looked up in the env's.

Callables (``env_factory``, a policy ``_target_``) travel to the Ray actors with cloudpickle: those
defined in the ``__main__`` script go by value; those of an importable module go by reference, and
the actors import them (Ray puts the driver's working directory and script directory on their path).

Like the ``alpagym-ray`` CLI, this module is a composition root (DESIGN.md, "Dependency direction"):
it may name the concrete packages (``REWARD_TARGET``); the runtime it starts builds everything from
the config nodes it is handed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from alpagym_ray.gym_adapter import register_obs_specs

CONF = Path(__file__).resolve().parent / "conf"
REWARD_TARGET = "rewards.compute.reward_fn"
"""The ``_target_`` given to a reward mapping that has none (the presets carry it already)."""


def make_policy(policy: Mapping[str, Any], obs_specs: Mapping[str, Any] | None = None) -> Any:
    """Build a policy from its config node after registering the run's custom observation keys.

    The ``_target_`` of the policy node of runs made by :func:`train`: the learner and the rollout
    workers build the policy through it, so a policy reading custom keys finds them in
    ``alpagym_ray.observations.SPECS`` in every process. ``policy["_target_"]`` is an import path or a
    callable; the node's other keys are its keyword arguments."""
    from alpagym_ray.targets import instantiate, to_plain

    register_obs_specs(obs_specs)
    node = dict(policy)
    target = node.get("_target_")
    if callable(target):
        kwargs = {k: to_plain(v) for k, v in node.items() if k != "_target_"}
        return target(**kwargs)
    return instantiate(node)


def load_reward(reward: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """The reward's config node: a preset name (``alpagym_ray/conf/reward/<name>.yaml``), a path to a
    YAML file, or a mapping with a ``terms:`` list, as a plain dict.

    A node without ``_target_`` gets :data:`REWARD_TARGET`; a node built by that target gets a ``source``
    naming the reward in errors (the preset or file, else ``reward (api.train)``)."""
    import yaml

    from alpagym_ray.targets import to_plain
    from rewards.spec import RewardSpecError, resolve_source

    if isinstance(reward, Mapping):
        raw, label = dict(to_plain(reward)), "reward (api.train)"
    elif isinstance(reward, str | Path):
        path, label = resolve_source(reward)
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise RewardSpecError(f"{label}: not valid YAML: {e}") from None
        if not isinstance(raw, Mapping):
            raise RewardSpecError(f"{label}: expected a mapping with a 'terms:' list, got {type(raw).__name__}")
        raw = dict(raw)
    else:
        raise ValueError(f"reward must be a preset name, a YAML path or a mapping with 'terms', got "
                         f"{type(reward).__name__}")
    raw.setdefault("_target_", REWARD_TARGET)
    if raw["_target_"] == REWARD_TARGET:
        raw.setdefault("source", label)
    return raw


def _defaults(group: str, name: str) -> dict[str, Any]:
    import yaml

    return dict(yaml.safe_load((CONF / group / f"{name}.yaml").read_text()))


def _merge(base: dict[str, Any], overrides: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
    """``base`` with ``overrides`` applied (nested mappings merged); unknown keys are errors.

    A nested node whose override names another ``_target_`` is replaced whole (its keys are the
    other target's arguments)."""
    out = dict(base)
    for key, value in (overrides or {}).items():
        if key not in base:
            raise ValueError(f"{what} has no key {key!r}; valid: {sorted(base)}")
        if isinstance(base[key], dict) and isinstance(value, Mapping):
            swapped = "_target_" in value and value["_target_"] != base[key].get("_target_")
            out[key] = dict(value) if swapped else _merge(base[key], value, f"{what}.{key}")
        else:
            out[key] = value
    return out


def _learner_config(learner: Mapping[str, Any] | None) -> dict[str, Any]:
    """``conf/learner/grpo.yaml`` with the overrides; ``grpo: {...}`` (the former name of the algorithm's
    fields) is accepted for ``algorithm: {...}``."""
    base = _defaults("learner", "grpo")
    over = dict(learner or {})
    if "grpo" in over:
        if "algorithm" in over:
            raise ValueError("learner: give the algorithm's fields under 'algorithm' or 'grpo' (its former "
                             "name), not both")
        grpo = over.pop("grpo")
        if not isinstance(grpo, Mapping):
            raise ValueError(f"learner.grpo must be a mapping of algorithm fields, got {grpo!r}")
        over["algorithm"] = dict(_merge(base["algorithm"], grpo, "learner.grpo"))
    return _merge(base, over, "learner")


def train(
    env_factory: str | Callable[..., Any],
    reward: str | Path | Mapping[str, Any],
    policy: Mapping[str, Any],
    *,
    metric_aggregations: Mapping[str, Any],
    env_kwargs: Mapping[str, Any] | None = None,
    obs_keys: Sequence[str] | None = None,
    obs_specs: Mapping[str, Any] | None = None,
    reset_options: Sequence[Mapping[str, Any]] | None = None,
    num_envs: int = 16,
    iterations: int = 10,
    run_dir: str | Path | None = None,
    seed: int = 0,
    decision_every: int = 1,
    max_steps: int | None = None,
    cut_after_failure: bool = True,
    topology: Mapping[str, Any] | None = None,
    learner: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """GRPO post-training of ``policy`` on a Gymnasium env; returns the run summary.

    Args:
        env_factory: import path or callable returning one ``gymnasium.Env`` (see
            ``alpagym_ray.gym_adapter``); called with ``env_kwargs``.
        reward: preset name, YAML path, or ``{"terms": [...]}`` (DESIGN.md, "Rewards"), checked
            against ``metric_aggregations``.
        policy: config node ``{"_target_": import path or callable, **kwargs}`` building an
            ``alpagym_ray.policy.Policy`` that is an ``nn.Module``; checkpoints also need ``kind``,
            ``policy_config()`` and ``from_config()`` (``learners/checkpoint.py``).
        metric_aggregations: ``{name: aggregation}`` of the per-tick metrics in ``info["metrics"]``.
        obs_keys: keys the env stacks (default: the policy's ``obs_keys``).
        obs_specs: custom observation keys ``{key: {"shape": [...], "features": [...]}}``.
        reset_options: the reset options GRPO groups are drawn from (default ``[{}]``: one start
            state per seed); a group's G episodes share seed and options.
        num_envs: envs per rollout worker (``topology.envs_per_worker``), a multiple of the group size.
        iterations: GRPO iterations (published versions after the starting one).
        run_dir: output directory (default ``runs/api-<timestamp>``).
        decision_every, max_steps, cut_after_failure: see ``alpagym_ray.gym_adapter.GymEnvConfig``.
        topology: overrides of ``conf/topology/local_cpu.yaml`` (workers, devices, Ray address).
        learner: overrides of ``conf/learner/grpo.yaml`` (``group_size``, ``lr``, ``algorithm: {...}``...;
            ``grpo: {...}`` is read as ``algorithm: {...}``).

    Returns the summary of ``alpagym_ray.train_loop.run`` (also written to ``run_dir/summary.json``).
    """
    from alpagym_ray import train_loop
    from alpagym_ray.gym_adapter import GymBatchedEnv
    from alpagym_ray.targets import instantiate

    topo = _merge(_defaults("topology", "local_cpu"), topology, "topology")
    if topology and "envs_per_worker" in topology and int(topology["envs_per_worker"]) != num_envs:
        raise ValueError(f"num_envs={num_envs} and topology.envs_per_worker={topology['envs_per_worker']} "
                         "differ; give one of them")
    topo["envs_per_worker"] = int(num_envs)
    lc = _learner_config(learner)
    G = int(lc["group_size"])
    if G < 1 or num_envs < G or num_envs % G:
        raise ValueError(f"num_envs={num_envs} must be a positive multiple of learner.group_size={G} (each "
                         "rollout worker runs whole groups)")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
    if not isinstance(policy, Mapping) or "_target_" not in policy:
        raise ValueError(f"policy must be a config mapping with a '_target_' (import path or callable), got "
                         f"{policy!r}")
    options = [dict(o) for o in (reset_options if reset_options is not None else [{}])]
    if not options:
        raise ValueError("reset_options must hold at least one options mapping (or be None for [{}])")

    # check everything here, before any actor starts
    reward_raw = load_reward(reward)
    probe_policy = make_policy(policy, obs_specs)
    keys = tuple(obs_keys) if obs_keys is not None else tuple(probe_policy.obs_keys)
    env_node: dict[str, Any] = {
        "_target_": "alpagym_ray.gym_adapter.make_gym_batched_env", "env_factory": env_factory,
        "env_kwargs": dict(env_kwargs or {}), "metric_aggregations": dict(metric_aggregations),
        "obs_keys": list(keys), "obs_specs": dict(obs_specs or {}), "decision_every": decision_every,
        "max_steps": max_steps, "cut_after_failure": cut_after_failure,
    }
    probe_env = GymBatchedEnv(num_envs=1, device="cpu",
                              **{k: v for k, v in env_node.items() if k != "_target_"})
    try:
        # what every rollout worker will do with the node
        reward_fn = instantiate(reward_raw, metric_aggregations=probe_env.metric_aggregations)
        probe_env.check_reward(reward_fn)
        missing = [k for k in probe_policy.obs_keys if k not in probe_env.obs_keys]
        if missing:
            raise ValueError(f"the policy reads {list(probe_policy.obs_keys)}; the env stacks "
                             f"{list(probe_env.obs_keys)}: missing {missing}")
        horizon = int(probe_policy.action_spec.horizon)
        if probe_env.expected_horizon not in (None, horizon):
            raise ValueError(f"the policy emits H = {horizon} poses; the env's action space takes "
                             f"[{probe_env.expected_horizon}, 3]")
    finally:
        probe_env.close()
    del probe_policy

    # absolute: the actors do not share this process's working directory
    run_path = Path(run_dir or f"runs/api-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    run_path.mkdir(parents=True, exist_ok=True)
    spec = train_loop.RunSpec(
        run_dir=str(run_path), env=env_node,
        policy={"_target_": "alpagym_ray.api.make_policy", "policy": dict(policy),
                "obs_specs": dict(obs_specs or {})},
        reward=reward_raw, learner=lc, topology=topo, train_groups=options, iterations=iterations,
        seed=int(seed))
    train_loop.write_json(run_path / "run_spec.json", asdict(spec))
    summary = train_loop.run(spec)
    train_loop.write_json(run_path / "summary.json", summary)
    return summary
