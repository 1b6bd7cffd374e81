"""Open-loop behaviour cloning: maximise the log-likelihood of logged expert futures.

A dataset is a dict of tensors sharing the leading dimension ``N``: the observation keys a policy
reads with their ``<key>_mask``s (``alpagym_ray.observations``), plus ``target [N, H, 3]`` (the
logged ego future, ``gt_trajectory[:, :H]``) and ``target_mask [N, H]``. The loss is the policy's
own negative log-likelihood of the target (``policy.log_prob``), the quantity GRPO later moves, so
a pre-trained policy starts RL with a calibrated distribution. Validation reports ADE / FDE (m) of
the deterministic action against the target.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from alpagym_ray.observations import mask_key
from learners.anchors import control_points_of

Dataset = dict[str, torch.Tensor]


@dataclass(frozen=True)
class BCConfig:
    """Behaviour-cloning optimisation settings."""

    epochs: int = 30
    """Passes over the training set."""
    batch_size: int = 128
    """Samples per optimizer step."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    warmup_steps: int = 50
    """Linear learning-rate warm-up steps, then cosine decay to ``lr * min_lr_frac``."""
    min_lr_frac: float = 0.05
    """Final learning rate as a fraction of ``lr``."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0: none)."""
    seed: int = 0
    """Seed of the batch order."""
    eval_batch_size: int = 512
    """Samples per forward pass during validation."""
    anchor_ce_weight: float = 1.0
    """Weight of the closest-anchor cross-entropy added to the NLL (``bc_loss``); 0 for policies
    without anchors."""

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError(f"BCConfig: epochs, batch_size and eval_batch_size must be >= 1, got "
                             f"{self.epochs}, {self.batch_size}, {self.eval_batch_size}")
        if not self.lr > 0 or self.weight_decay < 0 or self.grad_clip < 0 or self.warmup_steps < 0:
            raise ValueError("BCConfig: need lr > 0 and weight_decay, grad_clip, warmup_steps >= 0")
        if self.anchor_ce_weight < 0:
            raise ValueError(f"BCConfig.anchor_ce_weight must be >= 0, got {self.anchor_ce_weight}")
        if not 0 <= self.min_lr_frac <= 1:
            raise ValueError(f"BCConfig.min_lr_frac must be in [0, 1], got {self.min_lr_frac}")


def check_dataset(data: Mapping[str, torch.Tensor], obs_keys: tuple[str, ...], where: str = "dataset") -> int:
    """Check that ``data`` holds the keys, masks and target with one leading size; return ``N``."""
    needed = [*obs_keys, *(mask_key(k) for k in obs_keys), "target", "target_mask"]
    missing = [k for k in needed if k not in data]
    if missing:
        raise KeyError(f"{where}: missing {missing} (has {sorted(data)})")
    sizes = {k: int(data[k].shape[0]) for k in needed}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"{where}: leading sizes differ: {sizes}")
    return next(iter(sizes.values()))


def subset(data: Mapping[str, torch.Tensor], idx: torch.Tensor) -> Dataset:
    """Rows ``idx`` of every tensor."""
    return {k: v[idx] for k, v in data.items()}


def iterate_batches(
    data: Mapping[str, torch.Tensor], batch_size: int, generator: torch.Generator | None = None
) -> Iterator[Dataset]:
    """Batches of ``data`` in a shuffled order (``generator``) or in order (None); the last may be short."""
    n = next(iter(data.values())).shape[0]
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for i in range(0, n, batch_size):
        yield subset(data, order[i : i + batch_size].to(next(iter(data.values())).device))


