"""`ray start --head` + `ray job submit` on this machine, the way a single-GPU user works.

The head is this module's own (never the session cluster of ``ray_session``): its own ``--temp-dir``,
free ports for every Ray server, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (every socket on 127.0.0.1)
and ``RAY_AUTH_MODE=disabled``. It runs as ``ray start --head --block`` in a new process session and
is stopped by PID: SIGTERM to that process (Ray then ends the processes it started), then SIGKILL to
whatever of that session is left, by PID. Never ``ray stop``, which would stop every Ray on the host.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
PORT_NAMES = ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
              "dashboard-agent-grpc-port", "metrics-export-port", "node-manager-port", "object-manager-port",
              "runtime-env-agent-port")
WORKER_PORTS = 100


@dataclass
class Head:
    process: subprocess.Popen
    temp_dir: Path
    ports: dict[str, int]
    env: dict[str, str]

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard-port']}"


# ---- ports and sockets -----------------------------------------------------------------------------
def _port_is_free(port: int) -> bool:
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET, "0.0.0.0")):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def free_port_block(size: int, low: int = 20000, high: int = 32000, tries: int = 200) -> int:
    """First port of ``size`` consecutive free ports below the kernel's ephemeral range (so that
    outgoing connections do not take them before Ray binds them)."""
    rng = random.Random(os.getpid() ^ time.time_ns())
    for _ in range(tries):
        base = rng.randrange(low, high - size)
        if all(_port_is_free(p) for p in range(base, base + size)):
            return base
    raise RuntimeError(f"no block of {size} free ports in [{low}, {high})")


def _decode_address(hex_addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1])
    # /proc/net/tcp6 stores four host-order 32-bit words
    address = ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
    return address.ipv4_mapped or address


def listening_sockets() -> list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int, int]]:
    """``(address, port, inode)`` of every listening TCP socket of this network namespace."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                local, state, inode = fields[1], fields[3], int(fields[9])
                if state == "0A":  # TCP_LISTEN
                    hex_addr, hex_port = local.split(":")
                    out.append((_decode_address(hex_addr), int(hex_port, 16), inode))
    return out


def session_pids(sid: int) -> list[int]:
    """PIDs of the processes in session ``sid`` (the head's ``ray start`` and everything it started)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # state, ppid, pgrp, session
            pids.append(int(entry))
    return pids


def socket_owners(pids: list[int]) -> dict[int, int]:
    """``{socket inode: pid}`` for the open sockets of ``pids``."""
    owners = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                owners[int(target[8:-1])] = pid
    return owners


def head_listeners(head: Head) -> list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int, int]]:
    """``(address, port, pid)`` of every listening socket held by a process of the head's session."""
    owners = socket_owners(session_pids(head.process.pid))
    return [(addr, port, owners[inode]) for addr, port, inode in listening_sockets() if inode in owners]


def assert_loopback_only(head: Head) -> None:
    listeners = head_listeners(head)
    for name in ("port", "dashboard-port"):  # GCS and dashboard (Jobs API)
        bound = [addr for addr, port, _ in listeners if port == head.ports[name]]
        assert bound, f"nothing listens on --{name}={head.ports[name]}: {listeners}"
        assert all(a.is_loopback for a in bound), f"--{name} listens on {bound}"
    exposed = [(str(a), p, pid) for a, p, pid in listeners if not a.is_loopback]
    assert not exposed, f"head processes listen beyond 127.0.0.1: {exposed}"


# ---- the head ------------------------------------------------------------------------------------
def _wait_for_dashboard(head: Head, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if head.process.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.process.returncode}:\n{_log_tail(head)}")
        try:
            with urllib.request.urlopen(head.dashboard_url + "/api/version", timeout=5) as r:
                if r.status == 200 and "ray_version" in json.loads(r.read()):
                    return
        except (OSError, ValueError):
            pass
        time.sleep(1.0)
    raise TimeoutError(f"the dashboard did not answer within {timeout_s} s:\n{_log_tail(head)}")


def _log_tail(head: Head, n: int = 4000) -> str:
    log = head.temp_dir / "ray_start.log"
    return log.read_text(errors="replace")[-n:] if log.exists() else ""


