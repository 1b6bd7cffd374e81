import math

import pytest
import torch
from torch import distributions as D

from alpagym_ray.policy import ActionSpec, Policy
from learners.anchors import control_points_of
from learners.priors import route_control
from learners.trajectory_policy import (
    ROUTE_KEYS,
    TrajectoryPolicy,
    TrajectoryPolicyConfig,
    build_policy,
)

ALL = ("ego_history", "route", "map_points", "agents")


def tiny(**kw) -> TrajectoryPolicy:
    torch.manual_seed(0)
    return TrajectoryPolicy(TrajectoryPolicyConfig(size="tiny", **kw))


def test_config_checks():
    with pytest.raises(ValueError, match="imitation target"):
        TrajectoryPolicyConfig(obs_keys=("ego_history", "gt_trajectory"))
    with pytest.raises(ValueError, match="unknown keys"):
        TrajectoryPolicyConfig(obs_keys=("ego_hist",))
    with pytest.raises(ValueError, match="size"):
        TrajectoryPolicyConfig(size="huge")
    with pytest.raises(ValueError, match="horizon"):
        TrajectoryPolicyConfig(horizon=4)
    with pytest.raises(ValueError, match="num_control_points"):
        TrajectoryPolicyConfig(horizon=5, num_control_points=6)
    with pytest.raises(ValueError, match="min_std"):
        TrajectoryPolicyConfig(min_std=1.0, init_std=0.5)
    cfg = TrajectoryPolicyConfig(size="tiny", horizon=64)
    assert cfg.d_model == 32 and cfg.num_control_points == 16
    assert TrajectoryPolicyConfig.from_dict(cfg.to_dict()) == cfg


def test_sizes():
    n_tiny = sum(p.numel() for p in tiny(obs_keys=ALL).parameters())
    assert n_tiny < 100_000
    n_default = sum(p.numel() for p in TrajectoryPolicy(TrajectoryPolicyConfig(obs_keys=ALL)).parameters())
    assert 1_000_000 < n_default < 10_000_000


def test_large_size_is_about_100m():
    large = TrajectoryPolicy(TrajectoryPolicyConfig(size="large", obs_keys=ROUTE_KEYS))
    assert 80e6 < sum(p.numel() for p in large.parameters()) < 150e6


@pytest.mark.parametrize("keys", [ROUTE_KEYS, ALL, (*ALL, "bev"), ("agents",)])
def test_act_shapes_and_exact_logp(make_obs, keys):
    policy = tiny(obs_keys=keys, prior="constant_velocity" if "ego_history" in keys else "none")
    assert isinstance(policy, Policy)
    assert policy.action_spec == ActionSpec(horizon=20)
    obs = make_obs(6, keys)
    action, logp, extras = policy.act(obs, torch.Generator().manual_seed(3))
    assert action.shape == (6, 20, 3) and logp.shape == (6,)
    assert extras["anchor"].shape == (6,) and extras["anchor"].dtype == torch.long
    assert torch.isfinite(action).all() and torch.isfinite(logp).all()
    # the stored action alone reproduces the log-probability bit for bit
    assert torch.equal(policy.log_prob(obs, action), logp)
    assert torch.equal(policy(obs, action), logp)
    # same generator seed: same sample; deterministic mode: no randomness at all
    again, _, _ = policy.act(obs, torch.Generator().manual_seed(3))
    assert torch.equal(action, again)
    d1, _, _ = policy.act(obs, deterministic=True)
    d2, _, _ = policy.act(obs, torch.Generator().manual_seed(9), deterministic=True)
    assert torch.equal(d1, d2)
    assert policy.entropy(obs).shape == (6,)


def test_fully_masked_observation_is_finite(make_obs):
    policy = tiny(obs_keys=ALL)
    obs = make_obs(3, ALL, mask_prob=0.0)
    action, logp, _ = policy.act(obs, torch.Generator().manual_seed(0))
    assert torch.isfinite(action).all() and torch.isfinite(logp).all()


def test_masked_elements_are_ignored(make_obs):
    policy = tiny(obs_keys=ALL)
    obs = make_obs(4, ALL)
    changed = {k: v.clone() for k, v in obs.items()}
    for k in ALL:
        m = obs[f"{k}_mask"]
        changed[k][~m] = 123.0  # garbage where masked out
    a, _, _ = policy.act(obs, deterministic=True)
    b, _, _ = policy.act(changed, deterministic=True)
    torch.testing.assert_close(a, b)


def test_missing_key_is_named(make_obs):
    policy = tiny(obs_keys=ALL)
    obs = make_obs(2, ROUTE_KEYS)
    with pytest.raises(KeyError, match="map_points"):
        policy.act(obs)


