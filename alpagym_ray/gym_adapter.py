"""A batched env over B copies of any single Gymnasium env (DESIGN.md, "Batched env interface").

Any ``gymnasium.Env`` whose ``step`` takes a trajectory action (``[H, 3]`` float32 ego-frame poses,
``alpagym_ray.policy``) and whose ``info["metrics"]`` carries the metrics its reward reads can be
trained by the GRPO system: :class:`GymBatchedEnv` implements ``alpagym_ray.env_protocol.BatchedEnv``
plus ``metric_aggregations`` and the episode infos the rollout worker reads. An env with another
action space is wrapped in a ``gymnasium.ActionWrapper`` that turns the trajectory into its action.

Contract for the single env (checked, with errors naming the env index, step and key):

* ``reset(seed=, options=) -> (obs, info)`` and ``step(action) -> (obs, reward, terminated,
  truncated, info)`` (Gymnasium >= 0.26). ``reset`` with the same seed and options must give the
  same first observation: a GRPO group relies on it.
* **Observations** are a dict of arrays whose keys follow the observation table
  (``alpagym_ray.observations.SPECS``: shape ``spec.shape``), each with an optional boolean mask
  under ``"<key>_mask"`` (shape ``[spec.shape[0]]``; all True when absent). A key outside the table
  is declared with ``obs_specs={key: {"shape": [...], "features": [...], "doc": "..."}}``: it is
  registered into ``SPECS`` of the process that builds the env (see :func:`register_obs_specs`);
  the learner process needs the same registration, which ``alpagym_ray.api.train`` arranges through
  ``alpagym_ray.api.make_policy``. A non-dict observation is allowed when ``obs_keys`` names exactly
  one key: the observation is that key's array.
* **Metrics**: ``info["metrics"] = {name: value}`` on every step, where ``value`` is a float (one
  tick) or a sequence of ``k`` per-tick values; every name must be declared in
  ``metric_aggregations`` (undeclared names are ignored with a warning). With ``decision_every = d``
  every step reports ``d`` ticks (the last step of an episode may report fewer). A declared metric
  that is missing on a step, or NaN, is *invalid* on those ticks (``valid = False``), as in drivesim.
* Optional ``info["ego_pose"]`` (x, y, yaw in the env's own frame), given on ``reset`` and on steps,
  is passed on as ``infos["ego_pose"] [B, 3]`` (the rollout worker stores it as the episode's
  trajectory). The env's own ``reward`` is returned but GRPO does not use it: the reward spec scores
  the metrics. Each step's raw infos are in ``infos["env_infos"]`` (None for envs that waited).

Episode metrics (``info["episode_metrics"]``, for envs that ended on this step) are every declared
series reduced by its own aggregation over the shared tick mask (``alpagym_ray.metrics``): only
ticks with ``eval_relevant`` = 1, and none after the first ``collision_any`` or ``offroad`` tick
(``cut_after_failure``). The mask series the env does not declare are *implicit*: ``eval_relevant``
is 1 on every tick (a Gymnasium env has no warm-up: the policy is in control on every step), and
``collision_any`` / ``offroad`` are invalid on every tick, so they cut nothing. An env that declares
none of the three is therefore aggregated plainly over all its ticks. Implicit failure flags are
not reported metrics: they are absent from ``metric_names`` and ``episode_metrics``, and
:meth:`GymBatchedEnv.check_reward` refuses a reward that reads them. When the env declares every
series ``alpagym_ray.metrics.episode_metrics`` needs (``collision_front``, ``collision_lateral``,
``collision_any``, ``offroad``, ``progress``, ``gt_dist_traveled_m`` and ``eval_relevant``), the
derived ``collision_at_fault``, ``offroad_or_collision`` and ``scene_score`` are added.

No autoreset: an env that ended is not stepped again; it keeps returning its last observation with
its ``terminated`` / ``truncated`` flag set, reward 0 and no metrics, until :meth:`reset`.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from alpagym_ray.metrics import DERIVED_EPISODE_METRICS, Aggregation, aggregate, episode_metrics, tick_mask
from alpagym_ray.observations import SPECS, ObsSpec, mask_key
from alpagym_ray.targets import import_target

MASK_SERIES = ("eval_relevant", "collision_any", "offroad")
"""Series the shared tick mask is built from (``alpagym_ray.metrics.tick_mask``)."""
DERIVED_NEEDS = ("eval_relevant", "collision_front", "collision_lateral", "collision_any", "offroad",
                 "progress", "gt_dist_traveled_m")
"""Series ``alpagym_ray.metrics.episode_metrics`` needs to add the derived episode metrics."""
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# ---- custom observation keys ---------------------------------------------------------------------
def _as_obs_spec(key: str, raw: ObsSpec | Mapping[str, Any]) -> ObsSpec:
    """An ``ObsSpec`` from a declaration ``{"shape": [...], "features": [...], "doc": "..."}``."""
    if isinstance(raw, ObsSpec):
        if raw.key != key:
            raise ValueError(f"obs_specs[{key!r}] is an ObsSpec for key {raw.key!r}")
        spec = raw
    else:
        if not isinstance(raw, Mapping):
            raise ValueError(f"obs_specs[{key!r}] must be a mapping with 'shape' (and optional 'features', "
                             f"'doc'), got {type(raw).__name__}")
        unknown = set(raw) - {"shape", "features", "doc"}
        if unknown or "shape" not in raw:
            raise ValueError(f"obs_specs[{key!r}]: keys are 'shape' (required), 'features', 'doc'; "
                             f"got {sorted(raw)}")
        shape = raw["shape"]
        if not isinstance(shape, Sequence) or isinstance(shape, str):
            raise ValueError(f"obs_specs[{key!r}].shape must be a list of ints, got {shape!r}")
        spec = ObsSpec(key, tuple(shape), tuple(raw.get("features") or ()), str(raw.get("doc", "")), False)
    if not _KEY_RE.match(key) or key.endswith("_mask") or key == "cameras":
        raise ValueError(f"observation key {key!r} must be an identifier that does not end in '_mask' "
                         f"and is not 'cameras'")
    shape = spec.shape
    if not shape or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape):
        raise ValueError(f"obs_specs[{key!r}].shape must be a non-empty list of positive ints (the first "
                         f"axis is the masked one), got {list(shape)}")
    if spec.features and len(spec.features) != shape[-1]:
        raise ValueError(f"obs_specs[{key!r}]: {len(spec.features)} features {list(spec.features)} for a "
                         f"last axis of {shape[-1]}")
    if spec.dtype != "float32":
        raise ValueError(f"obs_specs[{key!r}]: dtype must be float32 (the Arrow columns are), got "
                         f"{spec.dtype}")
    return spec


def register_obs_specs(obs_specs: Mapping[str, ObsSpec | Mapping[str, Any]] | None) -> tuple[str, ...]:
    """Add custom observation keys to ``alpagym_ray.observations.SPECS`` in *this* process.

    The Arrow step schema (``alpagym_ray.columns``) and the learner read shapes from ``SPECS``, and
    registries do not cross process boundaries, so every process that builds the env, the schema or
    the policy calls this with the same declarations (the adapter and ``alpagym_ray.api.make_policy``
    do). Registering a key again with the same shape and features is a no-op; a key of the table, or
    one registered with a different shape, is an error. Returns the keys."""
    if not obs_specs:
        return ()
    if not isinstance(obs_specs, Mapping):
        raise ValueError(f"obs_specs must map key -> {{shape, features, doc}}, got "
                         f"{type(obs_specs).__name__}")
    specs = [_as_obs_spec(str(k), v) for k, v in obs_specs.items()]
    for spec in specs:
        old = SPECS.get(spec.key)
        if old is not None and (old.shape, old.features) != (spec.shape, spec.features):
            raise ValueError(f"observation key {spec.key!r} is already in the table with shape "
                             f"{list(old.shape)} and features {list(old.features)}; a custom key needs its "
                             f"own name (got shape {list(spec.shape)}, features {list(spec.features)})")
    for spec in specs:
        SPECS.setdefault(spec.key, spec)
    return tuple(s.key for s in specs)


# ---- configuration -------------------------------------------------------------------------------
@dataclass(frozen=True)
class GymEnvConfig:
    """How :class:`GymBatchedEnv` builds and reads its Gymnasium envs."""

    env_factory: str | Callable[..., Any]
    """Import path (``module:attr`` or ``module.attr``) or callable returning one ``gymnasium.Env``;
    ``"gymnasium.make"`` with ``env_kwargs={"id": ...}`` builds a registered env."""
    metric_aggregations: Mapping[str, Aggregation | str]
    """``{name: aggregation}`` of every per-tick metric the env reports in ``info["metrics"]``
    (aggregation: an ``Aggregation`` or one of last, max, min, mean, median)."""
    env_kwargs: Mapping[str, Any] = field(default_factory=dict)
    """Keyword arguments of ``env_factory``."""
    obs_keys: tuple[str, ...] | None = None
    """Observation keys to stack (None: every key of the env's ``Dict`` observation space)."""
    obs_specs: Mapping[str, Any] = field(default_factory=dict)
    """Custom observation keys ``{key: {"shape": [...], "features": [...], "doc": "..."}}``."""
    decision_every: int = 1
    """Ticks per step: every step reports this many per-tick values per metric."""
    max_steps: int | None = None
    """Truncate an episode after this many steps (None: only the env ends episodes)."""
    cut_after_failure: bool = True
    """The tick mask drops ticks after the first collision_any / offroad tick (AlpaSim's rule)."""

    def __post_init__(self) -> None:
        if not (callable(self.env_factory) or (isinstance(self.env_factory, str) and self.env_factory)):
            raise ValueError(f"env_factory must be an import path or a callable, got {self.env_factory!r}")
        if not isinstance(self.env_kwargs, Mapping):
            raise ValueError(f"env_kwargs must be a mapping, got {type(self.env_kwargs).__name__}")
        if not isinstance(self.metric_aggregations, Mapping):
            raise ValueError("metric_aggregations must map metric name -> aggregation, got "
                             f"{type(self.metric_aggregations).__name__}")
        object.__setattr__(self, "metric_aggregations", _parse_aggregations(self.metric_aggregations))
        if self.obs_keys is not None:
            if isinstance(self.obs_keys, str) or not self.obs_keys:
                raise ValueError(f"obs_keys must be a non-empty list of keys or None, got {self.obs_keys!r}")
            object.__setattr__(self, "obs_keys", tuple(self.obs_keys))
        if isinstance(self.decision_every, bool) or not isinstance(self.decision_every, int) \
                or self.decision_every < 1:
            raise ValueError(f"decision_every must be an int >= 1, got {self.decision_every!r}")
        m = self.max_steps
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"max_steps must be an int >= 1 or None, got {self.max_steps!r}")
        if not isinstance(self.cut_after_failure, bool):
            raise ValueError(f"cut_after_failure must be a bool, got {self.cut_after_failure!r}")


