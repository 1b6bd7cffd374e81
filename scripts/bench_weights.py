"""Weight publish latency against policy size: learner -> broadcaster -> rollout-worker pull, beside the
floor of one pinned host copy of the same bytes. Writes JSON.

    python scripts/bench_weights.py --params 1e6 4e6 16e6 64e6 128e6 --repeats 5 --out runs/bench_weights.json

Per size (a model of float32 parameters in layer-sized tensors, ``--chunk`` elements at most each):

* **learner** (a Ray actor, model on ``--device``): what ``alpagym_ray.learner._publish`` does:
  ``alpagym_ray.flat_params.flatten_params(model, out=host)`` (the weights copied into one host buffer
  kept from publish to publish, pinned when the model is on CUDA), then
  ``ray.get(broadcaster.publish.remote(version, flat))``: Ray stores the argument in the object store,
  the ``WeightBroadcaster`` actor ``ray.put``s its own copy (so the weights outlive the learner) and
  answers. Timed: ``flatten_s``, ``publish_call_s`` (argument transfer + the broadcaster's put, whose
  own time is ``broadcaster_put_s``).
* **worker** (a Ray actor, model on ``--device``): ``RolloutWorker.pull_if_newer`` itself (one call to
  the broadcaster, ``ray.get`` of the buffer from the object store, ``load_flat_params`` into the
  model): ``pull_s``; then, apart, its two data steps again: ``pull_get_s`` and ``pull_load_s``.
* ``end_to_end_s``: from the driver asking the learner to publish to the worker holding the weights
  (the two calls back to back, driver round trips included).
* **floor**: one copy of the same bytes into pinned host memory (``torch.empty(pin_memory=True)``)
  from the device the learner keeps its weights on when CUDA is available, else a plain host
  ``memcpy`` (``torch.Tensor.copy_``); ``memcpy_s``: host to host always.

Medians over ``--repeats`` after one warm-up publish and pull per size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from torch import nn

from alpagym_ray.flat_params import flatten_params, host_buffer, load_flat_params
from alpagym_ray.rollout_worker import RolloutWorker
from alpagym_ray.weights import ObjectStoreReceiver, WeightBroadcaster


class FlatModel(nn.Module):
    """``num_parameters`` float32 parameters in tensors of at most ``chunk`` elements (random values)."""

    def __init__(self, num_parameters: int, chunk: int, seed: int = 0):
        super().__init__()
        if num_parameters < 1 or chunk < 1:
            raise ValueError(f"FlatModel: num_parameters={num_parameters} and chunk={chunk} must be >= 1")
        gen = torch.Generator().manual_seed(seed)
        rest = num_parameters % chunk
        sizes = [chunk] * (num_parameters // chunk) + ([rest] if rest else [])
        self.layers = nn.ParameterList(nn.Parameter(torch.randn(n, generator=gen)) for n in sizes)


def machine_meta(**extra: Any) -> dict:
    """What a benchmark ran on and which code it measured (plus ``extra``), with the load average after it."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "gpu": gpu, "commit": _commit(), "source_sha": source_sha(), **extra, "loadavg_after": os.getloadavg()}


def write_result(path: str | os.PathLike, result: dict) -> None:
    """A benchmark's result as indented JSON at ``path`` (its folder made if missing)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1))


def finish_result(path: str | os.PathLike | None, result: dict) -> dict:
    """A benchmark's last step: the load average after the run into ``result["meta"]``, the JSON written
    to ``path`` (if any); returns ``result``."""
    result["meta"] |= machine_meta()
    if path:
        write_result(path, result)
    return result


SOURCE_DIRS = ("alpagym_ray", "learners", "envs", "rewards", "scripts")


def source_sha(root: str | None = None) -> str:
    """SHA-256 (16 hex digits) of the project's ``.py`` and ``.yaml`` files, by relative path: names the
    code a benchmark measured where ``git`` cannot (a copy of the working tree whose ``.git`` is stale
    reports an old commit ``+dirty``). ``python scripts/bench_weights.py --source-sha`` prints it for a
    checkout, to match a JSON with its commit."""
    import hashlib

    base = Path(root) if root else Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for d in SOURCE_DIRS:
        for f in sorted(p for p in (base / d).rglob("*") if p.suffix in (".py", ".yaml") and p.is_file()
                        and "results" not in p.parts and "__pycache__" not in p.parts):
            h.update(f.relative_to(base).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _commit() -> str | None:
    """The checkout's commit (with ``+dirty`` for uncommitted changes); None outside a git checkout."""
    import subprocess

    root = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("+dirty" if dirty else "")


