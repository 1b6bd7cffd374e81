"""The flat weight buffer (alpagym_ray.flat_params): round trips, layout checks, and writing into a
caller's reused buffer (what the learner does on every publish)."""

from __future__ import annotations

import pytest
import torch

from alpagym_ray.flat_params import flat_layout, flat_size, flatten_params, host_buffer, load_flat_params
from alpagym_ray.observations import SPECS, mask_key
from learners.trajectory_policy import TrajectoryPolicy, TrajectoryPolicyConfig

KEYS = ("ego_history", "route")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _policy(seed: int) -> TrajectoryPolicy:
    torch.manual_seed(seed)
    return TrajectoryPolicy(TrajectoryPolicyConfig(size="tiny", obs_keys=KEYS))


def _obs(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    obs = {}
    for k in KEYS:
        obs[k] = torch.randn((batch, *SPECS[k].shape), generator=g)
        obs[mask_key(k)] = torch.rand((batch, SPECS[k].shape[0]), generator=g) < 0.7
    return obs


def test_flat_round_trip_reproduces_outputs_bit_for_bit():
    src, dst = _policy(0), _policy(1)
    with torch.no_grad():
        src.anchors.add_(0.25)  # the anchors (a buffer) travel with the weights
    flat = flatten_params(src)
    assert flat.ndim == 1 and flat.numel() == flat_size(src)
    assert flat_size(src) == sum(p.numel() for p in src.parameters()) + src.anchors.numel()
    assert [n for n, _ in flat_layout(src)][-1] != "spline_w"  # non-persistent buffers stay out
    obs = _obs(4)
    assert not torch.equal(src.act(obs, deterministic=True)[0], dst.act(obs, deterministic=True)[0])
    load_flat_params(dst, flat)
    a, lp, _ = src.act(obs, torch.Generator().manual_seed(0))
    b, lq, _ = dst.act(obs, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and torch.equal(lp, lq)
    # the buffer is a copy: changing the source later does not change it
    with torch.no_grad():
        next(src.parameters()).add_(1.0)
    assert torch.equal(flat, flatten_params(dst))


def test_out_buffer_is_reused_and_tracks_the_weights():
    policy = _policy(0)
    out = host_buffer(policy)
    assert out.shape == (flat_size(policy),) and out.dtype == torch.float32 and not out.is_pinned()
    ptr = out.data_ptr()
    first = flatten_params(policy, out=out)
    assert first is out and out.data_ptr() == ptr
    assert torch.equal(out, flatten_params(policy))
    with torch.no_grad():  # an optimizer step: the next publish writes the new values in place
        for p in policy.parameters():
            p.mul_(0.5).add_(0.125)
    again = flatten_params(policy, out=out)
    assert again is out and out.data_ptr() == ptr
    assert torch.equal(out, flatten_params(policy))
    # a float64 buffer receives converted values
    wide = flatten_params(policy, out=torch.empty(flat_size(policy), dtype=torch.float64))
    torch.testing.assert_close(wide, flatten_params(policy).double(), rtol=0, atol=0)


def test_out_buffer_of_a_mixed_dtype_model_converts_each_entry():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 2).double())
    out = flatten_params(model, out=host_buffer(model))
    expected = torch.cat([v.detach().float().reshape(-1) for v in model.state_dict().values()])
    assert torch.equal(out, expected)


def test_wrong_out_buffers_are_refused():
    policy = _policy(0)
    n = flat_size(policy)
    with pytest.raises(ValueError, match="does not match"):
        flatten_params(policy, out=torch.empty(n + 1))
    with pytest.raises(ValueError, match="does not match"):
        flatten_params(policy, out=torch.empty(2, n // 2))
    with pytest.raises(TypeError, match="floating-point"):
        flatten_params(policy, out=torch.empty(n, dtype=torch.int32))


def test_flat_size_mismatch_is_refused():
    policy = _policy(0)
    with pytest.raises(ValueError, match="does not match"):
        load_flat_params(policy, torch.zeros(flat_size(policy) + 1))
    with pytest.raises(ValueError, match="does not match"):
        load_flat_params(policy, torch.zeros(2, flat_size(policy) // 2))


def test_mixed_dtypes_are_refused_without_out():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).double())
    with pytest.raises(TypeError, match="mixed dtypes"):
        flatten_params(model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_is_written_into_a_pinned_host_buffer():
    policy = _policy(0).cuda()
    out = host_buffer(policy)
    assert out.is_pinned() and out.device.type == "cpu"
    flatten_params(policy, out=out)
    assert torch.equal(out, flatten_params(policy).cpu())
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1.0)
    flatten_params(policy, out=out)  # synchronised before return: the host values are the new ones
    assert torch.equal(out, flatten_params(policy).cpu())
