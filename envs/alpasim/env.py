"""Training against an AlpaSim runtime: the batched env :class:`AlpaSimBatch` and the Gymnasium view
:class:`AlpaSimEnv` (issue 7; ``shared/specs/alpasim_protocol.md``, "How AlpaSim runs an episode").

AlpaSim has no step API, so each env slot runs one rollout the way AlpaSim expects an external
driver to behave:

1. the process hosts an ``EgodriverService`` (:class:`envs.alpasim.driver_host.DriverHost`, one per
   process, shared by every env instance; one session per env slot);
2. ``reset`` calls ``RuntimeService.simulate`` in the background with one ``RolloutSpec{scenario_id,
   nr_rollouts: 1, session_uuids: [pinned id], start_time_offset_us, random_seed}``; a GRPO group
   is G slots reset with the same options and seed, so G such specs;
3. every ``drive`` of the session is a decision: ``reset`` returns at the first one after warm-up,
   ``step(actions)`` answers the pending one with the action converted to the local frame (the
   current pose first, absolute timestamps) and returns at the next one;
4. the episode ends when ``simulate`` returns: its ``timestep_metrics`` become the shared per-tick
   series and ``alpagym_ray.metrics.episode_metrics`` reduces them (``aggregated_metrics`` are kept
   in ``info`` as a cross-check).

Decision cadence is the runtime's control step, read from the ``drive`` timestamps
(``decision_every`` = control step / 0.1 s once seen). A failed rollout (the runtime died, the
rollout returned ``success: false``, a timeout, the runtime retrying the rollout under the same
session id after a decision) raises :class:`RolloutFailed` from ``reset``/``step`` naming the
session and the last call seen, so a rollout worker fails the group and the buffer requests it
again. ``reset`` of an env whose rollout still runs, ``close`` and ``max_decisions`` stop it with
``terminate_session``.

``step`` returns reward 0 (AlpaSim sends metrics only at the end), ``truncated`` when the rollout
ended, and ``infos`` with ``ego_pose [B, 3]`` (local frame) and, for envs that ended in this step,
``episode_metrics {name: [B]}``, ``episode_series`` (per env ``{name: (values [T], valid [T],
aggregation)}`` from the first in-control tick on: warm-up ticks never count in the shared mask),
``episode_decision_of_tick`` (per env ``[T]``: the decision whose action led to each tick) and
``aggregated_metrics`` (the runtime's own, per env).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import grpc
import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from alpagym_ray.metrics import ALPASIM_METRICS, DERIVED_EPISODE_METRICS, Aggregation, episode_metrics
from alpagym_ray.observations import ALPASIM_KEYS, SPECS, mask_key
from envs.alpasim import convert
from envs.alpasim import messages as m
from envs.alpasim.driver_host import Decision, DriverHost, DriverSession, SessionError

log = logging.getLogger(__name__)

ALPASIM_WARMUP_US = 1_700_000
"""AlpaSim's force-GT warm-up: the recorded ego is replayed for the first 1.7 s."""
TICK_US = convert.TICK_US
REQUIRED_SERIES = ("eval_relevant", "collision_front", "collision_lateral", "collision_any", "offroad",
                   "progress", "gt_dist_traveled_m")
"""Series ``episode_metrics`` needs from every ``RolloutReturn``."""
METRIC_NAMES: tuple[str, ...] = tuple(ALPASIM_METRICS) + DERIVED_EPISODE_METRICS
"""The names in every AlpaSim episode's ``episode_metrics`` (AlpaSim's per-tick names plus the derived
ones); ``AlpaSimEnvConfig.extra_metrics`` adds more."""


class RolloutFailed(RuntimeError):
    """A rollout could not finish (simulate failed, the rollout reported an error, a timeout)."""


