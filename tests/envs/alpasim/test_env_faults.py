"""Faults around the AlpaSim env: a runtime that is not there, dies mid-episode, never drives, gives
up on a slow env, or rejects a scene. Each fails with a clear error within its timeout; nothing hangs,
and the env works again once the runtime does."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

from envs.alpasim import messages as m
from envs.alpasim.env import AlpaSimBatch, AlpaSimEnvConfig, RolloutFailed
from envs.alpasim.factory import make_batched_env
from envs.alpasim.runtime_server import RuntimeConfig, RuntimeServer
from envs.drivesim.generate import small_scene_set
from tests.envs.alpasim.test_env import SCENE, ScriptedRuntime

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = tmp_path_factory.mktemp("alpasim_fault_scenes")
        s = small_scene_set(root, n=2, seed=0)
    return str(Path(root).resolve()), s.ids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_runtime_not_listening_fails_within_the_connect_timeout():
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match=rf"runtime at 127.0.0.1:{port} did not answer get_runtime_info "
                                              r"within 1.0 s"):
        AlpaSimBatch(f"127.0.0.1:{port}", 1, AlpaSimEnvConfig(connect_timeout_s=1.0))
    assert time.monotonic() - t0 < 10


def test_runtime_dying_mid_episode_fails_the_step_and_nothing_hangs(scenes, tmp_path):
    yaml_path = tmp_path / "generated-runtime-server.yaml"
    proc = subprocess.Popen(
        [sys.executable, "-m", "alpagym_ray.cli", "alpasim-runtime", "--scenes", scenes[0], "--server-yaml",
         str(yaml_path), "--camera-px", "0", "--log-level", "WARNING"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = None
    try:
        deadline = time.monotonic() + 120
        while not yaml_path.is_file():
            assert proc.poll() is None and time.monotonic() < deadline, "the runtime did not start"
            time.sleep(0.2)
        env = make_batched_env(2, runtime_yaml=str(yaml_path),
                               config={"obs_keys": ["ego_history"], "decision_timeout_s": 30.0})
        env.reset(seeds=[1, 1], options=[{"scene_id": scenes[1][0]}] * 2)
        env.step(torch.zeros(2, 20, 3))
        sessions = [s.session.session_uuid for s in env._slots]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        t0 = time.monotonic()
        with pytest.raises(RolloutFailed, match=r"2 of 2 rollouts failed: session alpagym-.*simulate failed: "
                                                r"UNAVAILABLE.*last call seen: drive"):
            env.step(torch.zeros(2, 20, 3))
        assert time.monotonic() - t0 < 20
        assert all(env.host.get(s) is None for s in sessions)   # the dead rollouts' sessions are gone
        # a reset against the dead runtime fails quickly as well
        t0 = time.monotonic()
        with pytest.raises(RolloutFailed, match="before its first decision: session .*simulate failed: UNAVAILABLE"):
            env.reset(seeds=[1, 1], options=[{"scene_id": scenes[1][0]}] * 2)
        assert time.monotonic() - t0 < 20
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        if env is not None:
            env.close()


def test_a_runtime_that_never_drives_times_out_naming_the_session_and_last_call():
    release = threading.Event()

    def script(driver, sid, spec, rt):
        driver.start_session(m.DriveSessionRequest(session_uuid=sid), timeout=5)
        release.wait(20)
        return m.SimulationReturn.RolloutReturn(success=False, error="gave up")

    rt = ScriptedRuntime(script)
    env = AlpaSimBatch(rt.address, 1, AlpaSimEnvConfig(start_timeout_s=1.0))
    try:
        t0 = time.monotonic()
        with pytest.raises(RolloutFailed, match=r"session alpagym-\S+ \(scene scripted-scene\): no drive and no "
                                                r"end of simulate within 1 s .*last call seen: start_session"):
            env.reset(options=[{"scene_id": SCENE}])
        assert time.monotonic() - t0 < 10
    finally:
        release.set()
        env.close()
        rt.stop()


def test_the_runtime_giving_up_on_a_slow_env_fails_that_episode_then_the_env_recovers(scenes):
    server = RuntimeServer(RuntimeConfig(scenes_dir=scenes[0], max_steps=6, camera_px=0, driver_timeout_s=0.5))
    server.start()
    env = AlpaSimBatch(server.address, 1, AlpaSimEnvConfig(obs_keys=("ego_history",)))
    try:
        env.reset(options=[{"scene_id": scenes[1][1]}])
        time.sleep(1.5)                                   # the policy "hangs" past the runtime's deadline
        with pytest.raises(RolloutFailed, match=r"the rollout failed \(ROLLOUT_ERROR_CODE_UNSPECIFIED\): session "
                                                r"alpagym-\S+: driver .* drive got no answer within 0.5 s"):
            env.step(torch.zeros(1, 20, 3))
        env.reset(options=[{"scene_id": scenes[1][1]}])    # the same env, the next group
        steps = 0
        while True:
            _, _, term, trunc, info = env.step(torch.zeros(1, 20, 3))
            steps += 1
            if bool((term | trunc)[0]):
                break
        assert steps == 3 and "episode_metrics" in info
    finally:
        env.close()
        server.stop(0)


def test_a_scene_the_runtime_rejects_fails_reset_with_its_status(scenes):
    server = RuntimeServer(RuntimeConfig(scenes_dir=scenes[0], camera_px=0))
    server.start()
    env = AlpaSimBatch(server.address, 1)
    try:
        env.scene_infos = {}        # as with a runtime that lists no scenes: the runtime itself must refuse
        with pytest.raises(RolloutFailed, match=r"before its first decision: session \S+ \(scene nope\): "
                                                r"simulate failed: INVALID_ARGUMENT: rollout_specs\[0\]: "
                                                r"unknown scene 'nope'"):
            env.reset(options=[{"scene_id": "nope"}])
    finally:
        env.close()
        server.stop(0)
