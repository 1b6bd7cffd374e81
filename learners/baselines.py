"""Reference policies without learning: constant velocity and logged replay.

Both are deterministic (a point mass on one action): ``act`` returns ``logp = 0`` and ``log_prob``
returns 0 for any action, so they can be rolled out by the same code as a learned policy, but they
cannot be trained with GRPO. They have no parameters (``state_dict()`` is empty).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from alpagym_ray.observations import SPECS, mask_key
from alpagym_ray.policy import ACTION_DT, ActionSpec

_HIST = SPECS["ego_history"].features
SPEED, YAW_RATE = _HIST.index("speed"), _HIST.index("yaw_rate")


def constant_velocity_trajectory(speed: torch.Tensor, yaw_rate: torch.Tensor, horizon: int) -> torch.Tensor:
    """Arc at constant ``speed [B]`` (m/s) and ``yaw_rate [B]`` (rad/s) from the ego origin.

    Returns ``[B, H, 3]`` rear-axle poses (x, y, yaw) at ``t = 0.1 k`` s, ``k = 1..H``."""
    t = torch.arange(1, horizon + 1, device=speed.device, dtype=speed.dtype) * ACTION_DT
    v, w = speed[:, None], yaw_rate[:, None]
    yaw = w * t
    # 1 - cos(a) = 2 sin^2(a / 2) keeps float32 precision for small turns
    straight = w.abs() < 1e-6
    safe_w = torch.where(straight, torch.ones_like(w), w)
    x = torch.where(straight, v * t, v * torch.sin(yaw) / safe_w)
    y = torch.where(straight, v * w * t * t / 2, 2 * v * torch.sin(yaw / 2) ** 2 / safe_w)
    return torch.stack([x, y, yaw], dim=-1)


class _Deterministic(nn.Module):
    """Common parts of the parameter-free reference policies."""

    kind = ""
    deterministic = True

    def __init__(self, horizon: int = 20, size: str | None = None, model: Mapping[str, Any] | None = None):
        """``size`` and ``model`` are accepted so every policy config takes ``policy.size=`` and
        ``policy.model.path=``; a weight-free policy has no size, and a checkpoint path is an error."""
        super().__init__()
        if model and model.get("path"):
            raise ValueError(f"{type(self).__name__} has no weights; policy.model.path must be null, "
                             f"got {model.get('path')!r}")
        self.horizon = int(horizon)
        self.action_spec = ActionSpec(horizon=self.horizon)

    def policy_config(self) -> dict[str, Any]:
        return {"horizon": self.horizon}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> _Deterministic:
        return cls(**config)

    def _check_obs(self, obs: Mapping[str, torch.Tensor]) -> None:
        missing = [k for k in self.obs_keys if k not in obs or mask_key(k) not in obs]
        if missing:
            raise KeyError(f"{type(self).__name__} reads {list(self.obs_keys)} (and their masks); "
                           f"missing {missing} in the observation (keys: {sorted(obs)})")

    def trajectory(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def act(
        self,
        obs: Mapping[str, torch.Tensor],
        generator: torch.Generator | None = None,
        deterministic: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        self._check_obs(obs)
        action = self.trajectory(obs)
        return action, action.new_zeros(action.shape[0]), {}

    def log_prob(self, obs: Mapping[str, torch.Tensor], action: torch.Tensor) -> torch.Tensor:
        return action.new_zeros(action.shape[0])

    def entropy(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return obs[self.obs_keys[0]].new_zeros(obs[self.obs_keys[0]].shape[0])


class ConstantVelocityPolicy(_Deterministic):
    """Extrapolates the ego's current speed and yaw rate (the last row of ``ego_history``)."""

    kind = "learners.baselines.ConstantVelocityPolicy"
    obs_keys = ("ego_history",)

    def trajectory(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        hist = obs["ego_history"].float()
        speed = hist[:, -1, SPEED].clamp(min=0.0)
        yaw_rate = hist[:, -1, YAW_RATE]
        valid = obs[mask_key("ego_history")][:, -1].bool()
        speed = torch.where(valid, speed, torch.zeros_like(speed))
        yaw_rate = torch.where(valid, yaw_rate, torch.zeros_like(yaw_rate))
        return constant_velocity_trajectory(speed, yaw_rate, self.horizon)


class LoggedReplayPolicy(_Deterministic):
    """Replays the recorded ego future (``gt_trajectory[:, :H]``): the expert's own plan.

    Past the end of the log (``gt_trajectory_mask`` False) the last two valid poses are extrapolated
    at constant velocity and heading; with fewer than two, the ego holds the current pose."""

    kind = "learners.baselines.LoggedReplayPolicy"
    obs_keys = ("gt_trajectory",)

    def trajectory(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        h = self.horizon
        gt = obs["gt_trajectory"].float()
        valid = obs[mask_key("gt_trajectory")].bool()
        if gt.shape[1] < h:
            raise ValueError(f"gt_trajectory has {gt.shape[1]} poses, fewer than the horizon {h}")
        # poses with the origin prepended: index 0 is now (always valid), index k is step k
        poses = torch.cat([gt.new_zeros(gt.shape[0], 1, 3), gt[:, :h]], dim=1)
        ok = torch.cat([valid.new_ones(gt.shape[0], 1), valid[:, :h]], dim=1)
        ar = torch.arange(h + 1, device=gt.device).expand_as(ok)
        last = torch.where(ok, ar, torch.zeros_like(ar)).cummax(dim=1).values  # last valid index <= k
        base = poses.gather(1, last[..., None].expand(-1, -1, 3))
        prev_idx = (last - 1).clamp(min=0)
        prev_ok = ok.gather(1, prev_idx) & (last > 0)
        prev = poses.gather(1, prev_idx[..., None].expand(-1, -1, 3))
        step_xy = (base[..., :2] - prev[..., :2]) * prev_ok[..., None].to(gt.dtype)
        gap = (ar - last).to(gt.dtype)[..., None]
        out = torch.cat([base[..., :2] + gap * step_xy, base[..., 2:]], dim=-1)
        return out[:, 1:]