@dataclass(frozen=True)
class AlpaSimEnvConfig:
    """How the env talks to the AlpaSim runtime and what it observes."""

    obs_keys: tuple[str, ...] = ("ego_history", "route")
    """Observation keys (``ego_history``, ``route``, ``gt_trajectory``, ``cameras``)."""
    horizon: int = 20
    """H, poses per action (0.1 s apart, ego frame, the current pose excluded); ≥ 5."""
    decision_every: int = 2
    """Expected ticks (0.1 s) per decision until the drive timestamps show the runtime's control
    step (our runtime server's default is 2 ticks; AlpaSim's own default is 1)."""
    warmup_us: int = ALPASIM_WARMUP_US
    """Force-GT warm-up; drives inside it are answered with an empty trajectory."""
    runtime_skips_warmup: bool = True
    """The runtime runs with ``skip_driver_during_force_gt=true`` (as AlpaGym does): every drive is a
    decision. False: drives before the scene's start (from ``get_runtime_info``) + offset +
    ``warmup_us`` are warm-up; for a scene the runtime does not list, before the first drive's time +
    ``warmup_us``."""
    driver_host: str = "127.0.0.1"
    """Interface the hosted EgodriverService binds."""
    driver_port: int = 0
    """Its port (0: any free port; one server per process and host is shared by every env)."""
    driver_advertise_host: str | None = None
    """Address the runtime calls the driver on (None: ``driver_host``; needed when binding 0.0.0.0)."""
    connect_timeout_s: float = 10.0
    """How long the runtime may take to answer ``get_runtime_info`` at start."""
    start_timeout_s: float = 300.0
    """How long ``reset`` waits for a session's first decision (scene loading and warm-up)."""
    decision_timeout_s: float = 120.0
    """How long ``step`` waits for a session's next drive or the end of its ``simulate``."""
    drive_timeout_s: float = 120.0
    """How long a runtime's ``drive`` call waits for the env's action before failing."""
    simulate_timeout_s: float | None = None
    """Deadline of each ``simulate`` call (None: none; the waits above still bound every step)."""
    max_decisions: int | None = None
    """Stop a rollout early after this many decisions (the last answer carries terminate_session)."""
    cut_after_failure: bool = True
    """Episode metrics ignore ticks after the first collision / off-road (AlpaSim's aggregation)."""
    camera_ids: tuple[str, ...] = ()
    """Logical camera ids observed under ``cameras`` (required with that key)."""
    camera_size: tuple[int, int] = (0, 0)
    """(height, width) every camera frame is resized to (required with ``cameras``)."""
    max_message_bytes: int = m.DEFAULT_MAX_MESSAGE_BYTES
    """gRPC message size cap, both directions."""
    extra_metrics: Mapping[str, str] = field(default_factory=dict)
    """Per-tick series the runtime reports beyond AlpaSim's, ``{name: aggregation}`` (e.g. our drivesim
    runtime's ``comfort_violation: max``): declared so rewards may use them; a rollout lacking one fails."""

    def __post_init__(self) -> None:
        bad = [k for k in self.obs_keys if k not in ALPASIM_KEYS]
        if bad:
            raise ValueError(f"AlpaSimEnvConfig.obs_keys: {bad} cannot come from AlpaSim; valid: "
                             f"{sorted(ALPASIM_KEYS)}")
        if self.horizon < 5:
            raise ValueError(f"AlpaSimEnvConfig.horizon must be >= 5, got {self.horizon}")
        if self.decision_every < 1:
            raise ValueError(f"AlpaSimEnvConfig.decision_every must be >= 1, got {self.decision_every}")
        if self.warmup_us < 0:
            raise ValueError(f"AlpaSimEnvConfig.warmup_us must be >= 0, got {self.warmup_us}")
        for name in ("connect_timeout_s", "start_timeout_s", "decision_timeout_s", "drive_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"AlpaSimEnvConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.simulate_timeout_s is not None and self.simulate_timeout_s <= 0:
            raise ValueError(f"AlpaSimEnvConfig.simulate_timeout_s must be > 0 or None, got {self.simulate_timeout_s}")
        if self.max_decisions is not None and self.max_decisions < 1:
            raise ValueError(f"AlpaSimEnvConfig.max_decisions must be >= 1 or None, got {self.max_decisions}")
        if not 0 <= self.driver_port < 65536:
            raise ValueError(f"AlpaSimEnvConfig.driver_port must be in [0, 65535], got {self.driver_port}")
        for name, agg in self.extra_metrics.items():
            if name in ALPASIM_METRICS or name in DERIVED_EPISODE_METRICS:
                raise ValueError(f"AlpaSimEnvConfig.extra_metrics: {name!r} is already one of AlpaSim's metrics")
            try:
                Aggregation.parse(str(agg))
            except ValueError as e:
                raise ValueError(f"AlpaSimEnvConfig.extra_metrics[{name!r}]: {e}") from None
        if "cameras" in self.obs_keys:
            if not self.camera_ids:
                raise ValueError("AlpaSimEnvConfig: obs key 'cameras' needs camera_ids (logical camera ids)")
            if len(self.camera_size) != 2 or min(self.camera_size) < 1:
                raise ValueError(f"AlpaSimEnvConfig: obs key 'cameras' needs camera_size (height, width) >= 1, "
                                 f"got {self.camera_size}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AlpaSimEnvConfig:
        """Build from a plain dict (e.g. a Hydra node), naming unknown keys."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            import difflib

            hints = {k: difflib.get_close_matches(k, names, n=1) for k in unknown}
            raise ValueError(f"unknown AlpaSim env option(s) {unknown} (did you mean {hints}); "
                             f"valid: {sorted(names)}")
        d = dict(d)
        for key in ("obs_keys", "camera_ids", "camera_size"):
            if key in d and d[key] is not None:
                d[key] = tuple(d[key])
        return cls(**d)


def parse_address(address: str) -> tuple[str, int]:
    """``"host:port"`` (IPv6 as ``[::1]:port``) -> (host, port); ValueError naming the input."""
    host, sep, port = str(address).strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"runtime address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def read_runtime_yaml(path: str) -> str:
    """The runtime address ``host:port`` from AlpaSim's ``generated-runtime-server.yaml`` (top-level
    ``host`` and ``port``, or one mapping level down, or an ``address: host:port`` entry)."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise FileNotFoundError(f"AlpaSim runtime yaml {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"AlpaSim runtime yaml {path} is not YAML: {e}") from None

    def find(node: Any) -> str | None:
        if not isinstance(node, dict):
            return None
        if "host" in node and "port" in node:
            return f"{node['host']}:{node['port']}"
        if isinstance(node.get("address"), str):
            return node["address"]
        return None

    found = find(data)
    if found is None and isinstance(data, dict):
        found = next((a for v in data.values() if (a := find(v)) is not None), None)
    if found is None:
        raise ValueError(f"AlpaSim runtime yaml {path}: no host/port entries (got keys "
                         f"{sorted(data) if isinstance(data, dict) else type(data).__name__})")
    parse_address(found)
    return found


@dataclass
class _Slot:
    """One env slot's current episode."""

    session: DriverSession
    future: Any
    scene_id: str
    offset_us: int
    seed: int
    decision: Decision | None = None
    decision_times: list[int] = field(default_factory=list)
    done: bool = False
    failed: str = ""
    undelivered: str = ""
    """Why the answer to the last decision could not be handed over (empty when it was)."""
    obs: dict[str, Any] | None = None
    pose: np.ndarray | None = None


class AlpaSimBatch:
    """B concurrent AlpaSim rollouts behind the batched env interface
    (``alpagym_ray.env_protocol.BatchedEnv``)."""

    def __init__(self, runtime_address: str, num_envs: int, config: AlpaSimEnvConfig | None = None,
                 device: str | torch.device = "cpu", scene_ids: Sequence[str] | None = None):
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.cfg = config or AlpaSimEnvConfig()
        self.num_envs = num_envs
        self.device = torch.device(device)
        self.obs_keys = tuple(self.cfg.obs_keys)
        self.decision_every = self.cfg.decision_every
        self.control_step_us: int | None = None
        extra = {k: Aggregation.parse(str(v)) for k, v in self.cfg.extra_metrics.items()}
        self.metric_aggregations: dict[str, Aggregation] = {**ALPASIM_METRICS, **extra}
        """Every per-tick series an episode carries, with its own aggregation (rewards are checked on it)."""
        self.metric_names = tuple(self.metric_aggregations) + DERIVED_EPISODE_METRICS
        self.runtime_address = runtime_address
        parse_address(runtime_address)
        self._channel = grpc.insecure_channel(runtime_address,
                                              options=m.channel_options(self.cfg.max_message_bytes))
        self._stub = m.runtime_stub(self._channel)
        self.host: DriverHost | None = None
        try:
            self.runtime_info = self._connect()
            self.scene_infos = {s.scene_id: s for s in self.runtime_info.scenes} if self.runtime_info else {}
            self.scene_ids = list(scene_ids) if scene_ids is not None else sorted(self.scene_infos)
            unknown = [s for s in self.scene_ids if self.scene_infos and s not in self.scene_infos]
            if unknown:
                raise KeyError(f"scene_ids {unknown[:5]} are not served by the AlpaSim runtime at "
                               f"{runtime_address} ({len(self.scene_infos)} scenes, e.g. "
                               f"{sorted(self.scene_infos)[:5]})")
            self.host = DriverHost.acquire(self.cfg.driver_host, self.cfg.driver_port,
                                           max_message_bytes=self.cfg.max_message_bytes)
            self.driver_address = self.host.address(self.cfg.driver_advertise_host)
        except BaseException:
            if self.host is not None:
                self.host.release()
                self.host = None
            self._channel.close()
            raise
        self._slots: list[_Slot | None] = [None] * num_envs
        self._zombies: list[_Slot] = []
        self._seen_control_steps: set[int] = set()

    # ---- runtime connection --------------------------------------------------------------
    def _connect(self) -> Any:
        """``get_runtime_info`` within ``connect_timeout_s`` (a clear error when nobody listens)."""
        t = self.cfg.connect_timeout_s
        try:
            return self._stub.get_runtime_info(m.Empty(), timeout=t, wait_for_ready=True)
        except grpc.RpcError as e:
            if m.is_unimplemented(e):
                return None   # an old runtime without get_runtime_info: scenes unknown
            code = e.code() if hasattr(e, "code") else None
            raise ConnectionError(
                f"AlpaSim runtime at {self.runtime_address} did not answer get_runtime_info within {t} s "
                f"({code.name if code else 'error'}: {e.details() if hasattr(e, 'details') else e}); is it running "
                f"(AlpaSim: wizard.run_mode=SERVER writes the address to generated-runtime-server.yaml; ours: "
                f"alpagym-ray alpasim-runtime --scenes DIR)?") from None

    # ---- reset ---------------------------------------------------------------------------
    def reset(self, seeds: Sequence[int | None] | None = None,
              options: Sequence[Mapping[str, Any] | None] | None = None,
              env_ids: Sequence[int] | None = None) -> dict[str, Any]:
        """Start a rollout in every env of ``env_ids`` (default all) and return at their first
        decisions. ``options[i]``: ``scene_id`` (else drawn from ``seeds[i]``) and
        ``start_time_offset_us`` or ``start_step`` (0.1 s ticks). A group = equal seeds and options."""
        ids = list(range(self.num_envs)) if env_ids is None else [int(i) for i in env_ids]
        n = len(ids)
        seeds = list(seeds) if seeds is not None else [None] * n
        opts = list(options) if options is not None else [None] * n
        if len(seeds) != n or len(opts) != n:
            raise ValueError(f"reset: got {len(seeds)} seeds and {len(opts)} options for {n} envs")
        plans = [self._plan(i, s, o) for i, (s, o) in enumerate(zip(seeds, opts, strict=True))]
        for i in ids:
            self._stop_slot(i, "reset")
        for i, (scene, offset, seed) in zip(ids, plans, strict=True):
            self._slots[i] = self._start(scene, offset, seed)
        errors = []
        deadline = time.monotonic() + self.cfg.start_timeout_s   # the rollouts start concurrently
        for i in ids:
            slot = self._slots[i]
            assert slot is not None
            try:
                slot.decision = slot.session.wait_event(_left(deadline), limit_s=self.cfg.start_timeout_s)
            except TimeoutError as e:
                errors.append(str(e))
                continue
            if slot.decision is None:
                try:
                    self._rollout_return(slot)   # raises with simulate's or the rollout's own error
                    errors.append(self._failure(slot, "the rollout ended before its first decision"))
                except RolloutFailed as e:
                    errors.append(f"before its first decision: {e}")
                continue
            slot.decision_times.append(slot.decision.time_now_us)
            self._check_start(slot)
            self._observe(slot)
        if errors:
            for i in ids:
                self._stop_slot(i, "reset failed")
            raise RolloutFailed("reset: " + "; ".join(errors))
        return self._batch()

    def _plan(self, i: int, seed: int | None, opt: Mapping[str, Any] | None) -> tuple[str, int, int]:
        """(scene id, start offset µs, rollout seed) of one reset entry; errors name ``options[i]``."""
        opt = dict(opt or {})
        unknown = set(opt) - {"scene_id", "start_time_offset_us", "start_step"}
        if unknown:
            raise ValueError(f"reset options[{i}]: unknown keys {sorted(unknown)}; valid: scene_id, "
                             f"start_time_offset_us, start_step")
        if "start_time_offset_us" in opt and "start_step" in opt:
            raise ValueError(f"reset options[{i}]: give start_time_offset_us or start_step, not both")
        scene = opt.get("scene_id")
        if scene is None:
            if not self.scene_ids:
                raise ValueError(f"reset options[{i}]: no scene_id and the runtime lists no scenes to draw from")
            scene = self.scene_ids[int(np.random.default_rng(seed).integers(len(self.scene_ids)))]
        scene = str(scene)
        if self.scene_infos and scene not in self.scene_infos:
            import difflib

            close = difflib.get_close_matches(scene, list(self.scene_infos), n=3)
            raise KeyError(f"reset options[{i}]: scene {scene!r} is not served by the runtime at "
                           f"{self.runtime_address}" + (f"; did you mean {close}?" if close else ""))
        offset = int(opt.get("start_time_offset_us", int(opt.get("start_step", 0)) * TICK_US))
        if offset < 0:
            raise ValueError(f"reset options[{i}]: the start offset must be >= 0, got {offset} us")
        # AlpaSim reads random_seed 0 as "draw one": shift by one so every reset seed is reproducible
        rollout_seed = (int(seed or 0) + 1) % (1 << 64) or 1
        return scene, offset, rollout_seed

    def _control_from_us(self, scene: str, offset_us: int) -> int | None:
        """When the policy takes control: the scene's start (as the runtime lists it) + offset + warm-up."""
        info = self.scene_infos.get(scene)
        if info is None or not info.HasField("metadata"):
            return None
        return int(info.metadata.start_time_us) + offset_us + self.cfg.warmup_us

    def _start(self, scene: str, offset_us: int, seed: int) -> _Slot:
        assert self.host is not None
        sid = f"alpagym-{uuid.uuid4()}"
        if self.cfg.runtime_skips_warmup:
            # the runtime sends no drive during the warm-up: every drive is a decision
            warmup_us, until = 0, None
        else:
            warmup_us, until = self.cfg.warmup_us, self._control_from_us(scene, offset_us)
        session = self.host.open_session(DriverSession(
            sid, scene, warmup_us=warmup_us, warmup_until_us=until, drive_timeout_s=self.cfg.drive_timeout_s))
        ip, port = self.driver_address
        request = m.SimulationRequest(
            available_drivers=[m.SimulationRequest.DriverAddress(ip=ip, port=port)],
            rollout_specs=[m.RolloutSpec(scenario_id=scene, nr_rollouts=1, session_uuids=[sid],
                                         start_time_offset_us=offset_us, random_seed=seed)],
            n_concurrent_per_driver=1)
        future = self._stub.simulate.future(request, timeout=self.cfg.simulate_timeout_s)
        host = self.host

        def on_done(_future: Any) -> None:
            session.mark_simulate_done()
            host.drop_session(sid)

        future.add_done_callback(on_done)
        return _Slot(session, future, scene, offset_us, seed)

    def _check_start(self, slot: _Slot) -> None:
        """Warn when the first decision comes before start + offset + warm-up (an older AlpaSim that
        ignores start_time_offset_us: the group still shares one start, the clip's)."""
        expected = self._control_from_us(slot.scene_id, slot.offset_us)
        assert slot.decision is not None
        if expected is not None and slot.decision.time_now_us + convert.TIME_TOLERANCE_US < expected:
            log.warning("%s: first decision at %d us, before start + offset + warm-up %d us: the runtime may not "
                        "support start_time_offset_us", slot.session.who(), slot.decision.time_now_us, expected)

    # ---- step ----------------------------------------------------------------------------
    def step(self, actions: torch.Tensor | np.ndarray):
        """Answer every pending decision with its action ``[B, H, 3]`` and advance to the next one."""
        a = torch.as_tensor(actions).detach().to("cpu", torch.float64).numpy()
        B = self.num_envs
        if a.ndim != 3 or a.shape[0] != B or a.shape[2] != 3 or a.shape[1] < 5:
            raise ValueError(f"actions must be [B={B}, H>=5, 3] ego-frame poses, got {list(a.shape)}")
        live = {i: s for i, s in enumerate(self._slots) if s is not None and not s.done}
        for i, slot in live.items():
            if not np.isfinite(a[i]).all():
                raise ValueError(f"actions[{i}] has non-finite values ({slot.session.who()})")
        for slot_i, slot in live.items():
            self._answer(slot, a[slot_i])
        deadline = time.monotonic() + self.cfg.decision_timeout_s   # the sessions advance concurrently
        endings: dict[int, tuple] = {}
        errors: dict[int, str] = {}
        for i, slot in live.items():
            try:
                ending = self._advance(slot, deadline)
            except RolloutFailed as e:
                errors[i] = str(e)
                continue
            if ending is not None:
                endings[i] = ending
        if errors:
            for i in errors:
                self._stop_slot(i, "failed")
            raise RolloutFailed(f"{len(errors)} of {len(live)} rollouts failed: " + "; ".join(errors.values()))
        infos: dict[str, Any] = {"metrics": {}, "aggregated_metrics": [None] * B,
                                 "episode_decision_of_tick": [None] * B}
        if endings:
            infos["episode_series"] = [None] * B
            infos["episode_metrics"] = {name: np.full(B, np.nan) for name in self.metric_names}
            for i, (series, ep, dec, aggregated) in endings.items():
                infos["episode_series"][i] = series
                infos["episode_decision_of_tick"][i] = dec
                infos["aggregated_metrics"][i] = aggregated
                for name in self.metric_names:
                    infos["episode_metrics"][name][i] = ep.get(name, np.nan)
        ended = np.isin(np.arange(B), list(endings))
        infos["ended"] = ended
        infos["ego_pose"] = torch.as_tensor(np.stack([self._pose_of(s) for s in self._slots]),
                                            dtype=torch.float32, device=self.device)
        infos["decision_every"] = self.decision_every
        reward = torch.zeros(B, dtype=torch.float32, device=self.device)   # AlpaSim scores only at the end
        terminated = torch.zeros(B, dtype=torch.bool, device=self.device)  # rollouts end at the clip's end
        truncated = torch.as_tensor(ended, device=self.device)
        return self._batch(), reward, terminated, truncated, infos

    def _answer(self, slot: _Slot, action: np.ndarray) -> None:
        """Hand ``action [H, 3]`` to the slot's waiting drive, as a local-frame trajectory."""
        assert slot.decision is not None and slot.pose is not None
        traj = convert.action_to_trajectory(action, slot.pose, slot.decision.time_now_us)
        try:
            slot.session.answer(slot.decision, m.DriveResponse(trajectory=traj))
        except SessionError as e:
            # the runtime gave up on this drive (its own timeout) or restarted the session: what
            # happens next (a failed RolloutReturn, a new attempt) says more, so keep waiting
            slot.undelivered = str(e)

    def _advance(self, slot: _Slot, deadline: float) -> tuple | None:
        """Wait for the slot's next decision (None; its observation is stored) or the end of its
        rollout (``(series, episode metrics, decision_of_tick, aggregated_metrics)``); the slot is
        then done. Raises RolloutFailed for every way the episode can fail."""
        assert slot.decision is not None
        limit = self.cfg.decision_timeout_s
        try:
            nxt = slot.session.wait_event(_left(deadline), after=slot.decision, limit_s=limit)
            if nxt is not None and self.cfg.max_decisions is not None and nxt.index >= self.cfg.max_decisions:
                # early stop: the drive after the last allowed decision ends the rollout, so every
                # recorded decision was executed
                slot.session.answer(nxt, m.DriveResponse(terminate_session=True))
                nxt = slot.session.wait_event(_left(deadline), after=nxt, limit_s=limit)
        except (TimeoutError, SessionError) as e:
            raise RolloutFailed(str(e) + (f" (earlier: {slot.undelivered})" if slot.undelivered else "")) from None
        if nxt is None:
            rollout = self._rollout_return(slot)
            if slot.undelivered:
                raise RolloutFailed(slot.undelivered)
            series, ep, dec = self._episode(slot, rollout)
            slot.done = True
            return series, ep, dec, dict(rollout.aggregated_metrics)
        if slot.undelivered and nxt.attempt == slot.decision.attempt:
            raise RolloutFailed(f"{slot.undelivered}; the runtime went on to decision {nxt.index} without it")
        if nxt.attempt != slot.decision.attempt:
            # the runtime retried the rollout under the same id (a re-sent start_session): the decisions
            # recorded so far belong to the dead attempt, so this episode is failed (before the first
            # decision a retry is harmless: reset simply waits for it)
            raise RolloutFailed(f"{slot.session.who()}: the runtime restarted the rollout (start_session attempt "
                                f"{nxt.attempt}) after {len(slot.decision_times)} decisions; they belong to the "
                                f"failed attempt")
        self._note_cadence(slot.decision.time_now_us, nxt.time_now_us)
        slot.decision = nxt
        slot.decision_times.append(nxt.time_now_us)
        self._observe(slot)
        return None

    def _note_cadence(self, prev_us: int, now_us: int) -> None:
        """The runtime's control step from consecutive drive times -> ``decision_every``."""
        dt = now_us - prev_us
        if dt <= 0:
            return
        ticks = max(1, int(round(dt / TICK_US)))
        if self.control_step_us is None:
            self.control_step_us = dt
            self.decision_every = ticks
            if ticks * TICK_US != dt:
                log.warning("AlpaSim control step %d us is not a multiple of 0.1 s; decision_every=%d", dt, ticks)
        elif ticks not in self._seen_control_steps and ticks != self.decision_every:
            log.warning("AlpaSim drives %d us apart, earlier %d us", dt, self.control_step_us)
        self._seen_control_steps.add(ticks)

    def _rollout_return(self, slot: _Slot) -> Any:
        """The slot's ``RolloutReturn`` (RolloutFailed when simulate or the rollout failed)."""
        try:
            ret = slot.future.result(timeout=self.cfg.decision_timeout_s)
        except grpc.FutureTimeoutError:
            raise RolloutFailed(self._failure(slot, "simulate did not return")) from None
        except grpc.RpcError as e:
            raise RolloutFailed(self._failure(slot, f"simulate failed: {e.code().name}: {e.details()}")) from None
        except grpc.FutureCancelledError:
            raise RolloutFailed(self._failure(slot, "simulate was cancelled")) from None
        if len(ret.rollout_returns) != 1:
            raise RolloutFailed(self._failure(
                slot, f"simulate returned {len(ret.rollout_returns)} rollouts for 1 spec"))
        rollout = ret.rollout_returns[0]
        if not rollout.success:
            code = m.RolloutErrorCode.Name(rollout.error_code) if rollout.error_code in m.RolloutErrorCode.values() \
                else str(rollout.error_code)
            raise RolloutFailed(self._failure(slot, f"the rollout failed ({code}): {rollout.error}"))
        return rollout

    def _episode(self, slot: _Slot, rollout: Any):
        """(series trimmed to the ticks from the policy's first, episode metrics, decision of each tick)."""
        try:
            items = convert.rollout_series(rollout)
        except convert.ConversionError as e:
            raise RolloutFailed(self._failure(slot, f"bad timestep_metrics: {e}")) from None
        return episode_from_series(items, slot.decision_times, self.cfg.cut_after_failure,
                                   who=slot.session.who(), required=tuple(self.cfg.extra_metrics))

    def _failure(self, slot: _Slot, what: str) -> str:
        return f"{slot.session.who()}: {what}; last call seen: {slot.session.describe_last_call()}"

    # ---- observations --------------------------------------------------------------------
    def _observe(self, slot: _Slot) -> None:
        assert slot.decision is not None
        t = slot.decision.time_now_us
        h, w = self.cfg.camera_size
        size = {lid: (int(h), int(w)) for lid in self.cfg.camera_ids}
        slot.obs = slot.session.observe(self.obs_keys, t, camera_size=size)
        slot.pose = slot.session.ego_pose(t)

    def _pose_of(self, slot: _Slot | None) -> np.ndarray:
        return np.zeros(3) if slot is None or slot.pose is None else slot.pose

    def _batch(self) -> dict[str, Any]:
        """Stack the slots' latest observations into ``{key: [B, ...]}`` tensors."""
        from alpagym_ray.observations import empty

        out: dict[str, Any] = {}
        obs = [s.obs if s is not None and s.obs is not None else None for s in self._slots]
        for key in self.obs_keys:
            if key == "cameras":
                h, w = self.cfg.camera_size
                frames = {lid: np.zeros((self.num_envs, h, w, 3), dtype=np.uint8) for lid in self.cfg.camera_ids}
                present = np.zeros((self.num_envs, len(self.cfg.camera_ids)), dtype=bool)
                for b, o in enumerate(obs):
                    if o is None:
                        continue
                    for j, lid in enumerate(self.cfg.camera_ids):
                        if o[mask_key("cameras")].get(lid, False):
                            frames[lid][b] = o["cameras"][lid]
                            present[b, j] = True
                out["cameras"] = {lid: torch.from_numpy(f).to(self.device) for lid, f in frames.items()}
                out[mask_key("cameras")] = torch.from_numpy(present).to(self.device)
                continue
            zero, zmask = empty(key)
            arr = np.stack([zero if o is None else o[key] for o in obs]).astype(np.float32)
            msk = np.stack([zmask if o is None else o[mask_key(key)] for o in obs]).astype(bool)
            out[key] = torch.from_numpy(arr).to(self.device)
            out[mask_key(key)] = torch.from_numpy(msk).to(self.device)
        return out

    # ---- stopping ------------------------------------------------------------------------
    def _stop_slot(self, i: int, reason: str) -> None:
        """End env ``i``'s rollout early: its pending and later drives get terminate_session."""
        slot = self._slots[i]
        if slot is None:
            return
        self._slots[i] = None
        if not slot.future.done():
            slot.session.abort(reason)
            self._zombies.append(slot)
        self._zombies = [z for z in self._zombies if not z.future.done()]

    def close(self) -> None:
        """Stop every rollout, release the driver host and close the runtime channel."""
        for i in range(self.num_envs):
            self._stop_slot(i, "env closed")
        for z in self._zombies:
            z.future.cancel()
        self._zombies = []
        if self.host is not None:
            self.host.release()
            self.host = None
        self._channel.close()

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        try:
            if getattr(self, "host", None) is not None:
                self.close()
        except Exception:
            pass


def episode_from_series(items: Sequence[Any], decision_times_us: Sequence[int], cut_after_failure: bool = True,
                        who: str = "rollout", required: Sequence[str] = ()):
    """An AlpaSim episode's per-tick series (``MetricSeries`` list, as ``timestep_metrics`` arrive) ->
    ``(series, episode metrics, decision_of_tick)``.

    ``series``: ``{name: (values [T], valid [T], aggregation)}`` aligned on the union of timestamps and
    trimmed to start at the first tick with the policy in control (warm-up ticks never count in the
    shared mask, so nothing a reward reads is lost); ``decision_of_tick [T]``: the decision whose
    action produced each tick (the last drive strictly before the tick's time; -1 before the first).
    """
    from alpagym_ray.metrics import series_to_arrays

    arrays = series_to_arrays(list(items))
    missing = [k for k in (*REQUIRED_SERIES, *required) if k not in arrays]
    if missing:
        raise RolloutFailed(f"{who}: timestep_metrics lack {missing} (got {sorted(arrays)})")
    times = np.unique(np.concatenate([np.asarray(s.timestamps_us, dtype=np.int64) for s in items]))
    er_v, er_ok, _ = arrays["eval_relevant"]
    in_control = np.nonzero(er_ok & (er_v > 0.5))[0]
    first = int(in_control[0]) if len(in_control) else len(times)
    series = {k: (v[first:], ok[first:], a) for k, (v, ok, a) in arrays.items()}
    times = times[first:]
    metrics = episode_metrics(series, cut_after_failure)
    ep = {k: float(v) for k, v in metrics.items()}
    d = np.asarray(decision_times_us, dtype=np.int64)
    if len(d):
        dec = np.searchsorted(d, times, side="left") - 1
        dec = np.clip(dec, -1, len(d) - 1).astype(np.int64)
    else:
        dec = np.full(len(times), -1, dtype=np.int64)
    return series, ep, dec


def _left(deadline: float) -> float:
    """Seconds until ``deadline`` (a short minimum, so a finished session is still seen)."""
    return max(deadline - time.monotonic(), 0.05)


def resolve_address(runtime_address: str | None = None, runtime_yaml: str | None = None) -> str:
    """The runtime's ``host:port``: given directly, or read from AlpaSim's ``generated-runtime-server.yaml``."""
    if (runtime_address is None) == (runtime_yaml is None):
        raise ValueError("give exactly one of runtime_address (host:port) and runtime_yaml (AlpaSim's "
                         f"generated-runtime-server.yaml); got runtime_address={runtime_address!r}, "
                         f"runtime_yaml={runtime_yaml!r}")
    if runtime_yaml is not None:
        return read_runtime_yaml(runtime_yaml)
    parse_address(str(runtime_address))
    return str(runtime_address)


MAX_ABS_POSE = 200.0


class AlpaSimEnv(gym.Env):
    """One AlpaSim rollout at a time with Gymnasium's API (a view of :class:`AlpaSimBatch` with B = 1).

    Observations are numpy (masks as ``int8`` MultiBinary; ``cameras`` a Dict of ``[H, W, 3]`` uint8
    frames); the action is ``[H, 3]`` ego-frame poses; the reward is 0 (AlpaSim scores an episode when
    it ends: score ``info["episode_series"]`` with ``rewards.compute.RewardFn``).
    """

    metadata = {"render_modes": []}

    def __init__(self, runtime_address: str | None = None, runtime_yaml: str | None = None,
                 config: AlpaSimEnvConfig | Mapping[str, Any] | None = None,
                 scene_ids: Sequence[str] | None = None):
        cfg = config if isinstance(config, AlpaSimEnvConfig) else AlpaSimEnvConfig.from_dict(dict(config or {}))
        self.sim = AlpaSimBatch(resolve_address(runtime_address, runtime_yaml), 1, cfg, "cpu", scene_ids)
        self.cfg = cfg
        obs_spaces: dict[str, spaces.Space] = {}
        for key in cfg.obs_keys:
            if key == "cameras":
                h, w = cfg.camera_size
                obs_spaces[key] = spaces.Dict({lid: spaces.Box(0, 255, shape=(h, w, 3), dtype=np.uint8)
                                               for lid in cfg.camera_ids})
                obs_spaces[mask_key(key)] = spaces.MultiBinary(len(cfg.camera_ids))
                continue
            spec = SPECS[key]
            obs_spaces[key] = spaces.Box(-np.inf, np.inf, shape=spec.shape, dtype=np.float32)
            obs_spaces[mask_key(key)] = spaces.MultiBinary(spec.shape[0])
        self.observation_space = spaces.Dict(obs_spaces)
        self.action_space = spaces.Box(-MAX_ABS_POSE, MAX_ABS_POSE, shape=(cfg.horizon, 3), dtype=np.float32)
        self.metric_names = self.sim.metric_names
        self.metric_aggregations = self.sim.metric_aggregations

    def _np_obs(self, obs: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in obs.items():
            if k == "cameras":
                out[k] = {lid: f[0].cpu().numpy() for lid, f in v.items()}
                continue
            a = v[0].cpu().numpy()
            out[k] = a.astype(np.int8) if a.dtype == np.bool_ else a.astype(np.float32)
        return out

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        opts = dict(options or {})
        if opts.get("scene_id") is None and self.sim.scene_ids:
            # draw the scene from the env's seeded generator so reset(seed=s) is reproducible
            opts["scene_id"] = self.sim.scene_ids[int(self.np_random.integers(len(self.sim.scene_ids)))]
        obs = self.sim.reset(seeds=[seed], options=[opts])
        slot = self.sim._slots[0]
        assert slot is not None
        info = {"scene_id": slot.scene_id, "start_time_offset_us": slot.offset_us,
                "session_uuid": slot.session.session_uuid}
        return self._np_obs(obs), info

    def step(self, action):
        a = torch.as_tensor(np.asarray(action, dtype=np.float32))[None]
        obs, reward, terminated, truncated, info = self.sim.step(a)
        out_info: dict[str, Any] = {"decision_every": info["decision_every"]}
        if "episode_metrics" in info:
            out_info["episode_metrics"] = {k: float(v[0]) for k, v in info["episode_metrics"].items()}
            out_info["episode_series"] = info["episode_series"][0]
            out_info["aggregated_metrics"] = info["aggregated_metrics"][0]
            out_info["episode_decision_of_tick"] = info["episode_decision_of_tick"][0]
        return self._np_obs(obs), float(reward[0]), bool(terminated[0]), bool(truncated[0]), out_info

    def close(self) -> None:
        self.sim.close()
