"""The `alpagym-ray pretrain` command (alpagym_ray/commands/pretrain.py) on small generated scenes."""

import json

import numpy as np
import pytest
import torch

from alpagym_ray.commands import pretrain as pt
from envs.drivesim.scene import AgentType, Scene

SMALL = ["policy=trajectory_route", "policy.size=tiny", "policy.num_anchors=8",
         "scenes.generate.num_scenes=4", "data.start_stride=6", "train.epochs=2", "train.batch_size=16",
         "progress=false"]


def _scene(scene_id: str, steps: int, invalid: tuple[int, ...] = ()) -> Scene:
    t = np.arange(steps, dtype=np.float32)
    state = np.zeros((1, steps, 5), np.float32)
    state[0, :, 0] = t
    state[0, :, 3] = 10.0
    valid = np.ones((1, steps), bool)
    valid[0, list(invalid)] = False
    return Scene(scene_id=scene_id, agent_state=state, agent_size=np.array([[4.5, 1.9]], np.float32),
                 agent_valid=valid, agent_type=np.array([AgentType.VEHICLE], np.int8), ego_index=0)


def test_start_pairs_known_answers():
    # 50 steps, warm-up 17, 2 ticks per decision, H = 20: the env allows starts 0..29; a full logged
    # future needs start + 17 + 20 < 50, i.e. starts 0..12
    pairs = pt.start_pairs([_scene("a", 50)], warmup=17, decision_every=2, horizon=20, stride=4)
    assert pairs == [("a", 0), ("a", 4), ("a", 8), ("a", 12)]
    # a gap in the ego's log at step 30 removes the starts whose decision or future covers it
    pairs = pt.start_pairs([_scene("b", 50, invalid=(30,))], warmup=17, decision_every=2, horizon=5, stride=1)
    starts = [s for _, s in pairs]
    assert starts == [s for s in range(28) if not 8 <= s <= 13]  # t0 + 5 < 50: starts <= 27
    with pytest.raises(ValueError, match="start_stride"):
        pt.start_pairs([_scene("a", 50)], 17, 2, 20, 0)


def test_split_ids_is_seeded_and_disjoint():
    ids = [f"s{i}" for i in range(10)]
    train, val = pt.split_ids(ids, 0.2, seed=0)
    assert len(val) == 2 and not set(train) & set(val) and sorted(train + val) == sorted(ids)
    assert pt.split_ids(ids, 0.2, seed=0) == (train, val)
    assert pt.split_ids(ids, 0.2, seed=1) != (train, val)
    assert pt.split_ids(["a", "b"], 0.9, 0)[0] != []  # always something to train on
    with pytest.raises(ValueError, match="at least 2 scenes"):
        pt.split_ids(["a"], 0.2, 0)


def test_config_hash_ignores_where_and_how_it_runs():
    a = pt.compose_config(SMALL)
    b = pt.compose_config([*SMALL, "run_dir=/elsewhere", "device=cpu", "progress=true"])
    c = pt.compose_config([*SMALL, "train.epochs=3"])
    assert pt.config_hash(a) == pt.config_hash(b) != pt.config_hash(c)


def test_pretrain_runs_caches_and_loads(tmp_path, monkeypatch, one_thread):
    cfg = pt.compose_config([*SMALL, f"run_dir={tmp_path}"])
    ckpt = pt.pretrain(cfg)
    assert ckpt.name == "checkpoint" and ckpt.parent.name == f"pretrain-{pt.config_hash(cfg)}"
    assert {"model.safetensors", "config.json", "optimizer.safetensors", "optimizer.json"} <= {
        f.name for f in ckpt.iterdir()}
    metrics = json.loads((ckpt.parent / "metrics.json").read_text())
    assert metrics["samples"]["train"] > 0 and metrics["samples"]["val"] > 0
    assert metrics["scenes"]["train_scenes"] == 3 and metrics["scenes"]["val_scenes"] == 1
    assert len(metrics["history"]) == 2 and np.isfinite(metrics["policy"]["ade"])
    assert metrics["constant_velocity"]["ade"] > 0
    assert any((ckpt.parent / "tb").iterdir())  # TensorBoard event file
    assert not list(tmp_path.glob("*.tmp-*"))  # finished runs leave no temporary directory
    from learners.checkpoint import load_checkpoint, read_checkpoint_config

    config = read_checkpoint_config(ckpt)
    assert config["obs_keys"] == ["ego_history", "route"] and config["policy_version"] == 0
    assert config["provenance"]["val"]["ade"] == metrics["policy"]["ade"]
    policy = load_checkpoint(ckpt)
    assert policy.config.size == "tiny" and float(policy.anchors.abs().sum()) > 0
    # the same config again: the cached checkpoint, no training
    monkeypatch.setattr("learners.bc.train_bc", lambda *a, **k: pytest.fail("retrained a cached config"))
    assert pt.pretrain(cfg) == ckpt
    assert pt.pretrain(cfg, run_dir=tmp_path) == ckpt


