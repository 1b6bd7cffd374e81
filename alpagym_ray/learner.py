"""The learner group: Ray Train ``TorchTrainer`` workers running the GRPO iteration of DESIGN.md.

Each rank takes its equal share of whole groups from the buffer, recomputes ``logp_old`` under its
current weights, and makes ``epochs`` passes in ``minibatches`` slices. The loss of a slice is
normalised by the *global* number of decision rows and gradients are summed across ranks (one
all-reduce of one flat buffer), so N learners make exactly the update one learner would. After the
iteration rank 0 publishes the flat weights (version + 1) to the broadcaster.

Versions: a fresh run publishes the starting weights as version 0; a restarted or resumed learner
group reloads the last checkpoint and publishes it as ``highest version ever published + 1``, so
versions only grow (DESIGN.md, "Weights").

This module knows no concrete policy, algorithm or checkpoint format (DESIGN.md, "Dependency
direction"): each rank builds them from the learner config, ``learner.algorithm`` (a ``_target_``
node giving an :class:`Algorithm`) and ``learner.checkpoint_io`` (a module path, see
:func:`checkpoint_io`), as ``alpagym_ray/conf/learner/grpo.yaml`` sets them.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch
from ray import train as ray_train

from alpagym_ray import columns as C
from alpagym_ray.flat_params import flat_size, flatten_params, host_buffer
from alpagym_ray.precision import autocast, check_precision, maybe_compile, set_matmul_precision
from alpagym_ray.targets import instantiate

CHECKPOINT_IO_FUNCTIONS = ("save_checkpoint", "load_checkpoint", "load_optimizer_state")
"""What the ``learner.checkpoint_io`` module must expose."""


class Algorithm(Protocol):
    """What the learner needs of the algorithm built from ``learner.algorithm`` (e.g. ``learners.grpo.GRPO``)."""

    needs_reference: bool
    """Whether :meth:`loss` needs ``logp_ref`` (the learner then keeps a frozen starting policy)."""

    def advantages(self, returns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``returns [num_groups, G]`` -> ``(advantages [num_groups, G], informative [num_groups] bool)``."""
        ...

    def loss(self, logp: torch.Tensor, logp_old: torch.Tensor, logp_behavior: torch.Tensor,
             advantages: torch.Tensor, num_rows_global: int,
             logp_ref: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss, stats)`` of rows ``[N]``: the shard's share, already divided by ``num_rows_global``."""
        ...


def build_algorithm(lc: dict) -> Algorithm:
    """The algorithm of the learner config ``lc`` (its ``algorithm`` node); ValueError names what is wrong."""
    node = lc.get("algorithm")
    if node is None:
        hint = (" (the former learner.grpo fields now sit in learner.algorithm beside its _target_)"
                if "grpo" in lc else "")
        raise ValueError("learner.algorithm is missing: it must be a config node with a _target_ building the "
                         f"algorithm, as in alpagym_ray/conf/learner/grpo.yaml{hint}")
    if not isinstance(node, dict) or "_target_" not in node:
        raise ValueError(f"learner.algorithm must be a config node with a _target_, got {node!r}")
    algorithm = instantiate(node)
    missing = [m for m in ("advantages", "loss") if not callable(getattr(algorithm, m, None))]
    if missing:
        raise ValueError(f"learner.algorithm: {node['_target_']} built {type(algorithm).__name__}, which lacks "
                         f"the methods {missing} the learner calls")
    return algorithm


