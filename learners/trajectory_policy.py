"""The built-in trajectory policy: an observation encoder and a mixture-of-Gaussians trajectory head.

Encoder. Each configured observation key becomes a few tokens: ``ego_history`` and ``route`` one
token each (their masked, scaled features flattened through an MLP), ``map_points`` and ``agents``
an MLP per element pooled by attention into ``pool_tokens`` tokens (so the token count stays small
whatever the number of elements), ``bev`` a strided CNN pooled to a 2 x 2 grid. A learned query
token plus these tokens go through a pre-norm Transformer; the query token's output feeds the head.

Head. The action is the natural cubic spline through the current pose and ``C`` control points
(``learners.anchors``); the head predicts a mixture over ``K`` anchors: logits, and per anchor a
Gaussian (diagonal) over the ``2C`` control-point coordinates centred on prior + anchor + a
predicted refinement. The prior (``learners.priors``, default: follow the route at the current
speed) makes anchors deviations from the obvious manoeuvre; without it a behaviour-cloned policy
copies its own yaw rate and misses curves in closed loop. The log-probability of an action is the
exact mixture density of its control points (the anchor choice is marginalised), recomputable from
the stored action alone: GRPO relies on it. Yaw is derived deterministically from the spline's
velocity.

Sizes: ``tiny`` (< 100k parameters, tests and the CPU quickstart), ``default`` (a few million),
``large`` (~100M). Build from Hydra with ``build_policy`` (``alpagym_ray/conf/policy/*.yaml``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from alpagym_ray.observations import SPECS, mask_key, unknown_keys
from alpagym_ray.policy import ActionSpec
from learners.anchors import (
    control_points_of,
    control_steps,
    default_num_control_points,
    fan_anchors,
    kmeans_anchors,
    residual_fan_anchors,
    spline_basis,
    trajectory_from_control,
)
from learners.priors import constant_velocity_control, route_control

SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(d_model=32, num_layers=1, num_heads=2, ffn_mult=2, pool_tokens=2),
    "default": dict(d_model=256, num_layers=4, num_heads=8, ffn_mult=4, pool_tokens=8),
    "large": dict(d_model=1024, num_layers=8, num_heads=16, ffn_mult=4, pool_tokens=16),
}
"""Architecture presets chosen with ``size`` (``policy.size=tiny``)."""

PRIORS = {"route": ("ego_history", "route"), "constant_velocity": ("ego_history",), "none": ()}
"""Priors the mixture is centred on (``learners.priors``) and the keys each reads."""
SEQUENCE_KEYS = ("ego_history", "route")
SET_KEYS = ("map_points", "agents")
RASTER_KEYS = ("bev",)
SUPPORTED_KEYS = SEQUENCE_KEYS + SET_KEYS + RASTER_KEYS

ALL_DRIVESIM_KEYS = ("ego_history", "route", "map_points", "agents")
"""The ``trajectory`` configuration's keys (``bev`` is optional in drivesim, so opt in)."""
ROUTE_KEYS = ("ego_history", "route")
"""The ``trajectory_route`` configuration's keys: both simulators provide them."""

# fixed input scaling by feature name, so that every input is O(1) (metres / 20, m/s / 10, ...)
FEATURE_SCALE = {
    "x": 0.05, "y": 0.05, "z": 0.05, "dx": 0.2, "dy": 0.2, "half_width": 0.5, "speed_limit": 0.1,
    "speed": 0.1, "vx": 0.1, "vy": 0.1, "accel_lon": 0.3, "yaw_rate": 1.0, "length": 0.2, "width": 0.5,
}


