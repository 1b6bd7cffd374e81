"""The collective weight path (issue 8): learner rank 0 -> rollout workers over a gloo / NCCL group.

Why. The object-store path (``alpagym_ray/weights.py``) copies every version to host memory, puts it
in the object store and has every worker fetch it: fine for small policies, slow for large ones on
multi-GPU hosts. Here learner rank 0 broadcasts the flat weight buffer GPU to GPU over NCCL (gloo on
CPU, which is how the tests run it), while the ``WeightBroadcaster`` actor stays the *control plane*:
who is in the group, which version to fetch, who failed. The object-store copy is still kept current
whenever someone needs it.

How.

* **A group of its own.** The sender owns a ``torch.distributed.TCPStore`` (bound to its node IP,
  a free port); each group epoch uses ``PrefixStore(f"alpagym-weights/{sender_id}/{epoch}", store)`` and builds
  ``ProcessGroupGloo`` / ``ProcessGroupNCCL`` objects directly (the "stateless process group" of
  vLLM / OpenRLHF), so torch's default process group (Ray Train's DDP group on the learner) is never
  touched. Ranks: the sender is 0, the members 1..N (``weights.plan_group``).
* **Members.** A ``WeightReceiver`` registers ``(worker id, incarnation, device key)``; a restarted
  worker registers again, which bumps the epoch, and the sender rebuilds the group before its next
  publish. Members that share a device with the sender or with one another (NCCL refuses two ranks of
  one GPU), and CPU members of an NCCL group, stay on the object store.
* **A timed handshake before every transfer.** A raw collective has no timeout and hangs when a peer
  is gone, so no rank enters one before all are known to be there: the sender opens an announcement
  ``(version, epoch, numel, dtype, bucket size)`` at the broadcaster; each member's background thread
  sees it (``sync_poll``), sets ``v{version}/ready/{rank}`` in the store and waits for ``v{version}/go``.
  When every ready key is there within ``timeout_s`` the sender writes ``go`` and all ranks broadcast;
  else it writes ``abort`` (the waiting members return at once), records the failure naming the
  missing workers and the epoch, abandons the epoch (they are excluded for a while, the epoch bumps,
  the group is rebuilt at the next publish) and serves this version through the object store. The
  transfer itself runs under a deadline too (per-operation timeouts, plus ``abort()`` of the group
  from a watchdog thread for NCCL), and ends with a ``v{version}/done/{rank}`` key from every member,
  so ``publish`` returns only when every member holds the version -- or after the timeout with the
  object-store fallback, never hanging.
* **Buckets.** The flat buffer travels in slices of ``bucket_bytes`` (default 256 MiB). A member
  receives each slice straight into its one preallocated flat buffer (a contiguous view, no second
  full-size temporary); the slices are issued back to back and waited for together.
* **The object-store copy** (``WeightBroadcaster.publish``) is kept current when any registered worker
  is on the object-store path, after every epoch change (a worker (re)joined or failed), when the
  transfer failed, when no member is in the group, and at least every ``object_store_every`` versions,
  so that a restarted worker can always force-pull something recent at once.
* **Workers never block between decisions.** The receiver's background thread does the control plane
  and the transfers; ``poll()`` only takes the newest completed buffer (a non-blocking lock try) and
  loads it into the caller's model between decisions, never mid-forward. An idle worker (waiting for
  its next groups) still takes part in every transfer.

Usage (learner rank 0 and a rollout worker)::

    from alpagym_ray.flat_params import flatten_params, load_flat_params
    from alpagym_ray.weight_sync import WeightReceiver, WeightSender

    # learner rank 0 only, once (topology.weight_backend / weight_bucket_mb / weight_timeout_s /
    # weight_object_store_every)
    sender = WeightSender(broadcaster, backend="nccl", device=device, bucket_bytes=256 * 2**20,
                          timeout_s=60.0, object_store_every=10)
    # after every iteration, instead of broadcaster.publish(version, numpy buffer):
    info = sender.publish(version, flatten_params(policy))      # a 1-D float tensor on the device
    # info: {"collective": bool, "object_store": bool, "members": [...], "epoch": int, "error": str,
    #        "publish_s": float, ...}; a failed member never raises, it is in info["error"]
    sender.close()                                              # at the end

    # rollout worker, once (instead of pull_if_newer)
    receiver = WeightReceiver(broadcaster, worker_id, device=device)
    load = lambda flat: load_flat_params(policy, flat)          # runs in the caller's thread
    # between decisions: never blocks
    new = receiver.poll(version, load)
    if new is not None:
        version = new
    # before a worker's first decision: wait for some weights
    new = receiver.poll(version, load, wait_s=300.0)
    if new is None:
        raise TimeoutError(...)

Limits. One sender per broadcaster (learner rank 0). NCCL members need distinct GPUs from the sender
and from each other. The store and gloo bind the node IP Ray reports (127.0.0.1 on a local cluster).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import ray
import torch
import torch.distributed as dist

from alpagym_ray.weights import SYNC_BACKENDS

DEFAULT_BUCKET_BYTES = 256 * 2**20
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_OBJECT_STORE_EVERY = 10
STORE_PREFIX = "alpagym-weights"


class WeightSyncError(RuntimeError):
    """A collective transfer failed; ``workers`` are the members known to be at fault (may be empty)."""

    def __init__(self, message: str, workers: list[str] | None = None):
        super().__init__(message)
        self.workers = list(workers or [])


# ---- helpers shared by both sides ------------------------------------------------------------
def bucket_layout(numel: int, bucket_numel: int) -> list[tuple[int, int]]:
    """``[(offset, length)]`` slices of a flat buffer of ``numel`` elements; the last one is ragged."""
    if numel < 0 or bucket_numel < 1:
        raise ValueError(f"bucket_layout: numel={numel} must be >= 0 and bucket_numel={bucket_numel} >= 1")
    return [(o, min(bucket_numel, numel - o)) for o in range(0, numel, bucket_numel)]


def node_ip() -> str:
    """This node's IP as Ray sees it (127.0.0.1 on a local cluster), else loopback."""
    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


