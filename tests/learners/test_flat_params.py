import pytest
import torch

from learners.flat_params import flat_layout, flat_size, flatten_params, load_flat_params
from learners.trajectory_policy import TrajectoryPolicy, TrajectoryPolicyConfig


def _policy(seed: int) -> TrajectoryPolicy:
    torch.manual_seed(seed)
    return TrajectoryPolicy(TrajectoryPolicyConfig(size="tiny", obs_keys=("ego_history", "route")))


def test_flat_round_trip_reproduces_outputs_bit_for_bit(make_obs):
    src, dst = _policy(0), _policy(1)
    with torch.no_grad():
        src.anchors.add_(0.25)  # the anchors (a buffer) travel with the weights
    flat = flatten_params(src)
    assert flat.ndim == 1 and flat.numel() == flat_size(src)
    assert flat_size(src) == sum(p.numel() for p in src.parameters()) + src.anchors.numel()
    assert [n for n, _ in flat_layout(src)][-1] != "spline_w"  # non-persistent buffers stay out
    obs = make_obs(4, ("ego_history", "route"))
    assert not torch.equal(src.act(obs, deterministic=True)[0], dst.act(obs, deterministic=True)[0])
    load_flat_params(dst, flat)
    a, lp, _ = src.act(obs, torch.Generator().manual_seed(0))
    b, lq, _ = dst.act(obs, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and torch.equal(lp, lq)
    # the buffer is a copy: changing the source later does not change it
    with torch.no_grad():
        next(src.parameters()).add_(1.0)
    assert torch.equal(flat, flatten_params(dst))


def test_flat_size_mismatch_is_refused():
    policy = _policy(0)
    with pytest.raises(ValueError, match="does not match"):
        load_flat_params(policy, torch.zeros(flat_size(policy) + 1))
    with pytest.raises(ValueError, match="does not match"):
        load_flat_params(policy, torch.zeros(2, flat_size(policy) // 2))


def test_mixed_dtypes_are_refused():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).double())
    with pytest.raises(TypeError, match="mixed dtypes"):
        flatten_params(model)
