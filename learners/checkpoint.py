"""Policy checkpoints: a directory of safetensors and JSON, nothing pickled.

Layout::

    config.json            format, kind (import path of the policy class), its hyper-parameters,
                           obs_keys, action spec, policy_version, provenance, and the size and
                           SHA-256 of every other file (a truncated or corrupt file fails cleanly)
    model.safetensors      the policy's state dict
    optimizer.safetensors  optional: the optimizer's tensors, for resuming
    optimizer.json         optional: the optimizer's param groups and non-tensor state, plus any
                           JSON trainer state (step, epoch...)

A policy class is checkpointable when it has a ``kind`` attribute (its import path), a
``policy_config() -> dict`` method (JSON-able) and a ``from_config(dict)`` classmethod, plus the
``Policy`` protocol's ``obs_keys`` and ``action_spec``. Checkpoints load from a local directory or
a Hugging Face Hub repo id (``org/name``, optionally at a revision) and push to the Hub.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib
import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from alpagym_ray.policy import ActionSpec, check_compatible

FORMAT = "alpagym-ray/policy-checkpoint"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.safetensors"
OPTIM_META = "optimizer.json"
OPTIONAL_FILES = (OPTIM_FILE, OPTIM_META)
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, truncated or does not fit; the message names the file."""


# ---- writing -----------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same directory, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into safetensors tensors and JSON (no pickles)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{idx}/{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}/{name}"] = value
    groups = []
    for g in sd["param_groups"]:
        group = {}
        for k, v in g.items():
            if isinstance(v, torch.Tensor):
                v = v.item()
            group[k] = list(v) if isinstance(v, tuple) else v
        groups.append(group)
    meta = {"class": type(optimizer).__name__, "param_groups": groups, "scalars": scalars}
    json.dumps(meta)  # raises TypeError here rather than leaving half a checkpoint
    return tensors, meta


def check_checkpointable(policy: Any) -> None:
    """Raise TypeError when ``policy`` lacks what a checkpoint records (see the module docstring)."""
    missing = [a for a in ("kind", "policy_config", "from_config", "obs_keys", "action_spec", "state_dict")
               if not hasattr(policy, a)]
    if missing:
        raise TypeError(f"{type(policy).__name__} cannot be checkpointed: it has no {missing} (a policy "
                        "needs kind, policy_config(), from_config(), obs_keys and action_spec; see "
                        "learners/checkpoint.py)")


def save_checkpoint(
    policy: Any,
    path: str | os.PathLike,
    *,
    policy_version: int = 0,
    provenance: Mapping[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    trainer_state: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``policy`` (and optionally ``optimizer`` and JSON ``trainer_state``) to directory ``path``.

    Every file is replaced atomically and ``config.json`` is written last with the other files'
    hashes, so a reader never accepts a mix of two saves. Returns the directory."""
    check_checkpointable(policy)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in policy.state_dict().items()}
    _atomic_write(path / MODEL_FILE, lambda tmp: save_file(state, tmp, metadata={"format": FORMAT}))
    files = [MODEL_FILE]
    if optimizer is not None:
        tensors, meta = _optimizer_to_files(optimizer)
        meta["trainer_state"] = dict(trainer_state or {})
        _atomic_write(path / OPTIM_FILE, lambda tmp: save_file(tensors, tmp))
        _atomic_write(path / OPTIM_META, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)))
        files += [OPTIM_FILE, OPTIM_META]
    else:
        for stale in (OPTIM_FILE, OPTIM_META):
            (path / stale).unlink(missing_ok=True)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": policy.kind,
        "config": policy.policy_config(),
        "obs_keys": list(policy.obs_keys),
        "action_spec": policy.action_spec.to_dict(),
        "policy_version": int(policy_version),
        "num_parameters": int(sum(p.numel() for p in policy.parameters())),
        "provenance": {
            "saved_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            **dict(provenance or {}),
        },
        "files": {f: {"bytes": (path / f).stat().st_size, "sha256": _sha256(path / f)} for f in files},
    }
    body = json.dumps(config, indent=1)
    _atomic_write(path / CONFIG_FILE, lambda tmp: Path(tmp).write_text(body))
    return path


# ---- reading -----------------------------------------------------------------------------------
def resolve_checkpoint(
    path_or_repo_id: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
) -> Path:
    """The local directory of a checkpoint: ``path_or_repo_id`` itself when it is a directory,
    else a Hugging Face Hub snapshot (downloaded into, or found in, the Hub cache)."""
    local = Path(path_or_repo_id).expanduser()
    if local.is_dir():
        return local
    name = str(path_or_repo_id)
    if not _REPO_ID.match(name):
        raise CheckpointError(f"checkpoint {name!r}: no such directory, and not a Hub repo id (org/name)")
    from huggingface_hub import snapshot_download

    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        snap = snapshot_download(
            name, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
            allow_patterns=[CONFIG_FILE, MODEL_FILE, OPTIM_FILE, OPTIM_META, "README.md"],
        )
    except Exception as e:  # the Hub client raises many types (offline, 404, auth, network)
        raise CheckpointError(f"checkpoint {name!r}: no such directory, and the Hugging Face Hub lookup "
                              f"failed ({type(e).__name__}: {e})") from e
    return Path(snap)


def read_checkpoint_config(directory: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """Read and check ``config.json``; with ``verify``, check every listed file's size and hash."""
    directory = Path(directory)
    cfg_path = directory / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(f"{directory}: not a policy checkpoint (no {CONFIG_FILE})")
    try:
        config = json.loads(cfg_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: unreadable JSON ({e}); corrupt or truncated") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_path}: not an {FORMAT} config")
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{cfg_path}: format version {config.get('format_version')}, this code "
                              f"reads {FORMAT_VERSION}")
    for key in ("kind", "config", "obs_keys", "action_spec", "files"):
        if key not in config:
            raise CheckpointError(f"{cfg_path}: missing field {key!r}")
    if verify:
        for name, meta in config["files"].items():
            f = directory / name
            if not f.is_file() and name in OPTIONAL_FILES:
                continue  # e.g. pushed to the Hub without the optimizer state
            if not f.is_file():
                raise CheckpointError(f"{f}: missing (listed in {CONFIG_FILE})")
            size = f.stat().st_size
            if size != meta["bytes"]:
                raise CheckpointError(f"{f}: {size} bytes, {CONFIG_FILE} records {meta['bytes']} "
                                      "(truncated or replaced)")
            if _sha256(f) != meta["sha256"]:
                raise CheckpointError(f"{f}: SHA-256 differs from {CONFIG_FILE} (corrupt or replaced)")
    return config


def policy_class(kind: str) -> type:
    """Import the class named by a checkpoint's ``kind`` (``package.module.Class``)."""
    module_name, _, cls_name = kind.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError, ValueError) as e:
        raise CheckpointError(f"checkpoint kind {kind!r} cannot be imported ({e})") from None
    if not hasattr(cls, "from_config"):
        raise CheckpointError(f"checkpoint kind {kind!r} has no from_config classmethod")
    return cls


