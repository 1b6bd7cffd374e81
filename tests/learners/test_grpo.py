"""GRPO advantages and loss against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from learners.grpo import GRPO, GRPOConfig, group_advantages, grpo_loss, truncated_is_weight


def test_group_advantages_dr_grpo_and_std_scaling():
    returns = torch.tensor([[1.0, 3.0], [2.0, 2.0], [0.0, 4.0]])
    adv, informative = group_advantages(returns)
    assert adv.tolist() == [[-1.0, 1.0], [0.0, 0.0], [-2.0, 2.0]]
    assert informative.tolist() == [True, False, True]
    adv_std, _ = group_advantages(returns, scale_by_std=True)
    # population std of [1, 3] is 1, of [0, 4] is 2: both groups become [-1, 1]
    assert adv_std.tolist() == [[-1.0, 1.0], [0.0, 0.0], [-1.0, 1.0]]


def test_truncated_importance_weight_caps_at_two():
    w = truncated_is_weight(torch.tensor([0.0, 0.0, math.log(3.0)]), torch.tensor([0.0, math.log(2.0), 0.0]), 2.0)
    assert w.tolist() == pytest.approx([1.0, 0.5, 2.0])


def one_row(ratio: float, adv: float, cfg: GRPOConfig | None = None, behavior_ratio: float = 1.0):
    """Loss of one row with π_θ/π_old = ratio and π_old/π_behavior = behavior_ratio."""
    logp_old = torch.tensor([0.0])
    logp = torch.tensor([math.log(ratio)], requires_grad=True)
    logp_b = torch.tensor([-math.log(behavior_ratio)])
    loss, stats = grpo_loss(logp, logp_old, logp_b, torch.tensor([adv]), 1, cfg or GRPOConfig())
    loss.backward()
    return float(loss), float(logp.grad), stats


def test_asymmetric_clip():
    # positive advantage: clipped above at 1 + 0.28, no gradient beyond it
    loss, grad, stats = one_row(1.5, 2.0)
    assert loss == pytest.approx(-1.28 * 2.0) and grad == 0.0 and float(stats["clip_fraction"]) == 1.0
    loss, grad, _ = one_row(1.2, 2.0)
    assert loss == pytest.approx(-1.2 * 2.0) and grad == pytest.approx(-1.2 * 2.0)
    # negative advantage: clipped below at 1 - 0.2
    loss, grad, _ = one_row(0.5, -1.0)
    assert loss == pytest.approx(0.8) and grad == 0.0
    loss, grad, _ = one_row(0.9, -1.0)
    assert loss == pytest.approx(0.9) and grad == pytest.approx(0.9)


def test_dual_clip_bounds_negative_advantages():
    # ratio 5 with A = -1: plain PPO loss would be 5; dual clip bounds it at c·|A| = 3, no gradient
    loss, grad, _ = one_row(5.0, -1.0)
    assert loss == pytest.approx(3.0) and grad == 0.0
    loss, _, _ = one_row(5.0, -1.0, GRPOConfig(dual_clip=0.0))
    assert loss == pytest.approx(5.0)


def test_truncated_importance_weight_scales_the_loss():
    loss, grad, _ = one_row(1.0, 1.0, behavior_ratio=0.5)
    assert loss == pytest.approx(-0.5) and grad == pytest.approx(-0.5)
    loss, _, stats = one_row(1.0, 1.0, behavior_ratio=3.0)
    assert loss == pytest.approx(-2.0)  # capped at 2
    assert float(stats["is_weight_max"]) == pytest.approx(3.0)


def test_loss_is_normalised_by_the_global_row_count():
    logp = torch.zeros(4, requires_grad=True)
    adv = torch.tensor([1.0, -1.0, 2.0, 0.0])
    loss_local, _ = grpo_loss(logp, torch.zeros(4), torch.zeros(4), adv, 4, GRPOConfig())
    loss_global, _ = grpo_loss(logp, torch.zeros(4), torch.zeros(4), adv, 8, GRPOConfig())
    assert float(loss_local) == pytest.approx(-0.5) and float(loss_global) == pytest.approx(-0.25)


def test_kl_to_reference_k3():
    logp = torch.tensor([0.0], requires_grad=True)
    cfg = GRPOConfig(kl_coef=0.5)
    loss, stats = grpo_loss(logp, torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), 1, cfg,
                            logp_ref=torch.tensor([math.log(2.0)]))
    kl = 2.0 - math.log(2.0) - 1.0
    assert float(stats["kl_ref"]) == pytest.approx(kl) and float(loss) == pytest.approx(0.5 * kl)
    with pytest.raises(ValueError, match="logp_ref"):
        grpo_loss(logp, torch.zeros(1), torch.zeros(1), torch.zeros(1), 1, cfg)


def test_bad_config_is_refused():
    with pytest.raises(ValueError):
        GRPOConfig(eps_low=1.5)
    with pytest.raises(ValueError):
        GRPOConfig(is_cap=0.5)


def test_grpo_algorithm_object_calls_the_pure_functions():
    algo = GRPO(eps_low=0.1, eps_high=0.2, scale_by_std=True, kl_coef=0.05)
    assert algo.config == GRPOConfig(eps_low=0.1, eps_high=0.2, scale_by_std=True, kl_coef=0.05)
    assert algo.needs_reference and not GRPO().needs_reference
    returns = torch.tensor([[1.0, 3.0, 2.0], [5.0, 5.0, 5.0]])
    adv, informative = algo.advantages(returns)
    ref_adv, ref_inf = group_advantages(returns, scale_by_std=True)
    assert torch.equal(adv, ref_adv) and torch.equal(informative, ref_inf)
    g = torch.Generator().manual_seed(0)
    logp, old, beh, ref = (torch.randn(12, generator=g) for _ in range(4))
    a = torch.randn(12, generator=g)
    loss, stats = algo.loss(logp, old, beh, a, 30, ref)
    ref_loss, ref_stats = grpo_loss(logp, old, beh, a, 30, algo.config, ref)
    assert torch.equal(loss, ref_loss) and stats.keys() == ref_stats.keys()


def test_grpo_algorithm_object_refuses_bad_fields():
    with pytest.raises(ValueError, match="is_cap"):
        GRPO(is_cap=0.5)
    with pytest.raises(TypeError, match="eps"):
        GRPO(eps=0.1)  # type: ignore[call-arg]
