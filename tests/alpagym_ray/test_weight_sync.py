"""The collective weight path (alpagym_ray/weight_sync.py) on CPU with gloo: a WeightSender in the test
process, WeightReceiver actors, the WeightBroadcaster as control plane. Exact delivery over several
bucketed versions, a restarted receiver, a member that never joins, and same-device members."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import ray
import torch
from torch import nn

from alpagym_ray.flat_params import flat_size, flatten_params, load_flat_params
from alpagym_ray.weight_sync import WeightReceiver, WeightSender, bucket_layout
from alpagym_ray.weights import SyncMember, WeightBroadcaster, plan_group

SIZES = (4000, 3000, 3007)   # 10007 float32 in three tensors
BUCKET_BYTES = 4096          # 1024 floats per bucket: 10 buckets, the last one of 791


class Model(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.parts = nn.ParameterList(nn.Parameter(torch.randn(n, generator=gen)) for n in SIZES)


def weights(version: int) -> torch.Tensor:
    """The flat weights the learner publishes as ``version`` (different for every version)."""
    model = Model(seed=100 + version)
    return flatten_params(model)


class ReceiverActor:
    """A rollout worker reduced to its weight path: a model loaded through ``WeightReceiver.poll``."""

    def __init__(self, broadcaster, worker_id: str, device_key: str | None = None):
        torch.set_num_threads(1)
        self.model = Model(seed=1)
        self.version = -1
        self.receiver = WeightReceiver(broadcaster, worker_id, "cpu", device_key=device_key, poll_interval_s=0.01)

    def _load(self, flat: torch.Tensor) -> None:
        load_flat_params(self.model, flat)

    def wait_for(self, version: int, timeout_s: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while self.version < version and time.monotonic() < deadline:
            got = self.receiver.poll(self.version, self._load, wait_s=0.2)
            if got is not None:
                self.version = got
        return self.state()

    def poll_now(self) -> int | None:
        """One poll between decisions: must return at once."""
        got = self.receiver.poll(self.version, self._load)
        if got is not None:
            self.version = got
        return got

    def state(self) -> dict:
        return {"version": self.version, "flat": flatten_params(self.model).numpy().copy(), "pid": os.getpid(),
                **self.receiver.stats()}


def receivers(broadcaster, *specs: tuple[str, str | None], max_restarts: int = 0):
    actor = ray.remote(ReceiverActor).options(num_cpus=0, max_restarts=max_restarts)
    handles = [actor.remote(broadcaster, wid, key) for wid, key in specs]
    ray.get([h.state.remote() for h in handles])  # constructed: registered with the broadcaster
    return handles


def broadcaster():
    return ray.remote(WeightBroadcaster).options(num_cpus=0).remote()


def assert_holds(state: dict, version: int) -> None:
    assert state["version"] == version, state
    np.testing.assert_array_equal(state["flat"], weights(version).numpy())


# ---- pure logic ------------------------------------------------------------------------------
def test_bucket_layout_covers_the_buffer_with_a_ragged_last_bucket():
    layout = bucket_layout(flat_size(Model()), BUCKET_BYTES // 4)
    assert len(layout) == 10 and layout[-1] == (9216, 791)
    assert all(o == i * 1024 for i, (o, _) in enumerate(layout)) and sum(n for _, n in layout) == 10007
    assert bucket_layout(0, 4) == [] and bucket_layout(8, 4) == [(0, 4), (4, 4)]
    with pytest.raises(ValueError, match="bucket_numel=0"):
        bucket_layout(10, 0)


def member(wid: str, key: str, device_type: str = "cuda", seq: int = 0, excluded: bool = False) -> SyncMember:
    return SyncMember(wid, "inc", key, device_type, seq, registered_at=0.0, excluded_until=5 if excluded else None)


def test_plan_group_keeps_shared_devices_cpu_nccl_members_and_excluded_ones_on_the_object_store():
    members = [member("a", "gpu1", seq=1), member("b", "gpu1", seq=2), member("c", "gpu0", seq=3),
               member("d", "cpu-d", "cpu", seq=4), member("e", "gpu2", seq=5), member("f", "gpu3", seq=6),
               member("g", "gpu4", seq=7, excluded=True)]
    ranks, store = plan_group(members, "gpu0", "nccl")
    assert ranks == {"e": 1, "f": 2}
    assert set(store) == {"a", "b", "c", "d", "g"}
    assert "shares device gpu1 with ['b']" in store["a"] and "same device as the sender" in store["c"]
    assert "nccl" in store["d"] and "excluded" in store["g"]
    ranks, _ = plan_group(members, "gpu0", "gloo")  # gloo takes CPU members
    assert ranks == {"d": 1, "e": 2, "f": 3}
    with pytest.raises(ValueError, match="backend 'mpi'"):
        plan_group(members, "gpu0", "mpi")


def test_control_plane_excludes_a_failed_member_then_reinstates_it_after_it_polls():
    b = WeightBroadcaster()  # the actor class used in-process: the control plane needs no Ray
    b.sync_register_sender("s", "127.0.0.1", 1, "gloo", "cpu-s")
    b.sync_register("w1", "i1", "k1", "cpu")
    b.sync_register("w2", "i2", "k2", "cpu")
    plan = b.sync_begin("s", 1, 10, "torch.float32", 4, 1.0)
    assert plan["ranks"] == {"w1": 1, "w2": 2}
    assert b.sync_poll("w2", "i2", -1)["kind"] == "join" and b.sync_poll("w2", "other", -1) == {"kind": "register"}
    epoch = b.sync_end("s", 1, plan["epoch"], False, ["w2"], "w2 did not join")
    assert epoch == plan["epoch"] + 1 and b.sync_announce is None
    assert b.sync_state()["failures"][-1]["workers"] == ["w2"] and b.sync_state()["failures"][-1]["epoch"] == epoch - 1
    assert b.sync_begin("s", 2, 10, "torch.float32", 4, 1.0)["ranks"] == {"w1": 1}  # w2 has not polled since
    b.sync_end("s", 2, epoch, True)
    assert b.sync_poll("w2", "i2", 2) is None
    plan = b.sync_begin("s", 3, 10, "torch.float32", 4, 1.0)
    assert plan["ranks"] == {"w1": 1, "w2": 2} and plan["epoch"] == epoch + 1  # reinstated: a new epoch
    b.sync_end("s", 3, plan["epoch"], True)
    assert b.highest_version() == 3
    with pytest.raises(ValueError, match="versions only grow"):
        b.sync_begin("s", 3, 10, "torch.float32", 4, 1.0)
    assert b.sync_begin("other", 4, 10, "torch.float32", 4, 1.0) == {"unknown_sender": True}


def test_sender_refuses_bad_arguments():
    with pytest.raises(ValueError, match="backend 'mpi'"):
        WeightSender(None, backend="mpi")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        WeightSender(None, backend="nccl", device="cpu")
    with pytest.raises(ValueError, match="bucket_bytes=0"):
        WeightSender(None, bucket_bytes=0)


# ---- on the Ray session cluster ---------------------------------------------------------------
@pytest.mark.ray
def test_collective_publish_delivers_exact_weights_in_buckets_over_several_versions(ray_session):
    b = broadcaster()
    r = receivers(b, ("w0", None), ("w1", None))
    with WeightSender(b, "gloo", "cpu", bucket_bytes=BUCKET_BYTES, timeout_s=20.0, object_store_every=2) as sender:
        with pytest.raises(ValueError, match="1-D floating tensor"):
            sender.publish(0, torch.zeros(2, 3))
        infos = []
        for version in range(3):
            info = sender.publish(version, weights(version))
            infos.append(info)
            assert info["collective"] and info["members"] == ["w0", "w1"] and info["buckets"] == 10, info
            for state in ray.get([h.wait_for.remote(version) for h in r]):
                assert_holds(state, version)
        # the object-store copy: after the (re)build, then at least every 2 versions
        assert [i["object_store"] for i in infos] == [True, False, True]
        assert ray.get(b.stats.remote())["version"] == 2
        states = ray.get([h.state.remote() for h in r])
        assert all(s["collective"] == 3 and s["object_store"] == 0 and not s["errors"] for s in states), states
        assert ray.get([h.poll_now.remote() for h in r]) == [None, None]  # nothing new: returns None at once
        assert ray.get(b.highest_version.remote()) == 2
    for h in r:
        ray.kill(h)


@pytest.mark.ray
def test_restarted_receiver_reregisters_and_the_group_is_rebuilt(ray_session):
    b = broadcaster()
    r = receivers(b, ("w0", None), ("w1", None), max_restarts=1)
    with WeightSender(b, "gloo", "cpu", bucket_bytes=BUCKET_BYTES, timeout_s=20.0, object_store_every=10) as sender:
        first = sender.publish(0, weights(0))
        assert first["collective"]
        old = ray.get([h.wait_for.remote(0) for h in r])
        ray.kill(r[0], no_restart=False)
        deadline = time.monotonic() + 60
        state = old[0]
        while state["pid"] == old[0]["pid"]:  # ray.kill is asynchronous: wait for the new process
            assert time.monotonic() < deadline, "the receiver actor did not restart"
            try:
                state = ray.get(r[0].state.remote())
            except ray.exceptions.RayActorError:
                time.sleep(0.1)
        assert state["incarnation"] != old[0]["incarnation"]  # its constructor registered again
        assert_holds(ray.get(r[0].wait_for.remote(0)), 0)  # force-pulled from the object store at once
        info = sender.publish(1, weights(1))
        assert info["collective"] and info["rebuilt"] and info["epoch"] > first["epoch"], info
        assert info["members"] == ["w0", "w1"]
        for state in ray.get([h.wait_for.remote(1) for h in r]):
            assert_holds(state, 1)
            assert state["epoch"] == info["epoch"]
    for h in r:
        ray.kill(h)


@pytest.mark.ray
def test_member_that_never_joins_times_out_is_named_and_the_object_store_serves_the_version(ray_session):
    b = broadcaster()
    (r,) = receivers(b, ("w0", None))
    # registered, then never polls or joins (a worker stuck in a long call)
    ray.get(b.sync_register.remote("ghost", "ghost-incarnation", "ghost-device", "cpu"))
    with WeightSender(b, "gloo", "cpu", bucket_bytes=BUCKET_BYTES, timeout_s=1.0, object_store_every=10) as sender:
        with pytest.warns(RuntimeWarning, match="ghost"):
            info = sender.publish(0, weights(0))
        assert not info["collective"] and info["object_store"] and info["failed_workers"] == ["ghost"]
        assert f"epoch {info['epoch']}" in info["error"] and "ghost" in info["error"]
        failure = ray.get(b.sync_state.remote())["failures"][-1]
        assert failure["workers"] == ["ghost"] and failure["epoch"] == info["epoch"] and failure["version"] == 0
        assert ray.get(b.stats.remote())["version"] == 0  # the object-store copy is current
        assert_holds(ray.get(r.wait_for.remote(0)), 0)
        # the next publish rebuilds without the ghost and reaches everybody else over the group
        info = sender.publish(1, weights(1))
        assert info["collective"] and info["members"] == ["w0"] and info["epoch"] > failure["epoch"], info
        assert "ghost" in info["object_store_members"]
        state = ray.get(r.wait_for.remote(1))
        assert_holds(state, 1)
        assert state["collective"] == 1 and state["object_store"] == 1
    ray.kill(r)


@pytest.mark.ray
def test_same_device_members_use_the_object_store(ray_session):
    b = broadcaster()
    # two workers on one (simulated) GPU, another on the sender's GPU: none may join an NCCL-style group
    r = receivers(b, ("w0", "sim-gpu-1"), ("w1", "sim-gpu-1"), ("w2", "sim-gpu-0"))
    with WeightSender(b, "gloo", "cpu", bucket_bytes=BUCKET_BYTES, timeout_s=5.0, device_key="sim-gpu-0") as sender:
        for version in range(2):
            info = sender.publish(version, weights(version))
            assert not info["collective"] and info["object_store"] and info["members"] == [], info
            assert set(info["object_store_members"]) == {"w0", "w1", "w2"}
            assert "shares device sim-gpu-1" in info["object_store_members"]["w0"]
            assert "same device as the sender" in info["object_store_members"]["w2"]
            for state in ray.get([h.wait_for.remote(version) for h in r]):
                assert_holds(state, version)
                assert state["collective"] == 0
    for h in r:
        ray.kill(h)


class CrashingReceiverActor(ReceiverActor):
    """Dies in the middle of the transfer, after the handshake (the case a raw collective hangs on)."""

    def arm(self) -> None:
        from alpagym_ray import weight_sync

        weight_sync._Group.transfer = lambda *args, **kwargs: os._exit(1)


@pytest.mark.ray
def test_member_dying_after_the_handshake_fails_the_transfer_without_hanging(ray_session):
    b = broadcaster()
    (ok,) = receivers(b, ("w0", None))
    crash = ray.remote(CrashingReceiverActor).options(num_cpus=0, max_restarts=0).remote(b, "w1", None)
    ray.get(crash.arm.remote())
    with WeightSender(b, "gloo", "cpu", bucket_bytes=BUCKET_BYTES, timeout_s=3.0) as sender:
        with pytest.warns(RuntimeWarning, match="epoch"):
            info = sender.publish(0, weights(0))
        assert not info["collective"] and info["object_store"] and "w1" in info["error"], info
        assert_holds(ray.get(ok.wait_for.remote(0)), 0)  # the survivor falls back on the object store
        info = sender.publish(1, weights(1))  # w1 is excluded (and dead): the group is w0 alone
        assert info["collective"] and info["members"] == ["w0"], info
        assert_holds(ray.get(ok.wait_for.remote(1)), 1)
    ray.kill(ok)