# ---- the adapter ---------------------------------------------------------------------------------
class GymBatchedEnv:
    """B copies of one Gymnasium env behind ``alpagym_ray.env_protocol.BatchedEnv`` (no autoreset).

    Observations come back as ``{key: [B, *shape] float32, key_mask: [B, shape[0]] bool}`` tensors on
    ``device``; ``step(actions [B, H, 3])`` hands env ``b`` the numpy array ``actions[b]`` ``[H, 3]``.
    """

    def __init__(
        self,
        env_factory: str | Callable[..., Any],
        num_envs: int = 1,
        device: str | torch.device = "cpu",
        *,
        metric_aggregations: Mapping[str, Aggregation | str],
        env_kwargs: Mapping[str, Any] | None = None,
        obs_keys: Sequence[str] | None = None,
        obs_specs: Mapping[str, Any] | None = None,
        decision_every: int = 1,
        max_steps: int | None = None,
        cut_after_failure: bool = True,
    ):
        if isinstance(num_envs, bool) or not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs must be an int >= 1, got {num_envs!r}")
        self.config = GymEnvConfig(
            env_factory=env_factory, metric_aggregations=metric_aggregations,
            env_kwargs=dict(env_kwargs or {}), obs_keys=tuple(obs_keys) if obs_keys is not None else None,
            obs_specs=dict(obs_specs or {}),
            decision_every=decision_every, max_steps=max_steps, cut_after_failure=cut_after_failure)
        cfg = self.config
        register_obs_specs(cfg.obs_specs)
        factory = import_target(cfg.env_factory) if isinstance(cfg.env_factory, str) else cfg.env_factory
        self.envs = [factory(**cfg.env_kwargs) for _ in range(num_envs)]
        for b, env in enumerate(self.envs):
            if not (callable(getattr(env, "reset", None)) and callable(getattr(env, "step", None))):
                raise TypeError(f"env_factory {_name(cfg.env_factory)} returned {type(env).__name__} "
                                f"(env {b}), which has no reset() / step(): expected a gymnasium.Env")
        self.num_envs = num_envs
        self.device = torch.device(device)
        self.decision_every = cfg.decision_every
        self.obs_keys = self._resolve_obs_keys()
        self.specs = {k: SPECS[k] for k in self.obs_keys}
        declared = _parse_aggregations(cfg.metric_aggregations)
        self.implicit_metrics = tuple(m for m in MASK_SERIES if m not in declared)
        """Mask series the env does not report (filled in, see the module docstring)."""
        self.metric_aggregations: dict[str, Aggregation] = {
            **declared, **{m: Aggregation.MAX for m in self.implicit_metrics}}
        self.derived = all(m in declared for m in DERIVED_NEEDS)
        reported = [*declared, *(["eval_relevant"] if "eval_relevant" in self.implicit_metrics else [])]
        derived = DERIVED_EPISODE_METRICS if self.derived else ()
        self.metric_names: tuple[str, ...] = tuple(reported) + derived
        self._undeclared_warned: set[str] = set()
        B = num_envs
        self._obs = {k: np.zeros((B, *s.shape), np.float32) for k, s in self.specs.items()}
        self._mask = {k: np.zeros((B, s.shape[0]), bool) for k, s in self.specs.items()}
        self._terminated = np.zeros(B, bool)
        self._truncated = np.zeros(B, bool)
        self._steps = np.zeros(B, np.int64)
        # per env, per step: (ticks k, {name: (values [k], valid [k])})
        self._series: list[list[tuple[int, dict[str, tuple[np.ndarray, np.ndarray]]]]] = [
            [] for _ in range(B)]
        self._pose = np.zeros((B, 3), np.float32)
        self._has_pose = False
        self._was_reset = False

    # ---- set-up checks -----------------------------------------------------------------------
    def _resolve_obs_keys(self) -> tuple[str, ...]:
        """The keys to stack, checked against the table and env 0's observation space."""
        space = getattr(self.envs[0], "observation_space", None)
        spaces = getattr(space, "spaces", None)
        where = f"env {_name(self.config.env_factory)}"
        keys = self.config.obs_keys
        if keys is None:
            if not isinstance(spaces, Mapping):
                raise ValueError(f"{where}: its observation space is {type(space).__name__}, not a Dict; "
                                 "pass obs_keys (one key, declared in obs_specs when it is not in the table)")
            keys = tuple(k for k in spaces if not str(k).endswith("_mask"))
        unknown = [k for k in keys if k not in SPECS]
        if unknown:
            raise ValueError(f"{where}: observation keys {unknown} are not in the observation table "
                             f"(alpagym_ray.observations.SPECS: {sorted(SPECS)}); declare them with "
                             "obs_specs={key: {'shape': [...], 'features': [...]}} or choose obs_keys")
        if isinstance(spaces, Mapping):
            missing = [k for k in keys if k not in spaces]
            if missing:
                raise ValueError(f"{where}: its observation space has no keys {missing} "
                                 f"(it has {list(spaces)})")
            for k in keys:
                _check_space_shape(where, k, getattr(spaces[k], "shape", None))
        elif space is not None:
            if len(keys) != 1:
                raise ValueError(f"{where}: a non-dict observation ({type(space).__name__}) fills exactly "
                                 f"one key; obs_keys is {list(keys)}")
            _check_space_shape(where, keys[0], getattr(space, "shape", None))
        return tuple(keys)

    @property
    def expected_horizon(self) -> int | None:
        """H when the env's action space is a ``[H, 3]`` box, else None (unknown)."""
        shape = getattr(getattr(self.envs[0], "action_space", None), "shape", None)
        if shape is not None and len(shape) == 2 and shape[1] == 3:
            return int(shape[0])
        return None

    def check_reward(self, reward_fn: Any) -> None:
        """Raise ValueError when a reward (``rewards.compute.RewardFn``) reads a failure flag the env does
        not report (an implicit ``collision_any`` / ``offroad`` series has no valid tick)."""
        silent = set(self.implicit_metrics) - {"eval_relevant"}
        needs = {t.spec.metric_name for t in reward_fn.terms
                 if t.spec.metric_name is not None and not t.derived}
        for t in reward_fn.terms:
            hook = getattr(t.fn, "required_series", None) if t.fn is not None else None
            if hook is not None:
                needs |= set(hook(dict(t.spec.params)))
        bad = sorted(needs & silent)
        if bad:
            raise ValueError(f"{reward_fn.spec.source} reads {bad}, which env "
                             f"{_name(self.config.env_factory)} does not report: declare them in "
                             f"metric_aggregations and put per-tick values in info['metrics'] (it reports "
                             f"{list(self.metric_names)})")

    # ---- protocol ----------------------------------------------------------------------------
    def reset(
        self, seeds: Sequence[int | None] | None = None, options: Sequence[dict | None] | None = None
    ) -> dict[str, torch.Tensor]:
        """Reset every env: env ``b`` gets ``seed=seeds[b]``, ``options=options[b]``."""
        B = self.num_envs
        seeds = list(seeds) if seeds is not None else [None] * B
        options = list(options) if options is not None else [None] * B
        if len(seeds) != B or len(options) != B:
            raise ValueError(f"reset needs {B} seeds and {B} options (one per env), got {len(seeds)} and "
                             f"{len(options)}")
        has_pose = True
        for b, env in enumerate(self.envs):
            seed_b, options_b = seeds[b], options[b]
            out = env.reset(seed=None if seed_b is None else int(seed_b),
                            options=None if options_b is None else dict(options_b))
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError(f"env {b}: reset() must return (obs, info) (Gymnasium API), got "
                                f"{type(out).__name__}")
            obs, info = out
            self._write_obs(b, obs, "reset")
            has_pose &= isinstance(info, Mapping) and "ego_pose" in info
            if isinstance(info, Mapping) and "ego_pose" in info:
                self._pose[b] = _pose(b, info["ego_pose"])
        self._has_pose = has_pose
        self._terminated[:] = False
        self._truncated[:] = False
        self._steps[:] = 0
        self._series = [[] for _ in range(B)]
        self._was_reset = True
        return self._observation()

    def step(
        self, actions: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
        """One step of every env that has not ended; ``actions [B, H, 3]`` ego-frame poses."""
        if not self._was_reset:
            raise RuntimeError("step() before reset(): reset the envs first")
        B, d = self.num_envs, self.decision_every
        acts = actions.detach().float().cpu().numpy() if isinstance(actions, torch.Tensor) else \
            np.asarray(actions, np.float32)
        if acts.ndim != 3 or acts.shape[0] != B or acts.shape[2] != 3:
            raise ValueError(f"actions must be [B={B}, H, 3] ego-frame poses, got {list(acts.shape)}")
        H = self.expected_horizon
        if H is not None and acts.shape[1] != H:
            raise ValueError(f"the env's action space is [{H}, 3] poses; the actions have "
                             f"H = {acts.shape[1]}")
        names = list(self.metric_aggregations)
        tick_values = np.full((B, d, len(names)), np.nan, np.float32)
        tick_valid = np.zeros((B, d, len(names)), bool)
        reward = np.zeros(B, np.float32)
        ended = np.zeros(B, bool)
        env_infos: list[Mapping | None] = [None] * B
        for b in (int(i) for i in np.nonzero(~(self._terminated | self._truncated))[0]):
            out = self.envs[b].step(acts[b])
            if not (isinstance(out, tuple) and len(out) == 5):
                raise TypeError(f"env {b}: step() must return (obs, reward, terminated, truncated, info) "
                                f"(Gymnasium API), got {type(out).__name__}")
            obs, r, term, trunc, info = out
            step_index = int(self._steps[b])
            self._steps[b] += 1
            term, trunc = bool(term), bool(trunc)
            if not term and self.config.max_steps is not None and self._steps[b] >= self.config.max_steps:
                trunc = True
            self._write_obs(b, obs, f"step {step_index}")
            reward[b] = float(r)
            info = info if isinstance(info, Mapping) else {}
            env_infos[b] = info
            k, values = self._parse_metrics(b, step_index, info.get("metrics"), term or trunc)
            self._series[b].append((k, values))
            for j, name in enumerate(names):
                v, ok = values[name]
                tick_values[b, :k, j] = v
                tick_valid[b, :k, j] = ok
            if self._has_pose and "ego_pose" in info:
                self._pose[b] = _pose(b, info["ego_pose"])
            self._terminated[b], self._truncated[b] = term, trunc
            ended[b] = term or trunc
        out_info: dict[str, Any] = {
            "metrics": {n: torch.from_numpy(tick_values[:, :, j].copy()).to(self.device)
                        for j, n in enumerate(names)},
            "metrics_valid": {n: torch.from_numpy(tick_valid[:, :, j].copy()).to(self.device)
                              for j, n in enumerate(names)},
            "ended": torch.from_numpy(ended.copy()).to(self.device),
            "env_infos": env_infos,
        }
        if ended.any():
            out_info["episode_metrics"], out_info["episode_series"] = self._episode_end(ended)
        if self._has_pose:
            out_info["ego_pose"] = torch.from_numpy(self._pose.copy()).to(self.device)
        return (self._observation(), torch.from_numpy(reward).to(self.device),
                torch.from_numpy(self._terminated.copy()).to(self.device),
                torch.from_numpy(self._truncated.copy()).to(self.device), out_info)

    def close(self) -> None:
        for env in self.envs:
            close = getattr(env, "close", None)
            if callable(close):
                close()

    # ---- observations ------------------------------------------------------------------------
    def _write_obs(self, b: int, obs: Any, when: str) -> None:
        """Copy env ``b``'s observation into row ``b`` of the stacked buffers (checked against the specs)."""
        if not isinstance(obs, Mapping):
            if len(self.obs_keys) != 1:
                raise ValueError(f"env {b} ({when}): the observation is a {type(obs).__name__}, not a "
                                 f"dict; only a single obs key can be filled from it (obs_keys: "
                                 f"{list(self.obs_keys)})")
            obs = {self.obs_keys[0]: obs}
        for key, spec in self.specs.items():
            if key not in obs:
                raise ValueError(f"env {b} ({when}): the observation has no key {key!r} "
                                 f"(it has {sorted(obs)})")
            value = np.asarray(obs[key], dtype=np.float32)
            if value.shape != spec.shape:
                raise ValueError(f"env {b} ({when}): observation {key!r} has shape {list(value.shape)}, the "
                                 f"observation table says {list(spec.shape)}")
            self._obs[key][b] = value
            m = obs.get(mask_key(key))
            if m is None:
                self._mask[key][b] = True
            else:
                m = np.asarray(m)
                if m.shape != spec.shape[:1]:
                    raise ValueError(f"env {b} ({when}): mask {mask_key(key)!r} has shape {list(m.shape)}, "
                                     f"expected [{spec.shape[0]}]")
                self._mask[key][b] = m.astype(bool)

    def _observation(self) -> dict[str, torch.Tensor]:
        # fresh tensors each call: callers keep them (the rollout worker records them per decision)
        out: dict[str, torch.Tensor] = {}
        for key in self.obs_keys:
            out[key] = torch.from_numpy(self._obs[key].copy()).to(self.device)
            out[mask_key(key)] = torch.from_numpy(self._mask[key].copy()).to(self.device)
        return out

    # ---- metrics -----------------------------------------------------------------------------
    def _parse_metrics(
        self, b: int, step_index: int, metrics: Any, last: bool
    ) -> tuple[int, dict[str, tuple[np.ndarray, np.ndarray]]]:
        """``(k, {name: (values [k] float64, valid [k] bool)})`` of one step's ``info["metrics"]``."""
        where = f"env {b}, step {step_index}"
        if metrics is None:
            metrics = {}
        if not isinstance(metrics, Mapping):
            raise ValueError(f"{where}: info['metrics'] must map metric name -> value(s), got "
                             f"{type(metrics).__name__}")
        arrays: dict[str, np.ndarray] = {}
        for name, v in metrics.items():
            if name not in self.config.metric_aggregations:
                if name not in self._undeclared_warned:
                    self._undeclared_warned.add(name)
                    warnings.warn(f"{where}: info['metrics'] has {name!r}, which is not declared in "
                                  f"metric_aggregations; it is ignored", stacklevel=3)
                continue
            if isinstance(v, torch.Tensor):
                v = v.detach().cpu().numpy()
            try:
                a = np.asarray(v, dtype=np.float64)
            except (TypeError, ValueError):
                raise ValueError(f"{where}: metric {name!r} is {v!r}, not a number or a list of "
                                 "numbers") from None
            if a.ndim > 1:
                raise ValueError(f"{where}: metric {name!r} has shape {list(a.shape)}; give a float or one "
                                 "value per tick")
            arrays[name] = a.reshape(-1)
        lengths = {n: a.shape[0] for n, a in arrays.items()}
        d = self.decision_every
        k = d
        if lengths:
            if len(set(lengths.values())) > 1:
                raise ValueError(f"{where}: metrics report different numbers of ticks {lengths}")
            k = next(iter(lengths.values()))
            if k != d and not (last and 1 <= k <= d):
                raise ValueError(f"{where}: metrics hold {k} tick(s); with decision_every={d} every step "
                                 f"reports {d} value(s) per metric (the last step of an episode may report "
                                 "fewer)")
        out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name in self.metric_aggregations:
            if name in arrays:
                a = arrays[name]
                out[name] = (np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0), np.isfinite(a))
            elif name == "eval_relevant" and name in self.implicit_metrics:
                out[name] = (np.ones(k), np.ones(k, bool))
            else:  # not reported on this step (or an implicit failure flag): invalid ticks
                out[name] = (np.zeros(k), np.zeros(k, bool))
        return k, out

    def episode_series(self, b: int) -> dict[str, tuple[np.ndarray, np.ndarray, Aggregation]]:
        """Env ``b``'s series so far ``{name: (values [T] float64, valid [T] bool, aggregation)}``."""
        steps = self._series[b]
        out = {}
        for name, agg in self.metric_aggregations.items():
            if steps:
                values = np.concatenate([s[1][name][0] for s in steps])
                valid = np.concatenate([s[1][name][1] for s in steps])
            else:
                values, valid = np.zeros(0), np.zeros(0, bool)
            out[name] = (values, valid, agg)
        return out

    def aggregate_episode(
        self, series: Mapping[str, tuple[np.ndarray, np.ndarray, Aggregation]]
    ) -> dict[str, float]:
        """Episode metrics of one env's series (see the module docstring)."""
        if self.derived:
            agg = episode_metrics(series, cut_after_failure=self.config.cut_after_failure)
        else:
            flags = {m: np.where(series[m][1], series[m][0], 0.0) for m in MASK_SERIES}
            mask = tick_mask(flags["eval_relevant"], flags["collision_any"], flags["offroad"],
                             self.config.cut_after_failure)
            agg = aggregate(series, mask)
        return {name: float(agg[name]) for name in self.metric_names}

    def _episode_end(self, ended: np.ndarray) -> tuple[dict[str, np.ndarray], list[dict | None]]:
        """``({name: [B]} episode metrics, NaN where not ended; per-env series or None)``."""
        metrics = {name: np.full(self.num_envs, np.nan) for name in self.metric_names}
        per_env: list[dict | None] = [None] * self.num_envs
        for b in np.nonzero(ended)[0]:
            series = self.episode_series(int(b))
            per_env[b] = series
            for name, value in self.aggregate_episode(series).items():
                metrics[name][b] = value
        return metrics, per_env


