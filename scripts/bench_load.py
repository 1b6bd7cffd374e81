"""The learner's load phase: decision rows of whole GRPO groups from the object store to device tensors
(``alpagym_ray.learner.load_groups``), through pinned staging and without. Writes JSON.

    python scripts/bench_load.py --groups 512 --rows-per-group 512 --obs-storage float32 float16 \\
        --repeats 3 --out scripts/results/bench_load.json

Data: per storage (``topology.obs_storage``), ``--groups`` RecordBatches of ``--rows-per-group`` decision
rows of the full drivesim key set (``C.step_schema(ALL_DRIVESIM_KEYS, 20, storage)``), ``ray.put`` one by
one as rollout workers return them; episode ids ``<group>/<j>`` spread over ``--group-size`` episodes.
The observation values are random, drawn once and reused by every group (copies do not depend on
values; every group is its own object, so every load reads distinct memory).

Per (storage, pinned): ``load_groups(entries, ALL_DRIVESIM_KEYS, 20, device, GRPO(), pinned=...)`` on a
side stream as the learner's prefetch runs it, the device synchronised before the clock stops: median
seconds over ``--repeats`` after one warm-up (which allocates the pinned slots), the two modes
interleaved; ``gb_per_s``: the bytes the load uploads (observation values in the stored dtype, masks one
byte a flag, float32 actions) per second. ``breakdown``: one more load in its steps: ``ray.get`` +
``Table.from_batches``, ``pc.index_in`` of the episode ids, ``C.observations``, the action column;
``staging_wait_s``: of that, time the host waited for a slot's transfer (the rest of a staged upload
is the host memcpy into the slots).

``floor``: one ``--floor-mib`` copy host -> host (``torch`` ``copy_``), and on CUDA pageable -> device
and pinned -> device: what the staged path is bounded by (memcpy and DMA overlap, so the slower).

Not measured: the page faults of a learner process that maps objects written by other processes (the
driver here wrote them itself), and transfers between nodes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_weights import finish_result, machine_meta  # noqa: E402

from alpagym_ray import columns as C  # noqa: E402
from alpagym_ray.learner import _side_stream, _synced, load_groups  # noqa: E402
from alpagym_ray.observations import SPECS, mask_key  # noqa: E402
from alpagym_ray.pinned_upload import staging_for  # noqa: E402
from learners.grpo import GRPO  # noqa: E402
from learners.trajectory_policy import ALL_DRIVESIM_KEYS  # noqa: E402

HORIZON = 20


@dataclass
class Meta:
    """What ``load_groups`` reads of a ``GroupMeta``."""

    group_id: str
    returns: list[float]


def uploaded_bytes_per_row(storage: str) -> int:
    """Bytes one decision row puts on the device through ``column_to``: observation values in the stored
    dtype, one byte per mask flag, the float32 action."""
    item = torch.empty(0, dtype=C.OBS_STORAGE[storage][1]).element_size()
    per = sum(int(np.prod(SPECS[k].shape)) * item + SPECS[k].shape[0] for k in ALL_DRIVESIM_KEYS)
    return per + HORIZON * 3 * 4


def put_groups(storage: str, groups: int, rows: int, group_size: int,
               seed: int = 0) -> list[tuple[Meta, ray.ObjectRef]]:
    """``groups`` decision-row batches in the object store, as ``(meta, ref)`` entries of ``load_groups``."""
    rng = np.random.default_rng(seed)
    schema = C.step_schema(ALL_DRIVESIM_KEYS, HORIZON, storage)
    npdt = np.float16 if storage == "float16" else np.float32
    shared = {C.ACTION: rng.standard_normal((rows, HORIZON, 3), np.float32),
              C.STEP: np.arange(rows, dtype=np.int32), C.POLICY_VERSION: np.zeros(rows, np.int64),
              C.LOGP_BEHAVIOR: np.zeros(rows, np.float32), C.REWARD: np.zeros(rows, np.float32),
              C.DONE: np.zeros(rows, bool)}
    for k in ALL_DRIVESIM_KEYS:
        shared[C.obs_column(k)] = rng.standard_normal((rows, *SPECS[k].shape), np.float32).astype(npdt)
        shared[C.obs_column(mask_key(k))] = rng.random((rows, SPECS[k].shape[0])) > 0.1
    episode_of_row = np.arange(rows) * group_size // rows  # contiguous runs of rows per episode
    entries = []
    for g in range(groups):
        gid = f"g{g}"
        cols = dict(shared, **{C.EPISODE_ID: [f"{gid}/{j}" for j in episode_of_row], C.GROUP_ID: [gid] * rows,
                               C.SCENE_ID: ["scene"] * rows})
        meta = Meta(gid, rng.standard_normal(group_size).tolist())
        entries.append((meta, ray.put(C.build_step_batch(schema, cols))))
    return entries


def time_load(entries, device: torch.device, pinned: bool) -> float:
    """Seconds of one ``load_groups`` (on a side stream, as the learner), device work included."""
    t0 = _synced(device)
    with _side_stream(device):
        out = load_groups(entries, ALL_DRIVESIM_KEYS, HORIZON, device, GRPO(), pinned=pinned)
    dt = _synced(device) - t0
    del out
    return dt


def breakdown(entries, device: torch.device, pinned: bool) -> dict[str, float]:
    """One load in ``load_groups``'s steps (seconds each, device work included)."""
    staging = staging_for(device) if pinned else None
    wait0 = staging.wait_s if staging is not None else 0.0
    t0 = _synced(device)
    with _side_stream(device):
        table = pa.Table.from_batches(ray.get([ref for _, ref in entries]))
        t1 = time.perf_counter()
        keys = pa.array([f"{m.group_id}/{j}" for m, _ in entries for j in range(len(m.returns))])
        pc.index_in(table.column(C.EPISODE_ID), value_set=keys)
        t2 = time.perf_counter()
        obs = C.observations(table, ALL_DRIVESIM_KEYS, device, pinned)
        t3 = _synced(device)
        action = C.column_to(table, C.ACTION, (HORIZON, 3), device, pinned=pinned)
        t4 = _synced(device)
    del obs, action, table
    return {"get_table_s": t1 - t0, "index_in_s": t2 - t1, "observations_s": t3 - t2, "action_s": t4 - t3,
            "staging_wait_s": (staging.wait_s - wait0) if staging is not None else 0.0}