class BenchLearner:
    """The learner side of a publish (rank 0 of ``alpagym_ray.learner``)."""

    def __init__(self, num_parameters: int, chunk: int, device: str, broadcaster: Any):
        self.model = FlatModel(num_parameters, chunk).to(device)
        self.device = torch.device(device)
        self.broadcaster = broadcaster
        self.host = host_buffer(self.model)  # as learner rank 0: allocated once, rewritten per publish

    def publish(self, version: int) -> dict[str, float]:
        t0 = time.perf_counter()
        flat = flatten_params(self.model, out=self.host).numpy()   # as learner._publish (synchronised)
        t1 = time.perf_counter()
        answer = ray.get(self.broadcaster.publish.remote(version, flat))
        t2 = time.perf_counter()
        return {"flatten_s": t1 - t0, "publish_call_s": t2 - t1, "broadcaster_put_s": answer["put_s"],
                "learner_publish_s": t2 - t0}

    def checksum(self) -> float:
        return float(flatten_params(self.model).double().sum())


class BenchWorker(RolloutWorker):
    """A rollout worker reduced to its weight path: the real ``pull_if_newer`` into a model of the
    benchmark's size (no env, policy config or reward needed)."""

    def __init__(self, num_parameters: int, chunk: int, device: str, broadcaster: Any):
        # only what pull_if_newer reads (RolloutWorker.__init__ builds an env, policy and reward)
        self.worker_id = "bench"
        self.device = torch.device(device)
        self.policy = FlatModel(num_parameters, chunk, seed=1).to(self.device)
        self.broadcaster = broadcaster
        self.flat_tools = load_flat_params
        self.version = -1
        self.pull_s = 0.0
        self.receiver = ObjectStoreReceiver(broadcaster)  # topology.weight_transport=object_store

    def pull(self) -> dict[str, float]:
        t0 = time.perf_counter()
        version = self.pull_if_newer()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        # the two data steps again, apart: fetch from the object store, copy into the model
        _, refs = ray.get(self.broadcaster.pull_if_newer.remote(-1))
        t2 = time.perf_counter()
        flat = ray.get(refs[0])
        t3 = time.perf_counter()
        load_flat_params(self.policy, torch.from_numpy(np.asarray(flat)).to(self.device))
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t4 = time.perf_counter()
        return {"pull_s": t1 - t0, "pull_get_s": t3 - t2, "pull_load_s": t4 - t3, "version": version}

    def checksum(self) -> float:
        return float(flatten_params(self.policy).double().sum())


def copy_floor(num_parameters: int, device: str, repeats: int) -> dict[str, Any]:
    """Median seconds of one copy of ``4 * num_parameters`` bytes into pinned host memory (from
    ``device`` when CUDA is available), and of a plain host memcpy."""
    def median_time(fn) -> float:
        fn()  # fault the pages in
        out = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return statistics.median(out)

    host_src = torch.randn(num_parameters)
    host_dst = torch.empty(num_parameters)
    result: dict[str, Any] = {"memcpy_s": median_time(lambda: host_dst.copy_(host_src))}
    if torch.cuda.is_available():
        src = host_src.to(device if device.startswith("cuda") else "cuda")
        pinned = torch.empty(num_parameters, pin_memory=True)

        def pinned_copy() -> None:
            pinned.copy_(src, non_blocking=True)
            torch.cuda.synchronize()

        result.update(floor_s=median_time(pinned_copy), floor_kind=f"{src.device} -> pinned host")
    else:
        result.update(floor_s=result["memcpy_s"], floor_kind="host memcpy (no CUDA)")
    return result


