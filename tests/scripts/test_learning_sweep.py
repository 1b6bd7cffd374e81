"""scripts/learning_sweep.py: synchronous GRPO in one process on a small scene set, and its reward-to-go
advantage variant against hand-computed values."""

import json

import numpy as np
import pyarrow as pa
import pytest

from alpagym_ray import columns as C

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_sweep_runs_iterations_and_evaluates_the_same_held_out_episodes(tmp_path, script):
    from envs.drivesim.generate import small_scene_set

    small_scene_set(tmp_path / "scenes", n=4, seed=0)
    out = tmp_path / "sweep.json"
    sweep = script("learning_sweep")
    argv = [f"scenes.path={tmp_path / 'scenes'}", "scenes.start_steps=[0]", "policy=trajectory_route",
            "policy.size=tiny", "policy.num_anchors=16", "pretrain.enabled=false", "iterations=2",
            "learner.group_size=2", "learner.groups_per_iteration=2", "learner.minibatches=2", "learner.epochs=2",
            "eval.episodes_per_start=2", "eval.device=cpu", f"run_dir={tmp_path / 'run'}"]
    summary = sweep.run(argv)
    assert [h["iteration"] for h in summary["history"]] == [0, 1]
    first = summary["history"][0]
    # two epochs over two minibatches: π_θ moved away from π_old within the iteration
    assert first["approx_kl"] > 0 and np.isfinite(first["return"]) and 0 <= first["offroad"] <= 1
    before, after = summary["eval_before"], summary["eval_after"]
    assert before["episodes"] == after["episodes"] == 2     # 1 held-out scene x 1 start x 2 episodes
    assert summary["eval_delta"]["episodes"] == 2
    assert summary["eval_delta"]["return"] == pytest.approx(after["return"] - before["return"])
    assert (tmp_path / "run" / "checkpoint").is_dir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.argv", ["learning_sweep.py", "--out", str(out), *argv])
        assert sweep.main() == 0
    assert "returns" not in json.loads(out.read_text())["eval_after"]


def test_reward_to_go_advantage_subtracts_the_group_mean_at_each_decision(script):
    sweep = script("learning_sweep")

    class Meta:
        returns = [0.0, 0.0]  # only their count (G) is read

    # episode 0: rewards [1, 0, -10]; episode 1: [0, 1, 0]; rows in any order
    rows = [("g/0", 0, 1.0), ("g/0", 1, 0.0), ("g/0", 2, -10.0), ("g/1", 2, 0.0), ("g/1", 0, 0.0), ("g/1", 1, 1.0)]
    batch = pa.RecordBatch.from_pydict({C.EPISODE_ID: [r[0] for r in rows], C.STEP: [r[1] for r in rows],
                                        C.REWARD: pa.array([r[2] for r in rows], pa.float32())})
    adv = sweep.reward_to_go_advantage([Meta()], [batch]).numpy()
    # reward-to-go: episode 0 [-9, -10, -10], episode 1 [1, 1, 0]; group means [-4, -4.5, -5]
    expected = {("g/0", 0): -5.0, ("g/0", 1): -5.5, ("g/0", 2): -5.0,
                ("g/1", 0): 5.0, ("g/1", 1): 5.5, ("g/1", 2): 5.0}
    assert adv == pytest.approx([expected[(r[0], r[1])] for r in rows])
