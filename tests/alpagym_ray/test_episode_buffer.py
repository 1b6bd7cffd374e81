"""The episode buffer against stand-in workers: a timed-out iteration can be asked for again."""

from __future__ import annotations

import asyncio

import pyarrow as pa
import pytest
import ray

from alpagym_ray.episode_buffer import EpisodeBuffer
from alpagym_ray.rollout_worker import GroupMeta, GroupRequest

pytestmark = pytest.mark.ray


class GatedWorker:
    """Answers ``run_groups`` only once ``open()`` was called (an async actor: calls interleave)."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()

    def open(self) -> None:
        self.gate.set()

    async def run_groups(self, requests: list[GroupRequest]):
        await self.gate.wait()
        metas = [GroupMeta(r.group_id, True, [0.0, 1.0], 0, 0, 2, None, worker_id="gated") for r in requests]
        return [metas, *[pa.record_batch({"x": [1, 2]}) for _ in requests]]


def test_a_timed_out_iteration_is_assembled_again_on_the_next_request(ray_session):
    worker = ray.remote(GatedWorker).options(num_cpus=0, max_concurrency=8).remote()
    buffer = ray.remote(EpisodeBuffer).options(num_cpus=0, max_concurrency=16).remote(
        [worker], [{"scene_id": "s"}], group_size=2, groups_per_iteration=2, groups_per_call=2)
    ray.get(buffer.start.remote(0, 0))
    with pytest.raises(ray.exceptions.RayTaskError, match="only 0 of 2 groups"):
        ray.get(buffer.take_shard.remote(0, 0, 1, 1, 0.5))
    ray.get(worker.open.remote())
    shard = ray.get(buffer.take_shard.remote(0, 0, 1, 1, 30.0))
    assert sum(len(mb) for mb in shard["minibatches"]) == 2
    stats = ray.get(buffer.stats.remote())
    assert stats["consumed"] == 4 and stats["accounting_ok"]
    for actor in (buffer, worker):
        ray.kill(actor)