def checkpoint_io(path: object) -> ModuleType:
    """The module named by ``learner.checkpoint_io`` (e.g. a policy package's checkpoint module), checked
    to expose :data:`CHECKPOINT_IO_FUNCTIONS`."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"learner.checkpoint_io must be a module path (save_checkpoint, load_checkpoint, "
                         f"load_optimizer_state), got {path!r}")
    try:
        module = importlib.import_module(path)
    except ImportError as e:
        raise ImportError(f"learner.checkpoint_io {path!r}: cannot import it ({e})") from e
    missing = [f for f in CHECKPOINT_IO_FUNCTIONS if not callable(getattr(module, f, None))]
    if missing:
        raise ValueError(f"learner.checkpoint_io {path!r} lacks {missing}; it must expose "
                         f"{list(CHECKPOINT_IO_FUNCTIONS)}")
    return module


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _allreduce_grads(params: list[torch.Tensor]) -> None:
    """Sum gradients over ranks in one flat buffer (loss already carries 1 / global rows)."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p)
        offset += n


def _broadcast_int(value: int, device: torch.device) -> int:
    dist = _dist()
    if dist is None:
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)  # NCCL only moves CUDA tensors
    dist.broadcast(t, src=0)
    return int(t.item())


def load_groups(entries: list[tuple[Any, Any]], obs_keys, horizon: int, device, algorithm: Algorithm,
                pinned: bool = False):
    """Decision rows of whole groups -> tensors (obs, action, logp_behavior, advantage, version) on ``device``;
    the advantages are ``algorithm.advantages`` of the groups' returns. On CUDA the copies are queued on the
    current stream (through pinned staging if ``pinned``, ``learner.pinned_upload``; else one plain copy per
    Arrow chunk): synchronise it before using the tensors on another stream."""
    # chunked, not combined: each column goes from the object store's shared memory to the device without
    # a combined copy on the host first (that copied every column once more); the pinned staging packs
    # the chunks (one per group) into a few large transfers
    return groups_to_tensors([m for m, _ in entries], ray.get([ref for _, ref in entries]), obs_keys, horizon,
                             device, algorithm, pinned)


def groups_to_tensors(metas: list[Any], batches: list[pa.RecordBatch], obs_keys, horizon: int, device,
                      algorithm: Algorithm, pinned: bool = False):
    """:func:`load_groups` once the groups' decision batches are here (``metas[i]`` describes ``batches[i]``)."""
    table = pa.Table.from_batches(batches)
    returns = torch.tensor([m.returns for m in metas], dtype=torch.float32)      # [groups, G]
    adv, informative = algorithm.advantages(returns)
    # one advantage per episode id, repeated on its decision rows (looked up in Arrow, not per row in Python)
    keys = pa.array([f"{m.group_id}/{j}" for m in metas for j in range(returns.shape[1])])
    idx = pc.index_in(table.column(C.EPISODE_ID), value_set=keys)
    if idx.null_count:
        raise ValueError(f"load_groups: {idx.null_count} decision rows belong to no episode of their groups")
    advantage = adv.reshape(-1).float()[torch.from_numpy(idx.to_numpy(zero_copy_only=False).astype(np.int64))]
    out = {
        "obs": C.observations(table, obs_keys, device, pinned),
        "action": C.column_to(table, C.ACTION, (horizon, 3), device, pinned=pinned),
        "logp_behavior": torch.from_numpy(table.column(C.LOGP_BEHAVIOR).to_numpy()).to(device),
        "advantage": advantage.to(device),
        "version": torch.from_numpy(table.column(C.POLICY_VERSION).to_numpy()),
        "informative": informative,
    }
    return out


def pa_concat(batches):
    return pa.Table.from_batches(batches).combine_chunks()


def _rows(mb: dict, sl: slice) -> tuple[dict, dict]:
    """Rows ``sl`` of a minibatch: (observation dict, the other per-row tensors)."""
    return {k: v[sl] for k, v in mb["obs"].items()}, {k: v[sl] for k, v in mb.items() if k != "obs"}