def make_gym_batched_env(
    env_factory: str | Callable[..., Any],
    num_envs: int = 1,
    device: str = "cpu",
    *,
    metric_aggregations: Mapping[str, Aggregation | str],
    env_kwargs: Mapping[str, Any] | None = None,
    obs_keys: Sequence[str] | None = None,
    obs_specs: Mapping[str, Any] | None = None,
    decision_every: int = 1,
    max_steps: int | None = None,
    cut_after_failure: bool = True,
) -> GymBatchedEnv:
    """The ``_target_`` of a run's env node: the rollout worker adds ``num_envs`` and ``device``.

    Example node: ``{"_target_": "alpagym_ray.gym_adapter.make_gym_batched_env", "env_factory":
    "my_pkg.envs:LaneEnv", "env_kwargs": {...}, "metric_aggregations": {"progress": "last", ...}}``."""
    return GymBatchedEnv(env_factory, num_envs, device, metric_aggregations=metric_aggregations,
                         env_kwargs=env_kwargs, obs_keys=obs_keys, obs_specs=obs_specs,
                         decision_every=decision_every, max_steps=max_steps,
                         cut_after_failure=cut_after_failure)


# ---- helpers -------------------------------------------------------------------------------------
def _parse_aggregations(raw: Mapping[str, Aggregation | str]) -> dict[str, Aggregation]:
    """``{name: Aggregation}`` from declarations (names checked; derived episode metrics refused)."""
    parsed: dict[str, Aggregation] = {}
    for name, agg in raw.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"metric_aggregations: metric names must be non-empty strings, got {name!r}")
        if name in DERIVED_EPISODE_METRICS:
            raise ValueError(f"metric_aggregations: {name!r} is derived at episode end "
                             f"(alpagym_ray.metrics.episode_metrics), not reported per tick")
        try:
            parsed[name] = agg if isinstance(agg, Aggregation) else Aggregation.parse(str(agg))
        except ValueError as e:
            raise ValueError(f"metric_aggregations[{name!r}]: {e}") from None
    return parsed


def _name(factory: str | Callable[..., Any]) -> str:
    if isinstance(factory, str):
        return repr(factory)
    return f"{getattr(factory, '__module__', '?')}:{getattr(factory, '__qualname__', repr(factory))}"


def _check_space_shape(where: str, key: str, shape: tuple[int, ...] | None) -> None:
    if shape is not None and tuple(shape) != SPECS[key].shape:
        raise ValueError(f"{where}: observation space {key!r} has shape {list(shape)}, the observation table "
                         f"says {list(SPECS[key].shape)}")


def _pose(b: int, value: Any) -> np.ndarray:
    pose = np.asarray(value, dtype=np.float32).reshape(-1)
    if pose.shape != (3,) or not all(math.isfinite(float(x)) for x in pose):
        raise ValueError(f"env {b}: info['ego_pose'] must be 3 finite numbers (x, y, yaw), got {value!r}")
    return pose
