"""The weight broadcaster (DESIGN.md, "Weights"): one Ray actor owning the latest policy weights.

Object-store path (every topology). The learner hands it ``(version, flat float32 numpy buffer)``; the
broadcaster ``ray.put``s the buffer itself, so the published weights are owned by this actor and
survive a learner crash (ray_notes.md: an object dies with its owner). Rollout workers call
``pull_if_newer(my_version)`` between decisions and fetch the buffer once per version. Versions only
grow: a publish at or below the current version is refused, and ``highest_version`` lets a restarted
learner continue above it.

Collective path (``topology.weight_transport: collective``, ``alpagym_ray/weight_sync.py``). The
bytes travel learner rank 0 -> rollout workers over a gloo / NCCL group; this actor is only its
*control plane*, a handful of short calls that never carry weights:

* ``sync_register(worker, incarnation, device_key, device_type)`` (a ``WeightReceiver`` starting;
  a restarted worker registers again under a new incarnation) and ``sync_register_sender`` (the
  ``WeightSender`` of learner rank 0, with the address of its rendezvous store). Every change of the
  membership bumps the **group epoch**; the sender rebuilds its group before its next publish.
* ``sync_begin(sender, version, ...)``: the sender asks who is in the group for this version. The
  answer (``plan_group``) puts every member on the object store that shares a device with the sender
  or with another member (NCCL cannot hold two ranks of one GPU), or cannot use the backend (NCCL
  needs a CUDA device), or is excluded after a failed transfer; the others get ranks 1..N. The
  broadcaster then keeps the *announcement* ``(version, epoch, numel, dtype, bucket size, store
  address, rank)`` open for them.
* ``sync_poll(worker, incarnation, have_version)``: a receiver's background thread asks every few ms:
  ``join`` (an open announcement for it), ``object_store`` (a newer object-store copy), ``register``
  (unknown to this actor, e.g. after a broadcaster restart) or ``None``.
* ``sync_end(sender, version, epoch, ok, missing, reason)``: closes the announcement. A failure is
  recorded (``sync_state()["failures"]``, naming the workers and the epoch), the missing workers are
  excluded for ``2**(k-1)`` versions after their k-th consecutive failure (capped at 64) and until
  they poll again, and the epoch is bumped so that the sender rebuilds.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import asdict, dataclass

import numpy as np
import ray
import torch

SYNC_BACKENDS = ("gloo", "nccl")
MAX_EXCLUDE_VERSIONS = 64
"""A member that keeps failing is retried at least every this many versions."""


@dataclass
class SyncMember:
    """A rollout worker registered for the collective weight path."""

    worker_id: str
    incarnation: str
    """Unique per ``WeightReceiver`` instance: a restarted worker re-registers under a new one."""
    device_key: str
    """Identifies the device holding the worker's weights (node + GPU UUID, or a per-process CPU key)."""
    device_type: str
    """``cuda`` or ``cpu``: NCCL groups take CUDA members only."""
    seq: int
    """Registration order; ranks follow it."""
    registered_at: float
    last_seen: float = 0.0
    polls: int = 0
    fails: int = 0
    """Consecutive failed transfers (reset by a successful one)."""
    excluded_until: int | None = None
    """While set: on the object store until a publish of at least this version (and a poll since)."""
    excluded_at_poll: int = 0


