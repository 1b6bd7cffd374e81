"""The collective weight path against the object-store path, through the same API. Writes JSON.

    python scripts/bench_weight_sync.py --params 1e6 4e6 16e6 --receivers 2 --repeats 5

Backend: ``nccl`` when at least 2 GPUs are visible (the sender on one GPU, each receiver on its own:
``--receivers`` is capped at GPUs - 1), else ``gloo`` on CPU. ``--backend`` forces one.

Per size (float32 parameters in tensors of at most ``--chunk`` elements), a sender actor (learner
rank 0: ``WeightSender.publish(version, flatten_params(model))``) and ``--receivers`` receiver actors
(a rollout worker's weight path: ``WeightReceiver.poll`` loading into a model of the same layout), in
two modes:

* **collective**: every receiver on a device of its own, so all are in the group; the object-store
  copy is refreshed only every ``--object-store-every`` versions (it is counted when it happens).
* **object_store**: every receiver given the sender's device key, so the group is empty and every
  version goes through ``WeightBroadcaster.publish`` and a fetch from the object store (today's path).

Timed per version: ``publish_s`` (the sender's call; with ``handshake_s``, ``broadcast_s``, ``ack_s``,
``put_s`` inside it), ``end_to_end_s`` (from asking the sender to publish to the last receiver having
the version loaded in its model; the same host's clock). Medians over ``--repeats`` after one warm-up
version (which builds the group). The weights are checked equal at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import ray
import torch
from bench_weights import (  # scripts/: the same synthetic model as the object-store benchmark
    FlatModel,
    machine_meta,
    write_result,
)

from alpagym_ray.flat_params import flatten_params, load_flat_params
from alpagym_ray.weight_sync import WeightReceiver, WeightSender
from alpagym_ray.weights import WeightBroadcaster


class BenchSender:
    """Learner rank 0: a model and a ``WeightSender``."""

    def __init__(self, broadcaster: Any, num_parameters: int, chunk: int, backend: str, device: str,
                 bucket_bytes: int, object_store_every: int, device_key: str | None):
        torch.set_num_threads(1)
        self.device = torch.device(device)
        self.model = FlatModel(num_parameters, chunk).to(self.device)
        self.sender = WeightSender(broadcaster, backend, self.device, bucket_bytes=bucket_bytes, timeout_s=120.0,
                                   object_store_every=object_store_every, device_key=device_key)

    def publish(self, version: int) -> dict[str, Any]:
        with torch.no_grad():  # new weights every version
            for p in self.model.parameters():
                p.add_(1.0)
        t0 = time.perf_counter()
        flat = flatten_params(self.model)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        info = self.sender.publish(version, flat)
        return {**info, "flatten_s": t1 - t0, "sender_total_s": time.perf_counter() - t0}

    def checksum(self) -> float:
        return float(flatten_params(self.model).double().sum())

    def close(self) -> None:
        self.sender.close()


class BenchReceiver:
    """A rollout worker's weight path: ``WeightReceiver.poll`` into a model of the same layout."""

    def __init__(self, broadcaster: Any, worker_id: str, num_parameters: int, chunk: int, device: str,
                 device_key: str | None):
        torch.set_num_threads(1)
        self.device = torch.device(device)
        self.model = FlatModel(num_parameters, chunk, seed=1).to(self.device)
        self.version = -1
        self.receiver = WeightReceiver(broadcaster, worker_id, self.device, device_key=device_key,
                                       poll_interval_s=0.005)

    def _load(self, flat: torch.Tensor) -> None:
        load_flat_params(self.model, flat)
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def wait_for(self, version: int, timeout_s: float = 300.0) -> float:
        """Poll until ``version`` is loaded; returns the wall-clock time (``time.time``) it was."""
        deadline = time.monotonic() + timeout_s
        while self.version < version:
            if time.monotonic() > deadline:
                raise TimeoutError(f"receiver: version {version} not received within {timeout_s} s "
                                   f"({self.receiver.stats()})")
            got = self.receiver.poll(self.version, self._load, wait_s=0.5)
            if got is not None:
                self.version = got
        return time.time()

    def checksum(self) -> float:
        return float(flatten_params(self.model).double().sum())

    def stats(self) -> dict[str, Any]:
        return self.receiver.stats()

    def close(self) -> None:
        self.receiver.close()