def test_log_prob_matches_an_independent_mixture(make_obs):
    """log_prob equals torch.distributions' mixture of diagonal Gaussians with the head's parameters."""
    policy = tiny(obs_keys=ROUTE_KEYS)
    obs = make_obs(5, ROUTE_KEYS)
    action, logp, _ = policy.act(obs, torch.Generator().manual_seed(1))
    dist = policy.distribution(obs)
    b, k = dist.logits.shape
    comp = D.Independent(D.Normal(dist.mean.reshape(b, k, -1), dist.std.reshape(b, k, -1)), 1)
    ref = D.MixtureSameFamily(D.Categorical(logits=dist.logits), comp)
    y = control_points_of(action, policy.steps).reshape(b, -1)
    torch.testing.assert_close(logp, ref.log_prob(y), atol=1e-4, rtol=1e-5)


def _one_obs(make_obs, n, keys):
    one = make_obs(1, keys, seed=4)
    return {k: v.expand(n, *v.shape[1:]) for k, v in one.items()}


def test_sampling_matches_the_distribution(make_obs):
    """The sampler draws from the density log_prob evaluates (statistical checks, fixed seeds)."""
    n = 20_000
    policy = tiny(obs_keys=ROUTE_KEYS, num_anchors=4, init_std=1.0)
    with torch.no_grad():  # spread the anchor weights so every component is visited
        policy.head[-1].bias[:4] = torch.tensor([0.0, 0.5, -0.5, 1.0])
        obs = _one_obs(make_obs, n, ROUTE_KEYS)
        action, logp, extras = policy.act(obs, torch.Generator().manual_seed(0))
        dist = policy.distribution({k: v[:1] for k, v in obs.items()})
    probs = torch.softmax(dist.logits[0], -1)
    # anchor frequencies: chi-square against the softmax (3 dof; 16.3 is the 0.1 % quantile)
    counts = torch.bincount(extras["anchor"], minlength=4).double()
    chi2 = ((counts - n * probs.double()) ** 2 / (n * probs.double())).sum()
    assert chi2 < 16.3
    # within each anchor: standardised residuals are N(0, 1)
    y = control_points_of(action, policy.steps)
    for k in range(4):
        z = ((y[extras["anchor"] == k] - dist.mean[0, k]) / dist.std[0, k]).reshape(-1)
        se = 1 / math.sqrt(z.numel())
        assert abs(float(z.mean())) < 5 * se
        assert abs(float(z.var()) - 1) < 5 * math.sqrt(2) * se


def test_log_prob_is_a_normalised_density_of_the_samples(make_obs):
    """With one control point (a 2-D density) check by importance sampling against a broad Gaussian q:
    E_q[p / q] = 1 (normalised) and E_q[p / q * y] = the mean of the policy's own samples."""
    n = 100_000
    policy = tiny(obs_keys=ROUTE_KEYS, horizon=5, num_control_points=1, num_anchors=4, init_std=1.0)
    with torch.no_grad():
        policy.head[-1].bias[:4] = torch.tensor([0.0, 0.5, -0.5, 1.0])
        obs = _one_obs(make_obs, n, ROUTE_KEYS)
        action, _, _ = policy.act(obs, torch.Generator().manual_seed(0))
        sample_mean = control_points_of(action, policy.steps).reshape(n, 2).double().mean(0)
        centre = policy.distribution({k: v[:1] for k, v in obs.items()}).mean[0].reshape(-1, 2).mean(0)
        q = D.Independent(D.Normal(centre.double(), torch.full((2,), 6.0, dtype=torch.float64)), 1)
        noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        yq = q.mean + 6.0 * noise
        traj = torch.zeros(n, 5, 3)
        traj[:, 4, :2] = yq.float()  # the control point sits at the last step (t = 5)
        w = torch.exp(policy.log_prob(obs, traj).double() - q.log_prob(yq))
    assert abs(float(w.mean()) - 1) < 0.03
    is_mean = (w[:, None] * yq).mean(0) / w.mean()
    torch.testing.assert_close(is_mean, sample_mean, atol=0.05, rtol=0)


