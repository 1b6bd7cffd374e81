"""A short GRPO run through the Ray system with the AlpaSim env against our drivesim-backed runtime
server: the rollout workers host the driver sessions, the runtime (in this process) calls them back,
and a rollout that fails mid-episode is retried by the buffer."""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from alpagym_ray import columns as C
from alpagym_ray import train_loop
from envs.alpasim import runtime_server
from envs.alpasim.runtime_server import RuntimeConfig, RuntimeServer
from envs.drivesim.generate import small_scene_set

pytestmark = pytest.mark.ray

REWARD = {"_target_": "rewards.compute.reward_fn",
          "terms": [{"kind": "metric", "metric_name": "progress", "scale": 1.0},
                    {"kind": "metric", "metric_name": "collision_any", "scale": -10.0},
                    {"kind": "metric", "metric_name": "offroad", "scale": -5.0}]}   # progress_safety
POLICY = {"_target_": "learners.trajectory_policy.build_policy", "size": "tiny",
          "obs_keys": ["ego_history", "route"], "horizon": 20, "num_anchors": 16, "model": {"path": None}}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = tmp_path_factory.mktemp("alpasim_train_scenes")
        s = small_scene_set(root, n=2, seed=0)
    return str(Path(root).resolve()), s.ids


class FailOnce:
    """Makes the first session's third ``drive`` fail inside the runtime (as when the rollout dies
    mid-episode): that rollout returns ``success: false`` and the env raises from ``step``."""

    def __init__(self):
        self.lock = threading.Lock()
        self.victim: str | None = None
        self.drives = 0
        self.fired = False
        self.original = runtime_server._DriverCalls.__call__

    def __call__(self, calls, rpc, request, timeout=None):
        with self.lock:
            if self.victim is None:
                self.victim = calls.session
            if rpc == "drive" and calls.session == self.victim and not self.fired:
                self.drives += 1
                if self.drives == 3:
                    self.fired = True
                    raise runtime_server.RolloutFailed(f"session {calls.session}: injected fault, the runtime "
                                                       f"lost the rollout mid-episode")
        return self.original(calls, rpc, request, timeout)


def test_grpo_run_against_our_alpasim_runtime(ray_session, tmp_path, scenes, monkeypatch):
    root, ids = scenes
    fault = FailOnce()
    monkeypatch.setattr(runtime_server._DriverCalls, "__call__",
                        lambda calls, rpc, request, timeout=None: fault(calls, rpc, request, timeout))
    server = RuntimeServer(RuntimeConfig(scenes_dir=root, max_steps=10, camera_px=0))
    server.start()
    try:
        spec = train_loop.RunSpec(
            run_dir=str(tmp_path / "run"),
            env={"_target_": "envs.alpasim.factory.make_batched_env", "runtime_address": server.address,
                 "scene_ids": ids, "config": {"obs_keys": ["ego_history", "route"], "horizon": 20,
                                              "decision_timeout_s": 60.0}},
            policy=POLICY, reward=REWARD,
            learner={"group_size": 2, "groups_per_iteration": 2, "epochs": 1, "minibatches": 1, "lr": 1e-3,
                     "max_grad_norm": 1.0, "max_staleness": 1, "checkpoint_every": 1,
                     "checkpoint_io": "learners.checkpoint",
                     "algorithm": {"_target_": "learners.grpo.GRPO", "eps_low": 0.2, "eps_high": 0.28,
                                   "dual_clip": 3.0, "is_cap": 2.0, "scale_by_std": False, "kl_coef": 0.0}},
            topology={"name": "test", "address": None, "num_rollout_workers": 1, "envs_per_worker": 2,
                      "rollout_cpus": 0, "rollout_gpus": 0, "rollout_device": "cpu", "num_learners": 1,
                      "learner_cpus": 0.5, "learner_use_gpu": False, "backend": "gloo", "max_failures": 1},
            train_groups=[{"scene_id": s, "start_step": t} for s in ids for t in (0, 5)],
            iterations=2, seed=0)
        summary = train_loop.run(spec)
    finally:
        server.stop(0)
    stats = summary["buffer"]
    assert summary["final_version"] == 2
    assert stats["accounting_ok"] and stats["consumed"] == 2 * 2 * 2
    # the rollout killed mid-episode failed its group, which the buffer requested again
    assert fault.fired and stats["failed_groups"] >= 1 and stats["events"].get("group_failures", 0) >= 1
    assert stats["last_errors"]["group"]  # what went wrong reaches the summary (and a console warning)
    episodes = pq.read_table(list((Path(summary["run_dir"]) / "episodes").glob("*.parquet"))).to_pydict()
    # 10 in-control ticks at the runtime's 0.2 s control step: 5 decisions per episode
    assert set(episodes[C.NUM_DECISIONS]) == {5}
    progress = np.asarray(episodes["metric.progress"])
    assert np.isfinite(progress).all() and np.isfinite(episodes["metric.scene_score"]).all()
    # the returns are the reward of AlpaSim's metrics as the runtime reported them
    expected = progress - 10 * np.asarray(episodes["metric.collision_any"]) - 5 * np.asarray(episodes["metric.offroad"])
    np.testing.assert_allclose(episodes[C.RETURN], expected, atol=1e-9)