def _stop(head: Head) -> None:
    """SIGTERM the ``ray start --block`` process (it ends what it started), then SIGKILL any leftover
    process of its session, each by PID."""
    sid = head.process.pid
    if head.process.poll() is None:
        head.process.send_signal(signal.SIGTERM)
        try:
            head.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.process.kill()
            head.process.wait(timeout=10)
    deadline = time.time() + 20
    while session_pids(sid) and time.time() < deadline:
        time.sleep(0.5)
    for pid in session_pids(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def start_head() -> Head:
    """``ray start --head --block`` on a fresh temp dir and free ports, answering on its Jobs API."""
    # short: Ray puts Unix sockets under the temp dir, and their paths are limited to 107 bytes
    temp_dir = Path(tempfile.mkdtemp(prefix="agr-", dir="/tmp"))
    base = free_port_block(len(PORT_NAMES) + WORKER_PORTS)
    ports = {name: base + i for i, name in enumerate(PORT_NAMES)}
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
        # stop at once on SIGTERM (the default drains the node for up to 30 s)
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
        # the job's `python` is the one on the PATH of `ray start` (ray_notes.md)
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        # where Ray's own helpers (Ray Train's placement-group cleaner) look when they autodetect the
        # cluster: this head, not another Ray on the same machine
        RAY_ADDRESS=f"127.0.0.1:{ports['port']}",
    )
    command = [str(VENV_BIN / "ray"), "start", "--head", "--block", f"--temp-dir={temp_dir}", "--num-cpus=2",
               "--include-dashboard=true", "--disable-usage-stats", f"--object-store-memory={512 * 2**20}",
               *(f"--{name}={port}" for name, port in ports.items()),
               f"--min-worker-port={base + len(PORT_NAMES)}",
               f"--max-worker-port={base + len(PORT_NAMES) + WORKER_PORTS - 1}"]
    with open(temp_dir / "ray_start.log", "w") as log:
        process = subprocess.Popen(command, env=env, cwd=temp_dir, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    head = Head(process, temp_dir, ports, env)
    try:
        _wait_for_dashboard(head, timeout_s=180)
    except BaseException:
        stop_head(head)
        raise
    return head


def stop_head(head: Head) -> None:
    _stop(head)
    shutil.rmtree(head.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head():
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc to check the sockets")
    try:
        head = start_head()
    except RuntimeError:  # ray start exited, e.g. a port taken between our check and its bind: once more
        head = start_head()
    try:
        yield head
    finally:
        stop_head(head)


def submit(head: Head, entrypoint: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    command = [str(VENV_BIN / "ray"), "job", "submit", "--address", head.dashboard_url, "--working-dir", ".",
               "--", *entrypoint]
    try:
        return subprocess.run(command, env=head.env, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"")[-4000:]
        pytest.fail(f"ray job submit did not finish within {timeout_s} s; last output:\n{out!r}")


def _job_failure(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout[-6000:]}\nstderr:\n{result.stderr[-3000:]}"


# ---- tests ---------------------------------------------------------------------------------------
def test_head_listens_on_loopback_only_and_runs_a_job(ray_head):
    assert_loopback_only(ray_head)
    # a job from the working directory, in the venv of `ray start`, connected to this head
    code = ("import sys, ray, alpagym_ray.train_loop as t; t.init_ray({'address': 'auto'}); "
            "print('JOB-OK', sys.executable, ray.get_runtime_context().gcs_address)")
    result = submit(ray_head, ["python", "-c", code], timeout_s=240)
    assert result.returncode == 0, _job_failure(result)
    # the submit command echoes the entrypoint first: the job's own line starts with the marker
    line = next(x for x in result.stdout.splitlines() if x.startswith("JOB-OK "))
    executable, gcs = line.split()[1:]
    assert Path(executable).parent == VENV_BIN
    assert gcs == f"127.0.0.1:{ray_head.ports['port']}"


def test_training_job_leaves_a_checkpoint_and_tensorboard_events(ray_head):
    """The README's single-machine recipe: a short GRPO run submitted as a job (pre-training included).
    About 35 s on an idle 2-core machine, 90 s when it is shared with other work."""
    run_dir = ray_head.temp_dir / "run"
    entrypoint = ["python", "-m", "alpagym_ray.cli", "iterations=1", f"run_dir={run_dir}",
                  "topology.address=auto", "learner.group_size=2", "learner.groups_per_iteration=2",
                  "topology.envs_per_worker=2", "topology.num_rollout_workers=1",
                  "scenes.generate.num_scenes=8",
                  'pretrain.overrides=["train.epochs=1","scenes.generate.num_scenes=8"]',
                  "eval.enabled=false"]
    result = submit(ray_head, entrypoint, timeout_s=580)
    assert result.returncode == 0, _job_failure(result)
    assert "succeeded" in result.stdout + result.stderr

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_version"] == 1                      # v0 = the start, +1 for the iteration
    assert summary["buffer"]["accounting_ok"]
    assert summary["buffer"]["consumed"] == 2 * 2              # groups_per_iteration x group_size episodes
    latest = (run_dir / "checkpoints" / "latest.txt").read_text().strip()
    assert latest == "version_000001"
    assert (run_dir / "checkpoints" / latest / "model.safetensors").stat().st_size > 0
    assert json.loads((run_dir / "checkpoints" / latest / "config.json").read_text())
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and any(b"rollout/return_mean" in e.read_bytes() for e in events)
    assert "address: auto" in (run_dir / "config.yaml").read_text()
    # the job's own processes (driver, actors) stayed on 127.0.0.1 too
    assert_loopback_only(ray_head)


LOCAL_RAY = """
import sys, time
from alpagym_ray.train_loop import init_ray
init_ray({"address": None})
import ray
@ray.remote(num_cpus=0)
class A:
    def ping(self):
        return 1
a = A.remote()
ray.get(a.ping.remote())
print("ready", flush=True)
time.sleep(120)
"""


def test_local_run_keeps_every_ray_server_on_loopback():
    """``alpagym-ray train`` without an address starts Ray in-process: its GCS, raylet, dashboard and
    actors listen on 127.0.0.1 only (the environment does not say RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    tmp = tempfile.mkdtemp(prefix="agr", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    env.update(RAY_TMPDIR=tmp, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen([sys.executable, "-c", LOCAL_RAY], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.strip() == "ready":
                break
        assert lines and lines[-1].strip() == "ready", "".join(lines)[-3000:]
        owners = socket_owners(session_pids(proc.pid))
        listeners = [(a, p, owners[i]) for a, p, i in listening_sockets() if i in owners]
        assert listeners, "no listening socket found for the local Ray processes"
        exposed = [(str(a), p, pid) for a, p, pid in listeners if not a.is_loopback]
        assert not exposed, f"local Ray listens beyond 127.0.0.1: {exposed}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)
