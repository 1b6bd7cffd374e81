"""Run a gRPC server command until SIGINT / SIGTERM or its own shut_down rpc."""

from __future__ import annotations

import signal


def serve_until_shutdown(server, name: str) -> int:
    """Block until a signal or the server's ``shut_down`` rpc sets ``servicer.shutdown_requested``."""

    def on_signal(signum: int, frame: object) -> None:
        server.servicer.shutdown_requested.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    while not server.servicer.shutdown_requested.wait(0.5):
        pass
    server.stop()
    print(f"{name} stopped", flush=True)
    return 0
