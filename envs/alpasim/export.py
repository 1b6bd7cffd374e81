"""Export a policy checkpoint for AlpaSim: the checkpoint, a driver config and a README.

Layout of the export directory::

    checkpoint/     the checkpoint's config.json and model.safetensors (no optimizer state, no pickles)
    driver.yaml     AlpaSim driver config: model {model_type, checkpoint_path, device}, host, port,
                    inference {batch_window_ms, max_batch, deterministic, seed}
    README.md       the command lines: our driver (``alpagym-ray serve-driver --config driver.yaml``) and
                    AlpaSim's wizard with an external driver for the given scenes

This module copies files and writes text; it imports no policy code (``envs`` never imports
``learners``): the ``export`` command reads and verifies the checkpoint and passes what it found.
"""

from __future__ import annotations

import datetime
import json
import shlex
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

MODEL_TYPE = "alpagym_ray"
CHECKPOINT_FILES = ("config.json", "model.safetensors")
"""Files copied from the checkpoint (optimizer state is for resuming training, not for driving)."""
OPTIONAL_FILES = ("README.md",)


class ExportError(ValueError):
    """The export cannot be written; the message names the path or the setting."""


@dataclass(frozen=True)
class ExportSettings:
    """What the driver config and the README say."""

    device: str = "cpu"
    """Torch device the driver runs the policy on (``cuda`` on AlpaSim's GPU machines)."""
    host: str = "127.0.0.1"
    """Address the driver binds (use 0.0.0.0 only when AlpaSim reaches it from another network namespace)."""
    port: int = 6789
    """Port the driver binds."""
    batch_window_ms: float = 5.0
    """Batching window of concurrent ``drive`` calls."""
    max_batch: int = 64
    """Most sessions per forward pass."""
    deterministic: bool = True
    """Answer with the most likely trajectory (False: sample)."""
    seed: int = 0
    """Sampling seed (used when not deterministic)."""
    scene_ids: tuple[str, ...] = ()
    """AlpaSim scenes (e.g. ``clipgt-<uuid>``) the README's wizard command runs."""
    deploy: str = "local"
    """AlpaSim wizard ``+deploy=`` value."""
    topology: str = "1gpu"
    """AlpaSim wizard ``topology=`` value."""
    driver_source: str = "external"
    """AlpaSim wizard ``driver_source=`` value (a driver started outside the wizard: ours)."""
    extra: dict = field(default_factory=dict)
    """Free-form notes written into the README."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "scene_ids", tuple(self.scene_ids))
        if not 0 <= int(self.port) < 65536:
            raise ExportError(f"port must be in 0..65535, got {self.port}")
        if self.max_batch < 1 or self.batch_window_ms < 0:
            raise ExportError("max_batch must be >= 1 and batch_window_ms >= 0")
        for name in ("deploy", "topology", "driver_source"):
            value = getattr(self, name)
            if not value or any(c.isspace() for c in value):
                raise ExportError(f"{name} must be a non-empty word, got {value!r}")
        bad = [s for s in self.scene_ids if not s or any(c.isspace() or c in ",[]'\"" for c in s)]
        if bad:
            raise ExportError(f"scene ids must not be empty or contain spaces, commas, brackets or quotes: {bad}")


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    checkpoint_dir: Path
    driver_config: Path
    readme: Path


def driver_config_text(checkpoint_dir: Path, settings: ExportSettings) -> str:
    """The driver YAML (written by hand: plain scalars only, paths quoted)."""
    return "\n".join([
        "# AlpaSim driver config for `alpagym-ray serve-driver --config <this file>`",
        "model:",
        f"  model_type: {MODEL_TYPE}",
        f"  checkpoint_path: {json.dumps(str(checkpoint_dir))}",
        f"  device: {json.dumps(settings.device)}",
        f"host: {json.dumps(settings.host)}",
        f"port: {int(settings.port)}",
        "inference:",
        f"  batch_window_ms: {float(settings.batch_window_ms)}",
        f"  max_batch: {int(settings.max_batch)}",
        f"  deterministic: {'true' if settings.deterministic else 'false'}",
        f"  seed: {int(settings.seed)}",
        "",
    ])


def wizard_command(settings: ExportSettings, log_dir: str = "$PWD/runs/alpagym_ray_driver") -> str:
    """AlpaSim's wizard command line for an external driver and the given scenes."""
    scenes = ",".join(settings.scene_ids) if settings.scene_ids else "<scene_id>,<scene_id>"
    parts = [
        "alpasim_wizard",
        f"+deploy={settings.deploy}",
        f"topology={settings.topology}",
        f"driver_source={settings.driver_source}",
        f"'scenes.scene_ids=[{scenes}]'",
        f"wizard.log_dir={log_dir}",
    ]
    return " \\\n    ".join(parts)