def test_cli_prints_config_and_reports_bad_input(tmp_path, capsys):
    from alpagym_ray.cli import main

    assert main(["pretrain", "--cfg", "policy.size=tiny"]) == 0
    out = capsys.readouterr().out
    assert "_target_: learners.trajectory_policy.build_policy" in out and "size: tiny" in out
    assert main(["pretrain", "policy.size"]) == 2
    assert "key=value" in capsys.readouterr().err
    assert main(["pretrain", "policy=nope"]) == 2
    assert "bad config" in capsys.readouterr().err
    missing = tmp_path / "no_such_scenes"
    assert main(["pretrain", f"scenes.path={missing}", f"run_dir={tmp_path}", "progress=false"]) == 2
    assert "no_such_scenes" in capsys.readouterr().err


def test_device_resolution():
    assert pt.resolve_device("cpu") == torch.device("cpu")
    assert pt.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            pt.resolve_device("cuda")


def test_perturbed_replay_bends_the_log_sideways():
    gt = torch.zeros(2, 64, 3)
    gt[:, :, 0] = torch.arange(1, 65) * 1.0  # 10 m/s straight ahead
    obs = {"gt_trajectory": gt, "gt_trajectory_mask": torch.ones(2, 64, dtype=torch.bool)}
    plan = pt.perturbed_replay(obs, 20, torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.2]))
    assert torch.equal(plan[0], gt[0, :20])  # no perturbation: the log itself
    torch.testing.assert_close(plan[1, :, 0], 1.2 * gt[1, :20, 0])
    assert float(plan[1, 0, 1]) == pytest.approx(0.028, abs=1e-3)  # smoothstep(0.1) of 1 m
    ramp = pt.PERTURB_RAMP_STEPS
    torch.testing.assert_close(plan[1, ramp - 1 :, 1], torch.ones(20 - ramp + 1))
    assert float(plan[1, 4, 2]) > 0 and float(plan[1, -1, 2]) == pytest.approx(0.0, abs=1e-6)  # yaw follows


def test_collect_samples_with_perturbed_decisions(tmp_path):
    from envs.drivesim.generate import small_scene_set

    scenes = small_scene_set(tmp_path / "s", n=1).load_many()
    pairs = pt.start_pairs(scenes, 17, 2, 20, stride=10)
    plain = pt.collect_samples(scenes, pairs, {"warmup_ticks": 17}, ("ego_history", "route"), 20)
    assert len(plain["target"]) == len(pairs)
    assert set(plain) == {"ego_history", "ego_history_mask", "route", "route_mask", "target", "target_mask"}
    # the targets are the logged futures: they start where the ego is (the origin), heading along x
    assert float(plain["target"][:, 0, :2].norm(dim=-1).max()) < 3.0
    more = pt.collect_samples(scenes, pairs, {"warmup_ticks": 17}, ("ego_history", "route"), 20,
                              perturb_decisions=3, perturb_lateral_m=1.0, seed=0)
    assert len(pairs) < len(more["target"]) <= 4 * len(pairs)
    assert bool(more["target_mask"].all())
    # off the log, the targets lead back to it: some now start sideways
    assert float(more["target"][:, 3, 1].abs().max()) > 0.2
    again = pt.collect_samples(scenes, pairs, {"warmup_ticks": 17}, ("ego_history", "route"), 20,
                               perturb_decisions=3, perturb_lateral_m=1.0, seed=0)
    assert torch.equal(again["target"], more["target"])  # seeded