@dataclass(frozen=True)
class TrajectoryPolicyConfig:
    """Hyper-parameters of :class:`TrajectoryPolicy` (recorded in checkpoints' ``config.json``)."""

    obs_keys: tuple[str, ...] = ALL_DRIVESIM_KEYS
    """Observation keys the encoder reads (any of ego_history, route, map_points, agents, bev)."""
    horizon: int = 20
    """H, poses per action (0.1 s apart)."""
    num_anchors: int = 64
    """K, mixture components (anchors)."""
    num_control_points: int = 0
    """C, spline control points (0: one every 0.4 s, see ``default_num_control_points``)."""
    size: str = "default"
    """Architecture preset: tiny | default | large."""
    d_model: int = 0
    """Token width (0: from ``size``)."""
    num_layers: int = 0
    """Transformer layers (0 is allowed only through ``size``; -1 means none)."""
    num_heads: int = 0
    """Attention heads (0: from ``size``)."""
    ffn_mult: int = 0
    """Feed-forward width / d_model (0: from ``size``)."""
    pool_tokens: int = 0
    """Tokens each set-valued key (map_points, agents) is pooled into (0: from ``size``)."""
    min_std: float = 0.05
    """Smallest standard deviation of a control-point coordinate (m)."""
    max_std: float = 5.0
    """Largest standard deviation of a control-point coordinate (m)."""
    init_std: float = 0.5
    """Standard deviation at initialisation (m)."""
    min_speed: float = 0.5
    """Below this speed (m/s) the derived yaw holds its last value."""
    prior: str = "route"
    """What the mixture is centred on (anchors are deviations from it): ``route`` (the route at the
    current speed), ``constant_velocity`` (the arc at the current speed and yaw rate) or ``none``
    (anchors are absolute). See ``learners.priors``."""
    deterministic: bool = False
    """Default mode of ``act``: a fixed action (``deterministic_mode``) instead of a sample."""
    deterministic_mode: str = "top"
    """The deterministic action: the ``top`` (most likely) anchor's mean, or the ``mean`` of the
    mixture (smoother in time, but it blends distinct manoeuvres: worse closed-loop, see the report)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "obs_keys", tuple(self.obs_keys))
        if self.size not in SIZES:
            raise ValueError(f"TrajectoryPolicyConfig.size {self.size!r} unknown; valid: {list(SIZES)}")
        for name, value in SIZES[self.size].items():
            if getattr(self, name) == 0:
                object.__setattr__(self, name, value)
        if self.num_control_points == 0:
            object.__setattr__(self, "num_control_points", default_num_control_points(self.horizon))
        if not self.obs_keys:
            raise ValueError("TrajectoryPolicyConfig.obs_keys is empty; the policy must read something")
        bad = unknown_keys(self.obs_keys)
        if bad:
            raise ValueError(f"TrajectoryPolicyConfig.obs_keys: unknown keys {bad}; valid: {list(SPECS)}")
        if "gt_trajectory" in self.obs_keys:
            raise ValueError("TrajectoryPolicyConfig.obs_keys: 'gt_trajectory' is the imitation target "
                             "(the logged future), a policy must not read it")
        unsupported = [k for k in self.obs_keys if k not in SUPPORTED_KEYS]
        if unsupported:
            raise ValueError(f"TrajectoryPolicyConfig.obs_keys: {unsupported} not supported by this "
                             f"encoder; supported: {list(SUPPORTED_KEYS)}")
        if self.deterministic_mode not in ("mean", "top"):
            raise ValueError(f"TrajectoryPolicyConfig.deterministic_mode {self.deterministic_mode!r} "
                             "unknown; valid: ['mean', 'top']")
        if self.prior not in PRIORS:
            raise ValueError(f"TrajectoryPolicyConfig.prior {self.prior!r} unknown; valid: {list(PRIORS)}")
        lacking = [k for k in PRIORS[self.prior] if k not in self.obs_keys]
        if lacking:
            raise ValueError(f"TrajectoryPolicyConfig: prior={self.prior!r} reads {lacking}, which are not "
                             f"in obs_keys {list(self.obs_keys)}; add them or choose another prior "
                             f"({ {p: list(k) for p, k in PRIORS.items()} })")
        if len(set(self.obs_keys)) != len(self.obs_keys):
            raise ValueError(f"TrajectoryPolicyConfig.obs_keys has duplicates: {list(self.obs_keys)}")
        ActionSpec(horizon=self.horizon)  # raises on a bad horizon
        control_steps(self.horizon, self.num_control_points)  # raises when C > H
        if self.num_anchors < 1:
            raise ValueError(f"TrajectoryPolicyConfig.num_anchors must be >= 1, got {self.num_anchors}")
        if self.d_model % self.num_heads:
            raise ValueError(f"TrajectoryPolicyConfig: d_model {self.d_model} is not divisible by "
                             f"num_heads {self.num_heads}")
        if self.num_layers < 0 or self.pool_tokens < 1 or self.ffn_mult < 1:
            raise ValueError("TrajectoryPolicyConfig: num_layers >= 0, pool_tokens >= 1 and ffn_mult >= 1 "
                             f"required, got {self.num_layers}, {self.pool_tokens}, {self.ffn_mult}")
        if not 0 < self.min_std <= self.init_std <= self.max_std:
            raise ValueError("TrajectoryPolicyConfig: need 0 < min_std <= init_std <= max_std, got "
                             f"{self.min_std}, {self.init_std}, {self.max_std}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["obs_keys"] = list(self.obs_keys)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrajectoryPolicyConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TrajectoryPolicyConfig: unknown fields {unknown}; valid: {sorted(known)}")
        return cls(**d)


def _scale_vector(key: str) -> torch.Tensor:
    return torch.tensor([FEATURE_SCALE.get(f, 1.0) for f in SPECS[key].features], dtype=torch.float32)


class AutocastLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` that, under an autocast, normalises in the autocast dtype and returns it.

    Autocast runs ``layer_norm`` in float32 and returns float32, so a bf16 ``[B, N, d]`` element
    tensor is cast up, normalised, written in float32 and cast back down by the next matrix product
    (and again in the backward): the profile of the default policy showed such copies at 18-21 % of
    its GPU time (BENCHMARKS.md, session 5). CUDA's kernel accumulates the statistics in float32 for
    bf16 inputs, so only the output's rounding changes. Same parameters and state-dict keys as
    ``nn.LayerNorm``; identical to it outside an autocast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = x.device.type
        if not torch.is_autocast_enabled(kind):
            return super().forward(x)
        dtype = torch.get_autocast_dtype(kind)
        with torch.autocast(kind, enabled=False):
            return F.layer_norm(x.to(dtype), self.normalized_shape, self.weight.to(dtype), self.bias.to(dtype),
                                self.eps)


def _mlp(d_in: int, d: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d), nn.GELU(), nn.Linear(d, d_out), AutocastLayerNorm(d_out))


class SequenceToken(nn.Module):
    """A short fixed-length sequence ``[B, n, f]`` (with mask ``[B, n]``) -> one token ``[B, 1, d]``."""

    def __init__(self, key: str, d: int):
        super().__init__()
        n, f = SPECS[key].shape
        self.register_buffer("scale", _scale_vector(key), persistent=False)
        self.mlp = _mlp(n * (f + 1), 2 * d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask[..., None].to(x.dtype)
        feats = torch.cat([x * self.scale * m, m], dim=-1)
        return self.mlp(feats.flatten(1))[:, None]


class SetTokens(nn.Module):
    """A set of elements ``[B, N, f]`` (mask ``[B, N]``) -> ``pool`` tokens ``[B, pool, d]``.

    One MLP per element, then attention pooling by ``pool`` learned queries; a learned null element
    is always present, so a fully masked set is well defined."""

    def __init__(self, key: str, d: int, heads: int, pool: int):
        super().__init__()
        f = SPECS[key].shape[1]
        self.register_buffer("scale", _scale_vector(key), persistent=False)
        self.element = _mlp(f, 2 * d, d)
        self.null = nn.Parameter(torch.zeros(1, 1, d))
        self.queries = nn.Parameter(torch.randn(1, pool, d) * 0.02)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm = AutocastLayerNorm(d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        elems = self.element(x * self.scale)
        return self.norm(pool_by_queries(self.attn, self.queries[0], self.null[0, 0], elems, mask.bool()))


def pool_by_queries(attn: nn.MultiheadAttention, queries: torch.Tensor, null: torch.Tensor, elems: torch.Tensor,
                    keep: torch.Tensor) -> torch.Tensor:
    """``attn(queries, [null, elems], [null, elems])`` with ``keep`` as the key mask, for learned
    (batch-independent) queries, without projecting keys and values.

    Shapes: ``queries [P, d]``, ``null [d]`` (always kept), ``elems [B, N, d]``, ``keep [B, N]`` bool
    -> ``[B, P, d]``. With ``h`` heads of ``k = d / h`` dims, ``W_q, W_k, W_v`` the in-projection:
    the score of query p on element e in head i is ``(W_k,i^T q_p,i) . e / sqrt(k)`` plus a term
    constant over elements (the key bias), which the softmax cancels; and as the weights sum to one,
    ``sum_e a_e (W_v,i e + b_v,i) = W_v,i (sum_e a_e e) + b_v,i``. So per (head, query) one vector
    ``A [h P, d]`` scores the elements and the weighted sum is taken of the elements themselves:
    ``2 h P N d`` multiply-adds per row instead of ``2 N d^2`` for the projections (h P = 64 against
    d = 256 in the default policy), and no ``[B, N, d]`` keys or values in memory. Same parameters
    as ``nn.MultiheadAttention`` (checkpoints are unchanged); no dropout.
    """
    b, n, d = elems.shape
    h = attn.num_heads
    k = d // h
    p = queries.shape[0]
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)                     # [d, d] each
    b_q, _, b_v = attn.in_proj_bias.chunk(3)
    q = F.linear(queries, w_q, b_q).reshape(p, h, k)                  # [P, h, k]
    a = torch.einsum("phk,hkd->hpd", q, w_k.reshape(h, k, d)).reshape(h * p, d) / math.sqrt(k)
    scores = torch.matmul(elems, a.t().to(elems.dtype)).transpose(1, 2)  # [B, hP, N]
    scores = scores.masked_fill(~keep[:, None, :], float("-inf"))
    null_score = (null.to(a.dtype) @ a.t()).to(scores.dtype)             # [hP]
    weights = torch.softmax(torch.cat([null_score.expand(b, -1)[..., None], scores], -1).float(), -1)
    pooled = torch.matmul(weights[..., 1:].to(elems.dtype), elems)      # [B, hP, d]
    pooled = pooled + weights[..., :1].to(pooled.dtype) * null.to(pooled.dtype)
    heads = torch.einsum("bhpd,hkd->bphk", pooled.reshape(b, h, p, d), w_v.reshape(h, k, d).to(pooled.dtype))
    out = heads.reshape(b, p, d) + b_v.to(heads.dtype)
    return attn.out_proj(out)


def query_output(trunk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``trunk(x)[:, 0]``: the query token's output of the policy's Transformer, ``x [B, L, d]`` ->
    ``[B, d]``, with the trunk's own parameters but not its ``forward``.

    The head reads token 0 only, so the last layer attends from token 0 alone and runs its
    feed-forward on that one token (a 1/L share of the layer's projections and feed-forward instead
    of all L); every layer calls scaled-dot-product attention on ``[B, heads, L, d/heads]`` directly
    instead of through ``nn.MultiheadAttention``'s sequence-first transposes. The layers must be what
    :class:`TrajectoryPolicy` builds (:func:`check_query_trunk`, done once when it is built)."""
    if isinstance(trunk, nn.Identity):
        return x[:, 0]
    layers = list(trunk.layers)
    for i, layer in enumerate(layers):
        last = i == len(layers) - 1
        h = layer.norm1(x)
        attended = _self_attention(layer.self_attn, h[:, :1] if last else h, h)
        x = (x[:, :1] if last else x) + attended
        x = x + layer.linear2(layer.activation(layer.linear1(layer.norm2(x))))
    return x[:, 0]