def load_checkpoint(
    path_or_repo_id: str | os.PathLike,
    *,
    map_location: str | torch.device = "cpu",
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    env_obs_keys: Sequence[str] | None = None,
    env_action_spec: ActionSpec | None = None,
) -> Any:
    """Rebuild the policy saved at a directory or Hub repo id, on ``map_location``.

    With ``env_obs_keys`` / ``env_action_spec``, first check that the env provides every key the
    policy reads and takes its action (``PolicySpecMismatch`` naming both specs otherwise)."""
    directory = resolve_checkpoint(path_or_repo_id, revision=revision, cache_dir=cache_dir,
                                   local_files_only=local_files_only)
    config = read_checkpoint_config(directory)
    try:
        action_spec = ActionSpec.from_dict(config["action_spec"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{directory / CONFIG_FILE}: bad action_spec ({e})") from None
    if env_obs_keys is not None or env_action_spec is not None:
        check_compatible(config["obs_keys"], action_spec,
                         list(env_obs_keys) if env_obs_keys is not None else config["obs_keys"],
                         env_action_spec or action_spec, what=f"checkpoint {path_or_repo_id}")
    cls = policy_class(config["kind"])
    try:
        policy = cls.from_config(config["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{directory / CONFIG_FILE}: invalid {config['kind']} config ({e})") from e
    try:
        state = load_file(directory / MODEL_FILE, device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{directory / MODEL_FILE}: unreadable ({e})") from None
    try:
        result = policy.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"{directory / MODEL_FILE}: does not fit {config['kind']} ({e})") from None
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{directory / MODEL_FILE}: does not fit {config['kind']}: missing "
                              f"{result.missing_keys[:8]}, unexpected {result.unexpected_keys[:8]}")
    policy.to(map_location)
    policy.checkpoint_info = {"path": str(directory), "policy_version": config.get("policy_version", 0),
                              "provenance": config.get("provenance", {})}
    return policy


def load_optimizer_state(
    path: str | os.PathLike, optimizer: torch.optim.Optimizer, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Restore ``optimizer`` from a checkpoint directory; returns the saved trainer state (JSON)."""
    directory = Path(path)
    config = read_checkpoint_config(directory)
    if OPTIM_FILE not in config["files"] or not (directory / OPTIM_FILE).is_file():
        raise CheckpointError(f"{directory}: holds no optimizer state (saved without an optimizer)")
    meta = json.loads((directory / OPTIM_META).read_text())
    if meta["class"] != type(optimizer).__name__:
        raise CheckpointError(f"{directory / OPTIM_META}: state of a {meta['class']}, not a "
                              f"{type(optimizer).__name__}")
    tensors = load_file(directory / OPTIM_FILE, device=str(map_location))
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split("/", 2)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split("/", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{directory}: optimizer state does not fit this optimizer ({e})") from None
    return meta.get("trainer_state", {})


# ---- Hugging Face Hub --------------------------------------------------------------------------
def push_to_hub(
    path: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    include_optimizer: bool = False,
    token: str | None = None,
    api: Any | None = None,
) -> Any:
    """Upload a checkpoint directory to a Hub model repo (created when missing); returns the commit.

    The checkpoint is verified first. ``HF_ENDPOINT`` picks the server; ``api`` defaults to
    ``huggingface_hub.HfApi(token=token)``."""
    directory = Path(path)
    read_checkpoint_config(directory)
    if not _REPO_ID.match(repo_id):
        raise CheckpointError(f"push_to_hub: {repo_id!r} is not a repo id (org/name)")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    ignore = [] if include_optimizer else [OPTIM_FILE, OPTIM_META]
    return api.upload_folder(
        repo_id=repo_id, folder_path=str(directory), repo_type="model", revision=revision,
        commit_message=commit_message or f"alpagym-ray checkpoint from {directory.name}",
        ignore_patterns=ignore + [".*"],
    )