def plan_group(members: list[SyncMember], sender_device_key: str, backend: str
               ) -> tuple[dict[str, int], dict[str, str]]:
    """Who joins the collective group: ``({worker_id: rank 1..N}, {worker_id: why on the object store})``.

    Ranks follow registration order (rank 0 is the sender). A device that holds more than one member
    of the weight path (the sender included) keeps all of them on the object store: NCCL refuses two
    ranks of one GPU in a group."""
    if backend not in SYNC_BACKENDS:
        raise ValueError(f"plan_group: backend {backend!r} is not one of {SYNC_BACKENDS}")
    store: dict[str, str] = {}
    eligible = []
    for m in sorted(members, key=lambda m: m.seq):
        if m.excluded_until is not None:
            store[m.worker_id] = f"excluded after {m.fails} failed transfer(s)"
        elif backend == "nccl" and m.device_type != "cuda":
            store[m.worker_id] = f"device type {m.device_type!r}: the nccl backend moves CUDA tensors only"
        else:
            eligible.append(m)
    shared = Counter(m.device_key for m in eligible)
    ranks: dict[str, int] = {}
    for m in eligible:
        if m.device_key == sender_device_key:
            store[m.worker_id] = f"same device as the sender ({m.device_key})"
        elif shared[m.device_key] > 1:
            others = [o.worker_id for o in eligible if o.device_key == m.device_key and o is not m]
            store[m.worker_id] = f"shares device {m.device_key} with {others}"
        else:
            ranks[m.worker_id] = len(ranks) + 1
    return ranks, store


