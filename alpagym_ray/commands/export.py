"""``alpagym-ray export --checkpoint CKPT --out DIR``: a checkpoint packaged for AlpaSim.

Writes ``DIR/checkpoint/`` (config.json + model.safetensors), ``DIR/driver.yaml`` (AlpaSim driver config:
``model: {model_type, checkpoint_path, device}`` and server settings, read by ``alpagym-ray serve-driver
--config``) and ``DIR/README.md`` (the command lines to start our driver and AlpaSim's wizard with an
external driver for ``--scene-ids``). The checkpoint is verified (sizes and hashes) and loaded once;
a policy that reads drivesim-only observation keys cannot drive AlpaSim and is refused, naming them.
"""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alpagym-ray export", description="Export a policy checkpoint for AlpaSim.")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory or Hugging Face Hub repo id")
    p.add_argument("--out", required=True, metavar="DIR", help="export directory")
    p.add_argument("--scene-ids", default="", help="comma-separated AlpaSim scene ids for the README's wizard command")
    p.add_argument("--device", default="cpu", help="device in the driver config (cuda on AlpaSim machines)")
    p.add_argument("--host", default="127.0.0.1", help="address the driver binds")
    p.add_argument("--port", type=int, default=6789, help="port the driver binds")
    p.add_argument("--batch-window-ms", type=float, default=5.0)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="the driver samples instead of the most likely trajectory")
    p.add_argument("--deploy", default="local", help="AlpaSim wizard +deploy= value")
    p.add_argument("--topology", default="1gpu", help="AlpaSim wizard topology= value")
    p.add_argument("--driver-source", default="external", help="AlpaSim wizard driver_source= value")
    p.add_argument("--force", action="store_true", help="replace an existing export in DIR")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)

    def fail(msg: str) -> int:
        print(f"alpagym-ray export: {msg}", file=sys.stderr)
        return 2

    from envs.alpasim.driver_server import PolicyNotServable, check_servable
    from envs.alpasim.export import ExportError, ExportSettings, export_driver
    from learners.checkpoint import CheckpointError, load_checkpoint, read_checkpoint_config, resolve_checkpoint

    try:
        directory = resolve_checkpoint(args.checkpoint)
        config = read_checkpoint_config(directory)
        check_servable(config["obs_keys"])
        load_checkpoint(directory)  # the weights fit the recorded architecture
        settings = ExportSettings(
            device=args.device, host=args.host, port=args.port, batch_window_ms=args.batch_window_ms,
            max_batch=args.max_batch, deterministic=not args.sample,
            scene_ids=tuple(s.strip() for s in args.scene_ids.split(",") if s.strip()),
            deploy=args.deploy, topology=args.topology, driver_source=args.driver_source)
        result = export_driver(directory, args.out, kind=config["kind"], obs_keys=config["obs_keys"],
                               action_spec=config["action_spec"], policy_version=int(config.get("policy_version", 0)),
                               settings=settings, source=str(args.checkpoint), overwrite=args.force)
    except PolicyNotServable as e:
        return fail(f"checkpoint {args.checkpoint}: {e}")
    except (CheckpointError, ExportError, ValueError) as e:
        return fail(str(e))
    print(f"exported {config['kind']} to {result.out_dir}\n  checkpoint: {result.checkpoint_dir}\n"
          f"  driver config: {result.driver_config}\n  README: {result.readme}\n"
          f"start the driver with: alpagym-ray serve-driver --config {result.driver_config}")
    return 0