def floor(device: torch.device, mib: int, repeats: int) -> dict[str, float]:
    """GB/s of one ``mib`` MiB copy: host -> host, and on CUDA pageable -> device and pinned -> device."""
    n = mib * 2**20
    src = torch.ones(n, dtype=torch.uint8)
    host = torch.empty(n, dtype=torch.uint8)

    def rate(fn) -> float:
        fn()  # warm-up (first touch, driver state)
        times = []
        for _ in range(repeats):
            t0 = _synced(device)
            fn()
            times.append(_synced(device) - t0)
        return n / statistics.median(times) / 1e9

    out = {"mib": mib, "host_memcpy_gb_per_s": rate(lambda: host.copy_(src))}
    if device.type == "cuda":
        dst = torch.empty(n, dtype=torch.uint8, device=device)
        pinned = torch.ones(n, dtype=torch.uint8, pin_memory=True)
        out["pageable_h2d_gb_per_s"] = rate(lambda: dst.copy_(src))
        out["pinned_h2d_gb_per_s"] = rate(lambda: dst.copy_(pinned, non_blocking=True))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--groups", type=int, default=512)
    ap.add_argument("--rows-per-group", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=16, help="episodes per group (G)")
    ap.add_argument("--obs-storage", nargs="+", default=["float32", "float16"], choices=list(C.OBS_STORAGE))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--floor-mib", type=int, default=256)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if min(args.groups, args.rows_per_group, args.group_size, args.repeats, args.floor_mib) < 1:
        ap.error("--groups, --rows-per-group, --group-size, --repeats and --floor-mib must be >= 1")
    device = torch.device(args.device)
    rows = args.groups * args.rows_per_group
    # the largest storage's rows at a time (the previous one's objects are freed first), plus room
    # for the strings and Ray's own
    largest = max(uploaded_bytes_per_row(s) for s in args.obs_storage) * rows
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 object_store_memory=int(largest * 1.25) + 256 * 2**20)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    result: dict = {"meta": machine_meta(device=args.device, gpu=gpu, groups=args.groups,
                                         rows_per_group=args.rows_per_group, group_size=args.group_size,
                                         repeats=args.repeats, torch_threads=torch.get_num_threads()),
                    "floor": floor(device, args.floor_mib, args.repeats), "loads": []}
    print("floor", json.dumps(result["floor"]), flush=True)
    try:
        for storage in args.obs_storage:
            entries = put_groups(storage, args.groups, args.rows_per_group, args.group_size)
            nbytes = uploaded_bytes_per_row(storage) * rows
            modes = (True, False)
            times: dict[bool, list[float]] = {m: [] for m in modes}
            for m in modes:
                time_load(entries, device, m)  # warm-up: pinned slots, CUDA context, caching allocator
            for _ in range(args.repeats):
                for m in modes:
                    times[m].append(time_load(entries, device, m))
            for m in modes:
                s = statistics.median(times[m])
                row = {"storage": storage, "pinned": m, "rows": rows, "bytes": nbytes, "seconds": s,
                       "seconds_all": times[m], "gb_per_s": nbytes / s / 1e9,
                       "breakdown": breakdown(entries, device, m)}
                result["loads"].append(row)
                print(json.dumps(row), flush=True)
            del entries  # frees the objects before the next storage's
    finally:
        if started:
            ray.shutdown()
    return finish_result(args.out, result)


if __name__ == "__main__":
    main()