def default_device_key(device: torch.device | str) -> str:
    """What identifies the device holding a member's weights: node + GPU UUID for CUDA (two Ray actors
    sharing a GPU see the same UUID), node + process for CPU (CPU processes can share a gloo group)."""
    device = _device(device)
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else socket.gethostname()
    if device.type == "cuda":
        return f"{node}/gpu/{torch.cuda.get_device_properties(device.index).uuid}"
    return f"{node}/{device.type}/{os.getpid()}"


def _device(device: torch.device | str) -> torch.device:
    """``device`` with an explicit CUDA index (``cuda`` means the current device)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"weight sync: {name!r} is not a floating-point torch dtype")
    return dtype


def _listening_socket(host: str) -> socket.socket:
    """A socket listening on ``host`` at a free port: the store binds this address only."""
    family = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(128)
    return sock


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_with_deadline(fn: Callable[[], Any], timeout_s: float, what: str,
                       on_timeout: Callable[[], None] | None = None) -> Any:
    """Run ``fn`` in a helper thread and give up after ``timeout_s``: ``on_timeout`` (the group's
    ``abort``) is called and TimeoutError raised. The caller never waits longer, whatever the backend
    does (a gloo operation also times out by itself; an NCCL one is unblocked by the abort)."""
    out: list[Any] = []
    err: list[BaseException] = []

    def target() -> None:
        try:
            out.append(fn())
        except BaseException as e:  # handed to the caller
            err.append(e)

    thread = threading.Thread(target=target, daemon=True, name=f"alpagym-weight-sync: {what}")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        if on_timeout is not None:
            with contextlib.suppress(Exception):
                on_timeout()
        raise TimeoutError(f"{what}: not done within {timeout_s} s")
    if err:
        raise err[0]
    return out[0] if out else None


class _Group:
    """One epoch's group as seen by one rank: the store prefix, then the backend (built on first use,
    after the handshake, so that every rank is known to be there)."""

    def __init__(self, store: dist.Store, sender_id: str, epoch: int, rank: int, world: int, backend: str,
                 host: str, device: torch.device, timeout_s: float):
        # one prefix per (sender registration, epoch): a rendezvous is never replayed over old keys
        self.store = dist.PrefixStore(f"{STORE_PREFIX}/{sender_id}/{epoch}", store)
        self.epoch, self.rank, self.world, self.backend = epoch, rank, world, backend
        self.host, self.device, self.timeout_s = host, device, timeout_s
        self.pg: Any = None

    def _build(self) -> Any:
        timeout = timedelta(seconds=self.timeout_s)
        if self.backend == "gloo":
            opts = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]  # no public constructor
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=self.host)]
            opts._timeout = timeout
            return dist.ProcessGroupGloo(self.store, self.rank, self.world, opts)
        if not dist.is_nccl_available():
            raise RuntimeError("weight sync: backend 'nccl' requested but this torch build has no NCCL")
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        # a timed-out NCCL operation of this group aborts its communicator and raises here instead of
        # tearing the process down (the default); read once, when the group is constructed
        with _env(TORCH_NCCL_ASYNC_ERROR_HANDLING="2"):
            return dist.ProcessGroupNCCL(self.store, self.rank, self.world, opts)

    def transfer(self, flat: torch.Tensor, layout: list[tuple[int, int]]) -> None:
        """Broadcast ``flat`` from rank 0 in ``layout`` slices (in place on the receivers)."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # the current device is per thread
        if self.pg is None:
            self.pg = self._build()
        timeout = timedelta(seconds=self.timeout_s)
        works = [self.pg.broadcast(flat[o:o + n], 0, timeout) for o, n in layout]
        for w in works:
            w.wait(timeout)

    def abort(self) -> None:
        if self.pg is not None and self.backend == "nccl":
            self.pg.abort()

    def close(self) -> None:
        """Drop the backend. NCCL communicators are aborted (a local call: a graceful destroy is an
        intra-node collective that would hang on a dead peer); gloo's are released with the last
        reference (a worker thread still in an operation ends by that operation's timeout)."""
        pg, self.pg = self.pg, None
        if pg is not None and self.backend == "nccl":
            with contextlib.suppress(Exception):
                pg.abort()