def check_query_trunk(trunk: nn.Module) -> None:
    """Raise unless :func:`query_output` computes ``trunk(x)[:, 0]`` exactly: an identity, or an
    ``nn.TransformerEncoder`` without a final norm of pre-norm, batch-first layers without dropout."""
    if isinstance(trunk, nn.Identity):
        return
    if not isinstance(trunk, nn.TransformerEncoder) or trunk.norm is not None:
        raise TypeError(f"query_output: expected an nn.TransformerEncoder without a final norm, got {trunk}")
    for layer in trunk.layers:
        if not (layer.norm_first and layer.self_attn.batch_first and layer.dropout.p == 0.0):
            raise TypeError("query_output: needs pre-norm, batch-first layers without dropout")


def _self_attention(attn: nn.MultiheadAttention, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``attn(queries, tokens, tokens)`` for batch-first ``[B, Lq, d]`` / ``[B, L, d]``, no mask."""
    b, lq, d = queries.shape
    heads = attn.num_heads
    w, bias = attn.in_proj_weight, attn.in_proj_bias
    q = F.linear(queries, w[:d], bias[:d]).reshape(b, lq, heads, d // heads).transpose(1, 2)
    kv = F.linear(tokens, w[d:], bias[d:]).reshape(b, -1, 2, heads, d // heads).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, kv[0], kv[1])               # [B, heads, Lq, d / heads]
    return attn.out_proj(out.transpose(1, 2).reshape(b, lq, d))


class RasterTokens(nn.Module):
    """A raster ``[B, C, H, W]`` -> 4 tokens ``[B, 4, d]`` (strided CNN, 2 x 2 adaptive pooling)."""

    def __init__(self, key: str, d: int):
        super().__init__()
        c = SPECS[key].shape[0]
        w = max(8, d // 4)
        self.cnn = nn.Sequential(
            nn.Conv2d(c, w, 5, stride=2, padding=2), nn.GELU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(2 * w, d, 3, stride=2, padding=1), nn.AdaptiveAvgPool2d(2),
        )
        self.norm = AutocastLayerNorm(d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        y = self.cnn(x * mask[:, :, None, None].to(x.dtype))
        return self.norm(y.flatten(2).transpose(1, 2))


@dataclass
class MixtureParams:
    """The head's output for a batch: a mixture of diagonal Gaussians over control points."""

    logits: torch.Tensor
    """``[B, K]`` anchor logits."""
    mean: torch.Tensor
    """``[B, K, C, 2]`` control-point means (anchor + refinement), ego frame (m)."""
    std: torch.Tensor
    """``[B, K, C, 2]`` standard deviations (m)."""
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def log_prob(self, control: torch.Tensor) -> torch.Tensor:
        """Exact log-density ``[B]`` of control points ``[B, C, 2]``, the anchor marginalised."""
        z = (control[:, None] - self.mean) / self.std
        dims = z.shape[-2] * z.shape[-1]
        log_norm = self.std.log().sum((-2, -1)) + 0.5 * dims * math.log(2 * math.pi)
        log_n = -0.5 * (z**2).sum((-2, -1)) - log_norm
        return torch.logsumexp(F.log_softmax(self.logits, dim=-1) + log_n, dim=-1)

    def entropy(self) -> torch.Tensor:
        """``H(anchor) + E[H(control | anchor)]`` ``[B]``: the entropy of the joint (anchor, control
        points), an upper bound of the marginal entropy of the action (which has no closed form)."""
        logp = F.log_softmax(self.logits, dim=-1)
        cat = -(logp.exp() * logp).sum(-1)
        dims = self.std.shape[-2] * self.std.shape[-1]
        gauss = self.std.log().sum((-2, -1)) + 0.5 * dims * (1 + math.log(2 * math.pi))
        return cat + (logp.exp() * gauss).sum(-1)


class TrajectoryPolicy(nn.Module):
    """Encoder + mixture trajectory head; implements ``alpagym_ray.policy.Policy``."""

    kind = "learners.trajectory_policy.TrajectoryPolicy"
    """Import path recorded in checkpoints."""

    def __init__(self, config: TrajectoryPolicyConfig | None = None, anchors: torch.Tensor | None = None):
        """``anchors [K, C, 2]`` (see :meth:`fit_anchors`); default: a fan of accelerations around the
        constant-velocity prior, or of arcs without a prior."""
        super().__init__()
        cfg = config or TrajectoryPolicyConfig()
        self.config = cfg
        self.obs_keys = cfg.obs_keys
        self.horizon = cfg.horizon
        self.action_spec = ActionSpec(horizon=cfg.horizon)
        self.deterministic = cfg.deterministic
        self.deterministic_mode = cfg.deterministic_mode
        self.steps = control_steps(cfg.horizon, cfg.num_control_points)
        k, c, d = cfg.num_anchors, cfg.num_control_points, cfg.d_model
        if anchors is None:
            fan = residual_fan_anchors if cfg.prior != "none" else fan_anchors
            anchors = fan(k, self.steps)
        if tuple(anchors.shape) != (k, c, 2):
            raise ValueError(f"anchors must have shape [num_anchors={k}, num_control_points={c}, 2], "
                             f"got {list(anchors.shape)}")
        self.register_buffer("anchors", anchors.detach().float().clone())
        w, dw = spline_basis(cfg.horizon, self.steps)
        self.register_buffer("spline_w", w, persistent=False)
        self.register_buffer("spline_dw", dw, persistent=False)

        self.encoders = nn.ModuleDict()
        for key in cfg.obs_keys:
            if key in SEQUENCE_KEYS:
                self.encoders[key] = SequenceToken(key, d)
            elif key in SET_KEYS:
                self.encoders[key] = SetTokens(key, d, cfg.num_heads, cfg.pool_tokens)
            else:
                self.encoders[key] = RasterTokens(key, d)
        self.type_embed = nn.Parameter(torch.randn(len(cfg.obs_keys) + 1, d) * 0.02)
        self.query = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, cfg.num_heads, d * cfg.ffn_mult, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        layer.norm1, layer.norm2 = AutocastLayerNorm(d), AutocastLayerNorm(d)  # the layers deep-copy these
        self.trunk = (nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=False)
                      if cfg.num_layers else nn.Identity())
        check_query_trunk(self.trunk)
        self._trunk_fn = query_output  # trunk(seq)[:, 0], computed without the unused outputs
        self.out_norm = nn.LayerNorm(d)
        self.head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, k * (1 + 4 * c)))
        # start at the anchors with init_std: a small last layer, std bias at init_std
        with torch.no_grad():
            self.head[-1].weight.mul_(0.01)
            self.head[-1].bias.zero_()
        lo, hi = math.log(cfg.min_std), math.log(cfg.max_std)
        frac = (math.log(cfg.init_std) - lo) / (hi - lo)
        frac = min(max(frac, 1e-4), 1 - 1e-4)
        self.register_buffer("std_bias", torch.tensor(math.log(frac / (1 - frac))), persistent=False)

    # ---- checkpoints ------------------------------------------------------------------------
    def policy_config(self) -> dict[str, Any]:
        """JSON-able hyper-parameters (``from_config`` rebuilds the architecture)."""
        return self.config.to_dict()

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TrajectoryPolicy:
        cfg = TrajectoryPolicyConfig.from_dict(config)
        return cls(cfg, anchors=torch.zeros(cfg.num_anchors, cfg.num_control_points, 2))

    def prior_control(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The prior's control points ``[B, C, 2]`` (``config.prior``; zeros without a prior)."""
        if self.config.prior == "route":
            return route_control({k: obs[k].to(self.anchors.dtype) if obs[k].is_floating_point() else obs[k]
                                  for k in ("ego_history", "route", mask_key("ego_history"),
                                            mask_key("route"))}, self.steps)
        if self.config.prior == "constant_velocity":
            return constant_velocity_control(obs, self.steps).to(self.anchors.dtype)
        b = obs[self.obs_keys[0]].shape[0]
        return self.anchors.new_zeros(b, *self.anchors.shape[1:])

    @torch.no_grad()
    def fit_anchors(self, data: Mapping[str, torch.Tensor], seed: int = 0) -> None:
        """Set the anchors to k-means centres of logged futures (relative to the prior).

        ``data`` holds ``target [N, H, >=2]`` (ego frame) and the observations the prior reads.
        Called by pre-training before the first step."""
        target = data["target"]
        if target.shape[1] < self.horizon:
            raise ValueError(f"targets have {target.shape[1]} poses, fewer than the horizon {self.horizon}")
        control = control_points_of(target[:, : self.horizon].to(self.anchors), self.steps)
        residual = control - self.prior_control({k: v.to(self.anchors.device) for k, v in data.items()})
        self.anchors.copy_(kmeans_anchors(residual, self.config.num_anchors, seed=seed))

    def closest_anchor(self, obs: Mapping[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """Index ``[B]`` of the anchor nearest (mean control-point distance) to each target
        ``[B, H, >=2]``, relative to the prior."""
        residual = control_points_of(target[:, : self.horizon], self.steps) - self.prior_control(obs)
        return torch.linalg.vector_norm(self.anchors[None] - residual[:, None], dim=-1).mean(-1).argmin(1)

    # ---- forward ----------------------------------------------------------------------------
    def _check_obs(self, obs: Mapping[str, torch.Tensor]) -> None:
        missing = [k for k in self.obs_keys if k not in obs or mask_key(k) not in obs]
        if missing:
            raise KeyError(f"TrajectoryPolicy reads {list(self.obs_keys)} (and their masks); missing "
                           f"{missing} in the observation (keys: {sorted(obs)})")

    def max_rows(self) -> int:
        """Rows encoded in one pass. CUDA kernels index with 32-bit offsets: the largest activation
        per row, a set key's per-element hidden layer ``[elements + 1, 2 d_model]`` or the trunk's
        feed-forward ``[tokens, ffn_mult d_model]``, times the rows must stay under 2**31 elements
        (``default`` at 32,768 rows hit an illegal memory access); 2**30 leaves a margin."""
        cfg = self.config
        elements = max([SPECS[k].shape[0] + 1 for k in self.obs_keys if k in SET_KEYS] + [1])
        tokens = 1 + sum(cfg.pool_tokens if k in SET_KEYS else 4 if k in RASTER_KEYS else 1 for k in self.obs_keys)
        widest = max(elements * 2 * cfg.d_model, tokens * cfg.ffn_mult * cfg.d_model)
        return max(1, 2**30 // widest)

    def compile(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        """``torch.compile`` the encoder's heavy parts (the trunk's :func:`query_output` and the
        per-element MLPs of set keys), the hot path of ``act``, ``log_prob`` and ``entropy`` (``topology.compile``);
        token assembly and the mixture maths stay eager. Arguments go to ``torch.compile``. (Compiling
        the whole ``_encode`` failed on an H100 under bf16: the backward of the expanded ``[1, 1, d]``
        parameters returned a wrongly shaped gradient.)"""
        self._trunk_fn = torch.compile(query_output, *args, **kwargs)
        for encoder in self.encoders.values():
            (encoder.element if isinstance(encoder, SetTokens) else encoder).compile(*args, **kwargs)

    def encode(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Observation -> feature ``[B, d_model]`` (in slices of :meth:`max_rows` rows)."""
        self._check_obs(obs)
        b, most = obs[self.obs_keys[0]].shape[0], self.max_rows()
        if b <= most:
            return self._encode(obs)
        # slices of (nearly) equal size: 16,384 rows -> 3 x ~5,461, not 8,160 + 8,160 + a tail of 64
        n = -(-b // most)
        cuts = [i * b // n for i in range(n + 1)]
        keys = [*self.obs_keys, *(mask_key(k) for k in self.obs_keys)]
        spans = zip(cuts[:-1], cuts[1:], strict=True)
        return torch.cat([self._encode({k: obs[k][s:e] for k in keys}) for s, e in spans])

    def _encode(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        tokens = []
        for i, key in enumerate(self.obs_keys):
            x = obs[key].to(self.query.dtype)
            tokens.append(self.encoders[key](x, obs[mask_key(key)]) + self.type_embed[i + 1])
        b = tokens[0].shape[0]
        seq = torch.cat([self.query.expand(b, -1, -1) + self.type_embed[0], *tokens], dim=1)
        return self.out_norm(self._trunk_fn(self.trunk, seq))

    def distribution(self, obs: Mapping[str, torch.Tensor]) -> MixtureParams:
        """The action distribution for a batch of observations."""
        out = self.head(self.encode(obs))
        # under a bf16 autocast (alpagym_ray.precision) only the network runs in bf16: the mixture,
        # its densities and the splines stay float32, so log-probs keep their precision
        with torch.autocast(out.device.type, enabled=False):
            return self._mixture(out.float(), obs)

    def _mixture(self, out: torch.Tensor, obs: Mapping[str, torch.Tensor]) -> MixtureParams:
        cfg = self.config
        k, c = cfg.num_anchors, cfg.num_control_points
        b = out.shape[0]
        logits = out[:, :k]
        offset = out[:, k : k + 2 * k * c].reshape(b, k, c, 2)
        raw_std = out[:, k + 2 * k * c :].reshape(b, k, c, 2)
        lo, hi = math.log(cfg.min_std), math.log(cfg.max_std)
        std = torch.exp(lo + (hi - lo) * torch.sigmoid(raw_std + self.std_bias))
        # refinements scale with the anchor's reach, so one output scale fits slow and fast anchors
        reach = 1.0 + self.anchors.norm(dim=-1, keepdim=True)
        mean = self.prior_control(obs)[:, None] + self.anchors + offset * reach
        return MixtureParams(logits, mean, std)

    def trajectory(self, control: torch.Tensor) -> torch.Tensor:
        """Control points ``[B, C, 2]`` -> action ``[B, H, 3]``."""
        with torch.autocast(control.device.type, enabled=False):
            return trajectory_from_control(control.float(), self.spline_w, self.spline_dw, self.config.min_speed)

    def _control_points(self, action: torch.Tensor) -> torch.Tensor:
        """Action ``[B, H, >=2]`` -> its control points ``[B, C, 2]``, in float32 whatever the autocast."""
        with torch.autocast(action.device.type, enabled=False):
            return control_points_of(action.to(self.anchors.dtype), self.steps)

    def act(
        self,
        obs: Mapping[str, torch.Tensor],
        generator: torch.Generator | None = None,
        deterministic: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Sample the mixture (or take its deterministic action): action ``[B, H, 3]``, logp ``[B]``
        and extras ``{"anchor": [B] long (sampled, or the most likely), "anchor_prob": [B]}``.
        ``generator`` must live on the model's device."""
        det = self.deterministic if deterministic is None else deterministic
        dist = self.distribution(obs)
        probs = F.softmax(dist.logits, dim=-1)
        if det:
            anchor = probs.argmax(dim=-1)
        else:
            anchor = torch.multinomial(probs.detach().float(), 1, generator=generator).squeeze(1)
        idx = anchor[:, None, None, None].expand(-1, 1, *dist.mean.shape[2:])
        mean = dist.mean.gather(1, idx).squeeze(1)
        if det and self.deterministic_mode == "mean":
            control = (probs[..., None, None] * dist.mean).sum(1)
        elif det:
            control = mean
        else:
            std = dist.std.gather(1, idx).squeeze(1)
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            control = mean + std * noise
        action = self.trajectory(control)
        # logp from the action's own control points: exactly what log_prob(obs, action) computes
        logp = dist.log_prob(self._control_points(action))
        extras = {"anchor": anchor, "anchor_prob": probs.gather(1, anchor[:, None]).squeeze(1)}
        return action, logp, extras

    def forward(self, obs: Mapping[str, torch.Tensor], action: torch.Tensor) -> torch.Tensor:
        """``log_prob`` (so DDP-wrapped policies compute it through ``__call__``)."""
        return self.log_prob(obs, action)

    def log_prob(self, obs: Mapping[str, torch.Tensor], action: torch.Tensor) -> torch.Tensor:
        """Exact log-density ``[B]`` of ``action [B, H, >=2]`` (of its control points)."""
        if action.shape[-2] != self.horizon:
            raise ValueError(f"action has {action.shape[-2]} poses, this policy's horizon is {self.horizon}")
        return self.distribution(obs).log_prob(self._control_points(action))

    def entropy(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Entropy of the joint (anchor, control points) ``[B]`` (see ``MixtureParams.entropy``)."""
        return self.distribution(obs).entropy()


def build_policy(
    size: str = "default",
    obs_keys: Sequence[str] = ALL_DRIVESIM_KEYS,
    horizon: int = 20,
    num_anchors: int = 64,
    model: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> TrajectoryPolicy:
    """Hydra builder (``_target_: learners.trajectory_policy.build_policy``).

    ``model.path`` (a checkpoint directory or Hugging Face Hub repo id) starts from saved weights:
    the architecture then comes from the checkpoint, and its ``obs_keys`` and ``horizon`` must equal
    the configured ones (the env is configured from the same values). Other keyword arguments are
    :class:`TrajectoryPolicyConfig` fields."""
    cfg = TrajectoryPolicyConfig(size=size, obs_keys=tuple(obs_keys), horizon=horizon,
                                 num_anchors=num_anchors, **overrides)
    path = (model or {}).get("path")
    if not path:
        return TrajectoryPolicy(cfg)
    from learners.checkpoint import load_checkpoint

    policy = load_checkpoint(str(path), revision=(model or {}).get("revision"))
    if not isinstance(policy, TrajectoryPolicy):
        raise TypeError(f"checkpoint {path} holds a {type(policy).__name__}, not a TrajectoryPolicy")
    got = policy.config
    if got.obs_keys != cfg.obs_keys or got.horizon != cfg.horizon:
        raise ValueError(
            f"checkpoint {path} reads obs_keys={list(got.obs_keys)} with horizon={got.horizon}, the policy "
            f"config asks for obs_keys={list(cfg.obs_keys)} with horizon={cfg.horizon}; set "
            "policy.obs_keys / policy.horizon to the checkpoint's values")
    differs = {a: (getattr(cfg, a), getattr(got, a)) for a in ("size", "num_anchors", *overrides)
               if a not in ("deterministic", "deterministic_mode") and getattr(cfg, a) != getattr(got, a)}
    if differs:
        warnings.warn(f"checkpoint {path}: the architecture comes from the checkpoint; (config, checkpoint) "
                      f"values differ for {differs}", stacklevel=2)
    # the sampling mode is a run setting, not part of the weights
    policy.config = replace(got, deterministic=cfg.deterministic, deterministic_mode=cfg.deterministic_mode)
    policy.deterministic = cfg.deterministic
    policy.deterministic_mode = cfg.deterministic_mode
    return policy
