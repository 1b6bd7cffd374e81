"""GRPO's maths as pure functions (DESIGN.md, "Algorithm defaults" and "GRPO iteration").

Notation (per decision row i of an episode in group g):
    A_g,e  = R_e − mean_{e' in g} R_e'             Dr. GRPO advantage (Liu et al. 2025, arXiv:2503.20783);
                                                   optionally divided by the group std (Shao et al. 2024)
    r_i    = π_θ(a_i|s_i) / π_old(a_i|s_i)         ratio to the policy at the start of the iteration
    w_i    = min(π_old(a_i|s_i) / π_behavior(a_i|s_i), 2)   truncated importance weight (stale actors)
    L_clip = −min(r A, clip(r, 1−ε_low, 1+ε_high) A)        asymmetric clip ("clip-higher", DAPO)
    dual clip (Ye et al. 2020, arXiv:1912.09729): for A < 0, L_clip ≤ −c A (c = 3)
    loss   = Σ_i w_i (L_clip,i + β KL_i) / N_global          normalised by the global number of rows
KL_i is the k3 estimator exp(q−p) − (q−p) − 1 with p = log π_θ, q = log π_ref (Schulman 2020).

:class:`GRPO` wraps them as the algorithm object the learner builds from its config node
(``learner.algorithm._target_: learners.grpo.GRPO`` in ``alpagym_ray/conf/learner/grpo.yaml``): the
learner core knows only its ``advantages`` / ``loss`` interface, never this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GRPOConfig:
    """GRPO loss hyper-parameters."""

    eps_low: float = 0.2
    """Lower clip of the ratio: 1 − eps_low."""
    eps_high: float = 0.28
    """Upper clip of the ratio: 1 + eps_high (clip-higher keeps exploration alive)."""
    dual_clip: float = 3.0
    """Bound c of the dual clip for negative advantages (≤ 1 disables it)."""
    is_cap: float = 2.0
    """Cap of the truncated importance weight π_old / π_behavior."""
    scale_by_std: bool = False
    """Divide advantages by the group's return std (original GRPO) instead of Dr. GRPO's plain centring."""
    kl_coef: float = 0.0
    """β of the KL penalty to the frozen reference policy (0: no reference needed)."""

    def __post_init__(self) -> None:
        if not (0 < self.eps_low < 1 and self.eps_high > 0):
            raise ValueError(f"GRPOConfig: need 0 < eps_low < 1 and eps_high > 0, got {self.eps_low}, {self.eps_high}")
        if self.is_cap < 1:
            raise ValueError(f"GRPOConfig.is_cap must be >= 1, got {self.is_cap}")
        if self.kl_coef < 0:
            raise ValueError(f"GRPOConfig.kl_coef must be >= 0, got {self.kl_coef}")


def group_advantages(
    returns: torch.Tensor, scale_by_std: bool = False, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-episode advantages of groups.

    Args:
        returns: ``[num_groups, G]`` episode returns, one row per group.
        scale_by_std: divide by the group's (population) std.
    Returns:
        ``(advantages [num_groups, G], informative [num_groups] bool)``; a group whose returns are
        all equal carries no signal (its advantages are 0) and is reported as not informative.
    """
    mean = returns.mean(dim=1, keepdim=True)
    adv = returns - mean
    std = returns.std(dim=1, unbiased=False, keepdim=True)
    informative = (std[:, 0] > eps)
    if scale_by_std:
        adv = adv / std.clamp(min=eps)
    return torch.where(informative[:, None], adv, torch.zeros_like(adv)), informative


def truncated_is_weight(logp_old: torch.Tensor, logp_behavior: torch.Tensor, cap: float) -> torch.Tensor:
    """``min(π_old / π_behavior, cap)`` per row ``[N]``, without gradient."""
    return torch.exp(logp_old - logp_behavior).clamp(max=cap).detach()


