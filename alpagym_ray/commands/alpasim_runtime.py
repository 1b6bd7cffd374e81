"""``alpagym-ray alpasim-runtime --scenes DIR``: an AlpaSim ``RuntimeService`` backed by drivesim.

Serves until ``shut_down`` is called or the process is interrupted. Prints the bound address; with
``--server-yaml PATH`` also writes it like AlpaSim's ``generated-runtime-server.yaml`` (``host``,
``port``), and with ``--port-file PATH`` writes the bound port alone (useful with ``--port 0``).

``--simulate SCENE_IDS`` instead runs those scenes once (``--rollouts`` each) against ``--driver``, prints
one JSON line per rollout (session, success, error, episode metrics over the shared tick mask) and
exits (0 when every rollout succeeded): a local check of a driver without AlpaSim.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alpagym-ray alpasim-runtime",
                                description="Serve AlpaSim's RuntimeService with drivesim as the simulator.")
    p.add_argument("--scenes", required=True, metavar="DIR", help="scene-set directory")
    p.add_argument("--control-step-us", type=int, default=None,
                   help="µs between drive calls (a multiple of 100000; default decision_every x 100 ms)")
    p.add_argument("--decision-every", type=int, default=2, help="ticks per decision when --control-step-us is unset")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port to bind (0: any free port)")
    p.add_argument("--warmup-ticks", type=int, default=17, help="0.1 s ticks of recorded-ego replay (AlpaSim 17)")
    p.add_argument("--max-steps", type=int, default=None, help="cap on in-control ticks per rollout")
    p.add_argument("--horizon", type=int, default=20, help="poses of each driver trajectory tracked (0.1 s apart)")
    p.add_argument("--skip-driver-during-force-gt", choices=("true", "false"), default="true",
                   help="no drive calls during the warm-up (default true, as AlpaGym runs AlpaSim)")
    p.add_argument("--no-ground-truth", action="store_true", help="do not send the recorded future")
    p.add_argument("--camera-px", type=int, default=128, help="camera frame side in pixels (0: no camera)")
    p.add_argument("--driver-timeout-s", type=float, default=30.0, help="deadline of every call to a driver")
    p.add_argument("--max-concurrent-rollouts", type=int, default=16)
    p.add_argument("--agents", choices=("log", "idm"), default="log", help="other agents: replay or reactive")
    p.add_argument("--driver", default=None, metavar="HOST:PORT",
                   help="driver used when a SimulationRequest names none")
    p.add_argument("--max-message-mb", type=float, default=64.0, help="largest gRPC message (MiB)")
    p.add_argument("--server-yaml", default=None, metavar="PATH", help="write host/port here once bound")
    p.add_argument("--port-file", default=None, metavar="PATH", help="write the bound port here once bound")
    p.add_argument("--simulate", default=None, metavar="SCENE_IDS",
                   help="run these comma-separated scenes against --driver, print their metrics and exit")
    p.add_argument("--rollouts", type=int, default=1, help="rollouts per scene with --simulate")
    p.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads (rollouts run in threads)")
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def fail(msg: str) -> int:
        print(f"alpagym-ray alpasim-runtime: {msg}", file=sys.stderr)
        return 2

    import torch

    from envs.alpasim.runtime_server import RuntimeConfig, RuntimeServer, write_server_yaml
    from envs.drivesim.scene import SceneError

    if args.decision_every < 1:
        return fail(f"--decision-every must be >= 1, got {args.decision_every}")
    control_step = args.control_step_us if args.control_step_us is not None else args.decision_every * 100_000
    try:
        config = RuntimeConfig(
            scenes_dir=args.scenes, control_step_us=control_step, warmup_ticks=args.warmup_ticks,
            max_steps=args.max_steps, horizon=args.horizon,
            skip_driver_during_force_gt=args.skip_driver_during_force_gt == "true",
            send_ground_truth=not args.no_ground_truth, camera_px=args.camera_px,
            driver_timeout_s=args.driver_timeout_s, max_concurrent_rollouts=args.max_concurrent_rollouts,
            agents=args.agents, default_driver=args.driver,
            max_message_bytes=int(args.max_message_mb * 1024 * 1024))
        torch.set_num_threads(max(args.torch_threads, 1))
        server = RuntimeServer(config)
    except (ValueError, SceneError) as e:
        return fail(str(e))
    try:
        port = server.start(args.host, args.port)
    except (OSError, RuntimeError) as e:
        return fail(f"cannot bind {args.host}:{args.port} ({e})")
    if args.server_yaml:
        write_server_yaml(args.server_yaml, args.host, port)
    if args.port_file:
        Path(args.port_file).write_text(f"{port}\n")
    print(f"alpasim runtime serving {len(server.servicer.entries)} scenes from {args.scenes} on "
          f"{args.host}:{port} (control step {control_step} us)", flush=True)

    if args.simulate:
        try:
            return _simulate_once(server, args)
        finally:
            server.stop()

    from alpagym_ray.commands.serving import serve_until_shutdown

    return serve_until_shutdown(server, "alpasim runtime")


def _simulate_once(server: object, args: argparse.Namespace) -> int:
    """Call our own ``simulate`` for ``--simulate`` scenes and print one JSON line per rollout."""
    import grpc
    import numpy as np

    from alpagym_ray.metrics import episode_metrics
    from envs.alpasim import convert
    from envs.alpasim import messages as m

    if not args.driver:
        print("alpagym-ray alpasim-runtime: --simulate needs --driver HOST:PORT", file=sys.stderr)
        return 2
    if args.rollouts < 1:
        print(f"alpagym-ray alpasim-runtime: --rollouts must be >= 1, got {args.rollouts}", file=sys.stderr)
        return 2
    specs = [m.RolloutSpec(scenario_id=s.strip(), nr_rollouts=args.rollouts)
             for s in args.simulate.split(",") if s.strip()]
    with grpc.insecure_channel(server.address) as channel:  # type: ignore[attr-defined]
        try:
            request = m.SimulationRequest(rollout_specs=specs,
                                          n_concurrent_per_driver=min(len(specs) * args.rollouts, 8))
            ret = m.runtime_stub(channel).simulate(request, timeout=3600)
        except grpc.RpcError as e:
            print(f"alpagym-ray alpasim-runtime: simulate failed: {e.code().name}: {e.details()}", file=sys.stderr)
            return 2
    ok = True
    for r in ret.rollout_returns:
        line: dict = {"scene_id": r.rollout_spec.scenario_id, "session": r.rollout_uuid, "success": r.success}
        if r.success:
            line["episode_metrics"] = {k: (None if not np.isfinite(v) else round(float(v), 6))
                                       for k, v in episode_metrics(convert.rollout_series_arrays(r)).items()}
        else:
            line["error"] = r.error
        ok &= r.success
        print(json.dumps(line), flush=True)
    return 0 if ok else 1
