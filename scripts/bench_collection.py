"""Collection efficiency: env-steps/s collected through the Ray system with the learner paused, divided
by what the same number of rollout workers reach without Ray. Writes JSON.

    python scripts/bench_collection.py --workers 2 --envs-per-worker 16 --group-size 8 --seconds 30 \\
        --out runs/bench_collection.json [--override policy.size=default ...]

Both sides run the same code on the same work: ``alpagym_ray.rollout_worker.RolloutWorker`` with the
env, policy and reward of ``alpagym_ray/conf/train.yaml`` (plus ``--override``s), on generated scenes,
``envs_per_worker / group_size`` GRPO groups per call, one torch thread per worker.

* **Ray system**: the broadcaster, the rollout workers (Ray actors, ``--rollout-cpus`` each) and the
  episode buffer of ``alpagym_ray.train_loop.start_actors``; version 0 is published once, the buffer is
  started with an unbounded staleness and a stand-in for an infinitely fast learner takes every
  iteration's groups and drops them, so the buffer keeps every worker busy and the object store never
  fills (its admission, ownership of the results, weight polls and Parquet writing included). The
  buffer's ``env_steps`` counter is sampled every 0.1 s.
* **Without Ray**: the same number of plain processes, each running a ``RolloutWorker`` directly
  (weights loaded once from the same flat buffer) in a loop of calls with the same requests, started
  together; every call's completion is time-stamped. Also one such worker alone in this process.

Env-steps count ticks under policy control (warm-up replay excluded), as the buffer counts them. The
rate over a window is (env-steps completed between the first and the last completion in the window)
/ (time between them), the same estimator for both sides, after ``--warmup`` seconds.

Reported: ``efficiency`` = Ray env-steps/s / without-Ray env-steps/s (median over ``--repeats``
alternating rounds); ``cpu_efficiency``, the same ratio of env-steps per CPU-second of each side's
whole process tree (Ray's daemons and actors included), which a busy shared machine disturbs less
than wall-clock rates; ``worker_pull_fraction``, the share of a Ray worker's time in ``pull_if_newer``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import statistics
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alpagym_ray.rollout_worker import GroupRequest, RolloutWorker


class LocalRolloutWorker(RolloutWorker):
    """A :class:`RolloutWorker` without Ray: the weights come once from a flat buffer in memory."""

    def __init__(self, flat: np.ndarray, **kwargs: Any):
        super().__init__(broadcaster=None, **kwargs)
        self.flat_tools(self.policy, torch.from_numpy(flat).to(self.device))
        self.version = 0

    def pull_if_newer(self, wait: bool = False, timeout_s: float = 300.0) -> int:
        return self.version


# ---- configuration ---------------------------------------------------------------------------------
def build_configs(overrides: list[str], scenes_path: str, scene_ids: list[str]) -> dict[str, Any]:
    """env / policy / reward dicts as ``alpagym-ray train`` builds them (commands/train.py)."""
    from alpagym_ray.commands.pretrain import compose_config
    from alpagym_ray.targets import to_plain

    cfg = to_plain(compose_config(["policy.size=tiny", *overrides], "train"))
    policy = cfg["policy"]
    env = dict(cfg["env"], scenes_path=scenes_path, scene_ids=scene_ids)
    env.pop("groups_from", None)  # read by the train command only
    env["config"] = {**env.get("config", {}), "obs_keys": list(policy["obs_keys"]),
                     "horizon": policy["horizon"]}
    starts = [int(s) for s in cfg["scenes"]["start_steps"]]
    groups = [{"scene_id": s, "start_step": t} for s in scene_ids for t in starts]
    return {"env": env, "policy": policy, "reward": cfg["reward"], "learner": cfg["learner"],
            "groups": groups, "obs_storage": cfg["topology"].get("obs_storage", "float32"),
            "decision_every": int(env["config"].get("decision_every", 1))}


def starting_weights(policy: dict) -> np.ndarray:
    from alpagym_ray.flat_params import flatten_params
    from alpagym_ray.targets import instantiate

    torch.manual_seed(0)
    return flatten_params(instantiate(policy)).float().numpy()


def rate(events: list[tuple[float, int]], t0: float, t1: float) -> dict[str, float]:
    """Env-steps/s between the first and last completion in ``[t0, t1]``; ``events`` are
    ``(time, env-steps completed at that time)`` in any order."""
    inside = sorted(e for e in events if t0 <= e[0] <= t1)
    if len(inside) < 2:
        raise RuntimeError(f"only {len(inside)} completions in the {t1 - t0:.1f} s window: "
                           "measure longer (--seconds) or with fewer envs per worker")
    steps = sum(n for _, n in inside[1:])  # the first completion only opens the span (its work came before)
    span = inside[-1][0] - inside[0][0]
    return {"env_steps_per_s": steps / span, "env_steps": steps, "window_s": span, "completions": len(inside)}


def tree_cpu_seconds(root: int | None = None) -> dict[int, float]:
    """``{pid: user + system CPU seconds}`` of process ``root`` (default: this one) and all its
    descendants, from /proc (Linux; empty elsewhere). Ray's own daemons started by ``ray.init``
    (GCS, raylet) and its worker processes are descendants of the driver."""
    root = os.getpid() if root is None else root
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    parent, cpu = {}, {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry)
        parent[pid] = int(fields[1])                          # state, ppid, ...
        cpu[pid] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    out = {}
    for pid in cpu:
        p = pid
        while p not in (root, 0, 1) and p in parent:
            p = parent[p]
        if p == root:
            out[pid] = cpu[pid]
    return out


def cpu_between(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds used between two :func:`tree_cpu_seconds` samples (processes that started in
    between count from zero; those that ended in between are lost, a small undercount)."""
    return sum(t - before.get(pid, 0.0) for pid, t in after.items())


