"""CUDA MPS for a local run whose rollout workers and learner share one GPU (``topology.cuda_mps``).

Without MPS, the CUDA contexts of the rollout processes and the learner time-slice the GPU: one
context's kernels run at a time, so four half-empty rollout forwards and the learner's update take
turns. Under the Multi-Process Service their kernels run concurrently, as kernels of one process's
streams do (https://docs.nvidia.com/deploy/mps/index.html).

A local run (``topology.address: null``) starts a private control daemon before Ray, with its pipe
and log directories in a fresh temporary folder, and exports ``CUDA_MPS_PIPE_DIRECTORY`` so that
the Ray processes it starts (which inherit this process's environment) connect to it and no other
process on the machine does. It quits the daemon at the end of the run. A run that joins a running
Ray (``ray start --head``) cannot change its workers' environment: start the daemon before
``ray start`` instead (README, "One GPU").

Modes: ``false`` (no MPS), ``auto`` (MPS when the run starts Ray itself, a CUDA device is present
and ``nvidia-cuda-mps-control`` is on the PATH; otherwise a line saying why not) and ``true`` (the
same, but anything missing is an error). A daemon that already runs (its control pipe in
``$CUDA_MPS_PIPE_DIRECTORY``, default ``/tmp/nvidia-mps``) is used as it is, by both.

Measured (BENCHMARKS.md, session 9, one H100, the e2e recipe): 96-99 k env-steps/s without MPS,
108-113 k with it; the learner's update went from 4.1-4.2 s to 3.0-3.2 s per iteration.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

MODES = ("false", "auto", "true")
CONTROL = "nvidia-cuda-mps-control"
DEFAULT_PIPE = "/tmp/nvidia-mps"
"""Where CUDA clients look for the daemon when ``CUDA_MPS_PIPE_DIRECTORY`` is unset."""
ENV_KEYS = ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY")


def mode_of(value) -> str:
    """``topology.cuda_mps`` as one of :data:`MODES` (YAML gives booleans); ValueError otherwise."""
    mode = str(value).lower()
    if mode not in MODES:
        raise ValueError(f"topology.cuda_mps must be one of {list(MODES)}, got {value!r}")
    return mode


@dataclass
class MpsDaemon:
    """A control daemon this process started; :meth:`stop` quits it and restores the environment."""

    root: str
    """Temporary folder holding the daemon's pipe (``pipe/``) and log (``log/``) directories."""
    saved_env: dict
    """The ``CUDA_MPS_*`` variables as they were before (None: unset)."""

    def stop(self) -> None:
        env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": f"{self.root}/pipe"}
        try:
            subprocess.run([CONTROL], input="quit\n", text=True, env=env, timeout=30,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            print(f"warning: CUDA MPS daemon in {self.root} did not quit: {e}", flush=True)
        for k, v in self.saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(self.root, ignore_errors=True)


def running_daemon() -> str | None:
    """The pipe directory of a control daemon that this process's CUDA clients would use, or None."""
    pipe = os.environ.get("CUDA_MPS_PIPE_DIRECTORY") or DEFAULT_PIPE
    return pipe if os.path.exists(os.path.join(pipe, "control")) else None


def why_not(local_ray: bool, has_cuda: bool, control: str | None) -> str | None:
    """What prevents starting MPS here (None: nothing)."""
    if not local_ray:
        return ("the run joins a running Ray (topology.address is set), whose workers' environment is "
                f"fixed: start `{CONTROL} -d` before `ray start` instead (README, One GPU)")
    if not has_cuda:
        return "no CUDA device is visible"
    if control is None:
        return f"{CONTROL} is not on the PATH (it ships with the NVIDIA driver)"
    return None


def start(value, local_ray: bool) -> MpsDaemon | None:
    """Start a private MPS daemon for this run as ``topology.cuda_mps`` says, before Ray starts.

    Returns the daemon (stop it after the run) or None. Raises ValueError for a bad mode and
    RuntimeError when ``true`` cannot be honoured or the daemon fails to start."""
    mode = mode_of(value)
    if mode == "false":
        return None
    pipe = running_daemon()
    if pipe is not None:
        print(f"CUDA MPS: using the daemon already running ({pipe})", flush=True)
        return None
    import torch

    reason = why_not(local_ray, torch.cuda.is_available(), shutil.which(CONTROL))
    if reason is not None:
        if mode == "true":
            raise RuntimeError(f"topology.cuda_mps=true: {reason}")
        print(f"CUDA MPS off: {reason}", flush=True)
        return None
    root = tempfile.mkdtemp(prefix="alpagym-mps-")
    saved = {k: os.environ.get(k) for k in ENV_KEYS}
    env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": f"{root}/pipe", "CUDA_MPS_LOG_DIRECTORY": f"{root}/log"}
    for d in ("pipe", "log"):
        os.makedirs(f"{root}/{d}")
    proc = subprocess.run([CONTROL, "-d"], env=env, capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        msg = f"{CONTROL} -d failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()}"
        if mode == "true":
            raise RuntimeError(f"topology.cuda_mps=true: {msg}")
        print(f"CUDA MPS off: {msg}", flush=True)
        return None
    os.environ.update({k: env[k] for k in ENV_KEYS})  # the Ray processes started after this inherit it
    print(f"CUDA MPS on: a private daemon ({root}) for this run's processes", flush=True)
    return MpsDaemon(root=root, saved_env=saved)
