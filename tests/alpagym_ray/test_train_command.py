"""``alpagym-ray train`` for any env: the env node decides how GRPO groups form (``env.groups_from``).

A short run of the gym-adapter example (``env=gym``: the toy env of scripts/custom_env_example.py) on
the session Ray cluster, and the group forming of each kind without Ray (AlpaSim: the scene list of our
drivesim-backed runtime server, asked with ``get_runtime_info``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from alpagym_ray import cli
from alpagym_ray import columns as C
from alpagym_ray.commands import train
from alpagym_ray.commands.pretrain import compose_config
from alpagym_ray.targets import to_plain

FAST = ["policy=trajectory_route", "policy.size=tiny", "policy.num_anchors=16", "iterations=2", "video_every=0",
        "learner.group_size=2", "learner.groups_per_iteration=2", "learner.checkpoint_every=1",
        "topology.num_rollout_workers=1", "topology.envs_per_worker=4", "topology.rollout_cpus=0",
        "topology.learner_cpus=0.5"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.ray
def test_train_command_trains_a_gym_env(ray_session, tmp_path, capsys):
    run = tmp_path / "run"
    # 2 reset options: groups draw from them; episodes cut after 8 steps
    rc = cli.main(["train", "env=gym", "env.max_steps=8", "env.reset_options=[{},{}]", f"run_dir={run}", *FAST])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "no held-out scenes" in out and "starts from its initialisation" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["groups_from"] == "reset_options" and summary["reset_options"] == 2
    assert summary["final_version"] == 2                        # version 0 = start, +1 per iteration
    assert summary["buffer"]["accounting_ok"] and summary["buffer"]["consumed"] == 2 * 2 * 2
    assert (Path(summary["checkpoint"]) / "model.safetensors").is_file()
    episodes = pq.read_table(list((run / "episodes").glob("*.parquet"))).to_pydict()
    assert max(episodes[C.NUM_DECISIONS]) <= 8 and set(episodes[C.SCENE_ID]) == {""}
    # progress_safety on the toy env's metrics: return = progress - 10 collision - 5 offroad
    for i, ret in enumerate(episodes[C.RETURN]):
        expected = (episodes["metric.progress"][i] - 10 * episodes["metric.collision_any"][i]
                    - 5 * episodes["metric.offroad"][i])
        assert ret == pytest.approx(expected)
    spec = (run / "config.yaml").read_text()
    assert "custom_env_example" in spec


def _cfg(*overrides: str):
    from omegaconf import OmegaConf

    cfg = compose_config(list(overrides), "train")
    OmegaConf.set_struct(cfg, False)
    return cfg


def test_gym_env_groups_come_from_its_reset_options():
    cfg = _cfg("env=gym", "policy=trajectory_route", "env.reset_options=[{lane: 0},{lane: 1}]")
    groups = train.form_groups(to_plain(cfg.env), to_plain(cfg.policy), cfg)
    assert groups.train == [{"lane": 0}, {"lane": 1}] and groups.holdout == [] and groups.scenes_path is None
    # the actors' env node: no train-command keys, the policy's observation keys
    assert "groups_from" not in groups.env and "reset_options" not in groups.env
    assert groups.env["obs_keys"] == ["ego_history", "route"] and groups.env["env_kwargs"] == {"horizon": 20}
    default = _cfg("env=gym", "policy=trajectory_route")
    assert train.form_groups(to_plain(default.env), to_plain(default.policy), default).train == [{}]


def test_drivesim_groups_come_from_the_scene_set(tmp_path):
    from envs.drivesim.generate import small_scene_set

    s = small_scene_set(tmp_path / "scenes", n=4, seed=0)
    cfg = _cfg("policy=trajectory_route", f"scenes.path={tmp_path / 'scenes'}", "scenes.start_steps=[0,5]",
               "scenes.holdout_fraction=0.25")
    groups = train.form_groups(to_plain(cfg.env), to_plain(cfg.policy), cfg)
    train_ids, holdout_ids = groups.env["scene_ids"], groups.eval_env["scene_ids"]
    assert sorted(train_ids + holdout_ids) == sorted(s.ids) and len(holdout_ids) == 1
    assert groups.train == [{"scene_id": i, "start_step": t} for i in train_ids for t in (0, 5)]
    assert groups.holdout == [{"scene_id": i, "start_step": t} for i in holdout_ids for t in (0, 5)]
    assert groups.env["scenes_path"] == str((tmp_path / "scenes").resolve())
    assert groups.env["config"]["obs_keys"] == ["ego_history", "route"] and groups.env["config"]["horizon"] == 20


def test_alpasim_groups_come_from_the_runtime(tmp_path):
    from envs.alpasim.runtime_server import RuntimeConfig, RuntimeServer
    from envs.drivesim.generate import small_scene_set

    s = small_scene_set(tmp_path / "scenes", n=4, seed=0)
    server = RuntimeServer(RuntimeConfig(scenes_dir=str(tmp_path / "scenes"), max_steps=6, camera_px=0))
    server.start()
    try:
        cfg = _cfg("env=alpasim", f"env.runtime_address={server.address}", "policy=trajectory_route",
                   "policy.size=tiny", "policy.num_anchors=16", "scenes.start_steps=[0,5]",
                   "scenes.holdout_fraction=0.25")
        assert train.runtime_scene_ids(to_plain(cfg.env)) == sorted(s.ids)
        groups = train.form_groups(to_plain(cfg.env), to_plain(cfg.policy), cfg)
        train_ids, holdout_ids = groups.env["scene_ids"], groups.eval_env["scene_ids"]
        assert sorted(train_ids + holdout_ids) == sorted(s.ids) and len(holdout_ids) == 1
        assert groups.train == [{"scene_id": i, "start_step": t} for i in train_ids for t in (0, 5)]
        assert groups.scenes_path is None and "scenes_path" not in groups.env and "groups_from" not in groups.env
        assert groups.env["config"]["obs_keys"] == ["ego_history", "route"]
        # the run's pieces against the runtime: the check before Ray, and the held-out evaluation
        policy, reward = to_plain(cfg.policy), train.reward_node(cfg, ["env=alpasim"])
        train.check_run(groups.env, policy, reward)
        metrics = train.evaluate_checkpoint(groups.eval_env, policy, reward, cfg, groups.holdout)
        assert metrics["episodes"] == 2 * cfg.eval.episodes_per_start  # 1 held-out scene x 2 starts
        assert math.isfinite(metrics["progress"]) and math.isfinite(metrics["return"])
        # scene ids named in the env node are used as given
        chosen = _cfg("env=alpasim", f"env.runtime_address={server.address}", "policy=trajectory_route",
                      f"env.scene_ids=[{s.ids[0]}]")
        one = train.form_groups(to_plain(chosen.env), to_plain(chosen.policy), chosen)
        assert one.env["scene_ids"] == [s.ids[0]] and one.holdout == [] and one.eval_env is None
    finally:
        server.stop(0)
    with pytest.raises(ConnectionError, match=r"127.0.0.1:1 did not answer get_runtime_info"):
        train.runtime_scene_ids({"runtime_address": "127.0.0.1:1", "config": {"connect_timeout_s": 0.5}})


def test_bad_group_settings_are_refused():
    cfg = _cfg("env=gym", "policy=trajectory_route")
    env = to_plain(cfg.env)
    with pytest.raises(ValueError, match=r"env.groups_from='scene': valid: \['scenes', 'runtime', 'reset_options'\]"):
        train.form_groups({**env, "groups_from": "scene"}, to_plain(cfg.policy), cfg)
    with pytest.raises(ValueError, match="env.reset_options is read only with env.groups_from=reset_options"):
        train.form_groups({**env, "groups_from": "scenes"}, to_plain(cfg.policy), cfg)
    with pytest.raises(ValueError, match="non-empty list of mappings"):
        train.form_groups({**env, "reset_options": []}, to_plain(cfg.policy), cfg)


def test_reward_node_names_the_preset_and_a_bad_reward_fails_before_ray(tmp_path, capsys):
    cfg = _cfg("env=gym", "reward=comfort")
    node = train.reward_node(cfg, ["env=gym", "reward=comfort"])
    assert node["_target_"] == "rewards.compute.reward_fn"
    assert node["source"] == "reward 'comfort' (config group reward)"
    assert train.reward_node(_cfg(), [])["source"] == "reward 'progress_safety' (config group reward)"
    # the toy env reports no comfort series: refused while checking, before any actor starts
    rc = cli.main(["train", "env=gym", "reward=comfort", f"run_dir={tmp_path / 'run'}", *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and "reward 'comfort' (config group reward), term 4" in err
    assert not (tmp_path / "run" / "summary.json").exists()


def _drivesim_eval(tmp_path, *overrides: str):
    from envs.drivesim.generate import small_scene_set

    small_scene_set(tmp_path / "scenes", n=4, seed=0)
    cfg = _cfg("policy=trajectory_route", "policy.size=tiny", "policy.num_anchors=16",
               f"scenes.path={tmp_path / 'scenes'}", "scenes.start_steps=[0]", "scenes.holdout_fraction=0.5",
               "eval.episodes_per_start=2", *overrides)
    groups = train.form_groups(to_plain(cfg.env), to_plain(cfg.policy), cfg)
    return cfg, groups, train.reward_node(cfg, [])


def test_held_out_evaluation_runs_on_the_named_device(tmp_path):
    import torch

    cfg, groups, reward = _drivesim_eval(tmp_path, "eval.device=cpu")
    policy = to_plain(cfg.policy)
    metrics = train.evaluate_checkpoint(groups.eval_env, policy, reward, cfg, groups.holdout)
    assert metrics["episodes"] == 2 * len(groups.holdout) and math.isfinite(metrics["return"])
    # auto (the default) on a machine without CUDA is the CPU
    cfg.eval.device = "auto"
    if not torch.cuda.is_available():
        again = train.evaluate_checkpoint(groups.eval_env, policy, reward, cfg, groups.holdout)
        assert again.keys() == metrics.keys() and again["episodes"] == metrics["episodes"]
        # per-episode returns, one per held-out episode, averaging to the return; the same episodes
        # again pair up (not always to exactly zero: float noise can flip one sampled action)
        from alpagym_ray.evaluate import paired_difference

        assert len(metrics["returns"]) == metrics["episodes"]
        assert sum(metrics["returns"]) / metrics["episodes"] == pytest.approx(metrics["return"])
        assert paired_difference(metrics, again)["episodes"] == metrics["episodes"]


def test_eval_device_without_cuda_is_refused_before_anything_runs(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc = cli.main(["train", "env=gym", "eval.device=cuda", f"run_dir={tmp_path / 'run'}", *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and "eval.device: device='cuda' but no CUDA device is available" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.gpu
def test_held_out_evaluation_on_the_gpu(tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cfg, groups, reward = _drivesim_eval(tmp_path, "eval.device=cuda")
    before = torch.cuda.memory_allocated()
    metrics = train.evaluate_checkpoint(groups.eval_env, to_plain(cfg.policy), reward, cfg, groups.holdout)
    assert metrics["episodes"] == 2 * len(groups.holdout) and math.isfinite(metrics["return"])
    # cuBLAS keeps a 32 MiB workspace per stream it ran on (allocated through PyTorch's allocator): the
    # H100 showed exactly that left over (34,603,008 bytes), so clear them before looking for our tensors
    getattr(torch._C, "_cuda_clearCublasWorkspaces", lambda: None)()  # CUDA builds have it
    assert torch.cuda.memory_allocated() <= before, "the evaluation left tensors on the GPU"
