"""The GRPO system on the session Ray cluster: one real end-to-end run, worker and learner faults,
and synchronous mode against a single-process replay of the same batch."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch

from alpagym_ray import columns as C
from alpagym_ray import train_loop
from alpagym_ray.learner import grpo_update
from envs.drivesim.generate import small_scene_set
from learners.grpo import GRPO, group_advantages

pytestmark = pytest.mark.ray

REWARD = {"_target_": "rewards.compute.reward_fn",
          "terms": [{"kind": "metric", "metric_name": "progress", "scale": 1.0},
                    {"kind": "metric", "metric_name": "collision_any", "scale": -10.0},
                    {"kind": "metric", "metric_name": "offroad", "scale": -5.0}]}
POLICY = {"_target_": "learners.trajectory_policy.build_policy", "size": "tiny",
          "obs_keys": ["ego_history", "route"], "horizon": 20, "num_anchors": 16, "model": {"path": None}}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = tmp_path_factory.mktemp("scenes")
        s = small_scene_set(root, n=3, seed=0)
    return str(Path(root).resolve()), s.ids


def spec(tmp_path, scenes, iterations=2, max_staleness=1, workers=1, max_ticks=20, **extra) -> train_loop.RunSpec:
    path, ids = scenes
    return train_loop.RunSpec(
        run_dir=str(tmp_path / "run"),
        env={"_target_": "envs.drivesim.factory.make_batched_env", "scenes_path": path,
             "config": {"obs_keys": ["ego_history", "route"], "horizon": 20, "max_ticks": max_ticks}},
        policy=POLICY, reward=REWARD,
        learner={"group_size": 2, "groups_per_iteration": 2, "epochs": 1, "minibatches": 1, "lr": 1e-3,
                 "max_grad_norm": 1.0, "max_staleness": max_staleness, "checkpoint_every": 1,
                 "checkpoint_io": "learners.checkpoint",
                 "algorithm": {"_target_": "learners.grpo.GRPO", "eps_low": 0.2, "eps_high": 0.28,
                               "dual_clip": 3.0, "is_cap": 2.0, "scale_by_std": False, "kl_coef": 0.0}},
        topology={"name": "test", "address": None, "num_rollout_workers": workers, "envs_per_worker": 2,
                  "rollout_cpus": 0, "rollout_gpus": 0, "rollout_device": "cpu", "num_learners": 1,
                  "learner_cpus": 0.5, "learner_use_gpu": False, "backend": "gloo", "max_failures": 2},
        train_groups=[{"scene_id": s, "start_step": 0} for s in ids],
        iterations=iterations, seed=0, extra=extra)


def test_end_to_end_run_publishes_versions_and_leaves_outputs(ray_session, tmp_path, scenes):
    summary = train_loop.run(spec(tmp_path, scenes, iterations=2))
    run = Path(summary["run_dir"])
    assert summary["final_version"] == 2                      # version 0 = start, +1 per iteration
    assert summary["buffer"]["accounting_ok"]
    assert summary["buffer"]["consumed"] == 2 * 2 * 2          # iterations x groups x G
    assert (Path(summary["checkpoint"]) / "model.safetensors").is_file()
    assert json.loads((run / "versions.json").read_text())["highest_published"] == 2
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    episodes = pq.read_table(list((run / "episodes").glob("*.parquet")))
    assert {C.RETURN, C.VERSION_FIRST, "metric.scene_score"} <= set(episodes.column_names)
    # every episode produced is in a Parquet file or queued for one (written off the buffer's event loop)
    buffer = summary["buffer"]
    assert buffer["episode_write_error"] is None and buffer["episode_files"] >= 1
    assert buffer["produced"] == buffer["episodes_written"] + buffer["episodes_queued"]
    assert episodes.num_rows >= buffer["episodes_written"]  # (a queued one may land before the buffer is killed)


def test_collective_weight_transport_runs_end_to_end_over_gloo(ray_session, tmp_path, scenes):
    """topology.weight_transport=collective: versions reach the workers over a gloo group of the
    learner and the workers (NCCL on GPUs); the groups are learned with the versions they acted with."""
    s = spec(tmp_path, scenes, iterations=3, workers=2, max_staleness=0, write_steps=True)
    s.topology.update(weight_transport="collective", weight_backend="gloo", weight_bucket_mb=0.01,
                      weight_timeout_s=20, weight_object_store_every=100)
    summary = train_loop.run(s)
    assert summary["final_version"] == 3
    assert summary["buffer"]["accounting_ok"]
    assert summary["weights"]["collective_publishes"] >= 3, summary["weights"]  # versions 1-3 (0 may precede the group)
    assert summary["weights"]["sync_failures"] == 0
    steps = [pq.read_table(p) for p in sorted((Path(summary["run_dir"]) / "steps").glob("*.parquet"))]
    # synchronous: iteration i learns from rows acted with version i, which came over the group
    assert [sorted(set(t.column(C.POLICY_VERSION).to_pylist())) for t in steps] == [[0], [1], [2]]


def test_killed_rollout_worker_loses_only_its_group(ray_session, tmp_path, scenes):
    s = spec(tmp_path, scenes, workers=2, max_ticks=None)   # whole episodes: the kill lands mid-group
    broadcaster, workers, buffer = train_loop.start_actors(s)
    ray.get([w.ping.remote() for w in workers], timeout=120)
    from alpagym_ray.flat_params import flatten_params
    from learners.trajectory_policy import build_policy

    flat = flatten_params(build_policy(**{k: v for k, v in POLICY.items() if k != "_target_"})).numpy()
    ray.get(buffer.start.remote(0, 0))
    shard_ref = buffer.take_shard.remote(0, 0, 1, 1)
    deadline = time.time() + 60
    while ray.get(buffer.stats.remote())["in_flight"] < 2 and time.time() < deadline:
        time.sleep(0.05)
    # both workers now hold a group and wait for the first weights inside it, so the kill always lands
    # mid-group (killing a worker that is stepping its episodes raced with the end of short episodes)
    ray.kill(workers[0], no_restart=False)                     # Ray restarts it
    ray.get(broadcaster.publish.remote(0, flat))
    shard = ray.get(shard_ref, timeout=240)
    assert sum(len(mb) for mb in shard["minibatches"]) == 2
    # the other worker may fill the shard before Ray reports the killed worker's call as failed
    deadline = time.time() + 60
    while True:
        stats = ray.get(buffer.stats.remote())
        if stats["events"].get("worker_failures", 0) >= 1 or time.time() > deadline:
            break
        time.sleep(0.1)
    assert stats["accounting_ok"]
    assert stats["events"].get("worker_failures", 0) >= 1 and stats["events"].get("retries", 0) >= 1
    # the restarted worker force-pulls the weights and serves again
    deadline = time.time() + 120
    while True:
        try:
            assert ray.get(workers[0].ping.remote(), timeout=60)["worker_id"] == "w0"
            break
        except ray.exceptions.ActorUnavailableError:
            assert time.time() < deadline
            time.sleep(0.5)
    for a in [*workers, buffer, broadcaster]:
        ray.kill(a)


def test_learner_crash_resumes_from_checkpoint_with_growing_versions(ray_session, tmp_path, scenes):
    summary = train_loop.run(spec(tmp_path, scenes, iterations=3, crash_at_iteration=2))
    run = Path(summary["run_dir"])
    assert (run / ".crashed_once").is_file()
    # iterations 0, 1 published v1, v2 and checkpointed; a restart publishes the checkpoint above the
    # highest version (v3, or higher if Ray Train restarted more than once), then iteration 2 adds one
    assert summary["final_version"] >= 4
    versions = json.loads((run / "versions.json").read_text())
    assert versions["highest_published"] == summary["final_version"]
    assert summary["buffer"]["accounting_ok"]


def test_synchronous_mode_equals_a_single_process_replay(ray_session, tmp_path, scenes):
    from learners.checkpoint import load_checkpoint
    summary = train_loop.run(spec(tmp_path, scenes, iterations=1, max_staleness=0, write_steps=True))
    run = Path(summary["run_dir"])
    table = pq.read_table(run / "steps" / "iter00000_rank0.parquet")
    assert set(table.column(C.POLICY_VERSION).to_pylist()) == {0}   # synchronous: all acted with v0
    # the starting weights the learner published as version 0
    policy = load_checkpoint(run / "checkpoints" / "version_000000")
    episodes = pq.read_table(list((run / "episodes").glob("*.parquet")))
    ret = {r["episode_id"]: r["return"] for r in episodes.select(["episode_id", "return"]).to_pylist()}
    groups = sorted({e.rsplit("/", 1)[0] for e in table.column(C.EPISODE_ID).to_pylist()})
    returns = torch.tensor([[ret[f"{g}/{j}"] for j in range(2)] for g in groups])
    adv, _ = group_advantages(returns)
    adv_of = {f"{g}/{j}": float(adv[i, j]) for i, g in enumerate(groups) for j in range(2)}
    mb = {"obs": C.observations(table, ("ego_history", "route")),
          "action": C.column_tensor(table, C.ACTION, (20, 3)),
          "logp_behavior": torch.from_numpy(table.column(C.LOGP_BEHAVIOR).to_numpy()),
          "advantage": torch.tensor([adv_of[e] for e in table.column(C.EPISODE_ID).to_pylist()])}
    with torch.no_grad():
        mb["logp_old"] = policy.log_prob(mb["obs"], mb["action"]).float()
        # the behaviour log-probs recorded by the worker are the learner's π_old (same weights)
        np.testing.assert_allclose(mb["logp_old"].numpy(), mb["logp_behavior"].numpy(), rtol=1e-4, atol=1e-4)
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3, eps=1e-6)
    grpo_update(policy, opt, params, [mb], [table.num_rows], GRPO(), 1, 1.0)
    trained = load_checkpoint(summary["checkpoint"])
    for (name, a), b in zip(policy.state_dict().items(), trained.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_resume_continues_from_the_last_checkpoint_with_higher_versions(ray_session, tmp_path, scenes):
    first = train_loop.run(spec(tmp_path, scenes, iterations=1))
    assert first["final_version"] == 1
    again = spec(tmp_path, scenes, iterations=2)
    again.resume_checkpoint = first["checkpoint"]          # what `train resume=RUN_DIR` passes
    second = train_loop.run(again)
    # the checkpoint (iteration 0, v1) is republished as v2, then iteration 1 publishes v3
    assert second["final_version"] == 3
    assert json.loads((Path(second["run_dir"]) / "versions.json").read_text())["highest_published"] == 3