def readme_text(checkpoint_dir: Path, config_path: Path, settings: ExportSettings, kind: str,
                obs_keys: Sequence[str], action_spec: dict, policy_version: int, source: str) -> str:
    q = shlex.quote
    address = f"{settings.host}:{settings.port}"
    lines = [
        f"# AlpaSim driver: `{kind}` (policy_version {policy_version})",
        "",
        f"Exported by `alpagym-ray export` from `{source}` on "
        f"{datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}.",
        "",
        f"- `checkpoint/`: the policy ({', '.join(CHECKPOINT_FILES)}; safetensors + JSON, nothing pickled)",
        "- `driver.yaml`: the AlpaSim driver config (`model: {model_type, checkpoint_path, device}`, host, port,"
        " inference settings)",
        "",
        f"The policy reads {list(obs_keys)} (built by the driver from AlpaSim's egomotion, route, ground truth"
        f" and camera submissions) and answers each `drive` with {action_spec.get('horizon')} poses "
        f"{action_spec.get('dt')} s apart (rear axle, AlpaSim's rig frame), sent in the local frame with"
        " the current pose first and absolute timestamps.",
        "",
        "## 1. Start the driver",
        "",
        "```bash",
        f"alpagym-ray serve-driver --config {q(str(config_path))}",
        "# or, the same with flags:",
        f"alpagym-ray serve-driver --checkpoint {q(str(checkpoint_dir))} --host {settings.host} "
        f"--port {settings.port} --device {settings.device}",
        "```",
        "",
        f"It serves `egodriver.EgodriverService` on `{address}` until AlpaSim calls `shut_down` (or Ctrl-C).",
        "It binds 127.0.0.1 unless the config says otherwise: when AlpaSim's services run in containers that",
        "cannot reach the host's loopback, set `host` to an address they can reach.",
        "",
        "## 2. Run AlpaSim's wizard with this external driver",
        "",
        "From AlpaSim's repository (NVlabs/alpasim), for the scenes to evaluate:",
        "",
        "```bash",
        wizard_command(settings),
        "```",
        "",
        f"Point the wizard's external-driver address at `{address}` (the address keys of the driver",
        "config differ between AlpaSim versions: see its wizard documentation). AlpaSim then calls",
        "`start_session`, the observation submissions and `drive` on our driver for every rollout.",
        "",
        "## 3. Check locally without AlpaSim",
        "",
        "Our drivesim-backed runtime speaks the same protocol. With the driver running, this drives",
        "scenes of a local scene set through it and prints each rollout's metrics (AlpaSim's names):",
        "",
        "```bash",
        f"alpagym-ray alpasim-runtime --scenes SCENES_DIR --driver {settings.host}:{settings.port} "
        "--simulate SCENE_ID[,SCENE_ID...]",
        "```",
        "",
    ]
    if settings.extra:
        lines += ["## Notes", "", *(f"- {k}: {v}" for k, v in settings.extra.items()), ""]
    return "\n".join(lines)


def export_driver(checkpoint_dir: str | Path, out_dir: str | Path, *, kind: str, obs_keys: Sequence[str],
                  action_spec: dict, policy_version: int = 0, settings: ExportSettings | None = None,
                  source: str | None = None, overwrite: bool = False) -> ExportResult:
    """Write the export directory ``out_dir`` from a verified checkpoint directory (see the module
    docstring). ``out_dir`` must not hold an export already unless ``overwrite``."""
    settings = settings or ExportSettings()
    src = Path(checkpoint_dir)
    out = Path(out_dir).expanduser().resolve()
    missing = [f for f in CHECKPOINT_FILES if not (src / f).is_file()]
    if missing:
        raise ExportError(f"{src}: not a complete checkpoint (missing {missing})")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty; pass overwrite (--force) to replace the export")
    ckpt = out / "checkpoint"
    if ckpt.exists():
        shutil.rmtree(ckpt)
    ckpt.mkdir(parents=True)
    for name in CHECKPOINT_FILES + OPTIONAL_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, ckpt / name)
    config_path = out / "driver.yaml"
    config_path.write_text(driver_config_text(ckpt, settings))
    readme = out / "README.md"
    readme.write_text(readme_text(ckpt, config_path, settings, kind, obs_keys, action_spec, policy_version,
                                  source or str(src)))
    return ExportResult(out, ckpt, config_path, readme)