def _keys(version: int, rank: int | None = None) -> dict[str, str]:
    r = "" if rank is None else str(rank)
    return {"ready": f"v{version}/ready/{r}", "go": f"v{version}/go", "done": f"v{version}/done/{r}"}


# ---- learner rank 0 --------------------------------------------------------------------------
class WeightSender:
    """Learner rank 0's end of the collective path. See the module docstring.

    Args:
        broadcaster: the ``WeightBroadcaster`` actor handle.
        backend: ``"nccl"`` (GPU members; ``publish`` takes a CUDA tensor) or ``"gloo"`` (CPU: the
            buffer is moved to host memory first).
        device: where the learner keeps its weights (identifies the sender's GPU: members on it use
            the object store).
        bucket_bytes: bytes per broadcast slice.
        timeout_s: how long the handshake may take, and then the transfer with its acknowledgement: a
            publish returns within about 2 x ``timeout_s`` (plus the object-store put) at worst.
        object_store_every: keep the object-store copy at most this many versions old.
        host: address of the rendezvous store (default: this node's IP as Ray reports it).
        device_key: overrides the sender's device identity (tests simulate GPUs with it).
        control_timeout_s: timeout of each control call to the broadcaster.
    """

    def __init__(self, broadcaster: Any, backend: str = "gloo", device: torch.device | str = "cpu", *,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, timeout_s: float = DEFAULT_TIMEOUT_S,
                 object_store_every: int = DEFAULT_OBJECT_STORE_EVERY, host: str | None = None,
                 device_key: str | None = None, control_timeout_s: float = 30.0):
        if backend not in SYNC_BACKENDS:
            raise ValueError(f"WeightSender: backend {backend!r} is not one of {SYNC_BACKENDS}")
        if int(bucket_bytes) < 8:
            raise ValueError(f"WeightSender: bucket_bytes={bucket_bytes} must be >= 8")
        if not timeout_s > 0 or not control_timeout_s > 0:
            raise ValueError(f"WeightSender: timeout_s={timeout_s} and control_timeout_s={control_timeout_s} "
                             "must be > 0")
        if int(object_store_every) < 1:
            raise ValueError(f"WeightSender: object_store_every={object_store_every} must be >= 1")
        self.device = _device(device)
        if backend == "nccl" and self.device.type != "cuda":
            raise ValueError(f"WeightSender: backend 'nccl' needs a CUDA device, got {self.device}")
        self.broadcaster = broadcaster
        self.backend = backend
        self.bucket_bytes = int(bucket_bytes)
        self.timeout_s = float(timeout_s)
        self.object_store_every = int(object_store_every)
        self.control_timeout_s = float(control_timeout_s)
        self.host = host or node_ip()
        self.device_key = device_key or default_device_key(self.device)
        self.sender_id = ""  # a fresh id per registration: store prefixes are never reused
        sock = _listening_socket(self.host)
        self.port = int(sock.getsockname()[1])
        self._store = dist.TCPStore(self.host, self.port, is_master=True, timeout=timedelta(seconds=self.timeout_s),
                                    wait_for_workers=False, master_listen_fd=sock.detach())
        self._group: _Group | None = None
        self._epoch: int | None = None
        self._spent: set[int] = set()  # epochs whose group was built and dropped (this registration)
        self._last_store_version = -1
        self._stale_keys: deque[tuple[_Group, list[str]]] = deque()
        self.history: deque[dict] = deque(maxlen=100)
        self._closed = False
        self._register()

    def _call(self, ref: ray.ObjectRef, what: str) -> Any:
        try:
            return ray.get(ref, timeout=self.control_timeout_s)
        except ray.exceptions.GetTimeoutError as e:
            raise TimeoutError(f"WeightSender {self.sender_id[:8]}: the broadcaster did not answer {what} "
                               f"within {self.control_timeout_s} s") from e

    def _register(self) -> None:
        self._drop_group()
        self.sender_id = uuid.uuid4().hex
        self._epoch = None
        self._spent = set()
        self._call(self.broadcaster.sync_register_sender.remote(self.sender_id, self.host, self.port, self.backend,
                                                                self.device_key), "sync_register_sender")

    def publish(self, version: int, flat: torch.Tensor) -> dict[str, Any]:
        """Deliver ``flat`` (1-D floating tensor, on the learner's device) as ``version`` to every
        member, and to the object store when needed. Never raises for a member's failure: it is
        recorded at the broadcaster and returned under ``error``; the object store then has the
        version. Returns timings and what happened (``collective``, ``object_store``, ``members``,
        ``epoch``, ``error``...)."""
        t0 = time.perf_counter()
        if self._closed:
            raise RuntimeError("WeightSender.publish: the sender is closed")
        if not isinstance(flat, torch.Tensor) or flat.ndim != 1 or not flat.is_floating_point():
            got = f"{type(flat).__name__} {getattr(flat, 'dtype', '')} {list(getattr(flat, 'shape', []))}"
            raise ValueError(f"WeightSender.publish(version={version}): expected a 1-D floating tensor, got {got}")
        if self.backend == "nccl" and flat.device.type != "cuda":
            raise ValueError(f"WeightSender.publish(version={version}): backend 'nccl' needs a CUDA tensor, "
                             f"got one on {flat.device}")
        flat = flat.detach()
        wire = flat.contiguous() if self.backend == "nccl" else flat.to("cpu").contiguous()
        bucket_numel = max(1, self.bucket_bytes // wire.element_size())
        begin = (self.sender_id, int(version), wire.numel(), str(wire.dtype), bucket_numel, self.timeout_s)
        plan = self._call(self.broadcaster.sync_begin.remote(*begin), "sync_begin")
        if plan.get("unknown_sender"):  # e.g. the broadcaster restarted: register again
            self._register()
            plan = self._call(self.broadcaster.sync_begin.remote(*begin), "sync_begin")
        epoch, ranks = int(plan["epoch"]), dict(plan["ranks"])
        rebuilt = epoch != self._epoch
        if rebuilt:
            self._drop_group()
            self._epoch = epoch
        info: dict[str, Any] = {
            "version": int(version), "epoch": epoch, "members": sorted(ranks), "rebuilt": rebuilt,
            "object_store_members": plan["object_store_members"], "collective": False, "object_store": False,
            "error": "", "bytes": wire.numel() * wire.element_size(), "buckets": 0}
        t1 = time.perf_counter()
        failed = False
        if ranks:
            missing: list[str] = []
            try:
                info.update(self._send(int(version), epoch, ranks, wire, bucket_numel))
                info["collective"] = True
            except Exception as e:
                failed = True
                missing = e.workers if isinstance(e, WeightSyncError) else []
                info["error"] = (str(e) if isinstance(e, WeightSyncError) else
                                 f"weight sync epoch {epoch}, version {version}, members {sorted(ranks)}: "
                                 f"{type(e).__name__}: {e}")
                info["failed_workers"] = missing
                self._drop_group()
                warnings.warn(f"{info['error']}; the epoch is abandoned and version {version} goes through the "
                              "object store", RuntimeWarning, stacklevel=2)
            self._call(self.broadcaster.sync_end.remote(self.sender_id, int(version), epoch, not failed, missing,
                                                        info["error"]), "sync_end")
        t2 = time.perf_counter()
        need_store = (not ranks or failed or rebuilt or bool(plan["object_store_members"])
                      or plan["object_store_version"] < 0
                      or version - self._last_store_version >= self.object_store_every)
        if need_store:
            host = wire if wire.device.type == "cpu" else wire.to("cpu")
            answer = ray.get(self.broadcaster.publish.remote(int(version), host.float().numpy()))
            self._last_store_version = int(version)
            info.update(object_store=True, put_s=answer["put_s"])
        t3 = time.perf_counter()
        info.update(plan_s=t1 - t0, collective_s=t2 - t1, object_store_s=t3 - t2, publish_s=t3 - t0)
        self.history.append(info)
        return info

    def _send(self, version: int, epoch: int, ranks: dict[str, int], wire: torch.Tensor,
              bucket_numel: int) -> dict[str, Any]:
        """Handshake, bucketed broadcast, acknowledgement. Raises WeightSyncError naming the workers."""
        if self._group is None and epoch in self._spent:  # e.g. sync_end did not get through after a failure
            raise WeightSyncError(f"weight sync epoch {epoch}, version {version}: this epoch's group was already "
                                  "dropped; abandoning it so that the group is rebuilt under a new epoch")
        if self._group is None:
            self._group = _Group(self._store, self.sender_id, epoch, 0, len(ranks) + 1, self.backend, self.host,
                                 wire.device, self.timeout_s)
        g = self._group
        timeout = timedelta(seconds=self.timeout_s)
        where = f"weight sync epoch {epoch}, version {version}"
        while len(self._stale_keys) > 2:  # the keys of two versions ago: no member reads them any more
            old_group, keys = self._stale_keys.popleft()
            for old_key in keys:
                with contextlib.suppress(Exception):
                    old_group.store.delete_key(old_key)
        k = _keys(version)
        ready = [_keys(version, r)["ready"] for r in ranks.values()]
        done = [_keys(version, r)["done"] for r in ranks.values()]
        self._stale_keys.append((g, [*ready, *done, k["go"]]))
        t0 = time.perf_counter()
        try:
            g.store.wait(ready, timeout)
        except Exception as e:
            missing = [w for w, r in ranks.items() if not g.store.check([_keys(version, r)["ready"]])]
            g.store.set(k["go"], "abort")  # the members already waiting return at once
            raise WeightSyncError(f"{where}: worker(s) {missing} did not join within {self.timeout_s} s "
                                  f"({type(e).__name__})", missing) from e
        t1 = time.perf_counter()
        g.store.set(k["go"], "go")
        layout = bucket_layout(wire.numel(), bucket_numel)
        error = ""
        try:
            _run_with_deadline(lambda: g.transfer(wire, layout), self.timeout_s, f"{where}: broadcast", g.abort)
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
            g.close()  # members still blocked on this rank fail now and report it
        t2 = time.perf_counter()
        # every member confirms (ok or its own error); one that never does is the one at fault
        with contextlib.suppress(Exception):
            g.store.wait(done, timedelta(seconds=max(self.timeout_s - (t2 - t1), 1.0)))
        status = {w: g.store.get(_keys(version, r)["done"]).decode(errors="replace")
                  if g.store.check([_keys(version, r)["done"]]) else None for w, r in ranks.items()}
        missing = sorted(w for w, v in status.items() if v is None)
        bad = {w: v for w, v in status.items() if v not in (None, "ok")}
        if error or missing or bad:
            raise WeightSyncError(
                f"{where}: the transfer to {sorted(ranks)} failed"
                + (f" ({error})" if error else "")
                + (f"; worker(s) {missing} did not confirm it" if missing else "")
                + (f"; failed on {bad}" if bad else ""), missing)
        return {"handshake_s": t1 - t0, "broadcast_s": t2 - t1, "ack_s": time.perf_counter() - t2,
                "buckets": len(layout)}

    def _drop_group(self) -> None:
        if self._group is not None:
            self._group.close()
            self._spent.add(self._group.epoch)  # its store prefix is never rendezvoused over again
            self._group = None

    def close(self) -> None:
        """Leave the broadcaster (members return to the object store) and stop the store."""
        if self._closed:
            return
        self._closed = True
        self._drop_group()
        with contextlib.suppress(Exception):
            self._call(self.broadcaster.sync_unregister_sender.remote(self.sender_id), "sync_unregister_sender")
        self._stale_keys.clear()
        self._store = None  # type: ignore[assignment]

    def __enter__(self) -> WeightSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- rollout worker --------------------------------------------------------------------------
class WeightReceiver:
    """A rollout worker's end of the weight path (collective or object store). See the module docstring.

    A background thread asks the broadcaster every ``poll_interval_s`` for news, joins announced
    transfers (into one preallocated flat buffer) or fetches object-store copies; ``poll()`` hands the
    newest completed version to the caller between decisions.

    Args:
        broadcaster: the ``WeightBroadcaster`` actor handle.
        worker_id: the rollout worker's id (stable across its restarts).
        device: where the worker's policy lives; NCCL transfers land on it, gloo ones in host memory.
        device_key: overrides the device identity (tests simulate two workers on one GPU with it).
        poll_interval_s: how often the background thread asks the broadcaster when nothing is new.
        control_timeout_s: timeout of each control call to the broadcaster.
        fetch_timeout_s: timeout of one object-store fetch.
    """

    def __init__(self, broadcaster: Any, worker_id: str, device: torch.device | str = "cpu", *,
                 device_key: str | None = None, poll_interval_s: float = 0.05, control_timeout_s: float = 30.0,
                 fetch_timeout_s: float = 300.0):
        if not worker_id:
            raise ValueError("WeightReceiver: worker_id must be a non-empty string")
        if not poll_interval_s > 0:
            raise ValueError(f"WeightReceiver({worker_id}): poll_interval_s={poll_interval_s} must be > 0")
        self.broadcaster = broadcaster
        self.worker_id = worker_id
        self.device = _device(device)
        self.device_key = device_key or default_device_key(self.device)
        self.incarnation = uuid.uuid4().hex
        self.poll_interval_s = float(poll_interval_s)
        self.control_timeout_s = float(control_timeout_s)
        self.fetch_timeout_s = float(fetch_timeout_s)
        self.host = node_ip()
        self._cond = threading.Condition(threading.Lock())
        self._ready: tuple[int, torch.Tensor] | None = None  # newest completed version, not yet loaded
        self._have = -1          # newest version received or loaded (guarded by _cond)
        self._buf: torch.Tensor | None = None
        self._group: _Group | None = None
        self._group_key: tuple[str, int] | None = None
        self._spent: set[tuple[str, int]] = set()  # (sender, epoch) groups built and dropped here
        self._stores: dict[tuple[str, int], dist.TCPStore] = {}
        self.counts = {"collective": 0, "object_store": 0, "loads": 0, "aborted": 0, "failures": 0}
        self.errors: deque[str] = deque(maxlen=20)
        self._stop = threading.Event()
        self._register()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"alpagym-weights-{worker_id}")
        self._thread.start()

    # ---- caller side (between decisions) ------------------------------------------------------
    def poll(self, current_version: int, load: Callable[[torch.Tensor], None], wait_s: float = 0.0,
             fresh: bool = False) -> int | None:
        """If a version newer than ``current_version`` has arrived, call ``load(flat)`` with it (a 1-D
        tensor, on ``device`` for NCCL, in host memory otherwise; valid only during the call) and return
        that version; else ``None``. With ``wait_s == 0`` this never blocks (a transfer in progress
        counts as nothing new); with ``wait_s > 0`` it waits up to that long for a newer version.
        ``fresh`` (asked by a call's start, as of ``weights.ObjectStoreReceiver``) changes nothing here:
        the background thread asks continuously, so what has arrived is the latest there is."""
        deadline = time.perf_counter() + max(wait_s, 0.0)
        while True:
            if wait_s > 0:
                acquired = self._cond.acquire(timeout=max(deadline - time.perf_counter(), 0.0))
            else:
                acquired = self._cond.acquire(blocking=False)
            if acquired:
                try:
                    self._have = max(self._have, int(current_version))
                    ready = self._ready
                    if ready is not None and ready[0] > current_version:
                        self._ready = None
                        load(ready[1])
                        self.counts["loads"] += 1
                        return ready[0]
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        return None
                    self._cond.wait(min(remaining, 1.0))
                finally:
                    self._cond.release()
            elif time.perf_counter() >= deadline:
                return None

    def stats(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id, "incarnation": self.incarnation, "device_key": self.device_key,
                "have_version": self._have, "epoch": None if self._group_key is None else self._group_key[1],
                **self.counts, "errors": list(self.errors), "thread_alive": self._thread.is_alive()}

    def close(self) -> None:
        """Stop the background thread and leave the broadcaster."""
        self._stop.set()
        self._thread.join(timeout=self.control_timeout_s)
        with contextlib.suppress(Exception):
            ray.get(self.broadcaster.sync_unregister.remote(self.worker_id, self.incarnation),
                    timeout=self.control_timeout_s)
        self._drop_group()
        self._stores.clear()

    # ---- background thread --------------------------------------------------------------------
    def _register(self) -> None:
        ray.get(self.broadcaster.sync_register.remote(self.worker_id, self.incarnation, self.device_key,
                                                      self.device.type), timeout=self.control_timeout_s)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                reply = ray.get(self.broadcaster.sync_poll.remote(self.worker_id, self.incarnation, self._have),
                                timeout=self.control_timeout_s)
                if reply is None:
                    self._stop.wait(self.poll_interval_s)
                elif reply["kind"] == "join":
                    self._join(reply)
                elif reply["kind"] == "object_store":
                    if self._group_key is not None and self._group_key[1] != reply["epoch"]:
                        self._drop_group()  # that epoch is over (epochs are never reused)
                    self._fetch(reply)
                elif reply["kind"] == "register":
                    self._register()
            except Exception as e:  # recorded; the thread carries on and the next version is asked again
                self.counts["failures"] += 1
                self.errors.append(f"worker {self.worker_id} (epoch {self._group_key and self._group_key[1]}): "
                                   f"{type(e).__name__}: {e}")
                self._stop.wait(self.poll_interval_s)

    def _fetch(self, reply: dict) -> None:
        arr = ray.get(reply["refs"][0], timeout=self.fetch_timeout_s)
        with warnings.catch_warnings():  # the object-store array is read-only; load() only reads it
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.from_numpy(arr)
        with self._cond:
            if reply["version"] > self._have:
                self._ready = (int(reply["version"]), flat)
                self._have = int(reply["version"])
                self.counts["object_store"] += 1
                self._cond.notify_all()

    def _join(self, a: dict) -> None:
        version, epoch, rank = int(a["version"]), int(a["epoch"]), int(a["rank"])
        where = f"worker {self.worker_id}, weight sync epoch {epoch}, version {version}"
        timeout = float(a["timeout_s"])
        if self._group_key != (a["sender_id"], epoch):
            if (a["sender_id"], epoch) in self._spent:  # not joinable again: the sender times out and rebuilds
                raise WeightSyncError(f"{where}: this group was already dropped here; not joining it again")
            self._drop_group()
            addr = (a["host"], int(a["port"]))
            if addr not in self._stores:
                self._stores = {addr: dist.TCPStore(addr[0], addr[1], is_master=False, wait_for_workers=False,
                                                    timeout=timedelta(seconds=timeout))}
            transfer_device = self.device if a["backend"] == "nccl" else torch.device("cpu")
            self._group = _Group(self._stores[addr], a["sender_id"], epoch, rank, int(a["world"]), a["backend"],
                                 self.host, transfer_device, timeout)
            self._group_key = (a["sender_id"], epoch)
        g = self._group
        assert g is not None  # set just above
        dtype, numel = _dtype(a["dtype"]), int(a["numel"])
        k = _keys(version, rank)
        with self._cond:  # poll() sees a transfer in progress and returns at once
            buf = self._buf
            if buf is None or buf.numel() != numel or buf.dtype != dtype or buf.device != g.device:
                self._buf = buf = None  # free the old one first
                self._buf = buf = torch.empty(numel, dtype=dtype, device=g.device)
            if self._ready is not None and self._ready[1] is buf:
                self._ready = None  # about to be overwritten
            try:
                g.store.set(k["ready"], "1")
                g.store.wait([k["go"]], timedelta(seconds=timeout))
                if g.store.get(k["go"]) != b"go":
                    self.counts["aborted"] += 1
                    self._drop_group()  # the sender abandoned this epoch
                    return
                _run_with_deadline(lambda: g.transfer(buf, bucket_layout(numel, int(a["bucket_numel"]))),
                                   timeout, f"{where}: broadcast", g.abort)
            except Exception as e:  # the sender learns it from the done key (or its own timeout)
                with contextlib.suppress(Exception):
                    g.store.set(k["done"], f"{where}: {type(e).__name__}: {e}"[:500])
                self._drop_group()
                raise
            g.store.set(k["done"], "ok")
            self._ready = (version, buf)
            self._have = max(self._have, version)
            self.counts["collective"] += 1
            self._cond.notify_all()

    def _drop_group(self) -> None:
        if self._group is not None:
            self._group.close()
            if self._group_key is not None:
                self._spent.add(self._group_key)  # its store prefix is never rendezvoused over again
            self._group = None
            self._group_key = None
