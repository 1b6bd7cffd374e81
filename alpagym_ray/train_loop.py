"""The driver of a GRPO run: start the actors, run the learner group, write the summary.

It knows no concrete env, policy or reward: everything is built inside the actors from the
``_target_`` config nodes it is given (plain dicts).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray


@dataclass
class RunSpec:
    """Everything a run needs, in plain (picklable) form."""

    run_dir: str
    env: dict
    policy: dict
    reward: dict
    learner: dict
    topology: dict
    train_groups: list[dict]
    """Reset options groups are drawn from (drivesim: ``{"scene_id", "start_step"}``)."""
    iterations: int
    seed: int = 0
    resume_checkpoint: str | None = None
    extra: dict = field(default_factory=dict)


def init_ray(topology: dict) -> None:
    """Join the configured cluster, or start a local Ray bound to 127.0.0.1."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep every socket on 127.0.0.1
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = topology.get("address")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when it is imported (already done here): the
        # processes it starts inherit the variable, this one gets the flag itself and the node address, so
        # that every Ray server of a local run listens on 127.0.0.1 only (tests/alpagym_ray/test_job_submit.py)
        local: dict = {"log_to_driver": True}
        if os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0":
            from ray._private import ray_constants

            ray_constants.ENABLE_RAY_CLUSTER = False
            local["_node_ip_address"] = "127.0.0.1"
        # the dashboard serves Ray's state API (Ray Train's cleaner polls it): on 127.0.0.1 only
        try:
            ray.init(include_dashboard=True, dashboard_host="127.0.0.1", **local)
        except Exception as e:  # Ray without its [default] extras has no dashboard: run without it
            print(f"Ray dashboard unavailable ({e}); starting without it", flush=True)
            ray.shutdown()
            ray.init(include_dashboard=False, **local)


def start_actors(spec: RunSpec):
    """The broadcaster, the rollout workers and the buffer (the learner group comes with fit())."""
    from alpagym_ray.episode_buffer import EpisodeBuffer
    from alpagym_ray.rollout_worker import RolloutWorker
    from alpagym_ray.weights import WeightBroadcaster

    topo, lc = spec.topology, spec.learner
    G = int(lc["group_size"])
    B = int(topo["envs_per_worker"])
    if B < G or B % G:
        raise ValueError(f"topology.envs_per_worker={B} must be a positive multiple of learner.group_size={G}")
    broadcaster = ray.remote(WeightBroadcaster).options(num_cpus=0, max_restarts=0).remote()
    worker_cls = ray.remote(RolloutWorker)
    workers = [
        worker_cls.options(
            num_cpus=topo["rollout_cpus"], num_gpus=topo["rollout_gpus"], max_restarts=-1, max_task_retries=0,
        ).remote(f"w{i}", spec.env, spec.policy, spec.reward, broadcaster, G, B, topo["rollout_device"],
                 topo.get("torch_threads", 1), int(spec.extra.get("video_every", 0)) if i == 0 else 0, spec.run_dir,
                 weight_settings(topo), topo.get("precision", "fp32"), topo.get("compile", False),
                 topo.get("obs_storage", "float32"))
        for i in range(int(topo["num_rollout_workers"]))
    ]
    buffer = ray.remote(EpisodeBuffer).options(num_cpus=0, max_concurrency=64).remote(
        workers, spec.train_groups, G, int(lc["groups_per_iteration"]), B // G, int(lc["max_staleness"]),
        spec.run_dir, spec.seed)
    return broadcaster, workers, buffer


def fit(spec: RunSpec, broadcaster, buffer):
    """Run the learner group (Ray Train TorchTrainer) to the last iteration."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from alpagym_ray.learner import train_loop_per_worker

    topo = spec.topology
    config = {
        "buffer": buffer, "broadcaster": broadcaster, "policy": spec.policy, "learner": spec.learner,
        "iterations": spec.iterations, "seed": spec.seed, "run_dir": spec.run_dir,
        "use_gpu": bool(topo["learner_use_gpu"]), "torch_threads": topo.get("torch_threads", 1),
        "resume_checkpoint": spec.resume_checkpoint, "weights": weight_settings(topo),
        "precision": topo.get("precision", "fp32"), "compile": topo.get("compile", False),
        **{k: v for k, v in spec.extra.items() if k in ("crash_at_iteration", "write_steps")},
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=int(topo["num_learners"]), use_gpu=bool(topo["learner_use_gpu"]),
                                     resources_per_worker=learner_resources(topo)),
        torch_config=TorchConfig(backend=topo["backend"]),
        run_config=RunConfig(storage_path=str(Path(spec.run_dir).resolve() / "ray_train"), name="learner",
                             failure_config=FailureConfig(max_failures=int(topo["max_failures"]))),
    )
    return trainer.fit()


def weight_settings(topo: dict) -> dict:
    """The topology's ``weight_*`` keys as ``{transport, backend, bucket_mb, timeout_s, object_store_every}``."""
    return {k[len("weight_"):]: v for k, v in topo.items() if k.startswith("weight_")}


