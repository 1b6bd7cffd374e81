"""``alpagym-ray serve-driver --checkpoint CKPT``: serve a policy checkpoint as AlpaSim's ``EgodriverService``.

The checkpoint is a directory or a Hugging Face Hub repo id (``learners.checkpoint``). ``--config`` reads
the driver config that ``alpagym-ray export`` writes (``model: {model_type, checkpoint_path, device}``,
``host``, ``port``, ``inference: {batch_window_ms, max_batch, deterministic, seed}``); flags given on the
command line win. A policy that reads drivesim-only observation keys is refused, naming them.
Serves until ``shut_down`` is called or the process is interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

DEFAULT_PORT = 6789
MODEL_TYPE = "alpagym_ray"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alpagym-ray serve-driver",
                                description="Serve a policy checkpoint as an AlpaSim EgodriverService.")
    p.add_argument("--checkpoint", default=None, help="checkpoint directory or Hub repo id")
    p.add_argument("--config", default=None, metavar="YAML", help="driver config written by `alpagym-ray export`")
    p.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help=f"port to bind (default {DEFAULT_PORT}; 0: any free port)")
    p.add_argument("--device", default=None, help="torch device (default cpu)")
    p.add_argument("--batch-window-ms", type=float, default=None, help="batching window for drive calls (default 5)")
    p.add_argument("--max-batch", type=int, default=None, help="most sessions per forward pass (default 64)")
    p.add_argument("--sample", action="store_true", default=None,
                   help="sample trajectories (default: the most likely one)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling generator (default 0)")
    p.add_argument("--port-file", default=None, metavar="PATH", help="write the bound port here once bound")
    p.add_argument("--log-level", default="INFO")
    return p


def read_driver_config(path: str | Path) -> dict[str, Any]:
    """The export's driver config as flat settings (checkpoint, device, host, port, ...); ValueError naming
    the file and the field on anything unexpected."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: unreadable driver config ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ValueError(f"{path}: a driver config needs a 'model' mapping (model_type, checkpoint_path, device)")
    model = data["model"]
    if model.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{path}: model.model_type is {model.get('model_type')!r}; this driver serves {MODEL_TYPE!r}")
    if not model.get("checkpoint_path"):
        raise ValueError(f"{path}: model.checkpoint_path is missing")
    unknown = set(data) - {"model", "host", "port", "inference"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; valid: model, host, port, inference")
    inference = data.get("inference") or {}
    bad = set(inference) - {"batch_window_ms", "max_batch", "deterministic", "seed"}
    if bad:
        raise ValueError(f"{path}: unknown inference keys {sorted(bad)}")
    ckpt = Path(str(model["checkpoint_path"])).expanduser()
    if not ckpt.is_absolute() and (path.parent / ckpt).exists():
        ckpt = path.parent / ckpt  # relative to the config file
    return {"checkpoint": str(ckpt), "device": model.get("device"), "host": data.get("host"),
            "port": data.get("port"), "batch_window_ms": inference.get("batch_window_ms"),
            "max_batch": inference.get("max_batch"),
            "sample": None if inference.get("deterministic") is None else not inference["deterministic"],
            "seed": inference.get("seed")}


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def fail(msg: str) -> int:
        print(f"alpagym-ray serve-driver: {msg}", file=sys.stderr)
        return 2

    settings: dict[str, Any] = {}
    if args.config:
        try:
            settings = read_driver_config(args.config)
        except ValueError as e:
            return fail(str(e))
    for key in ("checkpoint", "host", "port", "device", "batch_window_ms", "max_batch", "sample", "seed"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if not settings.get("checkpoint"):
        return fail("give --checkpoint CKPT (or --config YAML with model.checkpoint_path)")
    host = settings.get("host") or "127.0.0.1"
    port = DEFAULT_PORT if settings.get("port") is None else int(settings["port"])
    device = settings.get("device") or "cpu"

    from envs.alpasim.driver_server import DriverConfig, DriverServer, PolicyNotServable, check_servable
    from learners.checkpoint import CheckpointError, load_checkpoint, read_checkpoint_config, resolve_checkpoint

    try:
        directory = resolve_checkpoint(settings["checkpoint"])
        ckpt_config = read_checkpoint_config(directory)
        check_servable(ckpt_config["obs_keys"])  # refuse before loading any weights
        policy = load_checkpoint(directory, map_location=device)
        policy.eval()
        config = DriverConfig(
            batch_window_s=float(settings.get("batch_window_ms") or 5.0) / 1000.0,
            max_batch=int(settings.get("max_batch") or 64), device=device,
            deterministic=not settings.get("sample"), seed=int(settings.get("seed") or 0))
        server = DriverServer(policy, config)
    except PolicyNotServable as e:
        return fail(f"checkpoint {settings['checkpoint']}: {e}")
    except (CheckpointError, ValueError, TypeError) as e:
        return fail(str(e))
    try:
        bound = server.start(host, port)
    except (OSError, RuntimeError) as e:
        return fail(f"cannot bind {host}:{port} ({e})")
    if args.port_file:
        Path(args.port_file).write_text(f"{bound}\n")
    print(f"alpasim driver serving {ckpt_config['kind']} (obs_keys {ckpt_config['obs_keys']}, policy_version "
          f"{ckpt_config.get('policy_version', 0)}) on {host}:{bound}", flush=True)

    from alpagym_ray.commands.serving import serve_until_shutdown

    return serve_until_shutdown(server, "alpasim driver")
