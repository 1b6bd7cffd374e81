"""Closed-loop evaluation: a policy over reset options in a batched env, episode metrics averaged.

Part of the runtime core: the reward comes built, or as a config node whose ``_target_`` builds it
against the env's metrics (as in the rollout workers), so this module imports no reward package.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from alpagym_ray.targets import instantiate

HEADLINE = ("return", "scene_score", "progress", "collision_any", "collision_at_fault", "offroad",
            "offroad_or_collision", "comfort_violation")


def evaluate(env, policy, options: Sequence[dict], reward_fn=None, deterministic: bool = True,
             seed: int = 0) -> dict[str, Any]:
    """Run every ``options`` entry once (in chunks of ``env.num_envs``); mean episode metrics (and the
    mean return under ``reward_fn``).

    ``reward_fn``: an object with ``episode(series) -> (return, terms)``, or a reward config node
    (``{"_target_": ..., "terms": [...]}``) built here with ``metric_aggregations=env.metric_aggregations``."""
    if isinstance(reward_fn, Mapping):
        reward_fn = instantiate(reward_fn, metric_aggregations=env.metric_aggregations)
    rows: dict[str, list[float]] = {}
    gen = torch.Generator(device=getattr(env, "device", "cpu")).manual_seed(seed)
    B = env.num_envs
    for start in range(0, len(options), B):
        chunk = list(options[start:start + B])
        n = len(chunk)
        obs = env.reset(seeds=[seed] * B, options=chunk + [chunk[0]] * (B - n))
        alive = np.ones(n, dtype=bool)
        while alive.any():
            with torch.no_grad():
                try:
                    action, _, _ = policy.act(obs, generator=gen, deterministic=deterministic)
                except TypeError:
                    action, _, _ = policy.act(obs, generator=gen)
            obs, _, term, trunc, info = env.step(action)
            ended = (term | trunc)[:n].cpu().numpy() & alive
            for i in np.nonzero(ended)[0]:
                for k, v in info["episode_metrics"].items():
                    rows.setdefault(k, []).append(float(v[i]))
                if reward_fn is not None:
                    total, _ = reward_fn.episode(info["episode_series"][i])
                    rows.setdefault("return", []).append(float(total))
            alive &= ~ended
    out = {k: float(np.nanmean(v)) for k, v in rows.items() if np.isfinite(v).any()}
    if "return" in rows and len(rows["return"]) > 1:  # the standard error says how far to trust a difference
        out["return_sem"] = float(np.std(rows["return"], ddof=1) / np.sqrt(len(rows["return"])))
    out["episodes"] = len(options)
    return out