def learner_resources(topo: dict) -> dict:
    """Ray resources of one learner rank (a GPU fraction when it shares the GPU with rollouts)."""
    res = {"CPU": float(topo["learner_cpus"])}
    if topo.get("learner_use_gpu"):
        res["GPU"] = float(topo.get("learner_gpus", 1))
    return res


def resource_demand(topo: dict) -> dict[str, float]:
    """The CPUs and GPUs the rollout workers and learner ranks of a topology reserve in Ray (the
    broadcaster and the buffer reserve none)."""
    n, m = int(topo["num_rollout_workers"]), int(topo["num_learners"])
    learner = learner_resources(topo)
    return {"CPU": n * float(topo["rollout_cpus"]) + m * learner["CPU"],
            "GPU": n * float(topo["rollout_gpus"]) + m * learner.get("GPU", 0.0)}


def check_resources(topo: dict, available: dict, can_grow: bool) -> str | None:
    """Ray waits forever for resources no node has: a topology asking for more CPUs or GPUs than the
    cluster holds raises ValueError naming the keys to change, unless the cluster ``can_grow`` (an
    autoscaler may add nodes): then the returned warning says what is missing."""
    demand = resource_demand(topo)
    short = {k: (v, float(available.get(k, 0.0))) for k, v in demand.items() if v > available.get(k, 0.0) + 1e-9}
    if not short:
        return None
    need = ", ".join(f"{v:g} {k}s but the cluster has {have:g}" for k, (v, have) in short.items())
    msg = (f"topology {topo.get('name', '?')!r} asks for {need} (num_rollout_workers x rollout_cpus / "
           f"rollout_gpus + num_learners x learner_cpus / learner_gpus); lower topology.num_rollout_workers, "
           f"topology.rollout_gpus, topology.rollout_cpus or the learner's share")
    if can_grow:
        return msg + "; waiting for the cluster to grow"
    raise ValueError(msg)


def run(spec: RunSpec) -> dict:
    """A whole run; returns the summary (also written to ``run_dir/summary.json``)."""
    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    init_ray(spec.topology)
    # only an autoscaling cluster (topology.autoscaling, the `cluster` preset) gets more than it has now
    warning = check_resources(spec.topology, ray.cluster_resources(),
                              can_grow=bool(spec.topology.get("autoscaling", False)))
    if warning:
        print(f"warning: {warning}", flush=True)
    t0 = time.time()
    broadcaster, workers, buffer = start_actors(spec)
    result = fit(spec, broadcaster, buffer)
    ray.get(buffer.flush_episodes.remote())  # every episode received is on disk before the actors go
    stats = ray.get(buffer.stats.remote())
    if stats.get("episode_write_error"):
        print(f"warning: episode Parquet files: {stats['episode_write_error']}", flush=True)
    errors = {k: v for k, v in ray.get(buffer.last_errors.remote()).items() if v}
    if errors:  # failed groups and dead workers were retried; say what went wrong, once, at the end
        stats["last_errors"] = errors
        for k, v in errors.items():
            print(f"warning: {stats['events']} during the run; the last {k} error: {v}", flush=True)
    summary = {
        "run_dir": str(run_dir), "iterations": spec.iterations, "wall_s": time.time() - t0,
        "final_version": ray.get(broadcaster.highest_version.remote()),
        "buffer": stats, "weights": ray.get(broadcaster.stats.remote()), "last_metrics": result.metrics,
        "checkpoint": latest_checkpoint(run_dir),
    }
    for actor in [*workers, buffer, broadcaster]:
        ray.kill(actor)
    return summary


def latest_checkpoint(run_dir: Path) -> str | None:
    """The newest checkpoint directory a run wrote (``checkpoints/latest.txt``), or None."""
    latest = run_dir / "checkpoints" / "latest.txt"
    return str(run_dir / "checkpoints" / latest.read_text().strip()) if latest.is_file() else None


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, default=str))
