"""The object-store weight path seen from a rollout worker: ``weights.ObjectStoreReceiver``."""

from __future__ import annotations

import time

import numpy as np
import pytest
import ray

from alpagym_ray.weights import ObjectStoreReceiver, WeightBroadcaster

pytestmark = pytest.mark.ray


def test_object_store_receiver_polls_without_waiting_and_asks_fresh_at_call_start(ray_session):
    broadcaster = ray.remote(WeightBroadcaster).options(num_cpus=0).remote()
    receiver = ObjectStoreReceiver(broadcaster, interval_s=0.01)
    loaded: list[np.ndarray] = []

    def load(flat):
        loaded.append(flat.numpy().copy())

    t0 = time.perf_counter()
    assert receiver.poll(-1, load, wait_s=0.3) is None  # nothing published: waits, then gives up
    assert time.perf_counter() - t0 >= 0.3 and not loaded
    ray.get(broadcaster.publish.remote(0, np.zeros(5, np.float32)))
    assert receiver.poll(-1, load, fresh=True) == 0 and loaded[-1].tolist() == [0.0] * 5
    assert receiver.poll(0, load, fresh=True) is None  # nothing newer
    # between decisions: the first poll only asks; the answer is taken by a later poll
    ray.get(broadcaster.publish.remote(1, np.ones(5, np.float32)))
    assert receiver.poll(0, load) is None
    deadline = time.perf_counter() + 30
    got = None
    while got is None and time.perf_counter() < deadline:
        time.sleep(0.02)
        got = receiver.poll(0, load)
    assert got == 1 and loaded[-1].tolist() == [1.0] * 5 and len(loaded) == 2
    # it asked again with the version it now has: nothing newer arrives, nothing is loaded twice
    time.sleep(0.05)
    assert receiver.poll(1, load) is None and receiver.poll(1, load) is None and len(loaded) == 2
    with pytest.raises(ValueError, match="interval_s=0 must be > 0"):
        ObjectStoreReceiver(broadcaster, interval_s=0)
    ray.kill(broadcaster)