def grpo_update(policy, optimizer, params, mbs: list[dict], global_rows: list[int], algorithm: Algorithm,
                epochs: int, max_grad_norm: float, world: int = 1, micro_batch_rows: int = 4096,
                precision: str = "fp32") -> dict[str, float]:
    """``epochs`` passes over the minibatches of one iteration; mean stats over the updates.

    Each minibatch dict holds ``obs``, ``action``, ``logp_old``, ``logp_behavior``, ``advantage``
    (and ``logp_ref``); ``global_rows[m]`` is minibatch m's decision rows summed over all ranks.
    A minibatch is processed in micro-batches of ``micro_batch_rows`` rows whose gradients add up
    (each micro-batch loss already carries 1 / global rows), so memory stays bounded on any batch.
    The loss of a micro-batch is ``algorithm.loss`` (:class:`Algorithm`).

    The first minibatch may come without ``logp_old``: its first pass runs before any step, under
    the weights of the start of the iteration, so π_old is that pass's own log-prob (detached), kept
    for later epochs. That saves one forward pass over it (with one minibatch, a quarter of the
    learner's work) and changes nothing else."""
    agg: dict[str, float] = {}
    n = 0
    for epoch in range(epochs):
        for m, mb in enumerate(mbs):
            fill_old = "logp_old" not in mb
            if fill_old and (epoch or m):
                raise ValueError(f"grpo_update: minibatch {m} has no logp_old (only the first may omit it)")
            old_parts: list[torch.Tensor] = []
            optimizer.zero_grad(set_to_none=False)
            rows = int(mb["action"].shape[0])
            stats_sum: dict[str, float] = {}
            loss_sum = 0.0
            for start in range(0, rows, micro_batch_rows):
                obs, t = _rows(mb, slice(start, start + micro_batch_rows))
                with autocast(precision, t["action"].device):
                    logp = policy.log_prob(obs, t["action"])
                logp_old = logp.detach() if fill_old else t["logp_old"]
                old_parts.append(logp_old)
                loss, stats = algorithm.loss(logp, logp_old, t["logp_behavior"], t["advantage"],
                                             global_rows[m], t.get("logp_ref"))
                loss.backward()
                loss_sum += float(loss.detach())
                k = int(t["action"].shape[0])
                for name, v in stats.items():  # per-row means -> sums, averaged below
                    if name == "is_weight_max":
                        stats_sum[name] = max(stats_sum.get(name, 0.0), float(v))
                    else:
                        stats_sum[name] = stats_sum.get(name, 0.0) + float(v) * k
            if fill_old:
                mb["logp_old"] = torch.cat(old_parts) if old_parts else mb["logp_behavior"][:0]
            _allreduce_grads(params)  # sum over ranks: the loss already divides by the global rows
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            n += 1
            for name, total in stats_sum.items():
                agg[name] = agg.get(name, 0.0) + (total if name == "is_weight_max" else total / max(rows, 1))
            agg["loss"] = agg.get("loss", 0.0) + loss_sum * world
            agg["grad_norm"] = agg.get("grad_norm", 0.0) + float(grad_norm)
    return {k: v / max(n, 1) for k, v in agg.items()}


def fill_old_and_reference(policy, reference, mbs: list[dict], micro_batch_rows: int = 4096,
                           precision: str = "fp32") -> None:
    """Before :func:`grpo_update`: ``logp_old`` (π_old = the weights at the start of the iteration) of every
    minibatch but the first, whose comes from its own first pass, and ``logp_ref`` of all when there is
    a frozen ``reference``."""
    for m, mb in enumerate(mbs):
        if m:
            mb["logp_old"] = log_probs(policy, mb, micro_batch_rows, precision=precision)
        if reference is not None:
            mb["logp_ref"] = log_probs(reference, mb, micro_batch_rows, precision=precision)


def head_entropy(policy, mb: dict, micro_batch_rows: int = 4096, precision: str = "fp32") -> float:
    """Mean policy entropy over a minibatch's first ``micro_batch_rows`` rows (NaN for policies without one)."""
    if not hasattr(policy, "entropy"):
        return math.nan
    device = mb["action"].device
    with torch.no_grad(), autocast(precision, device):
        head = {k: v[:micro_batch_rows] for k, v in mb["obs"].items()}
        return float(policy.entropy(head).mean())