def test_gradients_flow_through_log_prob(make_obs):
    policy = tiny(obs_keys=(*ALL, "bev"))
    obs = make_obs(8, (*ALL, "bev"))
    with torch.no_grad():
        action, _, _ = policy.act(obs, torch.Generator().manual_seed(0))
    policy.log_prob(obs, action).sum().backward()
    no_grad = [n for n, p in policy.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad
    for name in ("head.2.weight", "query", "encoders.route.mlp.0.weight", "encoders.agents.element.0.weight",
                 "encoders.bev.cnn.0.weight", "trunk.layers.0.linear1.weight"):
        assert float(dict(policy.named_parameters())[name].grad.abs().sum()) > 0, name


def test_fit_anchors_sets_kmeans_centres(make_driving):
    policy = tiny(obs_keys=ROUTE_KEYS, num_anchors=8)
    data = make_driving(200)
    policy.fit_anchors(data, seed=0)
    # anchors are deviations from the constant-velocity prior: every target's deviation is closer to
    # its nearest anchor than to the mean deviation
    res = (control_points_of(data["target"], policy.steps) - policy.prior_control(data)).reshape(200, -1)
    d = torch.cdist(res, policy.anchors.reshape(8, -1)).min(1).values
    spread = torch.cdist(res, res.mean(0, keepdim=True))
    assert float(d.mean()) < 0.5 * float(spread.mean())
    # nearest by the mean distance of the control points (an ADE over them)
    nearest = (res.reshape(200, 1, -1, 2) - policy.anchors[None]).norm(dim=-1).mean(-1).argmin(1)
    assert torch.equal(policy.closest_anchor(data, data["target"]), nearest)


def test_priors_centre_the_mixture(make_obs):
    obs = make_obs(4, ROUTE_KEYS, mask_prob=1.0)
    obs["ego_history"][:, -1, 4] = torch.tensor([0.0, 5.0, 10.0, 20.0])  # speed
    obs["ego_history"][:, -1, 6] = 0.0  # yaw rate
    policy = tiny(obs_keys=ROUTE_KEYS, num_anchors=1, prior="constant_velocity")
    with torch.no_grad():
        policy.anchors.zero_()
    mean = policy.distribution(obs).mean[:, 0]  # [B, C, 2]; the head starts near zero offsets
    t = torch.tensor(policy.steps) * 0.1
    torch.testing.assert_close(mean[..., 0], obs["ego_history"][:, -1, 4:5] * t, atol=0.05, rtol=0)
    none = tiny(obs_keys=ROUTE_KEYS, num_anchors=1, prior="none")
    assert torch.equal(none.prior_control(obs), torch.zeros(4, len(none.steps), 2))
    with pytest.raises(ValueError, match=r"prior='route' reads \['ego_history'\]"):
        TrajectoryPolicyConfig(obs_keys=("route",))
    assert TrajectoryPolicyConfig(obs_keys=("route",), prior="none").prior == "none"
    route = tiny(obs_keys=ROUTE_KEYS, num_anchors=1)
    assert route.config.prior == "route"
    torch.testing.assert_close(route.prior_control(obs), route_control(obs, route.steps))


def test_build_policy_from_hydra_kwargs():
    p = build_policy(size="tiny", obs_keys=["ego_history", "route"], horizon=20, num_anchors=8,
                     model={"path": None, "revision": None})
    assert p.obs_keys == ROUTE_KEYS and p.config.num_anchors == 8 and p.config.size == "tiny"


def test_hydra_configs_instantiate():
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from learners.baselines import ConstantVelocityPolicy, LoggedReplayPolicy

    conf = Path(__file__).resolve().parents[2] / "alpagym_ray" / "conf" / "policy"
    route = instantiate(OmegaConf.merge(OmegaConf.load(conf / "trajectory_route.yaml"), {"size": "tiny"}))
    assert isinstance(route, TrajectoryPolicy) and route.obs_keys == ROUTE_KEYS
    full = instantiate(OmegaConf.merge(OmegaConf.load(conf / "trajectory.yaml"), {"size": "tiny"}))
    assert full.obs_keys == ALL and full.config.num_anchors == 64
    assert isinstance(instantiate(OmegaConf.load(conf / "constant_velocity.yaml")), ConstantVelocityPolicy)
    replay = instantiate(OmegaConf.merge(OmegaConf.load(conf / "logged_replay.yaml"), {"size": "tiny"}))
    assert isinstance(replay, LoggedReplayPolicy) and replay.horizon == 20


@pytest.mark.gpu
def test_act_on_cuda_matches_cpu_deterministic(make_obs):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    policy = tiny(obs_keys=ALL)
    obs = make_obs(16, ALL)
    a_cpu, lp_cpu, _ = policy.act(obs, deterministic=True)
    gpu = policy.to("cuda")
    obs_gpu = {k: v.cuda() for k, v in obs.items()}
    a_gpu, lp_gpu, _ = gpu.act(obs_gpu, deterministic=True)
    torch.testing.assert_close(a_gpu.cpu(), a_cpu, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lp_gpu.cpu(), lp_cpu, atol=1e-3, rtol=1e-4)
    sampled, logp, _ = gpu.act(obs_gpu, torch.Generator(device="cuda").manual_seed(0))
    assert sampled.is_cuda and torch.equal(gpu.log_prob(obs_gpu, sampled), logp)


def test_deterministic_modes(make_obs):
    policy = tiny(obs_keys=ROUTE_KEYS, num_anchors=4)
    obs = make_obs(3, ROUTE_KEYS)
    dist = policy.distribution(obs)
    top, _, extras = policy.act(obs, deterministic=True)
    k = dist.logits.argmax(-1)
    assert torch.equal(extras["anchor"], k)
    assert torch.equal(control_points_of(top, policy.steps), dist.mean[torch.arange(3), k])
    policy.deterministic_mode = "mean"
    mean, logp, _ = policy.act(obs, deterministic=True)
    expected = (dist.logits.softmax(-1)[..., None, None] * dist.mean).sum(1)
    torch.testing.assert_close(control_points_of(mean, policy.steps), expected)
    assert torch.equal(policy.log_prob(obs, mean), logp)
    with pytest.raises(ValueError, match="deterministic_mode"):
        TrajectoryPolicyConfig(deterministic_mode="median")


def test_bf16_autocast_keeps_the_mixture_in_float32(make_obs):
    """Under a bf16 autocast only the network runs in bf16: log-probs are float32, reproducible from
    the stored action under the same autocast, and near the float32 values."""
    policy = TrajectoryPolicy(TrajectoryPolicyConfig(size="tiny", obs_keys=ALL))
    obs = make_obs(32, ALL)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        action, logp, _ = policy.act(obs, torch.Generator().manual_seed(0))
        again = policy.log_prob(obs, action)
        dist = policy.distribution(obs)
    assert action.dtype == logp.dtype == again.dtype == dist.mean.dtype == torch.float32
    assert torch.equal(again, logp)
    with torch.no_grad():
        full = policy.log_prob(obs, action)
    # bf16 has an 8-bit mantissa: the network's outputs move in their third digit, not more
    assert not torch.equal(full, logp)
    torch.testing.assert_close(logp, full, rtol=0.02, atol=0.5)


def test_large_batches_are_encoded_in_slices(make_obs, monkeypatch):
    """Past ``max_rows`` the encoder runs in slices (32-bit CUDA indexing); the result is the same."""
    policy = TrajectoryPolicy(TrajectoryPolicyConfig(size="tiny", obs_keys=ALL))
    obs = make_obs(10, ALL)
    with torch.no_grad():
        whole = policy.encode(obs)
        monkeypatch.setattr(policy, "max_rows", lambda: 3)
        sizes = []
        eager = policy._encode
        monkeypatch.setattr(policy, "_encode", lambda o: sizes.append(len(o["route"])) or eager(o))
        sliced = policy.encode(obs)
    torch.testing.assert_close(sliced, whole)
    assert sizes == [2, 3, 2, 3]  # nearly equal slices, no tail of one row
    default = TrajectoryPolicy(TrajectoryPolicyConfig(size="default", obs_keys=ALL))
    assert 257 * 512 * default.max_rows() <= 2**30 < 257 * 512 * (default.max_rows() + 1)


@pytest.mark.slow
def test_compiled_encoder_matches_eager(make_obs):
    """``policy.compile()`` (topology.compile) compiles the encoder; log-probs and gradients stay the same."""
    torch.manual_seed(0)
    policy = TrajectoryPolicy(TrajectoryPolicyConfig(size="tiny", obs_keys=ALL))
    obs = make_obs(16, ALL)
    with torch.no_grad():
        action, _, _ = policy.act(obs, torch.Generator().manual_seed(0))
    eager = policy.log_prob(obs, action)
    eager_grads = torch.autograd.grad(eager.sum(), list(policy.parameters()), allow_unused=True)
    policy.compile()
    compiled = policy.log_prob(obs, action)
    grads = torch.autograd.grad(compiled.sum(), list(policy.parameters()), allow_unused=True)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-4)
    for g, e in zip(grads, eager_grads, strict=True):
        if e is not None:
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def _pool_with_multihead_attention(tokens, x, mask):
    """SetTokens' forward written plainly: nn.MultiheadAttention over [null, elements]."""
    b = x.shape[0]
    elems = tokens.element(x * tokens.scale)
    elems = torch.cat([tokens.null.expand(b, -1, -1), elems], dim=1)
    keep = torch.cat([mask.new_ones(b, 1), mask.bool()], dim=1)
    pooled, _ = tokens.attn(tokens.queries.expand(b, -1, -1), elems, elems, key_padding_mask=~keep,
                            need_weights=False)
    return tokens.norm(pooled)


