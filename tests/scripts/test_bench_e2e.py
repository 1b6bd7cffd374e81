"""scripts/bench_e2e.py on a tiny CPU run: the steady-state numbers it reports, and what bounds the run
judged from the learner's wait for the buffer alone (its data wait also holds its own load)."""

import json
import math

import pytest

TINY = ["env=gym", "env.max_steps=8", "env.reset_options=[{},{}]", "policy=trajectory_route", "policy.size=tiny",
        "policy.num_anchors=16", "iterations=3", "learner.group_size=2", "learner.groups_per_iteration=2",
        "topology.num_rollout_workers=1", "topology.envs_per_worker=4", "topology.rollout_cpus=0",
        "topology.learner_cpus=0.5"]




@pytest.mark.ray
@pytest.mark.usefixtures("one_thread")
def test_bench_e2e_reports_the_learner_phases_and_the_bound(ray_session, tmp_path, script):
    out = tmp_path / "e2e.json"
    result = script("bench_e2e").main(["--out", str(out), *TINY])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["iterations_timed"] == 2 and result["env_steps_per_s"] > 0
    phases = result["learner_phase_s"]
    assert {"buffer_wait", "load", "update", "publish"} <= set(phases)
    # the publish's parts add up to no more than the whole
    parts = [phases[f"publish_{k}"] for k in ("flatten", "send", "buffer")]
    assert min(parts) >= 0.0 and sum(parts) <= phases["publish"]
    # the wait for the buffer is part of the learner's data wait (which adds the load)
    wait, buffer_wait = result["learner_data_wait_fraction"], result["learner_buffer_wait_fraction"]
    assert math.isfinite(buffer_wait) and 0.0 <= buffer_wait <= wait <= 1.0
    assert result["bound_by"] == ("learner" if buffer_wait < 0.1 else "rollout")
