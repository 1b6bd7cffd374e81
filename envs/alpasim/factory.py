"""Build AlpaSim envs from config (the ``_target_`` of ``alpagym_ray/conf/env/alpasim.yaml``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from envs.alpasim.env import AlpaSimBatch, AlpaSimEnvConfig, resolve_address


def make_batched_env(
    num_envs: int,
    device: str = "cpu",
    runtime_address: str | None = None,
    runtime_yaml: str | None = None,
    scene_ids: Sequence[str] | None = None,
    config: Mapping[str, Any] | None = None,
    scenes_path: str | None = None,
) -> AlpaSimBatch:
    """An :class:`AlpaSimBatch` of ``num_envs`` concurrent sessions against the AlpaSim runtime at
    ``runtime_address`` (``host:port``) or the address in ``runtime_yaml`` (AlpaSim's
    ``generated-runtime-server.yaml``); exactly one of the two.

    ``scene_ids``: the scenes resets may draw from (checked against the runtime's list; None: all it
    serves). ``config``: :class:`AlpaSimEnvConfig` fields. ``scenes_path`` is accepted for the train
    command's sake and not read: the runtime owns the scenes.
    """
    del scenes_path
    cfg = AlpaSimEnvConfig.from_dict(dict(config or {}))
    return AlpaSimBatch(resolve_address(runtime_address, runtime_yaml), num_envs, cfg, device, scene_ids)
