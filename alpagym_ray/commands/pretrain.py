"""``alpagym-ray pretrain``: open-loop behaviour cloning on a scene set's logged ego futures.

Usage: ``alpagym-ray pretrain [key=value ...]`` (Hydra overrides of ``alpagym_ray/conf/pretrain.yaml``;
``--cfg`` prints the composed config). The pipeline:

1. scenes: ``scenes.path`` (directory or Hub dataset id) or a generated set, split by scene into
   training and held-out validation scenes;
2. samples: drivesim is reset at many ``(scene, start_step)`` pairs; each reset's observation is an
   input and its ``gt_trajectory[:, :H]`` (the logged future) the target;
3. anchors: k-means over the training targets (policies with ``fit_anchors``);
4. behaviour cloning (``learners.bc``) with TensorBoard curves and a progress bar; validation ADE /
   FDE on the held-out scenes next to the constant-velocity baseline;
5. a checkpoint (``learners.checkpoint``) with the optimizer state, in
   ``<run_dir>/pretrain-<config hash>/checkpoint``.

:func:`pretrain` is what ``alpagym-ray train`` calls when it has no starting checkpoint: a run with
the same config (``run_dir``, ``device`` and ``progress`` aside, and the same scene-set index) is
found and reused, not retrained. The key is the config, not the code: after changing the policy's
code, use a fresh ``run_dir`` (or delete the cached ``pretrain-<hash>``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
NOT_HASHED = ("run_dir", "device", "progress")
PERTURB_RAMP_STEPS = 10
"""A perturbed replay reaches its full lateral offset after this many 0.1 s steps."""
"""Config keys that do not change the result (kept out of the cache key)."""


# ---- config ------------------------------------------------------------------------------------
def compose_config(overrides: Sequence[str] = (), config_name: str = "pretrain") -> Any:
    """The composed Hydra config (``DictConfig``) of ``alpagym_ray/conf/<config_name>.yaml``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # e.g. inside a @hydra.main app
        return compose(config_name, overrides=list(overrides))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name, overrides=list(overrides))


def _plain(cfg: Any) -> dict[str, Any]:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return json.loads(json.dumps(cfg))


