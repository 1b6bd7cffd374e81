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
import ray
import torch

from alpagym_ray import columns as C
from alpagym_ray.observations import mask_key
from alpagym_ray.targets import import_target, instantiate


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
    ):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        from rewards.compute import RewardFn  # composition inside the actor (registries do not travel)

        self.worker_id = worker_id
        self.device = torch.device(device)
        self.group_size = group_size
        self.env = instantiate(env, num_envs=num_envs, device=device)
        self.policy = instantiate(policy).to(self.device).eval()
        self.reward_fn = RewardFn.from_mapping(reward, self.env.metric_aggregations, source="reward config")
        self.broadcaster = broadcaster
        self.version = -1  # a (re)started worker force-pulls
        missing = [k for k in self.policy.obs_keys if k not in self.env.obs_keys]
        if missing:
            raise ValueError(f"policy reads {list(self.policy.obs_keys)} but the env provides "
                             f"{list(self.env.obs_keys)}: missing {missing}")
        self.horizon = int(self.policy.action_spec.horizon)
        self.schema = C.step_schema(self.policy.obs_keys, self.horizon)
        self.episode_schema = C.episode_schema(self.reward_fn.term_names, self.env.metric_names)
        self.flat_tools = import_target("learners.flat_params.load_flat_params")
        self.pull_s = 0.0
        # an mp4 of the first episode of a group every `video_every` versions (envs with render())
        self.video_every = video_every if hasattr(self.env, "render") else 0
        self.video_dir = os.path.join(run_dir, "videos") if run_dir else None
        self.last_video_version = -1

    # ---- weights -------------------------------------------------------------------------
    def pull_if_newer(self, wait: bool = False, timeout_s: float = 300.0) -> int:
        t0 = time.perf_counter()
        while True:
            version, refs = ray.get(self.broadcaster.pull_if_newer.remote(self.version))
            if refs is not None:
                flat = ray.get(refs[0])
                self.flat_tools(self.policy, torch.from_numpy(np.asarray(flat)).to(self.device))
                self.version = version
            if self.version >= 0 or not wait:
                break
            if time.perf_counter() - t0 > timeout_s:
                raise TimeoutError(f"worker {self.worker_id}: no weights published within {timeout_s} s")
            time.sleep(0.05)
        self.pull_s += time.perf_counter() - t0
        return self.version

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
        rec: dict[str, list] = {"alive": [], "obs": [], "action": [], "logp": [], "version": [], "pose": []}
        series: list[dict | None] = [None] * n
        ep_metrics: list[dict | None] = [None] * n
        dec_maps: list[np.ndarray | None] = [None] * n  # tick -> decision, when the env knows it (AlpaSim)
        ticks = 0
        record = (self.video_every > 0 and self.video_dir is not None and self.version >= 0
                  and self.version % self.video_every == 0 and self.version != self.last_video_version)
        frames = []
        while alive.any():
            self.pull_if_newer()
            if record and alive[0]:
                frames.append(self.env.render(0))
            with torch.no_grad():
                action, logp, _ = self.policy.act(obs, generator=gen)
            rec["alive"].append(alive.copy())
            rec["obs"].append({k: obs[k][:n].cpu().numpy() for k in self._obs_columns()})
            rec["action"].append(action[:n].reshape(n, -1).float().cpu().numpy())
            rec["logp"].append(logp[:n].float().cpu().numpy())
            rec["version"].append(self.version)
            obs, _, terminated, truncated, info = self.env.step(action)
            ticks += int(alive.sum()) * self.env.decision_every
            if "ego_pose" in info:
                rec["pose"].append(info["ego_pose"][:n].cpu().numpy())
            ended = ((terminated | truncated)[:n].cpu().numpy()) & alive
            for i in np.nonzero(ended)[0]:
                series[i] = info["episode_series"][i]
                ep_metrics[i] = {k: float(v[i]) for k, v in info["episode_metrics"].items()}
                if "episode_decision_of_tick" in info:
                    dec_maps[i] = np.asarray(info["episode_decision_of_tick"][i])
            alive &= ~ended
        if record and frames:
            self.last_video_version = self.version
            self._write_video(frames, f"v{self.version:05d}_{requests[0].group_id}.mp4")
        return self._to_arrow(requests, rec, series, ep_metrics, dec_maps, ticks, time.perf_counter() - t_start)

    def _write_video(self, frames: list[Any], name: str) -> None:
        import imageio.v2 as imageio

        assert self.video_dir is not None  # checked by the caller
        os.makedirs(self.video_dir, exist_ok=True)
        fps = max(1, 10 // self.env.decision_every)
        try:
            imageio.mimwrite(os.path.join(self.video_dir, name), frames, fps=fps, macro_block_size=1)
        except Exception as e:  # a video is a nicety: never fail the group for it
            print(f"worker {self.worker_id}: video {name} not written ({type(e).__name__}: {e})", flush=True)

    def _obs_columns(self) -> list[str]:
        return [c for k in self.policy.obs_keys for c in (k, mask_key(k))]

    def _to_arrow(self, requests, rec, series, ep_metrics, dec_maps, ticks, wall_s):
        G = self.group_size
        alive = np.stack(rec["alive"], 1)                     # [n, D]
        versions = np.asarray(rec["version"], dtype=np.int64)  # [D]
        metas, batches = [], []
        for g, req in enumerate(requests):
            rows_env, rows_dec, ep_ids, rewards, returns, term_rows = [], [], [], [], [], []
            ep_rows: dict[str, list] = {f.name: [] for f in self.episode_schema}
            for j in range(G):
                i = g * G + j
                decisions = np.nonzero(alive[i])[0]
                D = len(decisions)
                dec_of_tick = dec_maps[i] if dec_maps[i] is not None else (
                    np.arange(len(series[i]["eval_relevant"][0])) // self.env.decision_every)
                result = self.reward_fn.evaluate(series[i], dec_of_tick, D)
                ep_id = f"{req.group_id}/{j}"
                rows_env += [i] * D
                rows_dec += decisions.tolist()
                ep_ids += [ep_id] * D
                rewards.append(result.per_decision)
                returns.append(float(result.total))
                term_rows.append(result.terms)
                pose = np.stack([p[i] for p in rec["pose"][: D]]) if rec["pose"] else np.zeros((0, 3))
                for name, value in (
                    (C.EPISODE_ID, ep_id), (C.GROUP_ID, req.group_id), (C.SCENE_ID, req.options.get("scene_id", "")),
                    (C.START_STEP, int(req.options.get("start_step", 0))), (C.SEED, int(req.seed)),
                    (C.RETURN, float(result.total)), (C.NUM_DECISIONS, D),
                    (C.VERSION_FIRST, int(versions[decisions].min())), (C.VERSION_LAST, int(versions[decisions].max())),
                    (C.WORKER_ID, self.worker_id), (C.WALL_S, wall_s), (C.STATUS, "ok"),
                    (C.TRAJ_X, pose[:, 0].tolist()), (C.TRAJ_Y, pose[:, 1].tolist()), (C.TRAJ_YAW, pose[:, 2].tolist()),
                ):
                    ep_rows[name].append(value)
                for t in self.reward_fn.term_names:
                    ep_rows[C.TERM_PREFIX + t].append(float(result.terms[t]))
                for m in self.env.metric_names:
                    ep_rows[C.METRIC_PREFIX + m].append(float(ep_metrics[i].get(m, np.nan)))
            rows_env_a, rows_dec_a = np.asarray(rows_env), np.asarray(rows_dec)
            cols: dict[str, Any] = {
                C.EPISODE_ID: ep_ids, C.GROUP_ID: [req.group_id] * len(ep_ids),
                C.SCENE_ID: [req.options.get("scene_id", "")] * len(ep_ids),
                C.STEP: rows_dec_a.astype(np.int32), C.POLICY_VERSION: versions[rows_dec_a],
                C.ACTION: np.stack([rec["action"][d][e] for e, d in zip(rows_env_a, rows_dec_a, strict=True)]),
                C.LOGP_BEHAVIOR: np.asarray([rec["logp"][d][e] for e, d in zip(rows_env_a, rows_dec_a, strict=True)],
                                            dtype=np.float32),
                C.REWARD: np.concatenate(rewards).astype(np.float32),
                C.DONE: np.concatenate([np.arange(len(r)) == len(r) - 1 for r in rewards]),
            }
            for key in self._obs_columns():
                cols[C.obs_column(key)] = np.stack([rec["obs"][d][key][e] for e, d in zip(rows_env_a, rows_dec_a,
                                                                                          strict=True)])
            batches.append(C.build_step_batch(self.schema, cols))
            episodes = pa.RecordBatch.from_pydict(ep_rows, schema=self.episode_schema)
            metas.append(GroupMeta(
                req.group_id, True, returns, int(versions[rows_dec_a].min()), int(versions[rows_dec_a].max()),
                len(ep_ids), episodes, worker_id=self.worker_id, env_steps=ticks // max(len(requests), 1),
                wall_s=wall_s, reward_terms={t: [r[t] for r in term_rows] for t in self.reward_fn.term_names}))
        return metas, batches