def log_probs(policy, mb: dict, micro_batch_rows: int = 4096, key: str = "action",
              precision: str = "fp32") -> torch.Tensor:
    """``log π(a|s)`` of every row of a minibatch, in micro-batches, without gradient."""
    rows = int(mb[key].shape[0])
    out = []
    with torch.no_grad(), autocast(precision, mb[key].device):
        for start in range(0, rows, micro_batch_rows):
            obs, t = _rows(mb, slice(start, start + micro_batch_rows))
            out.append(policy.log_prob(obs, t[key]).float())
    return torch.cat(out) if out else torch.zeros(0)


def _write_steps(run_dir: Path, iteration: int, rank: int, minibatches) -> None:
    """The decision rows this rank learned from in ``iteration`` (for inspection and replay tests)."""
    import pyarrow.parquet as pq

    out = run_dir / "steps"
    out.mkdir(parents=True, exist_ok=True)
    refs = [ref for entries in minibatches for _, ref in entries]
    pq.write_table(pa_concat(ray.get(refs)), out / f"iter{iteration:05d}_rank{rank}.parquet")


def train_loop_per_worker(config: dict) -> None:
    """The Ray Train worker function (one per learner rank)."""
    ctx = ray_train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config["seed"])
    torch.set_num_threads(config.get("torch_threads", 1))
    device = torch.device("cuda" if config["use_gpu"] and torch.cuda.is_available() else "cpu")
    precision = check_precision(config.get("precision", "fp32"))  # as the rollout workers act
    set_matmul_precision(precision)
    buffer, broadcaster = config["buffer"], config["broadcaster"]
    lc = config["learner"]
    algorithm = build_algorithm(lc)
    algo_name = str(getattr(algorithm, "name", type(algorithm).__name__))
    ckpt_tools = checkpoint_io(lc.get("checkpoint_io"))
    policy = maybe_compile(instantiate(config["policy"]).to(device).train(), config.get("compile", False))
    params = [p for p in policy.parameters() if p.requires_grad]
    # fused: one kernel for all parameters on GPUs (the same update as the loop over tensors)
    optimizer = torch.optim.Adam(params, lr=lc["lr"], eps=1e-6, fused=device.type == "cuda")
    reference = None
    if getattr(algorithm, "needs_reference", False):
        reference = instantiate(config["policy"]).to(device).eval()
        for p in reference.parameters():
            p.requires_grad_(False)
    start_iteration = 0
    checkpoint = ray_train.get_checkpoint()
    resume_dir = config.get("resume_checkpoint")
    restored = False
    if checkpoint is not None or resume_dir:
        with (checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext(resume_dir)) as d:
            state = ckpt_tools.load_checkpoint(d, map_location=device)
            policy.load_state_dict(state.state_dict())
            trainer_state = ckpt_tools.load_optimizer_state(d, optimizer, map_location=device)
            start_iteration = int(trainer_state.get("iteration", -1)) + 1
            restored = True
    # versions only grow: continue above the highest ever published
    version = 0
    if rank == 0:
        highest = ray.get(broadcaster.highest_version.remote())
        recorded = _read_versions(config["run_dir"])
        version = max(highest, recorded) + 1 if (restored or highest >= 0 or recorded >= 0) else 0
    version = _broadcast_int(version, device)
    run_dir = Path(config["run_dir"])
    writer = None
    publisher = None
    if rank == 0:
        publisher = Publisher(policy, broadcaster, buffer, run_dir, config.get("weights") or {}, device)
        publisher.publish(version)
        # the starting weights of this (re)start, as published: what the first groups act with
        ckpt_tools.save_checkpoint(policy, run_dir / "checkpoints" / f"version_{version:06d}", policy_version=version,
                                   provenance={"algorithm": algo_name, "start_of_iteration": start_iteration})
        ray.get(buffer.start.remote(version, start_iteration))
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"))
    obs_keys, horizon = tuple(policy.obs_keys), int(policy.action_spec.horizon)
    M, epochs = lc["minibatches"], lc["epochs"]
    pinned = bool(lc.get("pinned_upload", True))  # load through pinned staging (CUDA only)

    def fetch(it: int) -> tuple[dict, list[dict], float, float]:
        """(shard, its minibatches on the device, seconds loading them, seconds waiting for the buffer)."""
        t_ask = time.perf_counter()
        shard = ray.get(buffer.take_shard.remote(it, rank, world, M))
        t0 = time.perf_counter()
        with _side_stream(device) as stream:
            mbs = [load_groups(entries, obs_keys, horizon, device, algorithm, pinned)
                   for entries in shard["minibatches"]]
            if stream is not None:
                stream.synchronize()
        return shard, mbs, time.perf_counter() - t0, t0 - t_ask

    prefetch = ShardPrefetch(fetch, enabled=bool(lc.get("prefetch", False)))
    prefetch.submit(start_iteration)
    for it in range(start_iteration, config["iterations"]):
        t_iter = time.perf_counter()
        _maybe_crash(config, it, rank, run_dir)
        shard, mbs, load_s, buffer_wait_s = prefetch.take(it)
        if it + 1 < config["iterations"]:
            prefetch.submit(it + 1)  # loads while this iteration learns
        t_data = t_load = time.perf_counter()
        micro = int(lc.get("micro_batch_rows", 4096))
        fill_old_and_reference(policy, reference, mbs, micro, precision)
        t_old = _synced(device)
        agg = grpo_update(policy, optimizer, params, mbs, shard["global_rows"], algorithm, epochs,
                          lc["max_grad_norm"], world, micro, precision)
        t_update = _synced(device)
        if config.get("write_steps"):
            _write_steps(run_dir, it, rank, shard["minibatches"])
        entropy = head_entropy(policy, mbs[0], micro, precision)
        version += 1
        metrics = dict(agg)
        metrics.update(iteration=it, version=version, entropy=entropy, lr=optimizer.param_groups[0]["lr"],
                       learner_s=time.perf_counter() - t_data, data_wait_s=t_data - t_iter,
                       load_s=load_s, buffer_wait_s=buffer_wait_s, old_logp_s=t_old - t_load, update_s=t_update - t_old,
                       decisions=sum(int(mb["action"].shape[0]) for mb in mbs))
        checkpoint_now = (it + 1) % lc["checkpoint_every"] == 0 or it + 1 == config["iterations"]
        if rank == 0:
            assert publisher is not None  # built by rank 0 above
            metrics.update(publisher.publish(version))
            _log(writer, metrics, shard["stats"], it, time.perf_counter() - t_iter)
        report_ckpt = None
        tmp = None
        if checkpoint_now and rank == 0:
            tmp = tempfile.mkdtemp(prefix="alpagym-ckpt-")
            ckpt_tools.save_checkpoint(policy, tmp, policy_version=version, optimizer=optimizer,
                                       trainer_state={"iteration": it, "version": version},
                                       provenance={"algorithm": algo_name, "iteration": it})
            report_ckpt = ray_train.Checkpoint.from_directory(tmp)
        scalar = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        scalar.update({f"buffer/{k}": v for k, v in shard["stats"].items() if isinstance(v, int | float)})
        if checkpoint_now:
            ray_train.report(scalar, checkpoint=report_ckpt)
        if rank == 0 and report_ckpt is not None and tmp is not None:
            import shutil

            shutil.copytree(tmp, run_dir / "checkpoints" / f"version_{version:06d}", dirs_exist_ok=True)
            (run_dir / "checkpoints" / "latest.txt").write_text(f"version_{version:06d}\n")
        _synced(device)  # this iteration's tensors are done with before their memory can be reused
        del mbs
    prefetch.close()
    if writer is not None:
        writer.close()
    if publisher is not None:
        publisher.close()


