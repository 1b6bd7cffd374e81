"""The episode buffer (Ray actor): requests GRPO groups from the rollout workers, admits them under
the staleness bound, and hands every learner rank its equal share of each iteration.

* It *calls* the workers, so it owns the returned objects: a worker that dies takes none of the
  finished data with it (ray_notes.md, "Objects and ownership"); its in-flight groups are requested
  again.
* Admission control (DESIGN.md, "Asynchrony"): the groups of iteration ``i`` (trained on weights
  version ``base + i``) may start only once version ``base + i − max_staleness`` is published, so
  every admitted group is at most ``max_staleness`` versions old when learned. ``max_staleness = 0``
  is synchronous. A group that is still too stale at consumption (e.g. after a learner restart) is
  dropped whole and counted.
* Accounting is exact: every episode returned by a worker is consumed, dropped with a reason
  (``zero_variance``, ``stale``, ``failed``), or still held; ``stats()`` reports the identity.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from ray.exceptions import RayActorError, RayTaskError

from alpagym_ray.episode_writer import EpisodeWriter
from alpagym_ray.rollout_worker import GroupMeta, GroupRequest


@dataclass
class HeldGroup:
    meta: GroupMeta
    steps: ray.ObjectRef
    iteration: int  # the iteration it was admitted for
    arrived: float


class EpisodeBuffer:
    def __init__(
        self,
        workers: list[Any],
        scenes: list[dict],
        group_size: int,
        groups_per_iteration: int,
        groups_per_call: int,
        max_staleness: int = 1,
        run_dir: str | None = None,
        seed: int = 0,
        max_zero_variance_retries: int = 4,
    ):
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        if not scenes:
            raise ValueError("EpisodeBuffer needs at least one scene to request groups for")
        self.workers = list(workers)
        self.scenes = scenes
        self.G = group_size
        self.gpi = groups_per_iteration
        self.per_call = groups_per_call
        self.max_staleness = max_staleness
        self.rng = np.random.default_rng(seed)
        self.seed = seed
        self.run_dir = Path(run_dir) if run_dir else None
        # per-episode Parquet, written by a thread: a write in this event loop blocks the learner and workers
        self.writer = EpisodeWriter(self.run_dir / "episodes") if self.run_dir is not None else None
        self.max_zero_variance_retries = max_zero_variance_retries
        self.base_version: int | None = None
        self.start_iteration = 0
        self.published = -1
        self.next_group = 0
        self.retry_pending: list[tuple[GroupRequest, int]] = []
        self.zero_var_drops: Counter = Counter()
        self.retry: deque[tuple[GroupRequest, int]] = deque()
        self.held: list[HeldGroup] = []
        self.in_flight: dict[int, tuple[list[tuple[GroupRequest, int]], Any]] = {}
        self.shards: dict[int, dict] = {}
        self.counts: Counter = Counter()     # episodes: produced, consumed, dropped_<reason>
        self.events: Counter = Counter()     # worker_failures, group_failures, retries
        self.staleness: list[int] = []
        self.env_steps = 0
        self.decision_rows = 0               # decision rows produced (env_steps / decision_rows = ticks per row)
        self.rollout_wall = 0.0
        self.phase_s: Counter = Counter()   # worker seconds per rollout phase (GroupMeta.phase_s)
        self.t_start = time.time()
        self.task: asyncio.Task | None = None
        self.wake = asyncio.Event()      # something changed for the producer (_fill)
        self.arrived = asyncio.Event()   # a worker call finished (groups held, dropped or failed)
        self.error: str | None = None

    # ---- control from the learner --------------------------------------------------------
    async def start(self, base_version: int, start_iteration: int = 0) -> None:
        """Begin (or re-begin after a learner restart) at weights ``base_version`` for iteration
        ``start_iteration``; groups held from before stay and are judged by their staleness."""
        self.base_version = base_version - start_iteration
        self.start_iteration = start_iteration
        self.published = max(self.published, base_version)
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._fill())
        self.wake.set()

    async def on_published(self, version: int) -> None:
        self.published = max(self.published, version)
        self.wake.set()

    # ---- producing -----------------------------------------------------------------------
    def _admitted(self) -> Counter:
        """Groups per iteration that are held, in flight or queued for a retry (recomputed, so a
        dropped group - zero variance, stale, failed - frees its slot for a replacement)."""
        first = self.start_iteration  # groups admitted for consumed iterations serve the next one
        n: Counter = Counter(max(h.iteration, first) for h in self.held)
        for batch, _ in self.in_flight.values():
            n.update(max(it, first) for _, it in batch)
        n.update(max(it, first) for _, it in self.retry)
        n.update(max(it, first) for _, it in self.retry_pending)
        return n

    def _target_iteration(self) -> int | None:
        """The iteration the next new group would serve, if admission allows starting it now."""
        assert self.base_version is not None
        admitted = self._admitted()
        it = self.start_iteration
        while admitted[it] >= self.gpi:
            it += 1
        if self.published >= self.base_version + it - self.max_staleness:
            return it
        return None

    def _new_request(self) -> GroupRequest:
        scene = self.scenes[int(self.rng.integers(len(self.scenes)))]
        gid = f"g{self.seed}-{self.next_group:07d}"
        self.next_group += 1
        return GroupRequest(group_id=gid, seed=int(self.rng.integers(2**31)), options=dict(scene))

    async def _fill(self) -> None:
        try:
            while True:
                for w, worker in enumerate(self.workers):
                    if w in self.in_flight:
                        continue
                    batch: list[tuple[GroupRequest, int]] = []
                    self.retry_pending = batch  # counted by _admitted while it is being filled
                    while len(batch) < self.per_call and self.retry:
                        batch.append(self.retry.popleft())
                    while len(batch) < self.per_call:
                        it = self._target_iteration()
                        if it is None:
                            break
                        batch.append((self._new_request(), it))
                    self.retry_pending = []
                    if batch:
                        reqs = [r for r, _ in batch]
                        refs = worker.run_groups.options(num_returns=len(reqs) + 1).remote(reqs)
                        self.in_flight[w] = (batch, refs)
                if not self.in_flight:
                    self.wake.clear()
                    await self.wake.wait()
                    continue
                waits = {asyncio.ensure_future(self._await(w, refs[0])): w for w, (_, refs) in self.in_flight.items()}
                wake = asyncio.ensure_future(self.wake.wait())
                done, _ = await asyncio.wait([*waits, wake], return_when=asyncio.FIRST_COMPLETED)
                for fut in waits:
                    if fut not in done:
                        fut.cancel()
                if wake not in done:
                    wake.cancel()
                self.wake.clear()
        except Exception as e:  # surface to the learner instead of hanging it
            import traceback

            self.error = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
            self.arrived.set()

    async def _await(self, w: int, meta_ref) -> None:
        try:
            await self._collect(w, meta_ref)
        finally:
            self.arrived.set()

    async def _collect(self, w: int, meta_ref) -> None:
        batch, refs = self.in_flight[w]
        try:
            metas: list[GroupMeta] = await meta_ref
            if metas:
                self.phase_s.update(metas[0].phase_s)
        except (RayActorError, RayTaskError) as e:
            # the worker died (it restarts by itself): its in-flight groups are requested again
            del self.in_flight[w]
            self.events["worker_failures"] += 1
            for req, it in batch:
                self.events["retries"] += 1
                self.retry.append((GroupRequest(req.group_id, req.seed, req.options, req.attempt + 1), it))
            self.last_worker_error = str(e)[:500]
            return
        del self.in_flight[w]
        for (req, it), meta, steps in zip(batch, metas, refs[1:], strict=True):
            if not meta.ok:
                self.events["group_failures"] += 1
                self.counts["dropped_failed_groups"] += 1
                self.last_group_error = meta.error[:2000]
                if req.attempt < 3:
                    self.retry.append((GroupRequest(req.group_id, req.seed, req.options, req.attempt + 1), it))
                continue
            n = len(meta.returns)
            self.counts["produced"] += n
            self.env_steps += meta.env_steps
            self.decision_rows += meta.num_rows
            self.rollout_wall += meta.wall_s
            self._write_episodes(meta.episodes)
            if np.ptp(meta.returns) <= 1e-9 and self.zero_var_drops[it] < self.max_zero_variance_retries * self.gpi:
                # no learning signal: drop and let admission request a replacement for this iteration
                self.zero_var_drops[it] += 1
                self.counts["dropped_zero_variance"] += n
                continue
            self.held.append(HeldGroup(meta, steps, it, time.time()))

    def _write_episodes(self, episodes: pa.RecordBatch | None) -> None:
        if self.writer is not None and episodes is not None:
            self.writer.write(episodes)

    async def flush_episodes(self, timeout_s: float = 120.0) -> None:
        """Wait (off the event loop) until every episode received so far is in its Parquet file (its
        counts and any write error are in :meth:`stats`)."""
        if self.writer is not None:
            await asyncio.to_thread(self.writer.flush, timeout_s)

    # ---- consuming -----------------------------------------------------------------------
    async def take_shard(self, iteration: int, rank: int, world_size: int, minibatches: int,
                         timeout_s: float = 600.0) -> dict:
        """Rank ``rank``'s share of iteration ``iteration``: ``{"minibatches": [[(meta, steps_ref)...]],
        "global_rows": [rows per minibatch across all ranks], "stats": {...}}``. Every rank gets the
        same number of whole groups per minibatch (decided here, once)."""
        if self.gpi % (world_size * minibatches):
            raise ValueError(f"groups_per_iteration={self.gpi} must be a multiple of learners x minibatches "
                             f"= {world_size} x {minibatches}")
        failed = self.shards.get(iteration)
        if failed is not None and failed["future"].done() and failed["future"].exception() is not None:
            self.shards.pop(iteration)  # a timed-out assembly is tried again by the next caller, not replayed
        if iteration not in self.shards:
            self.shards[iteration] = {"future": asyncio.ensure_future(
                self._assemble(iteration, world_size, minibatches, timeout_s)), "taken": set()}
        entry = self.shards[iteration]
        result = await entry["future"]
        entry["taken"].add(rank)
        if len(entry["taken"]) == world_size:
            self.shards.pop(iteration, None)
        return {"minibatches": result["per_rank"][rank], "global_rows": result["global_rows"],
                "stats": result["stats"]}

    async def _assemble(self, iteration: int, R: int, M: int, timeout_s: float) -> dict:
        assert self.base_version is not None
        t0 = time.time()
        train_version = self.base_version + iteration
        while True:
            self.arrived.clear()  # before looking: a group arriving after this wakes the wait below
            if self.error:
                raise RuntimeError(f"episode buffer failed: {self.error}")
            # stragglers beyond the bound (e.g. from before a learner restart) are dropped whole
            fresh = []
            for h in self.held:
                if train_version - h.meta.version_min > self.max_staleness:
                    self.counts["dropped_stale"] += len(h.meta.returns)
                else:
                    fresh.append(h)
            if len(fresh) < len(self.held):
                self.wake.set()  # their admission slots are free: request replacements
            self.held = fresh
            if len(self.held) >= self.gpi:
                break
            left = timeout_s - (time.time() - t0)
            if left <= 0:
                raise TimeoutError(f"iteration {iteration}: only {len(self.held)} of {self.gpi} groups within "
                                   f"{timeout_s} s (in flight: {len(self.in_flight)}, events: {dict(self.events)})")
            # event-driven, not polled: the learner waits here most of the time
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), timeout=min(left, 1.0))
        self.held.sort(key=lambda h: (h.meta.version_min, h.arrived))
        take, self.held = self.held[: self.gpi], self.held[self.gpi:]
        self.start_iteration = max(self.start_iteration, iteration + 1)
        k = self.gpi // (R * M)
        per_rank: list[list[list[tuple[GroupMeta, ray.ObjectRef]]]] = [[[] for _ in range(M)] for _ in range(R)]
        global_rows = [0] * M
        episode_means = _episode_means([h.meta.episodes for h in take])
        for m in range(M):
            for r in range(R):
                for h in take[(m * R + r) * k:(m * R + r + 1) * k]:
                    h.meta.episodes = None  # already written; keep the shard small
                    per_rank[r][m].append((h.meta, h.steps))
                    global_rows[m] += h.meta.num_rows
        stale = [train_version - h.meta.version_min for h in take]
        self.staleness += stale
        self.counts["consumed"] += sum(len(h.meta.returns) for h in take)
        returns = np.concatenate([h.meta.returns for h in take])
        terms: dict[str, list[float]] = {}
        for h in take:
            for t, v in h.meta.reward_terms.items():
                terms.setdefault(t, []).extend(v)
        stats = {
            "wait_s": time.time() - t0,
            "staleness_p50": float(np.percentile(stale, 50)), "staleness_p99": float(np.percentile(stale, 99)),
            "staleness_max": float(max(stale)), "buffer_groups": len(self.held),
            "return_mean": float(returns.mean()), "return_std": float(returns.std()),
            "terms": {t: float(np.mean(v)) for t, v in terms.items()},
            "episode_means": episode_means,
            **self.stats(),
        }
        self.wake.set()
        return {"per_rank": per_rank, "global_rows": global_rows, "stats": stats}

    # ---- reporting -----------------------------------------------------------------------
    def stats(self) -> dict:
        held = sum(len(h.meta.returns) for h in self.held)
        dropped = {k: v for k, v in self.counts.items() if k.startswith("dropped_") and k != "dropped_failed_groups"}
        return {
            "produced": self.counts["produced"], "consumed": self.counts["consumed"], "held": held,
            **dropped, "failed_groups": self.counts["dropped_failed_groups"],
            "accounting_ok": self.counts["produced"] == self.counts["consumed"] + sum(dropped.values()) + held,
            "env_steps": self.env_steps, "produced_decisions": self.decision_rows, "events": dict(self.events),
            "published": self.published,
            "in_flight": len(self.in_flight),
            "rollout_env_steps_per_s": self.env_steps / max(time.time() - self.t_start, 1e-9),
            "rollout_phase_fraction": {k: v / max(sum(self.phase_s.values()), 1e-9) for k, v in self.phase_s.items()},
            **(self.writer.stats() if self.writer is not None else {}),
        }

    def last_errors(self) -> dict:
        return {"worker": getattr(self, "last_worker_error", ""), "group": getattr(self, "last_group_error", "")}


REPORTED_METRICS = ("collision_any", "collision_at_fault", "offroad", "offroad_or_collision", "scene_score",
                    "progress", "comfort_violation")


def _episode_means(batches: list[pa.RecordBatch | None]) -> dict[str, float]:
    """Means of the headline episode metrics over the given episode batches."""
    out: dict[str, float] = {}
    batches = [b for b in batches if b is not None and b.num_rows]
    if not batches:
        return out
    table = pa.Table.from_batches(batches)
    for m in REPORTED_METRICS:
        col = "metric." + m
        if col in table.column_names:
            v = table.column(col).to_numpy()
            out[m] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
    out["any_failure"] = out.get("offroad_or_collision", float("nan"))
    return out
