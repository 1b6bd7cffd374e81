"""Build drivesim envs from config (the ``_target_`` of ``alpagym_ray/conf/env/drivesim.yaml``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from envs.drivesim.batched import DriveSimBatch
from envs.drivesim.config import DriveSimConfig
from envs.drivesim.scene import SceneSet


def make_batched_env(
    scenes_path: str,
    num_envs: int,
    device: str = "cpu",
    scene_ids: Sequence[str] | None = None,
    config: Mapping[str, Any] | None = None,
) -> DriveSimBatch:
    """A :class:`DriveSimBatch` over the scenes ``scene_ids`` of the set at ``scenes_path``
    (a directory or a Hugging Face Hub dataset id) — all of them when ``scene_ids`` is None."""
    root = scenes_path
    try:
        from envs.drivesim.scene_hub import resolve_scene_set

        root = str(resolve_scene_set(scenes_path))
    except ImportError:  # the Hub helper is optional for local directories
        pass
    scenes = SceneSet.open(root).load_many(scene_ids)
    return DriveSimBatch(scenes, num_envs=num_envs, config=DriveSimConfig.from_dict(dict(config or {})),
                         device=device)
