"""The batched environment interface rollout workers drive (DESIGN.md, "Batched env interface").

``reset(seeds[B], options[B]) -> obs`` and ``step(actions[B, H, 3]) -> obs, reward[B],
terminated[B], truncated[B], infos``; no autoreset: an ended env keeps returning its last
observation with ``terminated | truncated`` set until it is reset. Observations are dicts of
``[B, *spec.shape]`` float32 tensors plus ``<key>_mask`` booleans (``alpagym_ray.observations``).

``infos`` holds ``"metrics"``: ``{name: [B, decision_every]}`` per-tick values of the ticks the
step covered (with ``"metrics_valid"`` alike), and for envs that ended in this step
``"episode_metrics"``: ``{name: [B]}`` (NaN for envs that did not end) and ``"episode_series"``:
``list`` of per-env ``{name: (values[T], valid[T], Aggregation)}`` or None.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class BatchedEnv(Protocol):
    num_envs: int
    """B, the number of environments stepped together."""
    metric_names: tuple[str, ...]
    """Every per-tick and episode metric this env produces (rewards are checked against it)."""
    obs_keys: tuple[str, ...]
    """Observation keys this env provides."""
    decision_every: int
    """Ticks (0.1 s) per decision."""

    def reset(
        self, seeds: Sequence[int | None] | None = None, options: Sequence[dict | None] | None = None
    ) -> dict[str, torch.Tensor]: ...

    def step(
        self, actions: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]: ...