class ShardPrefetch:
    """Takes and loads the next iteration's shard in a background thread while this one learns.

    What it overlaps with the update: the wait for the buffer and :func:`load_groups` (Arrow from the
    object store to device tensors; ~2 s of a 260 k-row iteration on the H100 host). Staleness is
    unchanged: the buffer judges a group against the version of the iteration it assembles it for,
    not the time it is taken. A learner that dies loses the prefetched shard with the current one
    (both counted as consumed by the buffer). ``enabled=False`` (``learner.prefetch=false``) fetches
    in :meth:`take`."""

    def __init__(self, fetch, enabled: bool = True):
        from concurrent.futures import ThreadPoolExecutor

        self.fetch = fetch
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="alpagym-prefetch") if enabled else None
        self.pending: dict[int, Any] = {}

    def submit(self, iteration: int) -> None:
        if self.pool is not None and iteration not in self.pending:
            self.pending[iteration] = self.pool.submit(self.fetch, iteration)

    def take(self, iteration: int):
        """``fetch(iteration)``'s result (raising what it raised)."""
        future = self.pending.pop(iteration, None)
        return future.result() if future is not None else self.fetch(iteration)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


@contextlib.contextmanager
def _side_stream(device: torch.device):
    """A CUDA stream of its own for the prefetch thread's copies (so they overlap the update's kernels);
    ``None`` on CPU."""
    if device.type != "cuda":
        yield None
        return
    stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        yield stream