class WeightBroadcaster:
    def __init__(self) -> None:
        self.version = -1
        self.ref: ray.ObjectRef | None = None
        self.num_parameters = 0
        self.published_at = 0.0
        self.publishes = 0
        # collective control plane (see the module docstring); no weights pass through it
        self.sync_epoch = 0
        self.sync_members: dict[str, SyncMember] = {}
        self.sync_sender: dict | None = None
        self.sync_announce: dict | None = None
        self.sync_failures: deque[dict] = deque(maxlen=100)
        self.collective_version = -1
        self.collective_publishes = 0
        self._seq = 0

    # ---- object-store path -----------------------------------------------------------------
    def publish(self, version: int, flat: np.ndarray) -> dict:
        """Own and serve ``flat`` as ``version``. Returns publish timing (seconds)."""
        t0 = time.perf_counter()
        if version <= self.version:
            raise ValueError(f"publish of version {version} refused: version {self.version} is already "
                             "published (versions only grow)")
        self.ref = ray.put(np.ascontiguousarray(flat, dtype=np.float32))
        self.version = int(version)
        self.num_parameters = int(flat.size)
        self.published_at = time.time()
        self.publishes += 1
        return {"put_s": time.perf_counter() - t0, "version": self.version}

    def pull_if_newer(self, version: int) -> tuple[int, list[ray.ObjectRef] | None]:
        """``(latest version, [ref])`` when newer than ``version``, else ``(version, None)``.
        The ref is wrapped in a list so that Ray hands it over unresolved (no copy here)."""
        if self.ref is not None and self.version > version:
            return self.version, [self.ref]
        return version, None

    def highest_version(self) -> int:
        """The highest version published on either path (a restarted learner continues above it)."""
        return max(self.version, self.collective_version)

    def stats(self) -> dict:
        return {"version": self.version, "num_parameters": self.num_parameters,
                "publishes": self.publishes, "published_at": self.published_at,
                "collective_version": self.collective_version, "collective_publishes": self.collective_publishes,
                "sync_epoch": self.sync_epoch, "sync_failures": len(self.sync_failures)}

    # ---- collective control plane -----------------------------------------------------------
    def _bump(self) -> int:
        self.sync_epoch += 1
        self.sync_announce = None  # an announcement belongs to one epoch
        return self.sync_epoch

    def sync_register_sender(self, sender_id: str, host: str, port: int, backend: str, device_key: str) -> int:
        """Learner rank 0's ``WeightSender``: where its rendezvous store listens. Returns the new epoch."""
        if backend not in SYNC_BACKENDS:
            raise ValueError(f"sync_register_sender: backend {backend!r} is not one of {SYNC_BACKENDS}")
        self.sync_sender = {"sender_id": sender_id, "host": host, "port": int(port), "backend": backend,
                            "device_key": device_key}
        return self._bump()

    def sync_unregister_sender(self, sender_id: str) -> int:
        if self.sync_sender is not None and self.sync_sender["sender_id"] == sender_id:
            self.sync_sender = None
            return self._bump()
        return self.sync_epoch

    def sync_register(self, worker_id: str, incarnation: str, device_key: str, device_type: str) -> int:
        """A ``WeightReceiver`` (re)starting. Returns the new epoch."""
        if not worker_id or not incarnation or not device_key:
            raise ValueError(f"sync_register: worker_id={worker_id!r}, incarnation={incarnation!r} and "
                             f"device_key={device_key!r} must be non-empty")
        self._seq += 1
        now = time.time()
        self.sync_members[worker_id] = SyncMember(worker_id, incarnation, device_key, device_type, self._seq,
                                                  registered_at=now, last_seen=now)
        return self._bump()

    def sync_unregister(self, worker_id: str, incarnation: str) -> int:
        m = self.sync_members.get(worker_id)
        if m is not None and m.incarnation == incarnation:
            del self.sync_members[worker_id]
            return self._bump()
        return self.sync_epoch

    def sync_begin(self, sender_id: str, version: int, numel: int, dtype: str, bucket_numel: int,
                   timeout_s: float) -> dict:
        """Open the announcement of ``version`` for this epoch's group. Returns ``epoch``, ``ranks``
        (worker id -> rank), ``object_store_members`` (worker id -> why) and ``object_store_version``,
        or ``{"unknown_sender": True}`` when the sender must register (again)."""
        if self.sync_sender is None or self.sync_sender["sender_id"] != sender_id:
            return {"unknown_sender": True}
        if version <= self.highest_version():
            raise ValueError(f"sync_begin of version {version} refused: version {self.highest_version()} is "
                             "already published (versions only grow)")
        reinstated = False
        for m in self.sync_members.values():
            if m.excluded_until is not None and version >= m.excluded_until and m.polls > m.excluded_at_poll:
                m.excluded_until = None
                reinstated = True
        if reinstated:
            self._bump()
        ranks, on_store = plan_group(list(self.sync_members.values()), self.sync_sender["device_key"],
                                     self.sync_sender["backend"])
        self.sync_announce = None
        if ranks:
            self.sync_announce = {
                "version": int(version), "epoch": self.sync_epoch, "world": len(ranks) + 1, "ranks": ranks,
                "incarnations": {w: self.sync_members[w].incarnation for w in ranks},
                "numel": int(numel), "dtype": dtype, "bucket_numel": int(bucket_numel),
                "timeout_s": float(timeout_s), **self.sync_sender}
        return {"epoch": self.sync_epoch, "ranks": ranks, "object_store_members": on_store,
                "object_store_version": self.version}

    def sync_end(self, sender_id: str, version: int, epoch: int, ok: bool, missing: list[str] | None = None,
                 reason: str = "") -> int:
        """Close the announcement of ``version``. On failure: record it, exclude ``missing`` for a while
        and bump the epoch (the sender rebuilds before its next publish). Returns the epoch."""
        a = self.sync_announce
        members = list(a["ranks"]) if a is not None and a["version"] == version else []
        if a is not None and a["version"] == version:
            self.sync_announce = None
        if ok:
            self.collective_version = max(self.collective_version, int(version))
            self.collective_publishes += 1
            for w in members:
                if w in self.sync_members:
                    self.sync_members[w].fails = 0
            return self.sync_epoch
        missing = list(missing or [])
        self.sync_failures.append({"epoch": int(epoch), "version": int(version), "sender_id": sender_id,
                                   "workers": missing or members, "missing": missing, "reason": reason,
                                   "time": time.time()})
        for w in missing:
            m = self.sync_members.get(w)
            if m is not None:
                m.fails += 1
                m.excluded_until = int(version) + min(2 ** (m.fails - 1), MAX_EXCLUDE_VERSIONS)
                m.excluded_at_poll = m.polls
        return self._bump()

    def sync_poll(self, worker_id: str, incarnation: str, have_version: int) -> dict | None:
        """A receiver's periodic question: ``{"kind": "join", ...announcement, "rank"}``,
        ``{"kind": "object_store", "version", "refs": [ref], "epoch"}``, ``{"kind": "register"}`` or ``None``."""
        m = self.sync_members.get(worker_id)
        if m is None or m.incarnation != incarnation:
            return {"kind": "register"}
        m.polls += 1
        m.last_seen = time.time()
        a = self.sync_announce
        if (a is not None and a["version"] > have_version and a["incarnations"].get(worker_id) == incarnation):
            public = {k: v for k, v in a.items() if k not in ("ranks", "incarnations")}
            return {"kind": "join", **public, "rank": a["ranks"][worker_id]}
        if self.ref is not None and self.version > have_version:
            return {"kind": "object_store", "version": self.version, "refs": [self.ref], "epoch": self.sync_epoch}
        return None

    def sync_state(self) -> dict:
        """Everything about the collective path, for tests and monitoring."""
        plan: tuple[dict, dict] = ({}, {})
        if self.sync_sender is not None:
            plan = plan_group(list(self.sync_members.values()), self.sync_sender["device_key"],
                              self.sync_sender["backend"])
        return {"epoch": self.sync_epoch, "sender": self.sync_sender,
                "members": {w: asdict(m) for w, m in self.sync_members.items()},
                "ranks": plan[0], "object_store_members": plan[1],
                "announce": None if self.sync_announce is None else dict(self.sync_announce),
                "failures": list(self.sync_failures), "collective_version": self.collective_version,
                "object_store_version": self.version}