@pytest.mark.parametrize("key", ["map_points", "agents"])
def test_set_pooling_equals_multihead_attention(key):
    """SetTokens pools with the folded queries (pool_by_queries); values and gradients match
    nn.MultiheadAttention over [null, elements] with the same parameters, masked rows included."""
    from alpagym_ray.observations import SPECS
    from learners.trajectory_policy import SetTokens

    torch.manual_seed(0)
    tokens = SetTokens(key, d=64, heads=8, pool=4)
    with torch.no_grad():
        tokens.null.normal_()                                       # a non-zero null element
        tokens.attn.in_proj_bias.normal_()
    n, f = SPECS[key].shape
    x = torch.randn(6, n, f)
    mask = torch.rand(6, n) > 0.4
    mask[0] = False                                                  # nothing observed: the null alone
    params = list(tokens.parameters())
    out = tokens(x, mask)
    ref = _pool_with_multihead_attention(tokens, x, mask)
    assert out.shape == (6, 4, 64)
    assert torch.allclose(out, ref, atol=1e-5)
    g_out = torch.autograd.grad((out * ref.detach()).sum(), params)
    g_ref = torch.autograd.grad((ref * ref.detach()).sum(), params)
    for a, b in zip(g_out, g_ref, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("train", [True, False])
def test_query_output_equals_the_trunk(train):
    """The policy reads token 0 of its Transformer through query_output (the last layer for that
    token only, attention called directly); values and gradients match nn.TransformerEncoder's
    forward, in training and in inference mode (where PyTorch takes its fused fast path)."""
    from learners.trajectory_policy import query_output

    torch.manual_seed(0)
    policy = TrajectoryPolicy(TrajectoryPolicyConfig(size="tiny", num_layers=3, obs_keys=("ego_history", "route")))
    policy.train(train)
    x = torch.randn(5, 7, policy.config.d_model, requires_grad=train)
    with torch.set_grad_enabled(train):
        out, ref = query_output(policy.trunk, x), policy.trunk(x)[:, 0]
    assert out.shape == (5, policy.config.d_model)
    assert torch.allclose(out, ref, atol=1e-5)
    if train:
        params = [x, *policy.trunk.parameters()]
        for a, b in zip(torch.autograd.grad(out.square().sum(), params),
                        torch.autograd.grad(ref.square().sum(), params), strict=True):
            assert torch.allclose(a, b, atol=1e-5)


def test_autocast_layer_norm_keeps_the_autocast_dtype():
    """Outside an autocast it is nn.LayerNorm (same state-dict keys, same values); under a bf16
    autocast it returns bf16 (no float32 copy of the [B, N, d] tensors) near the float32 result, and
    its float32 parameters get float32 gradients."""
    from learners.trajectory_policy import AutocastLayerNorm

    torch.manual_seed(0)
    ref = torch.nn.LayerNorm(16)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    norm = AutocastLayerNorm(16)
    norm.load_state_dict(ref.state_dict())
    x = torch.randn(4, 9, 16) * 3 + 1
    assert torch.equal(norm(x), ref(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = norm(x)
        via_linear = norm(torch.nn.functional.linear(x, torch.eye(16)))  # a bf16 input stays bf16
    assert low.dtype == via_linear.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref(x), rtol=0.02, atol=0.02)
    low.float().square().sum().backward()
    assert norm.weight.grad is not None and norm.weight.grad.dtype == torch.float32


def test_policy_norms_run_in_the_autocast_dtype(make_obs):
    """The element MLPs, set pooling and trunk layers use AutocastLayerNorm, under the state-dict keys
    of the plain LayerNorms they replace (checkpoints are unchanged)."""
    from learners.trajectory_policy import AutocastLayerNorm

    policy = TrajectoryPolicy(TrajectoryPolicyConfig(size="tiny", num_layers=2, obs_keys=ALL))
    assert isinstance(policy.encoders["map_points"].element[-1], AutocastLayerNorm)
    assert isinstance(policy.encoders["agents"].norm, AutocastLayerNorm)
    assert all(isinstance(layer.norm1, AutocastLayerNorm) and isinstance(layer.norm2, AutocastLayerNorm)
               for layer in policy.trunk.layers)
    keys = set(policy.state_dict())
    assert {"trunk.layers.1.norm2.weight", "encoders.map_points.element.3.bias"} <= keys