def grpo_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    logp_behavior: torch.Tensor,
    advantages: torch.Tensor,
    num_rows_global: int,
    cfg: GRPOConfig,
    logp_ref: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO surrogate of one minibatch shard.

    Args:
        logp: ``[N]`` log π_θ(a|s) of the stored actions (with gradient).
        logp_old: ``[N]`` log π_old at the start of the iteration (no gradient).
        logp_behavior: ``[N]`` log-prob recorded by the rollout worker that acted.
        advantages: ``[N]`` the episode's advantage repeated on each of its decision rows.
        num_rows_global: decision rows of the whole minibatch across every learner rank, so that the
            gradients summed by DDP equal the single-learner gradient.
        logp_ref: ``[N]`` log π_ref, needed when ``cfg.kl_coef > 0``.
    Returns:
        ``(loss, stats)`` where ``loss`` is the shard's share (sum over rows / num_rows_global).
    """
    log_ratio = logp - logp_old.detach()
    ratio = torch.exp(log_ratio)
    surr = ratio * advantages
    surr_clipped = torch.clamp(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high) * advantages
    objective = torch.minimum(surr, surr_clipped)
    if cfg.dual_clip > 1.0:
        objective = torch.where(advantages < 0, torch.maximum(objective, cfg.dual_clip * advantages), objective)
    w = truncated_is_weight(logp_old, logp_behavior, cfg.is_cap)
    per_row = -objective
    kl = torch.zeros_like(logp)
    if cfg.kl_coef > 0:
        if logp_ref is None:
            raise ValueError("grpo_loss: kl_coef > 0 needs logp_ref")
        d = logp_ref.detach() - logp
        kl = torch.exp(d) - d - 1.0
        per_row = per_row + cfg.kl_coef * kl
    loss = (w * per_row).sum() / max(int(num_rows_global), 1)
    with torch.no_grad():
        clipped = ((ratio < 1.0 - cfg.eps_low) & (advantages < 0)) | ((ratio > 1.0 + cfg.eps_high) & (advantages > 0))
        raw_w = torch.exp(logp_old - logp_behavior)
        n = max(logp.numel(), 1)
        stats = {
            "clip_fraction": clipped.float().sum() / n,
            "approx_kl": ((ratio - 1.0) - log_ratio).sum() / n,  # k3 estimate of KL(π_old || π_θ)
            "kl_ref": kl.detach().sum() / n,
            "is_weight_mean": w.sum() / n,
            "is_weight_max": raw_w.max() if logp.numel() else torch.zeros(()),
            "is_ess_fraction": (w.sum() ** 2) / (w.pow(2).sum().clamp(min=1e-12) * n),
        }
    return loss, stats


class GRPO:
    """GRPO as the learner's algorithm object (``alpagym_ray.learner.Algorithm``).

    Built from the config node ``learner.algorithm`` (its keys are the :class:`GRPOConfig` fields, so
    an unknown key fails with TypeError naming it); the methods call the pure functions above."""

    name = "grpo"
    """Recorded in checkpoint provenance."""

    def __init__(self, eps_low: float = 0.2, eps_high: float = 0.28, dual_clip: float = 3.0, is_cap: float = 2.0,
                 scale_by_std: bool = False, kl_coef: float = 0.0) -> None:
        self.config = GRPOConfig(eps_low=float(eps_low), eps_high=float(eps_high), dual_clip=float(dual_clip),
                                 is_cap=float(is_cap), scale_by_std=bool(scale_by_std), kl_coef=float(kl_coef))

    @property
    def needs_reference(self) -> bool:
        """Whether :meth:`loss` needs ``logp_ref`` (a frozen copy of the starting policy)."""
        return self.config.kl_coef > 0

    def advantages(self, returns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``returns [num_groups, G]`` -> ``(advantages [num_groups, G], informative [num_groups])``;
        see :func:`group_advantages`."""
        return group_advantages(returns, scale_by_std=self.config.scale_by_std)

    def loss(self, logp: torch.Tensor, logp_old: torch.Tensor, logp_behavior: torch.Tensor,
             advantages: torch.Tensor, num_rows_global: int,
             logp_ref: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The surrogate of one minibatch shard, rows ``[N]``; see :func:`grpo_loss`."""
        return grpo_loss(logp, logp_old, logp_behavior, advantages, num_rows_global, self.config, logp_ref)

    def __repr__(self) -> str:
        return f"GRPO({self.config})"