def bench_size(num_parameters: int, args: argparse.Namespace, broadcaster: Any, version: int
               ) -> tuple[dict, int]:
    """Publish and pull ``num_parameters`` weights ``--repeats`` times; returns the medians and the
    last version published."""
    opts = {"num_cpus": 0, "num_gpus": 0.5 if args.device.startswith("cuda") else 0}
    build = (num_parameters, args.chunk, args.device, broadcaster)
    learner = ray.remote(BenchLearner).options(**opts).remote(*build)
    worker = ray.remote(BenchWorker).options(**opts).remote(*build)
    samples: list[dict[str, float]] = []
    for i in range(args.repeats + 1):  # the first round is a warm-up
        version += 1
        t0 = time.perf_counter()
        published = ray.get(learner.publish.remote(version))
        pulled = ray.get(worker.pull.remote())
        end_to_end = time.perf_counter() - t0
        if pulled["version"] != version:
            raise RuntimeError(f"worker pulled version {pulled['version']}, expected {version}")
        if i:
            samples.append({**published, **{k: v for k, v in pulled.items() if k != "version"},
                            "end_to_end_s": end_to_end})
    same = ray.get(learner.checksum.remote()) == ray.get(worker.checksum.remote())
    if not same:
        raise RuntimeError(f"{num_parameters} parameters: the worker's weights differ from the learner's")
    for actor in (learner, worker):
        ray.kill(actor)
    result: dict[str, Any] = {"parameters": num_parameters, "bytes": 4 * num_parameters}
    result.update({k: statistics.median(s[k] for s in samples) for k in samples[0]})
    result.update(copy_floor(num_parameters, args.device, args.repeats))
    result["end_to_end_over_floor"] = result["end_to_end_s"] / result["floor_s"]
    result["end_to_end_gb_per_s"] = result["bytes"] / result["end_to_end_s"] / 1e9
    result["floor_gb_per_s"] = result["bytes"] / result["floor_s"] / 1e9
    result["samples"] = samples
    return result, version


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=float, nargs="+", default=[1e6, 4e6, 16e6, 64e6, 128e6],
                   help="policy sizes (float32 parameters)")
    p.add_argument("--chunk", type=int, default=4 * 2**20, help="elements per parameter tensor at most")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the learner and worker keep their models")
    p.add_argument("--out", default="runs/bench_weights.json")
    p.add_argument("--source-sha", action="store_true", help="print this checkout's source_sha and exit")
    args = p.parse_args()
    if args.source_sha:
        print(source_sha())
        return
    sizes = [int(n) for n in args.params]
    if min(sizes) < 1 or args.repeats < 1:
        p.error("--params must be >= 1 and --repeats >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device here")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    torch.set_num_threads(1)
    # live at once at the largest size: the argument object, the broadcaster's copy, one older version
    store = max(512 * 2**20, 4 * 4 * max(sizes))
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=store,
             log_to_driver=False)
    load_before = os.getloadavg()
    results = []
    try:
        broadcaster = ray.remote(WeightBroadcaster).options(num_cpus=0).remote()
        version = -1
        for n in sizes:
            r, version = bench_size(n, args, broadcaster, version)
            print(json.dumps({k: v for k, v in r.items() if k != "samples"}), flush=True)
            results.append(r)
    finally:
        ray.shutdown()
    meta = machine_meta(device=args.device,
                        gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                        object_store_bytes=store, loadavg_before=load_before)
    write_result(args.out, {"meta": meta, "args": vars(args), "results": results})
    columns = ("flatten_s", "publish_call_s", "pull_s", "end_to_end_s", "floor_s")
    print(f"{'params':>12} {'MB':>6} " + " ".join(f"{c[:-2] + ' ms':>14}" for c in columns) + "  x floor")
    for r in results:
        print(f"{r['parameters']:>12,} {r['bytes'] / 1e6:>6.0f} "
              + " ".join(f"{r[c] * 1e3:>14.2f}" for c in columns) + f"  {r['end_to_end_over_floor']:>7.1f}")


if __name__ == "__main__":
    main()