class ObjectStoreReceiver:
    """A rollout worker's end of the object-store path, with the ``poll`` of the collective
    ``weight_sync.WeightReceiver``, so the worker handles both transports alike.

    Between decisions ``poll`` never waits: at most one ``pull_if_newer`` question is outstanding
    (``ray.wait(timeout=0)``), asked at most every ``interval_s`` (a new version comes once per learner
    iteration; a question costs ~0.4 ms, so 100 ms keeps it near 1 % of a busy worker). ``fresh=True``
    asks now and waits for the answer: a call starts with the latest weights, which synchronous mode
    (``max_staleness=0``) needs.
    """

    def __init__(self, broadcaster, interval_s: float = 0.1):
        if not interval_s > 0:
            raise ValueError(f"ObjectStoreReceiver: interval_s={interval_s} must be > 0")
        self.broadcaster = broadcaster
        self.interval_s = float(interval_s)
        self._pending: ray.ObjectRef | None = None  # the outstanding question
        self._last_ask = -float("inf")

    def poll(self, current_version: int, load, wait_s: float = 0.0, fresh: bool = False) -> int | None:
        """If the broadcaster holds a version newer than ``current_version``, call ``load(flat)`` (a 1-D
        float32 CPU tensor, valid during the call) and return that version; else ``None``. ``wait_s > 0``
        asks until a newer version exists or ``wait_s`` has passed; ``fresh`` asks once, now."""
        if wait_s > 0 or fresh:
            self._pending = None  # an answer still in flight is superseded by this one
            deadline = time.perf_counter() + wait_s
            while True:
                new = self._take(ray.get(self.broadcaster.pull_if_newer.remote(current_version)),
                                 current_version, load)
                if new is not None or time.perf_counter() >= deadline:
                    return new
                time.sleep(0.05)
        now = time.perf_counter()
        if now - self._last_ask < self.interval_s:
            return None
        self._last_ask = now
        new = None
        if self._pending is not None:
            ready, _ = ray.wait([self._pending], timeout=0)
            if not ready:
                return None
            new = self._take(ray.get(self._pending), current_version, load)
        self._pending = self.broadcaster.pull_if_newer.remote(current_version if new is None else new)
        return new

    @staticmethod
    def _take(answer: tuple[int, list | None], current_version: int, load) -> int | None:
        version, refs = answer
        if refs is None or version <= current_version:
            return None
        load(torch.from_numpy(np.asarray(ray.get(refs[0]))))
        return int(version)

    def close(self) -> None:
        self._pending = None
