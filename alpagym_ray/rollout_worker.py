"""The rollout worker (Ray actor): runs whole GRPO groups through a batched env with its own copy of
the policy, and returns them as compact Arrow RecordBatches.

A *group* is G episodes reset with the same seed and options (same scene, same start), differing
only in the policy's sampling (DESIGN.md, "Groups for any env"). Every decision row carries the
``policy_version`` that acted and the behaviour log-probability; weights are pulled from the
broadcaster between decisions, never during a forward pass.
"""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from alpagym_ray import columns as C
from alpagym_ray.flat_params import load_flat_params
from alpagym_ray.observations import mask_key
from alpagym_ray.precision import autocast, check_precision, maybe_compile, set_matmul_precision
from alpagym_ray.targets import instantiate
from alpagym_ray.weights import ObjectStoreReceiver


@dataclass(frozen=True)
class GroupRequest:
    """One GRPO group to run."""

    group_id: str
    """Unique id (also the prefix of its episode ids)."""
    seed: int
    """Reset seed shared by the group's G episodes (and the sampling stream's root)."""
    options: dict = field(default_factory=dict)
    """Reset options shared by the group (drivesim: ``scene_id``, ``start_step``)."""
    attempt: int = 0
    """Retry counter (a group lost with a dead worker is requested again)."""


@dataclass
class GroupMeta:
    """What the buffer needs to know about a finished group (the decision rows travel separately)."""

    group_id: str
    ok: bool
    returns: list[float]
    version_min: int
    version_max: int
    num_rows: int
    episodes: pa.RecordBatch | None
    error: str = ""
    worker_id: str = ""
    env_steps: int = 0
    wall_s: float = 0.0
    reward_terms: dict[str, list[float]] = field(default_factory=dict)
    phase_s: dict[str, float] = field(default_factory=dict)
    """Seconds per phase of the worker call that ran this group (on the call's first group only)."""