def ade_fde(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Average and final displacement errors ``([B], [B])`` in metres.

    ``pred`` and ``target`` are ``[B, H, >=2]`` (only x, y are compared); ``valid [B, H]`` limits the
    steps (FDE at the last valid step; NaN for a sample without a valid step)."""
    err = torch.linalg.vector_norm(pred[..., :2] - target[..., :2], dim=-1)
    if valid is None:
        valid = torch.ones_like(err, dtype=torch.bool)
    v = valid.to(err.dtype)
    n = v.sum(-1)
    ade = (err * v).sum(-1) / n.clamp(min=1)
    last = (torch.arange(err.shape[-1], device=err.device) * valid).argmax(-1)
    fde = err.gather(-1, last[:, None]).squeeze(-1)
    nan = torch.full_like(ade, float("nan"))
    return torch.where(n > 0, ade, nan), torch.where(n > 0, fde, nan)


def bc_loss(
    policy: nn.Module, batch: Mapping[str, torch.Tensor], anchor_ce_weight: float = 0.0
) -> torch.Tensor:
    """Mean negative log-likelihood of the batch's targets under ``policy`` (a scalar).

    With ``anchor_ce_weight > 0`` (policies with ``distribution`` and ``closest_anchor``, such as
    ``learners.trajectory_policy.TrajectoryPolicy``), add that
    times the cross-entropy of the anchor logits against each target's closest anchor (MultiPath's
    classification loss): it keeps the anchors specialised and the most likely anchor, which the
    deterministic mode drives, sharp."""
    target = batch["target"][:, : policy.horizon]
    if anchor_ce_weight == 0:
        return -policy.log_prob(batch, target).mean()
    dist = policy.distribution(batch)
    ce = F.cross_entropy(dist.logits, policy.closest_anchor(batch, target))
    return -dist.log_prob(control_points_of(target, policy.steps)).mean() + anchor_ce_weight * ce


@torch.no_grad()
def evaluate(policy: nn.Module, data: Mapping[str, torch.Tensor], batch_size: int = 512) -> dict[str, float]:
    """Validation metrics of the deterministic action: mean ADE, FDE (m) and NLL over ``data``."""
    was_training = policy.training
    policy.eval()
    ade, fde, nll = [], [], []
    for batch in iterate_batches(data, batch_size):
        action, _, _ = policy.act(batch, deterministic=True)
        h = action.shape[1]
        a, f = ade_fde(action, batch["target"][:, :h], batch["target_mask"][:, :h].bool())
        ade.append(a)
        fde.append(f)
        nll.append(-policy.log_prob(batch, batch["target"][:, :h]))
    policy.train(was_training)
    cat = lambda xs: torch.cat(xs).float()  # noqa: E731
    return {"ade": float(cat(ade).nanmean()), "fde": float(cat(fde).nanmean()), "nll": float(cat(nll).mean())}


@dataclass
class BCResult:
    """What :func:`train_bc` returns."""

    history: list[dict[str, float]] = field(default_factory=list)
    """One entry per epoch: ``epoch``, ``train_nll``, ``val_ade``, ``val_fde``, ``val_nll``, ``lr``."""
    optimizer: torch.optim.Optimizer | None = None
    """The optimizer (its state goes into the checkpoint for resuming)."""
    steps: int = 0
    """Optimizer steps taken."""


def lr_factor(step: int, total: int, cfg: BCConfig) -> float:
    """Linear warm-up to 1, then cosine decay to ``cfg.min_lr_frac`` at ``total`` steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac))


def train_bc(
    policy: nn.Module,
    train: Mapping[str, torch.Tensor],
    val: Mapping[str, torch.Tensor] | None,
    cfg: BCConfig,
    *,
    on_step: Callable[[int, float], None] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> BCResult:
    """Behaviour cloning of ``policy`` on ``train`` (on the policy's device), validating on ``val``
    after each epoch. ``on_step(step, loss)`` and ``on_epoch(record)`` report progress."""
    n = check_dataset(train, policy.obs_keys, "train set")
    if val is not None:
        check_dataset(val, policy.obs_keys, "validation set")
    device = next(policy.parameters()).device
    train = {k: v.to(device) for k, v in train.items()}
    val = {k: v.to(device) for k, v in val.items()} if val is not None else None
    decay = [p for p in policy.parameters() if p.ndim >= 2]
    no_decay = [p for p in policy.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    total = cfg.epochs * math.ceil(n / cfg.batch_size)
    gen = torch.Generator().manual_seed(cfg.seed)
    result = BCResult(optimizer=opt)
    policy.train()
    for epoch in range(cfg.epochs):
        losses = []
        for batch in iterate_batches(train, cfg.batch_size, gen):
            for g in opt.param_groups:
                g["lr"] = cfg.lr * lr_factor(result.steps, total, cfg)
            loss = bc_loss(policy, batch, cfg.anchor_ce_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
            opt.step()
            result.steps += 1
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(result.steps, losses[-1])
        record = {"epoch": epoch + 1, "train_nll": sum(losses) / len(losses), "lr": opt.param_groups[0]["lr"]}
        if val is not None:
            record.update({f"val_{k}": v for k, v in evaluate(policy, val, cfg.eval_batch_size).items()})
        result.history.append(record)
        if on_epoch is not None:
            on_epoch(record)
    return result
