import math

import pytest
import torch

from learners.baselines import ConstantVelocityPolicy
from learners.bc import BCConfig, ade_fde, bc_loss, check_dataset, evaluate, lr_factor, train_bc
from learners.trajectory_policy import ROUTE_KEYS, TrajectoryPolicy, TrajectoryPolicyConfig


def test_ade_fde_known_answers():
    pred = torch.zeros(2, 4, 3)
    target = torch.zeros(2, 4, 3)
    target[0, :, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])  # errors 1, 2, 3, 4
    target[1, :, 1] = 3.0
    target[1, :, 0] = 4.0  # error 5 everywhere
    ade, fde = ade_fde(pred, target)
    torch.testing.assert_close(ade, torch.tensor([2.5, 5.0]))
    torch.testing.assert_close(fde, torch.tensor([4.0, 5.0]))
    valid = torch.tensor([[True, True, False, False], [False, False, False, False]])
    ade, fde = ade_fde(pred, target, valid)
    assert float(ade[0]) == 1.5 and float(fde[0]) == 2.0
    assert math.isnan(float(ade[1])) and math.isnan(float(fde[1]))


def test_lr_schedule():
    cfg = BCConfig(lr=1.0, warmup_steps=10, min_lr_frac=0.1)
    assert lr_factor(0, 100, cfg) == pytest.approx(0.1)
    assert lr_factor(9, 100, cfg) == pytest.approx(1.0)
    assert lr_factor(10, 100, cfg) == pytest.approx(1.0)
    assert lr_factor(55, 100, cfg) == pytest.approx(0.55)
    assert lr_factor(100, 100, cfg) == pytest.approx(0.1)


def test_config_and_dataset_checks(make_driving):
    with pytest.raises(ValueError, match="epochs"):
        BCConfig(epochs=0)
    with pytest.raises(ValueError, match="anchor_ce_weight"):
        BCConfig(anchor_ce_weight=-1)
    data = make_driving(10)
    assert check_dataset(data, ROUTE_KEYS) == 10
    with pytest.raises(KeyError, match="route_mask"):
        check_dataset({k: v for k, v in data.items() if k != "route_mask"}, ROUTE_KEYS, "train set")
    data["target"] = data["target"][:5]
    with pytest.raises(ValueError, match="leading sizes differ"):
        check_dataset(data, ROUTE_KEYS)


def test_bc_loss_is_the_nll_plus_anchor_cross_entropy(make_driving):
    torch.manual_seed(0)
    policy = TrajectoryPolicy(TrajectoryPolicyConfig(size="tiny", obs_keys=ROUTE_KEYS, num_anchors=4))
    batch = make_driving(16)
    nll = -policy.log_prob(batch, batch["target"]).mean()
    torch.testing.assert_close(bc_loss(policy, batch), nll)
    closest = policy.closest_anchor(batch, batch["target"])
    ce = torch.nn.functional.cross_entropy(policy.distribution(batch).logits, closest)
    torch.testing.assert_close(bc_loss(policy, batch, 0.5), nll + 0.5 * ce)


def test_behaviour_cloning_beats_constant_velocity(make_driving, one_thread):
    """The synthetic expert turns with the route and accelerates as its history says: constant
    velocity misses both, a cloned policy learns them."""
    torch.manual_seed(0)
    train, val = make_driving(600, seed=0), make_driving(200, seed=1)
    policy = TrajectoryPolicy(TrajectoryPolicyConfig(size="tiny", obs_keys=ROUTE_KEYS, num_anchors=16))
    policy.fit_anchors(train)
    before = evaluate(policy, val)
    records = []
    result = train_bc(policy, train, val, BCConfig(epochs=12, batch_size=64, lr=3e-3, warmup_steps=20),
                      on_epoch=records.append)
    cv = evaluate(ConstantVelocityPolicy(20), val)
    after = result.history[-1]
    assert records == result.history and len(records) == 12
    assert result.steps == 12 * math.ceil(600 / 64)
    assert after["val_nll"] < before["nll"] - 5
    assert after["val_ade"] < 0.5 * cv["ade"], (after, cv)
    assert after["val_ade"] < before["ade"]
