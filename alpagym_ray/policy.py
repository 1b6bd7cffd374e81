"""The policy protocol (DESIGN.md, "Policy"): types only, no implementation.

A policy maps a batch of observations (``alpagym_ray.observations``: ``[B, *shape]`` float32 tensors
plus ``<key>_mask`` booleans) to a batch of trajectory actions: ``H`` future rear-axle poses
``(x, y, yaw)`` in the ego frame at ``t + 0.1 k`` s, ``k = 1..H`` (DESIGN.md, "Frames and actions").

GRPO stores the sampled action and calls :meth:`Policy.log_prob` on it later, so a stochastic policy
must be able to recompute the exact log-probability of any action it sampled from the action alone.
Implementations live in ``learners/`` (``learners.trajectory_policy``, ``learners.baselines``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

import torch

ACTION_FEATURES = ("x", "y", "yaw")
"""Last axis of an action: rear-axle position (m) and yaw (rad) in the ego frame."""
ACTION_FRAME = "ego_rear_axle"
"""AlpaSim's rig frame: origin at the rear-axle centre, x forward, y left, yaw counter-clockwise."""
ACTION_DT = 0.1
"""Seconds between two poses of an action."""
MIN_HORIZON = 5
"""The env accepts ``H >= 5`` (its controller extrapolates past the last pose)."""


@dataclass(frozen=True)
class ActionSpec:
    """What a trajectory action is; a checkpoint records it and an env must accept it."""

    horizon: int = 20
    """H, the number of future poses (``k = 1..H``; the current pose is not included)."""
    dt: float = ACTION_DT
    """Seconds between poses."""
    features: tuple[str, ...] = ACTION_FEATURES
    """Names of the last axis."""
    frame: str = ACTION_FRAME
    """Frame the poses are expressed in."""

    def __post_init__(self) -> None:
        if not isinstance(self.horizon, int) or self.horizon < MIN_HORIZON:
            raise ValueError(f"ActionSpec.horizon must be an int >= {MIN_HORIZON}, got {self.horizon!r}")
        if not self.dt > 0:
            raise ValueError(f"ActionSpec.dt must be > 0 s, got {self.dt!r}")
        object.__setattr__(self, "features", tuple(self.features))

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of one action (no batch dimension)."""
        return (self.horizon, len(self.features))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["features"] = list(self.features)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ActionSpec:
        unknown = set(d) - {"horizon", "dt", "features", "frame"}
        if unknown:
            raise ValueError(f"ActionSpec: unknown fields {sorted(unknown)}")
        return cls(**{**d, "features": tuple(d.get("features", ACTION_FEATURES))})


class PolicySpecMismatch(ValueError):
    """A policy (or checkpoint) reads keys the env does not provide, or emits actions it does not take."""


def spec_mismatches(
    policy_obs_keys: Sequence[str],
    policy_action: ActionSpec,
    env_obs_keys: Sequence[str],
    env_action: ActionSpec,
) -> list[str]:
    """What does not match between a policy's specs and an env's (empty list: compatible).

    The policy's keys must all be provided by the env (an env may provide more); the action specs
    must be equal."""
    problems = []
    missing = [k for k in policy_obs_keys if k not in env_obs_keys]
    if missing:
        problems.append(f"observation keys {missing} are not provided by the env")
    if policy_action != env_action:
        problems.append("the action specs differ")
    return problems


def check_compatible(
    policy_obs_keys: Sequence[str],
    policy_action: ActionSpec,
    env_obs_keys: Sequence[str],
    env_action: ActionSpec,
    what: str = "policy",
) -> None:
    """Raise :class:`PolicySpecMismatch` naming both specs when the policy cannot drive the env."""
    problems = spec_mismatches(policy_obs_keys, policy_action, env_obs_keys, env_action)
    if problems:
        raise PolicySpecMismatch(
            f"{what} does not match the env: {'; '.join(problems)}.\n"
            f"  {what}: obs_keys={list(policy_obs_keys)}, action={policy_action.to_dict()}\n"
            f"  env:    obs_keys={list(env_obs_keys)}, action={env_action.to_dict()}"
        )


@runtime_checkable
class Policy(Protocol):
    """A batched driving policy on torch tensors.

    Shapes: ``B`` batch, ``H = horizon``. ``obs`` holds at least ``obs_keys`` and their masks.
    """

    obs_keys: tuple[str, ...]
    """Observation keys the policy reads (a subset of ``alpagym_ray.observations.SPECS``)."""
    horizon: int
    """H, the number of poses per action."""
    action_spec: ActionSpec
    """The action the policy emits (``action_spec.horizon == horizon``)."""
    deterministic: bool
    """Default mode of :meth:`act`: True returns the most likely action instead of sampling."""

    def act(
        self,
        obs: Mapping[str, torch.Tensor],
        generator: torch.Generator | None = None,
        deterministic: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Actions ``[B, H, 3]``, their log-probabilities ``[B]`` (exactly what :meth:`log_prob`
        returns for them) and extras (``{name: [B, ...]}``, e.g. the chosen mode)."""
        ...

    def log_prob(self, obs: Mapping[str, torch.Tensor], action: torch.Tensor) -> torch.Tensor:
        """Log-probability ``[B]`` of ``action [B, H, 3]``; differentiable in the parameters."""
        ...

    def entropy(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Entropy ``[B]`` where the policy defines one (raises NotImplementedError otherwise)."""
        ...

    def state_dict(self) -> Mapping[str, Any]: ...

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> Any: ...