def config_hash(cfg: Any) -> str:
    """12 hex digits identifying what a pre-training run produces: the config without
    ``NOT_HASHED`` keys, plus the content of the scene set's index when one is named."""
    plain = {k: v for k, v in _plain(cfg).items() if k not in NOT_HASHED}
    scenes = plain.get("scenes", {})
    for key in ("path", "val_path"):
        index = Path(str(scenes.get(key))) / "index.json" if scenes.get(key) else None
        if index is not None and index.is_file():
            plain[f"_{key}_index_sha256"] = hashlib.sha256(index.read_bytes()).hexdigest()
    body = json.dumps(plain, sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()[:12]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; otherwise ``torch.device(name)``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but no CUDA device is available; use device=cpu or auto")
    return device


# ---- scenes and samples ------------------------------------------------------------------------
def split_ids(ids: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split scene ids into (train, held-out) by a seeded permutation; both non-empty when possible."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"scenes.val_fraction must be in (0, 1), got {val_fraction}")
    if len(ids) < 2:
        raise ValueError(f"need at least 2 scenes to hold some out for validation, got {len(ids)}")
    order = np.random.default_rng(seed).permutation(len(ids))
    n_val = min(len(ids) - 1, max(1, round(val_fraction * len(ids))))
    val = sorted(ids[i] for i in order[:n_val])
    return [i for i in ids if i not in set(val)], val


def load_scenes(cfg: Mapping[str, Any], run_dir: Path) -> tuple[list, list, dict[str, Any]]:
    """(training scenes, held-out scenes, description) from ``cfg["scenes"]``."""
    from envs.drivesim.scene import SceneSet
    from envs.drivesim.scene_hub import resolve_scene_set

    sc = cfg["scenes"]
    if sc.get("path"):
        root = resolve_scene_set(sc["path"])
        desc: dict[str, Any] = {"path": str(sc["path"])}
    else:
        gen = sc["generate"]
        root = run_dir / f"scenes-generated-{gen['num_scenes']}-{gen['seed']}"
        if not (root / "index.json").is_file():
            from envs.drivesim.generate import generate_scene_set

            tmp = root.with_name(root.name + f".tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            generate_scene_set(int(gen["num_scenes"]), tmp, seed=int(gen["seed"]))
            os.replace(tmp, root)
        desc = {"generated": dict(gen), "path": str(root)}
    scene_set = SceneSet.open(root)
    if sc.get("val_path"):
        train_ids, val_set = scene_set.ids, SceneSet.open(resolve_scene_set(sc["val_path"]))
        val_ids = val_set.ids
        val_scenes = val_set.load_many()
        desc["val_path"] = str(sc["val_path"])
    else:
        train_ids, val_ids = split_ids(scene_set.ids, float(sc["val_fraction"]), int(cfg["seed"]))
        val_scenes = scene_set.load_many(val_ids)
    desc.update(train_scenes=len(train_ids), val_scenes=len(val_ids), val_ids=val_ids)
    return scene_set.load_many(train_ids), val_scenes, desc


def start_pairs(scenes: Sequence, warmup: int, decision_every: int, horizon: int, stride: int
                ) -> list[tuple[str, int]]:
    """``(scene_id, start_step)`` pairs whose first decision has ``horizon`` logged future steps.

    The first decision is at ``start + warmup``; the ego must be valid there and on the next
    ``horizon`` steps (the imitation target), and the env needs one decision before the log ends."""
    if stride < 1:
        raise ValueError(f"data.start_stride must be >= 1, got {stride}")
    pairs = []
    for s in scenes:
        valid = s.agent_valid[s.ego_index]
        last = s.num_steps - 2 - warmup - decision_every  # the env's own bound
        for start in range(0, last + 1, stride):
            t0 = start + warmup
            if t0 + horizon < s.num_steps and valid[t0 : t0 + horizon + 1].all():
                pairs.append((s.scene_id, start))
    return pairs


def perturbed_replay(obs: Mapping[str, torch.Tensor], horizon: int, lateral_m: torch.Tensor,
                     speed_scale: torch.Tensor) -> torch.Tensor:
    """The logged future as an action ``[B, H, 3]``, bent sideways by ``lateral_m [B]`` (reached
    smoothly after ``PERTURB_RAMP_STEPS``) and stretched along x by ``speed_scale [B]``; yaw follows
    the path."""
    from learners.anchors import yaw_from_velocity
    from learners.baselines import LoggedReplayPolicy

    plan = LoggedReplayPolicy(horizon).trajectory(obs)
    r = (torch.arange(1, horizon + 1, dtype=plan.dtype, device=plan.device) / PERTURB_RAMP_STEPS).clamp(max=1)
    ramp = r * r * (3 - 2 * r)  # smoothstep: no jump at the current pose
    xy = torch.stack([plan[..., 0] * speed_scale[:, None], plan[..., 1] + lateral_m[:, None] * ramp], -1)
    vel = torch.diff(xy, dim=1, prepend=torch.zeros_like(xy[:, :1]))
    return torch.cat([xy, yaw_from_velocity(vel)[..., None]], dim=-1)


def collect_samples(
    scenes: Sequence, pairs: Sequence[tuple[str, int]], env: Mapping[str, Any], obs_keys: Sequence[str],
    horizon: int, batch_envs: int = 512, perturb_decisions: int = 0, perturb_lateral_m: float = 0.0,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Reset drivesim at every pair and stack the observations with ``target = gt_trajectory[:, :H]``.

    With ``perturb_decisions > 0`` each reset is followed by that many decisions driving a perturbed
    replay of the log (:func:`perturbed_replay`: lateral offsets ~ N(0, ``perturb_lateral_m``),
    speed scaled by U(0.8, 1.2)), and the states reached are recorded too: their targets, the logged
    future seen from off the log, lead back to it, so the policy learns to recover from its own
    drift (noise injection into the expert, as in DART, Laskey et al. 2017).
    Returns a ``learners.bc`` dataset (CPU tensors); samples whose target is not fully logged are
    dropped."""
    from alpagym_ray.observations import mask_key
    from envs.drivesim.batched import DriveSimBatch
    from envs.drivesim.config import DriveSimConfig

    if not pairs:
        raise ValueError("no (scene, start_step) pair has a full logged future; use longer scenes or a "
                         "shorter horizon")
    if perturb_decisions < 0 or perturb_lateral_m < 0:
        raise ValueError("data.perturb_decisions and data.perturb_lateral_m must be >= 0")
    keys = tuple(dict.fromkeys([*obs_keys, "ego_history", "gt_trajectory"]))
    sim_cfg = DriveSimConfig.from_dict({**dict(env), "obs_keys": keys, "horizon": horizon})
    n_env = min(batch_envs, len(pairs))
    sim = DriveSimBatch(scenes, num_envs=n_env, config=sim_cfg, device="cpu")
    gen = torch.Generator().manual_seed(seed)
    # the policy's keys, plus ego_history for the constant-velocity baseline
    stacked = [k for k in keys if k != "gt_trajectory"]
    stacked += [mask_key(k) for k in stacked]
    chunks: dict[str, list[torch.Tensor]] = {k: [] for k in (*stacked, "target", "target_mask")}

    def record(obs: Mapping[str, torch.Tensor], rows: torch.Tensor) -> None:
        for k in stacked:
            chunks[k].append(obs[k][rows].clone())
        chunks["target"].append(obs["gt_trajectory"][rows, :horizon].clone())
        chunks["target_mask"].append(obs[mask_key("gt_trajectory")][rows, :horizon].clone())

    for i in range(0, len(pairs), n_env):
        part = pairs[i : i + n_env]
        n = len(part)
        obs = sim.reset(seeds=[0] * n, env_ids=list(range(n)),
                        options=[{"scene_id": sid, "start_step": st} for sid, st in part])
        record(obs, torch.arange(n))
        for _ in range(perturb_decisions):
            lateral = torch.randn(n_env, generator=gen) * perturb_lateral_m
            scale = 0.8 + 0.4 * torch.rand(n_env, generator=gen)
            obs, *_ = sim.step(perturbed_replay(obs, horizon, lateral, scale))
            live = ~sim.done.cpu()
            live[n:] = False
            record(obs, torch.nonzero(live).squeeze(1))
    data = {k: torch.cat(v) for k, v in chunks.items()}
    full = data["target_mask"].all(dim=1)
    return {k: v[full] for k, v in data.items()}


# ---- the run -----------------------------------------------------------------------------------
def pretrain(cfg: Any, run_dir: str | os.PathLike | None = None, progress: bool | None = None) -> Path:
    """Behaviour-clone the configured policy; return its checkpoint directory.

    ``cfg`` is a composed pretrain config (:func:`compose_config`, DictConfig or plain dict);
    ``run_dir`` overrides ``cfg.run_dir``. A finished run with the same :func:`config_hash` under the
    run directory is returned as is (the cache ``alpagym-ray train`` relies on)."""
    from hydra.utils import instantiate

    from learners.checkpoint import CheckpointError, check_checkpointable, read_checkpoint_config

    plain = _plain(cfg)
    root = Path(run_dir if run_dir is not None else plain["run_dir"])
    out = root / f"pretrain-{config_hash(plain)}"
    ckpt = out / "checkpoint"
    if (ckpt / "config.json").is_file():
        try:
            read_checkpoint_config(ckpt)
            return ckpt
        except CheckpointError:
            shutil.rmtree(out)  # a damaged cache entry is rebuilt
    show = plain.get("progress", True) if progress is None else progress
    device = resolve_device(str(plain.get("device", "auto")))
    t_start = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    train_scenes, val_scenes, scene_desc = load_scenes(plain, root)

    torch.manual_seed(int(plain["seed"]))
    policy = instantiate(plain["policy"], _convert_="all")
    check_checkpointable(policy)
    horizon = int(policy.horizon)
    env = dict(plain.get("env", {}))
    warmup = int(env.get("warmup_ticks", 17))
    decision_every = int(env.get("decision_every", 2))
    data = plain["data"]
    stride = int(data["start_stride"])
    t0 = time.perf_counter()
    # validation: the logged states only (ADE / FDE against the log, as the baseline is scored)
    val = collect_samples(val_scenes, start_pairs(val_scenes, warmup, decision_every, horizon, stride),
                          env, policy.obs_keys, horizon, int(data.get("batch_envs", 512)))
    train = collect_samples(train_scenes, start_pairs(train_scenes, warmup, decision_every, horizon, stride),
                            env, policy.obs_keys, horizon, int(data.get("batch_envs", 512)),
                            perturb_decisions=int(data.get("perturb_decisions", 0)),
                            perturb_lateral_m=float(data.get("perturb_lateral_m", 0.0)),
                            seed=int(plain["seed"]))
    collect_s = time.perf_counter() - t0
    for name, part in (("training", train), ("held-out", val)):
        if len(part["target"]) == 0:
            raise ValueError(f"the {name} scenes gave no sample with {horizon} logged future steps after the "
                             f"{warmup}-tick warm-up; use longer scenes, more scenes or a shorter horizon")
    from_checkpoint = bool((plain["policy"].get("model") or {}).get("path"))
    if hasattr(policy, "fit_anchors") and not from_checkpoint:
        policy.fit_anchors(train, seed=int(plain["seed"]))
    policy.to(device)

    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    history, baseline, final, optimizer = _train(policy, train, val, plain, tmp, device, show)
    provenance = {
        "trainer": "alpagym-ray pretrain (behaviour cloning)",
        "config_hash": out.name.removeprefix("pretrain-"),
        "scenes": scene_desc | {"val_ids": scene_desc["val_ids"][:50]},
        "samples": {"train": int(len(train["target"])), "val": int(len(val["target"]))},
        "epochs": len(history), "device": str(device),
        "val": final, "constant_velocity_val": baseline,
    }
    from learners.checkpoint import save_checkpoint

    save_checkpoint(policy, tmp / "checkpoint", policy_version=0, provenance=provenance,
                    optimizer=optimizer, trainer_state={"epoch": len(history)})
    metrics = {"policy": final, "constant_velocity": baseline, "history": history,
               "samples": provenance["samples"], "scenes": scene_desc, "device": str(device),
               "collect_seconds": collect_s, "seconds": time.perf_counter() - t_start}
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
    (tmp / "config.json").write_text(json.dumps(plain, indent=1, default=str))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return ckpt


def _train(policy, train, val, plain, out: Path, device: torch.device, show: bool):
    """Behaviour cloning with TensorBoard logging and an optional rich progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from torch.utils.tensorboard import SummaryWriter

    from learners.baselines import ConstantVelocityPolicy
    from learners.bc import BCConfig, evaluate, train_bc

    tcfg = dict(plain["train"])
    if not all(hasattr(policy, a) for a in ("closest_anchor", "distribution", "steps")):
        tcfg["anchor_ce_weight"] = 0.0  # a policy without anchors: plain likelihood
    bc = BCConfig(**tcfg)
    baseline = evaluate(ConstantVelocityPolicy(policy.horizon).to(device),
                        {k: v.to(device) for k, v in val.items()}, bc.eval_batch_size)
    baseline.pop("nll")
    writer = SummaryWriter(log_dir=str(out / "tb"))
    total = bc.epochs * -(-len(train["target"]) // bc.batch_size)
    bar = Progress(TextColumn("[bold]pretrain[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeRemainingColumn(), disable=not show, transient=False)
    task = bar.add_task(f"cv ADE {baseline['ade']:.2f} m", total=total)

    def on_step(step: int, loss: float) -> None:
        bar.update(task, advance=1)
        if step % 10 == 0:
            writer.add_scalar("pretrain/train_nll", loss, step)

    def on_epoch(rec: dict[str, float]) -> None:
        step = int(bar.tasks[0].completed)
        for k in ("val_ade", "val_fde", "val_nll", "lr"):
            writer.add_scalar(f"pretrain/{k}", rec[k], step)
        writer.add_scalar("pretrain/cv_ade", baseline["ade"], step)
        writer.add_scalar("pretrain/cv_fde", baseline["fde"], step)
        bar.update(task, description=f"epoch {rec['epoch']}: val ADE {rec['val_ade']:.2f} m "
                                     f"(cv {baseline['ade']:.2f}), FDE {rec['val_fde']:.2f} m")

    with bar:
        result = train_bc(policy, train, val, bc, on_step=on_step, on_epoch=on_epoch)
    writer.close()
    last = result.history[-1]
    final = {"ade": last["val_ade"], "fde": last["val_fde"], "nll": last["val_nll"]}
    return result.history, baseline, final, result.optimizer


# ---- CLI ---------------------------------------------------------------------------------------
def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    show_cfg = "--cfg" in argv
    overrides = [a for a in argv if a != "--cfg"]
    bad = [a for a in overrides if "=" not in a]
    if bad:
        print(f"alpagym-ray pretrain: expected Hydra overrides key=value, got {bad}", file=sys.stderr)
        return 2
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = compose_config(overrides)
    except (HydraException, OmegaConfBaseException) as e:
        print(f"alpagym-ray pretrain: bad config: {e}", file=sys.stderr)
        return 2
    if show_cfg:
        print(OmegaConf.to_yaml(cfg))
        return 0
    from envs.drivesim.scene import SceneError
    from learners.checkpoint import CheckpointError

    try:
        ckpt = pretrain(cfg)
    except (SceneError, CheckpointError, ValueError, KeyError, TypeError) as e:
        print(f"alpagym-ray pretrain: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    metrics = json.loads((ckpt.parent / "metrics.json").read_text())
    p, cv = metrics["policy"], metrics["constant_velocity"]
    print(f"validation on {metrics['samples']['val']} samples of {metrics['scenes']['val_scenes']} held-out "
          f"scenes: ADE {p['ade']:.3f} m, FDE {p['fde']:.3f} m "
          f"(constant velocity: ADE {cv['ade']:.3f} m, FDE {cv['fde']:.3f} m)")
    print(f"checkpoint: {ckpt}")
    print(f"TensorBoard: tensorboard --logdir {ckpt.parent / 'tb'}")
    return 0
