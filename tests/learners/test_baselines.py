import math

import pytest
import torch

from alpagym_ray.policy import Policy
from learners.baselines import ConstantVelocityPolicy, LoggedReplayPolicy, constant_velocity_trajectory


def _history(speed: float, yaw_rate: float, batch: int = 1) -> dict[str, torch.Tensor]:
    hist = torch.zeros(batch, 16, 7)
    hist[..., 4], hist[..., 6] = speed, yaw_rate
    return {"ego_history": hist, "ego_history_mask": torch.ones(batch, 16, dtype=torch.bool)}


def test_constant_velocity_straight_and_circle():
    policy = ConstantVelocityPolicy(horizon=20)
    assert isinstance(policy, Policy)
    action, logp, extras = policy.act(_history(10.0, 0.0))
    t = torch.arange(1, 21) * 0.1
    torch.testing.assert_close(action[0, :, 0], 10.0 * t)
    assert torch.equal(action[0, :, 1:], torch.zeros(20, 2))
    assert torch.equal(logp, torch.zeros(1)) and extras == {}
    # 10 m/s at 0.1 rad/s: a circle of radius 100 m centred at (0, 100)
    action, _, _ = policy.act(_history(10.0, 0.1))
    r = torch.linalg.vector_norm(action[0, :, :2] - torch.tensor([0.0, 100.0]), dim=-1)
    torch.testing.assert_close(r, torch.full((20,), 100.0), atol=1e-3, rtol=0)
    torch.testing.assert_close(action[0, :, 2], 0.1 * t)
    assert float(action[0, -1, 1]) > 0  # turning left


def test_constant_velocity_tiny_yaw_rate_is_continuous():
    a = constant_velocity_trajectory(torch.tensor([10.0, 10.0]), torch.tensor([0.99e-6, 1.01e-6]), 20)
    torch.testing.assert_close(a[0], a[1], atol=1e-5, rtol=0)
    b = constant_velocity_trajectory(torch.tensor([10.0]), torch.tensor([1e-4]), 20)
    torch.testing.assert_close(b[0, -1, 1], torch.tensor(10.0 * 1e-4 * 2.0**2 / 2), rtol=1e-4, atol=0)


def test_constant_velocity_invalid_current_state_stands_still():
    obs = _history(10.0, 0.3)
    obs["ego_history_mask"][:, -1] = False
    action, _, _ = ConstantVelocityPolicy(20).act(obs)
    assert torch.equal(action, torch.zeros(1, 20, 3))


def test_logged_replay_returns_the_log_and_extrapolates_past_its_end():
    gt = torch.zeros(2, 64, 3)
    gt[:, :, 0] = torch.arange(1, 65) * 0.5
    gt[:, :, 2] = 0.01
    mask = torch.ones(2, 64, dtype=torch.bool)
    mask[1, 10:] = False  # the log ends 1 s ahead in env 1
    policy = LoggedReplayPolicy(horizon=20)
    action, logp, _ = policy.act({"gt_trajectory": gt, "gt_trajectory_mask": mask})
    assert torch.equal(action[0], gt[0, :20])
    torch.testing.assert_close(action[1, :, 0], torch.arange(1, 21) * 0.5)  # constant velocity beyond
    torch.testing.assert_close(action[1, 10:, 2], torch.full((10,), 0.01))
    assert torch.equal(logp, torch.zeros(2))


def test_logged_replay_without_any_log_holds_the_pose():
    gt = torch.randn(1, 64, 3)
    obs = {"gt_trajectory": gt, "gt_trajectory_mask": torch.zeros(1, 64, dtype=torch.bool)}
    action, _, _ = LoggedReplayPolicy(5).act(obs)
    assert torch.equal(action, torch.zeros(1, 5, 3))


def test_baselines_have_no_weights_and_reject_a_checkpoint():
    assert ConstantVelocityPolicy(20).state_dict() == {}
    with pytest.raises(ValueError, match="no weights"):
        ConstantVelocityPolicy(20, model={"path": "some/ckpt"})
    with pytest.raises(KeyError, match="gt_trajectory"):
        LoggedReplayPolicy(20).act(_history(1.0, 0.0))
    assert math.isclose(ConstantVelocityPolicy(64).action_spec.dt, 0.1)