def _synced(device: torch.device) -> float:
    """``perf_counter`` after the device's queued work (phase times of the learner, once per phase)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _maybe_crash(config: dict, iteration: int, rank: int, run_dir: Path) -> None:
    """Fault injection for tests: the process of rank 0 dies (once) at the configured iteration."""
    at = config.get("crash_at_iteration")
    marker = run_dir / ".crashed_once"
    if at is not None and iteration == at and rank == 0 and not marker.exists():
        marker.write_text(str(iteration))
        import os

        os._exit(1)


def _read_versions(run_dir: str) -> int:
    p = Path(run_dir) / "versions.json"
    if not p.is_file():
        return -1
    try:
        return int(json.loads(p.read_text())["highest_published"])
    except (ValueError, KeyError):
        return -1


class Publisher:
    """Rank 0's side of the weights (DESIGN.md, "Weights"): publish the policy as ``version``.

    ``weights`` is the topology's weight settings: ``transport`` ``object_store`` (one host buffer,
    pinned on CUDA, rewritten by every publish; Ray copies it into the object store when
    ``publish.remote`` is called, so reusing it is safe) or ``collective`` (an NCCL / gloo group to
    the rollout workers, :mod:`alpagym_ray.weight_sync`, which keeps the object-store copy current
    itself), with ``backend``, ``bucket_mb``, ``timeout_s``, ``object_store_every``."""

    def __init__(self, policy, broadcaster, buffer, run_dir: Path, weights: dict, device: torch.device):
        self.policy, self.broadcaster, self.buffer, self.run_dir = policy, broadcaster, buffer, run_dir
        self.transport = weights.get("transport", "object_store")
        self.sender = None
        if self.transport == "collective":
            from alpagym_ray.weight_sync import WeightSender

            self.sender = WeightSender(
                broadcaster, backend=weights.get("backend", "nccl"), device=str(device),
                bucket_bytes=int(float(weights.get("bucket_mb", 256)) * 2**20),
                timeout_s=float(weights.get("timeout_s", 60.0)),
                object_store_every=int(weights.get("object_store_every", 10)))
            self.flat = torch.empty(flat_size(policy), dtype=torch.float32, device=device)
        elif self.transport == "object_store":
            self.host = host_buffer(policy)
        else:
            raise ValueError(f"topology.weight_transport must be object_store or collective, got {self.transport!r}")

    def publish(self, version: int) -> dict[str, float]:
        """Publish, tell the buffer, record the version on disk; returns timings (seconds)."""
        t0 = time.perf_counter()
        out: dict[str, float] = {}
        if self.sender is not None:
            flat = flatten_params(self.policy, out=self.flat)
            t_flat = time.perf_counter()
            info = self.sender.publish(version, flat)
            out["publish_collective"] = float(bool(info.get("collective")))
            if info.get("error"):
                print(f"weights v{version}: collective path failed ({info['error']}); served from the object store",
                      flush=True)
        else:
            host = flatten_params(self.policy, out=self.host).numpy()
            t_flat = time.perf_counter()
            ray.get(self.broadcaster.publish.remote(version, host))
        t_sent = time.perf_counter()
        ray.get(self.buffer.on_published.remote(version))
        t_told = time.perf_counter()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.run_dir / "versions.json.tmp"
        tmp.write_text(json.dumps({"highest_published": version, "time": time.time()}))
        tmp.replace(self.run_dir / "versions.json")
        # where a slow publish goes: the device -> host flatten, the broadcaster taking the weights,
        # the buffer (an actor also serving the rollouts) acknowledging the version
        out.update(publish_s=time.perf_counter() - t0, publish_flatten_s=t_flat - t0,
                   publish_send_s=t_sent - t_flat, publish_buffer_s=t_told - t_sent)
        return out

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()


def _log(writer, metrics: dict, stats: dict, it: int, iter_s: float) -> None:
    """TensorBoard scalars and the console progress line of one iteration (rank 0)."""
    step = metrics["version"]
    for k in ("loss", "clip_fraction", "approx_kl", "kl_ref", "entropy", "grad_norm", "lr", "is_weight_mean",
              "is_weight_max", "is_ess_fraction", "publish_s", "publish_flatten_s", "publish_send_s",
              "publish_buffer_s", "publish_collective", "learner_s", "data_wait_s", "load_s", "buffer_wait_s",
              "old_logp_s", "update_s"):
        if k in metrics:
            writer.add_scalar(f"learner/{k}", metrics[k], step)
    for k in ("return_mean", "return_std", "staleness_p50", "staleness_p99", "staleness_max", "buffer_groups",
              "produced", "consumed", "rollout_env_steps_per_s", "wait_s"):
        if k in stats:
            writer.add_scalar(f"rollout/{k}", stats[k], step)
    for t, v in stats.get("terms", {}).items():
        writer.add_scalar(f"reward/{t}", v, step)
    for k, v in stats.get("episode_means", {}).items():
        writer.add_scalar(f"episode/{k}", v, step)
    for k, v in stats.get("rollout_phase_fraction", {}).items():  # where rollout workers spend their time
        writer.add_scalar(f"time/rollout_{k}_fraction", v, step)
    writer.add_scalar("learner/decisions_per_s", metrics["decisions"] / max(metrics["learner_s"], 1e-9), step)
    writer.add_scalar("time/iteration_s", iter_s, step)
    writer.flush()
    em = stats.get("episode_means", {})
    # written, not print()ed: Ray Train patches print() in its workers and the line would appear twice
    sys.stdout.write(f"iter {it:4d}  v{step:<4d} return {stats['return_mean']:+.3f}±{stats['return_std']:.3f}  "
          f"collision {em.get('collision_any', float('nan')):.2f}  offroad {em.get('offroad', float('nan')):.2f}  "
          f"env-steps/s {stats.get('rollout_env_steps_per_s', 0):,.0f}  "
          f"decisions/s(learn) {metrics['decisions'] / max(metrics['learner_s'], 1e-9):,.0f}  "
          f"staleness {stats['staleness_max']:.0f}  loss {metrics.get('loss', float('nan')):+.4f}  "
          f"kl {metrics.get('approx_kl', float('nan')):.4f}  {iter_s:.1f}s\n")
    sys.stdout.flush()