def add_cpu(result: dict, cpu_s: float, window_s: float) -> dict:
    """Cores the process tree used over the window, and env-steps per CPU-second (load-robust)."""
    result["cpu_cores_used"] = cpu_s / window_s
    result["env_steps_per_cpu_s"] = result["env_steps_per_s"] / max(result["cpu_cores_used"], 1e-9)
    return result


def requests_for_call(rng: np.random.Generator, groups: list[dict], per_call: int, tag: str, n: int
                      ) -> list[GroupRequest]:
    """What the buffer asks for: ``per_call`` groups of random (scene, start) with random seeds."""
    return [GroupRequest(group_id=f"{tag}-{n:07d}-{k}", seed=int(rng.integers(2**31)),
                         options=dict(groups[int(rng.integers(len(groups)))])) for k in range(per_call)]


# ---- without Ray -----------------------------------------------------------------------------------
def run_local_worker(index: int, cfg: dict, flat: np.ndarray, args: dict, start: Any = None
                     ) -> list[tuple[float, int]]:
    """One worker without Ray: build it, wait for the common start, run calls until the window ends;
    returns ``(completion time, env-steps)`` per call."""
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    G, B = args["group_size"], args["envs_per_worker"]
    worker = LocalRolloutWorker(flat, worker_id=f"local{index}", env=cfg["env"], policy=cfg["policy"],
                                reward=cfg["reward"], group_size=G, num_envs=B, device="cpu", torch_threads=1,
                                obs_storage=cfg["obs_storage"])
    rng = np.random.default_rng(1000 + index)
    if start is not None:
        start.wait()
    deadline = time.monotonic() + args["warmup"] + args["seconds"]
    events, n = [], 0
    while time.monotonic() < deadline:
        metas = worker.run_groups(requests_for_call(rng, cfg["groups"], B // G, f"l{index}", n))[0]
        failed = [m.error for m in metas if not m.ok]
        if failed:
            raise RuntimeError(f"local worker {index}: a group failed: {failed[0]}")
        events.append((time.monotonic(), sum(m.env_steps for m in metas)))
        n += 1
    return events


def _local_process(index: int, cfg: dict, flat: np.ndarray, args: dict, start: Any, out: Any) -> None:
    try:
        out.put(("ok", run_local_worker(index, cfg, flat, args, start)))
    except BaseException:
        start.abort()  # release the others instead of leaving them at the barrier
        out.put(("error", traceback.format_exc()))


def measure_local(cfg: dict, flat: np.ndarray, args: dict, processes: int) -> dict:
    """``processes`` plain worker processes started together (0: one worker in this process)."""
    if processes == 0:
        t_start = time.monotonic()
        events = run_local_worker(0, cfg, flat, args)
    else:
        ctx = mp.get_context("spawn")
        start, out = ctx.Barrier(processes + 1), ctx.Queue()
        procs = [ctx.Process(target=_local_process, args=(i, cfg, flat, args, start, out))
                 for i in range(processes)]
        for p in procs:
            p.start()
        # every worker built: start together (a broken barrier: a worker failed, its error is queued)
        with contextlib.suppress(threading.BrokenBarrierError):
            start.wait(timeout=600)
        t_start = time.monotonic()
        time.sleep(args["warmup"])
        cpu0 = tree_cpu_seconds()
        time.sleep(args["seconds"])
        cpu_s = cpu_between(cpu0, tree_cpu_seconds())
        events = []
        for _ in procs:
            status, value = out.get(timeout=args["warmup"] + args["seconds"] + 600)
            if status != "ok":
                raise RuntimeError(f"a local worker process failed:\n{value}")
            events += value
        for p in procs:
            p.join(timeout=60)
    t0 = t_start + args["warmup"]
    result = rate(events, t0, t0 + args["seconds"])
    return result if processes == 0 else add_cpu(result, cpu_s, args["seconds"])


# ---- through Ray -----------------------------------------------------------------------------------
def _pull_seconds(worker: RolloutWorker) -> float:
    """Runs inside a rollout-worker actor (``__ray_call__``): its time spent in ``pull_if_newer``."""
    return worker.pull_s


def measure_ray(cfg: dict, flat: np.ndarray, args: dict, run_dir: str) -> dict:
    import ray

    from alpagym_ray import train_loop

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    W, G, B = args["workers"], args["group_size"], args["envs_per_worker"]
    ray.init(address="local", num_cpus=max(1, int(np.ceil(W * args["rollout_cpus"]))),
             include_dashboard=False, object_store_memory=args["object_store_mb"] * 2**20,
             log_to_driver=False)
    try:
        learner = dict(cfg["learner"], group_size=G, groups_per_iteration=B // G, max_staleness=10**9)
        topology = {"name": "bench", "address": None, "num_rollout_workers": W, "envs_per_worker": B,
                    "rollout_cpus": args["rollout_cpus"], "rollout_gpus": 0, "rollout_device": "cpu",
                    "torch_threads": 1, "obs_storage": cfg["obs_storage"]}
        spec = train_loop.RunSpec(run_dir=run_dir, env=cfg["env"], policy=cfg["policy"],
                                  reward=cfg["reward"], learner=learner, topology=topology,
                                  train_groups=cfg["groups"], iterations=0)
        broadcaster, workers, buffer = train_loop.start_actors(spec)
        ray.get([w.ping.remote() for w in workers], timeout=600)  # every worker built
        ray.get(broadcaster.publish.remote(0, flat))
        ray.get(buffer.on_published.remote(0))
        t_start = time.monotonic()
        ray.get(buffer.start.remote(0, 0))  # the learner's part, then it stays paused
        # an infinitely fast learner: take every iteration's groups and drop them, so finished groups do
        # not pile up in the object store (spilling to disk would charge the learner's absence to Ray)
        stop = threading.Event()

        def consume() -> None:
            it = 0
            while not stop.is_set():
                ray.get(buffer.take_shard.remote(it, 0, 1, 1, 3600.0))
                it += 1

        consumer = threading.Thread(target=consume, daemon=True)
        consumer.start()
        t0 = t_start + args["warmup"]
        deadline = t0 + args["seconds"]
        events, last, cpu0, pulls0 = [], 0, None, []
        while time.monotonic() < deadline:
            if cpu0 is None and time.monotonic() >= t0:
                cpu0, t_cpu0 = tree_cpu_seconds(), time.monotonic()
                # seconds each worker has spent in pull_if_newer (runs between its calls: not awaited here)
                pulls0 = [w.__ray_call__.remote(_pull_seconds) for w in workers]
            stats = ray.get(buffer.stats.remote())
            if stats["env_steps"] != last:
                events.append((time.monotonic(), stats["env_steps"] - last))
                last = stats["env_steps"]
            time.sleep(0.1)
        cpu_s, cpu_window = cpu_between(cpu0 or {}, tree_cpu_seconds()), time.monotonic() - t_cpu0
        stop.set()
        pulls1 = ray.get([w.__ray_call__.remote(_pull_seconds) for w in workers], timeout=600)
        pull_s = [b - a for a, b in zip(ray.get(pulls0), pulls1, strict=True)]
        stats = ray.get(buffer.stats.remote())
        errors = ray.get(buffer.last_errors.remote())
        if stats["failed_groups"] or stats["events"].get("worker_failures"):
            raise RuntimeError(f"groups failed during the measurement: {stats['events']} {errors}")
        result = add_cpu(rate(events, t0, t0 + args["seconds"]), cpu_s, cpu_window)
        result["buffer"] = {k: stats[k] for k in ("produced", "consumed", "held", "accounting_ok", "env_steps")}
        # share of a worker's time spent asking the broadcaster for newer weights (a call per decision)
        result["worker_pull_fraction"] = statistics.mean(pull_s) / cpu_window
        for actor in [*workers, buffer, broadcaster]:
            ray.kill(actor)
        return result
    finally:
        ray.shutdown()


# ---- main ------------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2, help="rollout workers (Ray actors / plain processes)")
    p.add_argument("--envs-per-worker", type=int, default=16, help="B, a multiple of --group-size")
    p.add_argument("--group-size", type=int, default=8, help="G")
    p.add_argument("--rollout-cpus", type=float, default=1.0, help="CPUs per Ray rollout worker")
    p.add_argument("--seconds", type=float, default=30.0, help="measured window per side")
    p.add_argument("--warmup", type=float, default=8.0, help="seconds run before the window opens")
    p.add_argument("--scenes", type=int, default=16, help="generated scenes")
    p.add_argument("--object-store-mb", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=1, help="rounds of (Ray, without Ray); medians reported")
    p.add_argument("--skip-single", action="store_true", help="skip the one-worker in-process reference")
    p.add_argument("--override", nargs="*", default=[], help="Hydra overrides of conf/train.yaml")
    p.add_argument("--out", default="runs/bench_collection.json")
    a = p.parse_args()
    B, G = a.envs_per_worker, a.group_size
    if a.workers < 1 or G < 1 or B < G or B % G:
        p.error(f"--envs-per-worker={B} must be a positive multiple of --group-size={G}, "
                f"and --workers={a.workers} at least 1")
    if a.seconds <= 0 or a.warmup < 0 or a.repeats < 1:
        p.error("--seconds must be > 0, --warmup >= 0 and --repeats >= 1")
    args = vars(a)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    from envs.drivesim.generate import GeneratorConfig, generate_scene_set

    with tempfile.TemporaryDirectory(prefix="bench-collection-") as tmp:
        scene_set = generate_scene_set(a.scenes, Path(tmp) / "scenes", seed=0,
                                       cfg=GeneratorConfig(num_agents=16))
        cfg = build_configs(a.override, str(Path(tmp, "scenes").resolve()), list(scene_set.ids))
        flat = starting_weights(cfg["policy"])
        load_before = os.getloadavg()
        # the two sides alternate, so that a change of load on a shared machine hits both alike
        rounds: list[dict[str, Any]] = []
        for r in range(a.repeats):
            ray_side = measure_ray(cfg, flat, args, str(Path(tmp) / f"run{r}"))
            print(f"round {r} ray:", json.dumps(ray_side), flush=True)
            local_side = measure_local(cfg, flat, args, processes=a.workers)
            print(f"round {r} without ray:", json.dumps(local_side), flush=True)
            rounds.append({"ray": ray_side, "local_processes": local_side, "loadavg": os.getloadavg(),
                           "efficiency": ray_side["env_steps_per_s"] / local_side["env_steps_per_s"],
                           "cpu_efficiency": ray_side["env_steps_per_cpu_s"]
                           / local_side["env_steps_per_cpu_s"]})
        single = None if a.skip_single else measure_local(cfg, flat, args, processes=0)
        if single:
            print("one worker, this process:", json.dumps(single), flush=True)
        load_after = os.getloadavg()
    ray_rate = statistics.median(r["ray"]["env_steps_per_s"] for r in rounds)
    local_rate = statistics.median(r["local_processes"]["env_steps_per_s"] for r in rounds)
    summary = {
        "efficiency": statistics.median(r["efficiency"] for r in rounds),
        "efficiency_per_round": [r["efficiency"] for r in rounds],
        "ray_env_steps_per_s": ray_rate,
        "ray_decisions_per_s": ray_rate / cfg["decision_every"],
        "local_env_steps_per_s": local_rate,
        # env-steps per CPU-second of each side's whole process tree: robust to other load on the machine
        "cpu_efficiency": statistics.median(r["cpu_efficiency"] for r in rounds),
        "ray_cpu_cores_used": statistics.median(r["ray"]["cpu_cores_used"] for r in rounds),
        "local_cpu_cores_used": statistics.median(r["local_processes"]["cpu_cores_used"] for r in rounds),
    }
    if single:
        summary["local_single_worker_env_steps_per_s"] = single["env_steps_per_s"]
        summary["local_scaling"] = local_rate / (a.workers * single["env_steps_per_s"])
    results = {"rounds": rounds, "local_single_worker": single}
    meta = {
        "machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__, "ray": __import__("ray").__version__,
        "loadavg_before": load_before, "loadavg_after": load_after,
        "policy": {k: cfg["policy"].get(k) for k in ("size", "obs_keys", "horizon", "num_anchors")},
        "parameters": int(flat.size), "decision_every": cfg["decision_every"], "scenes": a.scenes,
    }
    report = {"meta": meta, "args": args, "summary": summary, "results": results}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
