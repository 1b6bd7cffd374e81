"""The rollout worker in-process (no Ray actors): the decision rows it returns line up with what the
policy saw and did, episode by episode, and its rewards add up to the returns."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from alpagym_ray import columns as C
from alpagym_ray.rollout_worker import GroupRequest, RolloutWorker, _Recording
from envs.drivesim.generate import small_scene_set

KEYS = ["ego_history", "route"]
REWARD = {"_target_": "rewards.compute.reward_fn",
          "terms": [{"kind": "metric", "metric_name": "progress", "scale": 1.0},
                    {"kind": "metric", "metric_name": "collision_any", "scale": -10.0},
                    {"kind": "metric", "metric_name": "offroad", "scale": -5.0, "dense": True}]}
POLICY = {"_target_": "learners.trajectory_policy.build_policy", "size": "tiny", "obs_keys": KEYS,
          "horizon": 20, "num_anchors": 16, "model": {"path": None}}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = tmp_path_factory.mktemp("scenes")
        return root, small_scene_set(root, n=2, seed=0).ids


def make_worker(root, **kw) -> RolloutWorker:
    env = {"_target_": "envs.drivesim.factory.make_batched_env", "scenes_path": str(Path(root).resolve()),
           "config": {"obs_keys": KEYS, "horizon": 20, "max_ticks": 30}}
    w = RolloutWorker("t0", env, POLICY, REWARD, broadcaster=None, group_size=3, num_envs=8, **kw)
    w.version = 7  # fixed weights: no broadcaster
    return w


@pytest.fixture(scope="module")
def worker(scenes):
    root, ids = scenes
    return make_worker(root), ids


def test_rows_line_up_with_observations_actions_and_returns(worker):
    w, ids = worker
    reqs = [GroupRequest("ga", 11, {"scene_id": ids[0], "start_step": 0}),
            GroupRequest("gb", 12, {"scene_id": ids[1], "start_step": 5})]
    out = w.run_groups(reqs)
    metas, batches = out[0], out[1:]
    assert [m.ok for m in metas] == [True, True], metas[0].error
    for req, meta, batch in zip(reqs, metas, batches, strict=True):
        assert batch.num_rows == meta.num_rows
        assert set(batch.column(C.GROUP_ID).to_pylist()) == {req.group_id}
        episodes = meta.episodes.to_pylist()
        ep_ids = batch.column(C.EPISODE_ID).to_pylist()
        steps = batch.column(C.STEP).to_numpy()
        done = batch.column(C.DONE).to_numpy(zero_copy_only=False)
        reward = batch.column(C.REWARD).to_numpy()
        start = 0
        for j, ep in enumerate(episodes):
            D = ep[C.NUM_DECISIONS]
            rows = slice(start, start + D)
            assert ep_ids[rows] == [f"{req.group_id}/{j}"] * D          # contiguous, in order
            assert steps[rows].tolist() == list(range(D))
            assert done[rows].tolist() == [False] * (D - 1) + [True]
            assert reward[rows].sum() == pytest.approx(ep[C.RETURN], abs=1e-4)
            assert ep[C.RETURN] == pytest.approx(meta.returns[j])
            assert len(ep[C.TRAJ_X]) == D
            start += D
        assert start == batch.num_rows
        assert set(batch.column(C.POLICY_VERSION).to_pylist()) == {7}
        # the recorded observation and action give back the behaviour log-prob: rows are aligned
        obs = C.observations(batch, KEYS)
        action = C.column_tensor(batch, C.ACTION, (20, 3))
        with torch.no_grad():
            logp = w.policy.log_prob(obs, action)
        np.testing.assert_allclose(logp.numpy(), batch.column(C.LOGP_BEHAVIOR).to_numpy(), atol=2e-3, rtol=1e-4)


def test_recording_gathers_ragged_episodes_env_major():
    rec = _Recording(["x"])
    alive = np.ones(3, dtype=bool)
    lengths = [2, 4, 1]  # env i acts in decisions 0 .. lengths[i] - 1
    for d in range(4):
        alive = np.array([d < n for n in lengths])
        x = torch.tensor([[100 * i + d, -(100 * i + d)] for i in range(3)], dtype=torch.float32)
        rec.decision(alive, {"x": x}, x[:, :1] * 2, x[:, 0], version=d, n=3)
    mat = rec.alive_matrix()
    assert mat.sum(1).tolist() == lengths
    got = rec.gather("x", mat)
    want = [[100 * i + d, -(100 * i + d)] for i in range(3) for d in range(lengths[i])]
    assert got.tolist() == want
    assert rec.gather("logp", mat).tolist() == [w[0] for w in want]


def test_failed_env_fails_the_groups_not_the_worker(worker):
    w, ids = worker
    out = w.run_groups([GroupRequest("bad", 1, {"scene_id": "no-such-scene"})])
    meta = out[0][0]
    assert not meta.ok and "no-such-scene" in meta.error
    assert out[1] is None
    # and the worker still works afterwards
    again = w.run_groups([GroupRequest("ok", 2, {"scene_id": ids[0]})])
    assert again[0][0].ok



def test_float16_observation_storage_keeps_log_probs_exact(scenes):
    """obs_storage=float16: observation columns are half floats, the learner's view of them is
    float32, and the policy acted on exactly those values (the log-probs the learner recomputes
    from the rows match the behaviour ones as closely as with float32 storage)."""
    root, ids = scenes
    w = make_worker(root, obs_storage="float16")
    out = w.run_groups([GroupRequest("g16", 11, {"scene_id": ids[0], "start_step": 0})])
    meta, batch = out[0][0], out[1]
    assert meta.ok, meta.error
    for key in KEYS:
        assert batch.schema.field(C.obs_column(key)).type.value_type == pa.float16()
    obs = C.observations(batch, KEYS)
    assert all(obs[k].dtype == torch.float32 for k in KEYS)
    assert torch.equal(obs["route"], obs["route"].half().float())            # float16 values, widened
    action = C.column_tensor(batch, C.ACTION, (20, 3))
    with torch.no_grad():
        logp = w.policy.log_prob(obs, action)
    np.testing.assert_allclose(logp.numpy(), batch.column(C.LOGP_BEHAVIOR).to_numpy(), atol=2e-3, rtol=1e-4)
    table = pa.Table.from_batches([batch, batch])                            # the learner's chunked path
    on_device = C.observations(table, KEYS, device="cpu")
    assert on_device["route"].dtype == torch.float32
    assert torch.equal(on_device["route"][: batch.num_rows], obs["route"])
    with pytest.raises(ValueError, match="obs_storage 'int8' unknown; valid"):
        make_worker(root, obs_storage="int8")


def test_a_failing_render_costs_the_video_not_the_groups(scenes, tmp_path, capsys):
    root, ids = scenes
    w = make_worker(root, video_every=1, run_dir=str(tmp_path))

    def broken(env=0, size=None):
        raise ValueError("no frame today")

    w.env.render = broken
    out = w.run_groups([GroupRequest("gv", 5, {"scene_id": ids[0], "start_step": 0})])
    assert out[0][0].ok and out[1].num_rows == out[0][0].num_rows  # the group is kept whole
    assert "worker t0: no video for v7 (ValueError: no frame today)" in capsys.readouterr().out
    assert not (tmp_path / "videos").exists()
