"""Every Arrow column of an episode, named once (RLlib's ``columns.py`` pattern).

A rollout worker returns, per GRPO group, one compact RecordBatch of **decision rows**
(:func:`step_schema`) and one of **episode rows** (:func:`episode_schema`). Observation columns are
fixed-size lists of float32, or float16 with ``topology.obs_storage=float16`` (``obs.<key>``,
flattened ``[*shape]``), with a fixed-size list of bool masks (``obs.<key>_mask``), so a column turns
into a ``[rows, *shape]`` tensor without copying. Every decision row carries the ``policy_version``
that acted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch

from alpagym_ray.observations import SPECS, mask_key
from alpagym_ray.pinned_upload import staging_for

# decision rows
EPISODE_ID = "episode_id"
GROUP_ID = "group_id"
SCENE_ID = "scene_id"
STEP = "step"
POLICY_VERSION = "policy_version"
ACTION = "action"
LOGP_BEHAVIOR = "logp_behavior"
REWARD = "reward"
DONE = "done"
# episode rows
START_STEP = "start_step"
SEED = "seed"
RETURN = "return"
NUM_DECISIONS = "num_decisions"
VERSION_FIRST = "policy_version_first"
VERSION_LAST = "policy_version_last"
WORKER_ID = "worker_id"
WALL_S = "wall_s"
STATUS = "status"
TERM_PREFIX = "term."
METRIC_PREFIX = "metric."
OBS_PREFIX = "obs."
TRAJ_X, TRAJ_Y, TRAJ_YAW = "traj_x", "traj_y", "traj_yaw"


OBS_STORAGE = {"float32": (pa.float32(), torch.float32), "float16": (pa.float16(), torch.float16)}
"""``topology.obs_storage`` -> (Arrow type, torch dtype) of the observation columns. float16 halves the
bytes every decision row moves (device -> host, Arrow, object store, host -> learner device); the
policy then acts on the float16-rounded values, so acting and learning still see the same input."""


def check_obs_storage(name: str) -> str:
    """``name`` if valid, else ValueError naming the valid ones."""
    if name not in OBS_STORAGE:
        raise ValueError(f"topology.obs_storage {name!r} unknown; valid: {list(OBS_STORAGE)}")
    return name


def obs_column(key: str) -> str:
    return OBS_PREFIX + key


def step_schema(obs_keys: Sequence[str], horizon: int, obs_storage: str = "float32") -> pa.Schema:
    """Schema of decision rows for a policy reading ``obs_keys`` with actions ``[horizon, 3]``,
    observations stored as ``obs_storage`` (:data:`OBS_STORAGE`)."""
    value_type = OBS_STORAGE[check_obs_storage(obs_storage)][0]
    fields = [
        pa.field(EPISODE_ID, pa.string()), pa.field(GROUP_ID, pa.string()), pa.field(SCENE_ID, pa.string()),
        pa.field(STEP, pa.int32()), pa.field(POLICY_VERSION, pa.int64()),
    ]
    for key in obs_keys:
        spec = SPECS[key]
        fields.append(pa.field(obs_column(key), pa.list_(value_type, math.prod(spec.shape))))
        fields.append(pa.field(obs_column(mask_key(key)), pa.list_(pa.bool_(), spec.shape[0])))
    fields += [
        pa.field(ACTION, pa.list_(pa.float32(), horizon * 3)),
        pa.field(LOGP_BEHAVIOR, pa.float32()), pa.field(REWARD, pa.float32()), pa.field(DONE, pa.bool_()),
    ]
    return pa.schema(fields, metadata={b"horizon": str(horizon).encode()})


def episode_schema(term_names: Sequence[str], metric_names: Sequence[str]) -> pa.Schema:
    fields = [
        pa.field(EPISODE_ID, pa.string()), pa.field(GROUP_ID, pa.string()), pa.field(SCENE_ID, pa.string()),
        pa.field(START_STEP, pa.int32()), pa.field(SEED, pa.int64()), pa.field(RETURN, pa.float64()),
        pa.field(NUM_DECISIONS, pa.int32()), pa.field(VERSION_FIRST, pa.int64()), pa.field(VERSION_LAST, pa.int64()),
        pa.field(WORKER_ID, pa.string()), pa.field(WALL_S, pa.float64()), pa.field(STATUS, pa.string()),
    ]
    fields += [pa.field(TERM_PREFIX + n, pa.float64()) for n in term_names]
    fields += [pa.field(METRIC_PREFIX + n, pa.float64()) for n in metric_names]
    fields += [pa.field(c, pa.list_(pa.float32())) for c in (TRAJ_X, TRAJ_Y, TRAJ_YAW)]
    return pa.schema(fields)


def fixed_list(values: np.ndarray, dtype: pa.DataType) -> pa.FixedSizeListArray:
    """``[rows, *shape]`` numpy array -> FixedSizeListArray of ``prod(shape)`` per row (one copy)."""
    rows = values.shape[0]
    width = int(np.prod(values.shape[1:])) if values.ndim > 1 else 1
    flat = pa.array(np.ascontiguousarray(values).reshape(rows * width), type=dtype)
    return pa.FixedSizeListArray.from_arrays(flat, width)


def column_tensor(batch: pa.RecordBatch | pa.Table, name: str, shape: Sequence[int]) -> torch.Tensor:
    """A fixed-size-list column as a ``[rows, *shape]`` tensor (zero-copy for float32 without nulls)."""
    col = batch.column(name)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return array_tensor(col, shape)


def column_to(table: pa.Table, name: str, shape: Sequence[int], device: torch.device | str,
              dtype: torch.dtype | None = None, pinned: bool = False) -> torch.Tensor:
    """A fixed-size-list column of a (chunked) table as one ``[rows, *shape]`` tensor on ``device``
    (of ``dtype``, default the column's), read from each chunk's zero-copy view (shared memory for
    batches fetched from the object store) -- no intermediate host copy of the whole column; a dtype
    change happens on ``device``, after the copy of the stored bytes.

    To CUDA with ``pinned`` (``learner.pinned_upload``): the chunks are packed into the process's
    pinned staging buffers and go to the device in a few large asynchronous copies on the current stream
    (:mod:`alpagym_ray.pinned_upload`); the result is ready once that stream's queued work is.
    Otherwise (CPU, or ``pinned=False``): one synchronous copy per chunk."""
    chunks = [c for c in table.column(name).chunks if len(c)]
    if not chunks:
        return column_tensor(table, name, shape).to(device, dtype)
    parts = [array_tensor(c, shape).contiguous() for c in chunks]  # contiguous already: a no-op
    stored, shape_out = parts[0].dtype, (table.num_rows, *parts[0].shape[1:])
    staging = staging_for(device) if pinned else None
    if staging is not None:
        out = torch.empty(shape_out, dtype=stored, device=device)
        staging.upload(parts, out)
        return out if dtype is None or dtype == stored else out.to(dtype)
    out = torch.empty(shape_out, dtype=dtype or stored, device=device)
    offset = 0
    for part in parts:
        # a copy across devices that also changes the dtype converts on the host (PyTorch's copy_):
        # move the stored bytes first, convert on the device
        out[offset:offset + len(part)].copy_(part.to(out.device) if part.dtype != out.dtype else part)
        offset += len(part)
    return out


def array_tensor(col: pa.Array, shape: Sequence[int]) -> torch.Tensor:
    """A fixed-size-list array as a ``[rows, *shape]`` tensor (zero-copy for float32 without nulls)."""
    flat = col.flatten()
    if pa.types.is_boolean(flat.type):
        arr = np.asarray(flat.to_numpy(zero_copy_only=False), dtype=bool)
    else:
        arr = flat.to_numpy(zero_copy_only=True)
    return torch.from_numpy(arr.reshape(len(col), *shape))


def observations(batch: pa.RecordBatch | pa.Table, obs_keys: Sequence[str],
                 device: torch.device | str | None = None, pinned: bool = False) -> dict[str, torch.Tensor]:
    """The observation dict of decision rows, as the policy takes it: float32 values whatever the
    storage, bool masks (on ``device``, through pinned staging on CUDA if ``pinned``: see :func:`column_to`)."""
    obs = {}
    for key in obs_keys:
        spec = SPECS[key]
        for name, shape, dtype in ((key, spec.shape, torch.float32), (mask_key(key), spec.shape[:1], None)):
            if device is None:
                tensor = column_tensor(batch, obs_column(name), shape)
                obs[name] = tensor if dtype is None else tensor.to(dtype)
            else:
                table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
                obs[name] = column_to(table, obs_column(name), shape, device, dtype, pinned)
    return obs


def build_step_batch(schema: pa.Schema, columns: Mapping[str, object]) -> pa.RecordBatch:
    """A RecordBatch of decision rows from numpy columns (fixed-size lists built in one copy)."""
    arrays = []
    for field in schema:
        v = columns[field.name]
        if pa.types.is_fixed_size_list(field.type):
            arrays.append(fixed_list(np.asarray(v), field.type.value_type))
        else:
            arrays.append(pa.array(v, type=field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)
