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
    returns = np.full(len(options), np.nan)  # per entry of ``options``, in their order (for paired differences)
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
                    returns[start + i] = float(total)
            alive &= ~ended
    out: dict[str, Any] = {k: float(np.nanmean(v)) for k, v in rows.items() if np.isfinite(v).any()}
    if "return" in rows and len(rows["return"]) > 1:  # the standard error says how far to trust a difference
        out["return_sem"] = float(np.std(rows["return"], ddof=1) / np.sqrt(len(rows["return"])))
    out["episodes"] = len(options)
    if "return" in rows:
        out["returns"] = returns.tolist()
    return out


def paired_difference(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, float] | None:
    """The change of the return between two :func:`evaluate` results over the same options and seed.

    Episode ``i`` of both runs starts from the same state with the same seed, so the per-episode
    differences ``d_i = after_i - before_i`` [n] remove the spread between scenes that dominates each
    mean's own standard error: ``{"return": mean(d), "return_sem": std(d) / sqrt(n), "episodes": n}``.
    None when either result lacks per-episode returns or their counts differ."""
    a, b = after.get("returns"), before.get("returns")
    if a is None or b is None or len(a) != len(b) or len(a) < 2:
        return None
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    d = d[np.isfinite(d)]
    if len(d) < 2:
        return None
    return {"return": float(d.mean()), "return_sem": float(d.std(ddof=1) / np.sqrt(len(d))), "episodes": len(d)}
