import json
import shutil
from pathlib import Path

import pytest
import torch

from alpagym_ray.policy import ActionSpec, PolicySpecMismatch
from learners.baselines import ConstantVelocityPolicy
from learners.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_optimizer_state,
    push_to_hub,
    read_checkpoint_config,
    save_checkpoint,
)
from learners.trajectory_policy import TrajectoryPolicy, TrajectoryPolicyConfig, build_policy

KEYS = ("ego_history", "route", "agents")


@pytest.fixture
def policy() -> TrajectoryPolicy:
    torch.manual_seed(0)
    p = TrajectoryPolicy(TrajectoryPolicyConfig(size="tiny", obs_keys=KEYS, num_anchors=8))
    with torch.no_grad():
        p.anchors.mul_(1.5)
    return p


def test_round_trip_is_bit_exact(tmp_path, policy, make_obs):
    path = save_checkpoint(policy, tmp_path / "ckpt", policy_version=7, provenance={"run": "test"})
    assert sorted(f.name for f in path.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["kind"] == "learners.trajectory_policy.TrajectoryPolicy"
    assert cfg["obs_keys"] == list(KEYS) and cfg["policy_version"] == 7
    spec = {"horizon": 20, "dt": 0.1, "features": ["x", "y", "yaw"], "frame": "ego_rear_axle"}
    assert cfg["action_spec"] == spec
    assert cfg["config"]["size"] == "tiny" and cfg["provenance"]["run"] == "test"
    assert cfg["num_parameters"] == sum(p.numel() for p in policy.parameters())
    # safetensors: an 8-byte header length then a JSON header; no pickle anywhere
    raw = (path / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert json.loads(raw[8 : 8 + n])["__metadata__"]["format"] == "alpagym-ray/policy-checkpoint"

    loaded = load_checkpoint(path)
    assert isinstance(loaded, TrajectoryPolicy) and loaded.config == policy.config
    assert loaded.checkpoint_info["policy_version"] == 7
    obs = make_obs(5, KEYS)
    a, lp, _ = policy.act(obs, torch.Generator().manual_seed(0))
    b, lq, _ = loaded.act(obs, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and torch.equal(lp, lq)
    assert torch.equal(policy.log_prob(obs, a), loaded.log_prob(obs, a))
    assert torch.equal(policy.anchors, loaded.anchors)


def test_baseline_round_trip(tmp_path):
    path = save_checkpoint(ConstantVelocityPolicy(horizon=30), tmp_path / "cv")
    loaded = load_checkpoint(path)
    assert isinstance(loaded, ConstantVelocityPolicy) and loaded.horizon == 30


def test_optimizer_state_round_trip(tmp_path, policy, make_obs):
    obs = make_obs(8, KEYS)
    action = policy.act(obs, torch.Generator().manual_seed(0))[0].detach()

    def step(p, opt):
        opt.zero_grad()
        (-p.log_prob(obs, action).mean()).backward()
        opt.step()

    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3, betas=(0.8, 0.95))
    for _ in range(3):
        step(policy, opt)
    path = save_checkpoint(policy, tmp_path / "c", optimizer=opt, trainer_state={"epoch": 3})
    assert (path / "optimizer.safetensors").is_file() and (path / "optimizer.json").is_file()
    restored = load_checkpoint(path)
    opt2 = torch.optim.AdamW(restored.parameters(), lr=0.5)
    assert load_optimizer_state(path, opt2) == {"epoch": 3}
    assert opt2.param_groups[0]["lr"] == 1e-3 and tuple(opt2.param_groups[0]["betas"]) == (0.8, 0.95)
    step(policy, opt)
    step(restored, opt2)
    for (n, p), q in zip(policy.named_parameters(), restored.parameters(), strict=True):
        assert torch.equal(p, q), n
    with pytest.raises(CheckpointError, match="not a SGD"):
        load_optimizer_state(path, torch.optim.SGD(restored.parameters(), lr=0.1))


def test_truncated_and_corrupt_files_fail_cleanly(tmp_path, policy):
    path = save_checkpoint(policy, tmp_path / "c")
    good = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: .*truncated"):
        load_checkpoint(path)
    flipped = bytearray(good)
    flipped[-5] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(path)
    (path / "model.safetensors").write_bytes(good)
    assert load_checkpoint(path) is not None
    text = (path / "config.json").read_text()
    (path / "config.json").write_text(text[:40])
    with pytest.raises(CheckpointError, match="config.json: unreadable JSON"):
        load_checkpoint(path)
    (path / "model.safetensors").unlink()
    (path / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no such directory, and not a Hub repo id"):
        load_checkpoint(tmp_path / "does" / "not" / "exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(empty)


def test_safetensors_that_do_not_fit_the_config(tmp_path, policy):
    path = save_checkpoint(policy, tmp_path / "c")
    cfg = json.loads((path / "config.json").read_text())
    cfg["config"]["num_anchors"] = 9
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not fit|size mismatch"):
        load_checkpoint(path)


def test_env_spec_mismatch_names_both_specs(tmp_path, policy):
    path = save_checkpoint(policy, tmp_path / "c")
    with pytest.raises(PolicySpecMismatch) as err:
        load_checkpoint(path, env_obs_keys=("ego_history", "route"), env_action_spec=ActionSpec(horizon=64))
    msg = str(err.value)
    assert "['agents'] are not provided" in msg and "action specs differ" in msg
    assert "obs_keys=['ego_history', 'route', 'agents']" in msg and "'horizon': 20" in msg
    assert "env:    obs_keys=['ego_history', 'route']" in msg and "'horizon': 64" in msg
    ok = load_checkpoint(path, env_obs_keys=(*KEYS, "map_points", "gt_trajectory"),
                         env_action_spec=ActionSpec(horizon=20))
    assert ok.obs_keys == KEYS


def _hub_cache(tmp_path: Path, src: Path, repo: str = "org/driver", rev: str = "0" * 40) -> Path:
    """The Hugging Face Hub cache layout: models--org--name/{refs/main, snapshots/<rev>/...}."""
    cache = tmp_path / "hub"
    root = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(src, root / "snapshots" / rev)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(rev)
    return cache


def test_load_from_a_hub_cache(tmp_path, policy, make_obs, monkeypatch):
    src = save_checkpoint(policy, tmp_path / "c")
    cache = _hub_cache(tmp_path, src)
    loaded = load_checkpoint("org/driver", cache_dir=cache, local_files_only=True)
    obs = make_obs(3, KEYS)
    assert torch.equal(policy.act(obs, deterministic=True)[0], loaded.act(obs, deterministic=True)[0])
    # HF_HUB_OFFLINE is honoured when local_files_only is not given
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load_checkpoint("org/driver", cache_dir=cache).config == policy.config
    with pytest.raises(CheckpointError, match="Hugging Face Hub lookup failed"):
        load_checkpoint("org/other", cache_dir=cache)
    # the Hydra builder takes the same ids
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    built = build_policy(size="tiny", obs_keys=list(KEYS), num_anchors=8, model={"path": "org/driver"})
    assert built.config.num_anchors == 8


class FakeHfApi:
    """Records calls instead of talking to a server (never the network)."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))

    def upload_folder(self, **kw):
        files = sorted(p.name for p in Path(kw["folder_path"]).iterdir())
        self.calls.append(("upload_folder", kw, files))
        return "commit-1"


def test_push_to_hub_with_a_mocked_api(tmp_path, policy):
    opt = torch.optim.Adam(policy.parameters())
    path = save_checkpoint(policy, tmp_path / "c", optimizer=opt)
    api = FakeHfApi()
    assert push_to_hub(path, "org/driver", api=api, private=True) == "commit-1"
    (name, repo, kw), (name2, up, files) = api.calls
    assert (name, repo, kw["private"], kw["exist_ok"]) == ("create_repo", "org/driver", True, True)
    assert name2 == "upload_folder" and up["repo_id"] == "org/driver" and up["folder_path"] == str(path)
    assert "optimizer.safetensors" in up["ignore_patterns"] and "optimizer.json" in up["ignore_patterns"]
    assert "config.json" in files and "model.safetensors" in files
    # what the Hub then serves (no optimizer files) still loads
    served = tmp_path / "served"
    served.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(path / f, served / f)
    assert load_checkpoint(served).config == policy.config
    with pytest.raises(CheckpointError, match="no optimizer state"):
        load_optimizer_state(served, opt)
    with pytest.raises(CheckpointError, match="not a repo id"):
        push_to_hub(path, "not a repo", api=api)
    (path / "model.safetensors").write_bytes(b"broken")
    with pytest.raises(CheckpointError):
        push_to_hub(path, "org/driver", api=api)


def test_build_policy_from_checkpoint_checks_interface(tmp_path, policy):
    path = save_checkpoint(policy, tmp_path / "c")
    with pytest.warns(UserWarning, match="architecture comes from the checkpoint"):
        p = build_policy(size="default", obs_keys=list(KEYS), num_anchors=8, model={"path": str(path)},
                         deterministic=True)
    assert p.config.size == "tiny" and p.deterministic
    with pytest.raises(ValueError, match="reads obs_keys"):
        build_policy(size="tiny", obs_keys=["ego_history", "route"], num_anchors=8, model={"path": str(path)})


def test_read_config_without_verification(tmp_path, policy):
    path = save_checkpoint(policy, tmp_path / "c")
    (path / "model.safetensors").write_bytes(b"x")
    assert read_checkpoint_config(path, verify=False)["kind"].endswith("TrajectoryPolicy")