def bench(num_parameters: int, mode: str, args: argparse.Namespace, gpus_each: float) -> dict[str, Any]:
    """One size, one mode: a fresh broadcaster, sender and receivers; returns the medians."""
    device = "cuda" if args.backend == "nccl" else "cpu"
    shared_key = "bench-shared-device" if mode == "object_store" else None
    opts = {"num_cpus": 0, "num_gpus": gpus_each}
    broadcaster = ray.remote(WeightBroadcaster).options(num_cpus=0).remote()
    receivers = [ray.remote(BenchReceiver).options(**opts).remote(broadcaster, f"w{i}", num_parameters, args.chunk,
                                                                   device, shared_key)
                 for i in range(args.receivers)]
    ray.get([r.stats.remote() for r in receivers])  # registered
    sender = ray.remote(BenchSender).options(**opts).remote(
        broadcaster, num_parameters, args.chunk, args.backend, device, int(args.bucket_mb * 2**20),
        args.object_store_every, shared_key)
    samples = []
    try:
        for version in range(args.repeats + 1):  # version 0 is the warm-up (builds the group)
            t0 = time.time()
            waits = [r.wait_for.remote(version) for r in receivers]
            info = ray.get(sender.publish.remote(version))
            loaded = ray.get(waits)
            if mode == "collective" and not info["collective"]:
                raise RuntimeError(f"{num_parameters} parameters: version {version} missed the group: {info['error']}")
            if version:
                keep = ("publish_s", "flatten_s", "handshake_s", "broadcast_s", "ack_s", "put_s", "plan_s")
                samples.append({**{k: info[k] for k in keep if k in info}, "end_to_end_s": max(loaded) - t0,
                                "object_store": bool(info["object_store"]), "collective": bool(info["collective"])})
        sums = ray.get([sender.checksum.remote(), *[r.checksum.remote() for r in receivers]])
        if any(s != sums[0] for s in sums[1:]):
            raise RuntimeError(f"{num_parameters} parameters, {mode}: receivers' weights differ from the sender's")
        ray.get([sender.close.remote(), *[r.close.remote() for r in receivers]])
    finally:
        for actor in (sender, *receivers, broadcaster):
            ray.kill(actor)
    result: dict[str, Any] = {"parameters": num_parameters, "bytes": 4 * num_parameters, "mode": mode,
                              "receivers": args.receivers, "backend": args.backend if mode == "collective" else "-"}
    for k in samples[0]:
        values = [s[k] for s in samples if k in s]
        if isinstance(values[0], bool):
            result[f"{k}_versions"] = sum(values)
        elif len(values) == len(samples):
            result[k] = statistics.median(values)
    result["end_to_end_gb_per_s"] = result["bytes"] / result["end_to_end_s"] / 1e9
    result["samples"] = samples
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=float, nargs="+", default=[1e6, 4e6, 16e6], help="policy sizes (float32)")
    p.add_argument("--chunk", type=int, default=4 * 2**20, help="elements per parameter tensor at most")
    p.add_argument("--receivers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--bucket-mb", type=float, default=256.0)
    p.add_argument("--object-store-every", type=int, default=1000,
                   help="collective mode: refresh the object-store copy every this many versions")
    p.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto")
    p.add_argument("--modes", nargs="+", choices=["collective", "object_store"], default=["collective", "object_store"])
    p.add_argument("--out", default=None, help="default: scripts/results/bench_weight_sync_<backend>.json")
    args = p.parse_args()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.backend == "auto":
        args.backend = "nccl" if gpus >= 2 else "gloo"
    if args.backend == "nccl":
        if gpus < 2:
            p.error(f"--backend nccl needs at least 2 GPUs, {gpus} visible")
        args.receivers = min(args.receivers, gpus - 1)
    sizes = [int(n) for n in args.params]
    if min(sizes) < 1 or args.repeats < 1 or args.receivers < 1 or args.bucket_mb <= 0:
        p.error("--params, --repeats and --receivers must be >= 1 and --bucket-mb > 0")
    out = Path(args.out or Path(__file__).parent / "results" / f"bench_weight_sync_{args.backend}.json")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    torch.set_num_threads(1)
    store = max(512 * 2**20, 4 * 4 * max(sizes))  # the argument, the broadcaster's copy, an older version
    ray.init(address="local", num_cpus=os.cpu_count() or 2, num_gpus=gpus, include_dashboard=False,
             object_store_memory=store, log_to_driver=False)
    load_before = os.getloadavg()
    results = []
    try:
        for n in sizes:
            for mode in args.modes:
                r = bench(n, mode, args, 1.0 if args.backend == "nccl" else 0.0)
                print(json.dumps({k: v for k, v in r.items() if k != "samples"}), flush=True)
                results.append(r)
    finally:
        ray.shutdown()
    meta = machine_meta(backend=args.backend, gpus=gpus, gpu=torch.cuda.get_device_name(0) if gpus else None,
                        object_store_bytes=store, loadavg_before=load_before)
    write_result(out, {"meta": meta, "args": vars(args), "results": results})
    print(f"{'params':>12} {'MB':>6} {'mode':>12} {'publish ms':>11} {'end-to-end ms':>14} {'GB/s':>6}")
    for r in results:
        print(f"{r['parameters']:>12,} {r['bytes'] / 1e6:>6.0f} {r['mode']:>12} {r['publish_s'] * 1e3:>11.2f} "
              f"{r['end_to_end_s'] * 1e3:>14.2f} {r['end_to_end_gb_per_s']:>6.2f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