class RolloutWorker:
    def __init__(
        self,
        worker_id: str,
        env: dict,
        policy: dict,
        reward: dict,
        broadcaster: Any,
        group_size: int,
        num_envs: int,
        device: str = "cpu",
        torch_threads: int | None = 1,
        video_every: int = 0,
        run_dir: str | None = None,
        weights: dict | None = None,
        precision: str = "fp32",
        compile_policy: bool = False,
        obs_storage: str = "float32",
    ):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.worker_id = worker_id
        self.device = torch.device(device)
        self.precision = check_precision(precision)  # the learner computes log-probs the same way
        set_matmul_precision(precision)
        self.group_size = group_size
        self.env = instantiate(env, num_envs=num_envs, device=device)
        self.policy = maybe_compile(instantiate(policy).to(self.device).eval(), compile_policy)
        # built inside the actor from its _target_ node (registries do not travel), checked against the env
        self.reward_fn = instantiate(reward, metric_aggregations=self.env.metric_aggregations)
        self.broadcaster = broadcaster
        # where new weights come from: the object store, or a gloo / NCCL group (weight_transport=collective)
        self.receiver: Any = None
        if broadcaster is not None:
            if (weights or {}).get("transport", "object_store") == "collective":
                from alpagym_ray.weight_sync import WeightReceiver

                self.receiver = WeightReceiver(broadcaster, worker_id, device=device)
            else:
                self.receiver = ObjectStoreReceiver(broadcaster)
        self.version = -1  # a (re)started worker force-pulls
        missing = [k for k in self.policy.obs_keys if k not in self.env.obs_keys]
        if missing:
            raise ValueError(f"policy reads {list(self.policy.obs_keys)} but the env provides "
                             f"{list(self.env.obs_keys)}: missing {missing}")
        self.horizon = int(self.policy.action_spec.horizon)
        self.schema = C.step_schema(self.policy.obs_keys, self.horizon, obs_storage)
        self.obs_dtype = C.OBS_STORAGE[obs_storage][1]  # what the rows keep, and so what the policy acts on
        self.episode_schema = C.episode_schema(self.reward_fn.term_names, self.env.metric_names)
        self.flat_tools = load_flat_params
        self.pull_s = 0.0
        self.phase_s: dict[str, float] = {}  # seconds per phase of run_groups (see phase_stats)
        self.profile = False  # synchronise the device at each phase boundary (exact GPU phase times)
        # an mp4 of the first episode of a group every `video_every` versions (envs with render())
        self.video_every = video_every if hasattr(self.env, "render") else 0
        self.video_dir = os.path.join(run_dir, "videos") if run_dir else None
        self.last_video_version = -1

    # ---- weights -------------------------------------------------------------------------
    def pull_if_newer(self, wait: bool = False, timeout_s: float = 300.0) -> int:
        """Ask for newer weights now and load them (``wait``: until some version exists)."""
        t0 = time.perf_counter()
        if self.receiver is not None:
            first = wait and self.version < 0
            new = self.receiver.poll(self.version, self._load_flat, wait_s=timeout_s if first else 0.0, fresh=True)
            if new is not None:
                self.version = new
            elif first:
                raise TimeoutError(f"worker {self.worker_id}: no weights received within {timeout_s} s")
        self.pull_s += time.perf_counter() - t0
        return self.version

    def _poll_weights(self) -> None:
        """Between decisions: load newer weights if they have arrived; never waits (the receivers
        ask in the background or with one outstanding question)."""
        if self.receiver is None:
            return
        t0 = time.perf_counter()
        new = self.receiver.poll(self.version, self._load_flat)
        if new is not None:
            self.version = new
        self.pull_s += time.perf_counter() - t0

    def _load_flat(self, flat: torch.Tensor) -> None:
        self.flat_tools(self.policy, flat.to(self.device))

    def phase_stats(self, reset: bool = False) -> dict[str, float]:
        """Seconds spent per phase since the start (or the last reset): ``policy`` (forward and
        sampling), ``env`` (simulation, metrics, observations), ``record`` (keeping the decision),
        ``gather`` (rows to host), ``reward``, ``assemble`` (Arrow), ``other``; plus ``pull``."""
        out = dict(self.phase_s, pull=self.pull_s)
        if reset:
            self.phase_s.clear()
            self.pull_s = 0.0
        return out

    def set_profile(self, on: bool) -> None:
        self.profile = on

    def ping(self) -> dict:
        return {"worker_id": self.worker_id, "pid": os.getpid(), "version": self.version}

    # ---- groups --------------------------------------------------------------------------
    def run_groups(self, requests: list[GroupRequest]):
        """Run the requested groups; returns ``[metas, steps_1, ..., steps_n]`` (one decision-row
        RecordBatch per group, so the buffer can hand each group to a learner on its own)."""
        try:
            metas, steps = self._run(requests)
        except Exception as e:  # a failed env or policy fails these groups, not the worker
            err = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=5)}"
            metas = [GroupMeta(r.group_id, False, [], -1, -1, 0, None, error=err, worker_id=self.worker_id)
                     for r in requests]
            steps = [None] * len(requests)
        return [metas, *steps]

    def _run(self, requests: list[GroupRequest]):
        t_start = time.perf_counter()
        G, B = self.group_size, self.env.num_envs
        n = len(requests) * G
        if n == 0 or n > B:
            raise ValueError(f"worker {self.worker_id}: {len(requests)} groups of {G} need {n} envs, it has {B}")
        self.pull_if_newer(wait=True)
        seeds = [r.seed for r in requests for _ in range(G)]
        options = [dict(r.options) for r in requests for _ in range(G)]
        seeds += [seeds[0]] * (B - n)       # spare envs repeat the first episode and are discarded
        options += [options[0]] * (B - n)
        obs = self.env.reset(seeds=seeds, options=options)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(int(np.random.SeedSequence([r.seed for r in requests] + [requests[0].attempt])
                            .generate_state(1)[0]))
        alive = np.ones(n, dtype=bool)
        rec = _Recording(self._obs_columns())
        ends: list[dict | None] = [None] * n  # per env: its series, episode metrics, tick -> decision map
        ticks = 0
        record = (self.video_every > 0 and self.video_dir is not None and self.version >= 0
                  and self.version % self.video_every == 0 and self.version != self.last_video_version)
        frames = []
        call_phases: dict[str, float] = {}
        clock = _PhaseClock(call_phases, self.device if self.profile else None)
        while alive.any():
            self._poll_weights()
            if record and alive[0]:
                try:
                    frames.append(self.env.render(0))
                except Exception as e:  # a video is a nicety: never fail the group for it
                    print(f"worker {self.worker_id}: no video for v{self.version} ({type(e).__name__}: {e})",
                          flush=True)
                    record, frames = False, []
                    self.last_video_version = self.version  # not tried again by the next call
            clock.lap("other")
            kept, policy_obs = self._stored(obs)
            with torch.no_grad(), autocast(self.precision, self.device):
                action, logp, _ = self.policy.act(policy_obs, generator=gen)
            clock.lap("policy")
            rec.decision(alive, kept, action[:n].reshape(n, -1), logp[:n], self.version, n)
            clock.lap("record")
            obs, _, terminated, truncated, info = self.env.step(action)
            ticks += int(alive.sum()) * self.env.decision_every
            if "ego_pose" in info:
                rec.pose.append(torch.as_tensor(info["ego_pose"])[:n].clone())
            ended = ((terminated | truncated)[:n].cpu().numpy()) & alive
            for i in np.nonzero(ended)[0]:
                ends[i] = {"series": info["episode_series"][i],
                           "metrics": {k: float(v[i]) for k, v in info["episode_metrics"].items()},
                           "dec_of_tick": (np.asarray(info["episode_decision_of_tick"][i])
                                           if "episode_decision_of_tick" in info else None)}
            alive &= ~ended
            clock.lap("env")
        if record and frames:
            self.last_video_version = self.version
            self._write_video(frames, f"v{self.version:05d}_{requests[0].group_id}.mp4")
        metas, batches = self._to_arrow(requests, rec, ends, ticks, time.perf_counter() - t_start, clock)
        clock.lap("assemble")
        metas[0].phase_s = call_phases
        for k, v in call_phases.items():
            self.phase_s[k] = self.phase_s.get(k, 0.0) + v
        return metas, batches

    def _write_video(self, frames: list[Any], name: str) -> None:
        import imageio.v2 as imageio

        assert self.video_dir is not None  # checked by the caller
        os.makedirs(self.video_dir, exist_ok=True)
        fps = max(1, 10 // self.env.decision_every)
        try:
            imageio.mimwrite(os.path.join(self.video_dir, name), frames, fps=fps, macro_block_size=1)
        except Exception as e:  # a video is a nicety: never fail the group for it
            print(f"worker {self.worker_id}: video {name} not written ({type(e).__name__}: {e})", flush=True)

    def _stored(self, obs: dict) -> tuple[dict, dict]:
        """(the observation as the decision rows keep it, what the policy acts on): with float16
        storage the policy acts on the float16-rounded values widened back, exactly what the learner
        rebuilds from the rows (so log π of acting and learning stay equal)."""
        if self.obs_dtype == torch.float32:
            return obs, obs
        kept = {k: torch.as_tensor(v).to(self.obs_dtype) if k in self.policy.obs_keys else v for k, v in obs.items()}
        return kept, {k: v.float() if k in self.policy.obs_keys else v for k, v in kept.items()}

    def _obs_columns(self) -> list[str]:
        return [c for k in self.policy.obs_keys for c in (k, mask_key(k))]

    def _to_arrow(self, requests: list[GroupRequest], rec: _Recording, ends: list, ticks: int, wall_s: float,
                  clock: _PhaseClock):
        """One decision-row RecordBatch and one GroupMeta (with its episode rows) per group.

        Rows are env-major (episode after episode, decisions in order), so a group's rows are one
        contiguous slice; every column is gathered once for all groups (one device->host copy)."""
        G = self.group_size
        n = len(ends)
        alive = rec.alive_matrix()                               # [n, D] bool: decision d of env i was taken
        counts = alive.sum(1)                                    # [n] decisions per episode
        env_of_row, dec_of_row = np.nonzero(alive)               # env-major row order
        versions = np.asarray(rec.version, dtype=np.int64)       # [D]
        row_version = versions[dec_of_row]
        cols = {key: rec.gather(key, alive) for key in rec.obs_columns}
        action, logp = rec.gather("action", alive), rec.gather("logp", alive).astype(np.float32)
        pose = rec.gather("pose", alive) if rec.pose else np.zeros((len(env_of_row), 3), np.float32)
        clock.lap("gather")
        results = []
        for i in range(n):
            e = ends[i]
            dec_of_tick = e["dec_of_tick"] if e["dec_of_tick"] is not None else (
                np.arange(len(e["series"]["eval_relevant"][0])) // self.env.decision_every)
            results.append(self.reward_fn.evaluate(e["series"], dec_of_tick, int(counts[i])))
        reward = np.concatenate([r.per_decision for r in results]).astype(np.float32)
        clock.lap("reward")
        done = np.zeros(len(env_of_row), dtype=bool)
        row_end = np.cumsum(counts)                              # [n] one past each episode's last row
        done[row_end - 1] = True
        row_start = row_end - counts
        metas, batches = [], []
        for g, req in enumerate(requests):
            lo, hi = int(row_start[g * G]), int(row_end[g * G + G - 1])
            envs = range(g * G, g * G + G)
            ep_ids = [f"{req.group_id}/{j}" for j in range(G)]
            scene_id = req.options.get("scene_id", "")
            ep_rows = np.repeat(np.asarray(ep_ids, dtype=object), counts[g * G:g * G + G])
            step_cols: dict[str, Any] = {
                C.EPISODE_ID: ep_rows, C.GROUP_ID: [req.group_id] * (hi - lo), C.SCENE_ID: [scene_id] * (hi - lo),
                C.STEP: dec_of_row[lo:hi].astype(np.int32), C.POLICY_VERSION: row_version[lo:hi],
                C.ACTION: action[lo:hi], C.LOGP_BEHAVIOR: logp[lo:hi], C.REWARD: reward[lo:hi], C.DONE: done[lo:hi],
                **{C.obs_column(k): v[lo:hi] for k, v in cols.items()},
            }
            batches.append(C.build_step_batch(self.schema, step_cols))
            ep: dict[str, list] = {f.name: [] for f in self.episode_schema}
            for j, i in enumerate(envs):
                r, a, b = results[i], int(row_start[i]), int(row_end[i])
                for name, value in (
                    (C.EPISODE_ID, ep_ids[j]), (C.GROUP_ID, req.group_id), (C.SCENE_ID, scene_id),
                    (C.START_STEP, int(req.options.get("start_step", 0))), (C.SEED, int(req.seed)),
                    (C.RETURN, float(r.total)), (C.NUM_DECISIONS, int(counts[i])),
                    (C.VERSION_FIRST, int(row_version[a:b].min())), (C.VERSION_LAST, int(row_version[a:b].max())),
                    (C.WORKER_ID, self.worker_id), (C.WALL_S, wall_s), (C.STATUS, "ok"),
                    (C.TRAJ_X, pose[a:b, 0]), (C.TRAJ_Y, pose[a:b, 1]), (C.TRAJ_YAW, pose[a:b, 2]),
                ):
                    ep[name].append(value)
                for t in self.reward_fn.term_names:
                    ep[C.TERM_PREFIX + t].append(float(r.terms[t]))
                for m in self.env.metric_names:
                    ep[C.METRIC_PREFIX + m].append(float(ends[i]["metrics"].get(m, np.nan)))
            episodes = pa.RecordBatch.from_pydict(ep, schema=self.episode_schema)
            metas.append(GroupMeta(
                req.group_id, True, [float(results[i].total) for i in envs], int(row_version[lo:hi].min()),
                int(row_version[lo:hi].max()), hi - lo, episodes, worker_id=self.worker_id,
                env_steps=ticks // max(len(requests), 1), wall_s=wall_s,
                reward_terms={t: [results[i].terms[t] for i in envs] for t in self.reward_fn.term_names}))
        return metas, batches


class _Recording:
    """What a batch of episodes did, decision by decision, kept as tensors on the acting device.

    Each decision appends ``[n, ...]`` tensors (cloned: an env may reuse its buffers); at the end
    :meth:`gather` stacks one key to ``[n, D, ...]`` and keeps the rows of decisions actually taken,
    env-major, in one device->host copy -- no per-row Python work."""

    def __init__(self, obs_columns: list[str]):
        self.obs_columns = obs_columns
        self.alive: list[np.ndarray] = []
        self.version: list[int] = []
        self.seq: dict[str, list[torch.Tensor]] = {k: [] for k in [*obs_columns, "action", "logp"]}
        self.pose: list[torch.Tensor] = []
        self.seq["pose"] = self.pose

    def decision(self, alive: np.ndarray, obs: dict, action: torch.Tensor, logp: torch.Tensor, version: int,
                 n: int) -> None:
        self.alive.append(alive.copy())
        self.version.append(version)
        for k in self.obs_columns:
            self.seq[k].append(torch.as_tensor(obs[k])[:n].clone())
        self.seq["action"].append(action.float().clone())
        self.seq["logp"].append(logp.float().clone())

    def alive_matrix(self) -> np.ndarray:
        return np.stack(self.alive, 1)                            # [n, D]

    def gather(self, key: str, alive: np.ndarray) -> np.ndarray:
        seq = self.seq[key]
        n, D = alive.shape
        flat = torch.cat(seq[:D])                                # [D * n, ...] decision-major, no transpose
        env, dec = np.nonzero(alive)                             # env-major rows
        index = torch.from_numpy(dec * n + env).to(flat.device)
        out = flat.index_select(0, index).cpu().numpy()          # [rows, ...] one gather, one copy to host
        seq.clear()                                              # free the device memory as we go
        return out


class _PhaseClock:
    """Adds the time since the last lap to ``totals[name]`` (optionally synchronising the device so
    that asynchronous GPU work is charged to the phase that launched it)."""

    def __init__(self, totals: dict[str, float], sync_device: torch.device | None):
        self.totals, self.t = totals, time.perf_counter()
        self.sync = sync_device is not None and sync_device.type == "cuda"

    def lap(self, name: str) -> None:
        if self.sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.totals[name] = self.totals.get(name, 0.0) + now - self.t
        self.t = now
