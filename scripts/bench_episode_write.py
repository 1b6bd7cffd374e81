"""How long the episode buffer's event loop is blocked per GRPO group by the per-episode Parquet output.

Before session 8 the buffer wrote each group's episodes batch as its own Parquet file inside its asyncio
loop; now it hands the batch to :class:`alpagym_ray.episode_writer.EpisodeWriter` (a thread). Times, for
``--groups`` batches of the real episode schema (G rows, 3 reward terms, the drivesim metrics,
trajectories of ``--decisions`` points): the old inline write per group, the new ``write`` call per
group (what the event loop now pays), and the writer's total time to drain them all. Writes JSON.

    python scripts/bench_episode_write.py --groups 512 --out scripts/results/bench_episode_write.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_weights import machine_meta, write_result  # noqa: E402

from alpagym_ray import columns as C  # noqa: E402
from alpagym_ray.episode_writer import EpisodeWriter  # noqa: E402
from envs.drivesim.metric_names import EPISODE_METRIC_NAMES  # noqa: E402


def episodes_batch(gid: str, G: int, decisions: int, rng: np.random.Generator) -> pa.RecordBatch:
    """One group's episodes with the schema the rollout workers send (values random)."""
    terms = ("term_1_metric_progress", "term_2_metric_collision_any", "term_3_metric_offroad")
    schema = C.episode_schema(terms, EPISODE_METRIC_NAMES)
    cols: dict[str, object] = {}
    for field in schema:
        if field.name == C.GROUP_ID:
            cols[field.name] = [gid] * G
        elif pa.types.is_string(field.type):
            cols[field.name] = [f"{gid}/{j}" for j in range(G)]
        elif pa.types.is_integer(field.type):
            cols[field.name] = rng.integers(0, 100, G)
        elif pa.types.is_list(field.type):
            cols[field.name] = [rng.standard_normal(decisions).astype(np.float32) for _ in range(G)]
        else:
            cols[field.name] = rng.standard_normal(G)
    return pa.RecordBatch.from_pydict(cols, schema=schema)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--groups", type=int, default=512, help="groups (one learner iteration of the GPU recipe)")
    ap.add_argument("--group-size", type=int, default=16)
    ap.add_argument("--decisions", type=int, default=46, help="trajectory points per episode")
    ap.add_argument("--out", default="bench_episode_write.json")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    batches = [episodes_batch(f"g0-{i:07d}", args.group_size, args.decisions, rng) for i in range(args.groups)]
    with tempfile.TemporaryDirectory() as d:
        inline = []
        for b in batches:  # the old path: one file per group, in the buffer's event loop
            t0 = time.perf_counter()
            out = Path(d) / "inline"
            out.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_batches([b]), out / f"{b.column(C.GROUP_ID)[0].as_py()}.parquet")
            inline.append(time.perf_counter() - t0)
        writer = EpisodeWriter(Path(d) / "writer")
        calls = []
        t_start = time.perf_counter()
        for b in batches:
            t0 = time.perf_counter()
            writer.write(b)
            calls.append(time.perf_counter() - t0)
        writer.close()
        drained = time.perf_counter() - t_start
        files = writer.files
    result = {
        "meta": machine_meta(groups=args.groups, group_size=args.group_size, decisions=args.decisions),
        "inline_ms_per_group": statistics.median(inline) * 1e3,
        "inline_s_per_iteration": sum(inline),
        "writer_call_us_per_group": statistics.median(calls) * 1e6,
        "writer_calls_s_per_iteration": sum(calls),
        "writer_drain_s": drained,
        "writer_files": files,
        "inline_files": len(batches),
    }
    write_result(args.out, result)
    print(result)
    return result


if __name__ == "__main__":
    main()
