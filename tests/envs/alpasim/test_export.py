"""``alpagym-ray export``: the checkpoint, the AlpaSim driver config and the README; the exported config
starts ``alpagym-ray serve-driver``; drivesim-only policies are refused; the CLIs' bad input."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch
import yaml

from alpagym_ray.commands import export as export_cmd
from alpagym_ray.commands import serve_driver as serve_cmd
from envs.alpasim import messages as m
from envs.alpasim.export import ExportError, ExportSettings

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from learners.checkpoint import save_checkpoint
    from learners.trajectory_policy import TrajectoryPolicy, TrajectoryPolicyConfig

    torch.manual_seed(0)
    policy = TrajectoryPolicy(TrajectoryPolicyConfig(obs_keys=("ego_history", "route"), size="tiny"))
    opt = torch.optim.Adam(policy.parameters())
    return save_checkpoint(policy, tmp_path_factory.mktemp("ckpt") / "ckpt", policy_version=7, optimizer=opt)


def test_export_writes_checkpoint_config_and_readme(checkpoint, tmp_path, capsys):
    from learners.checkpoint import load_checkpoint

    out = tmp_path / "export"
    rc = export_cmd.main(["--checkpoint", str(checkpoint), "--out", str(out), "--scene-ids",
                          "clipgt-aaa,clipgt-bbb", "--port", "7001", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == ["config.json", "model.safetensors"]
    policy = load_checkpoint(out / "checkpoint")                      # loads without the optimizer files
    assert policy.obs_keys == ("ego_history", "route")
    config = yaml.safe_load((out / "driver.yaml").read_text())
    assert config["model"] == {"model_type": "alpagym_ray", "checkpoint_path": str(out / "checkpoint"),
                               "device": "cpu"}
    assert config["host"] == "127.0.0.1" and config["port"] == 7001
    assert config["inference"]["deterministic"] is True
    readme = (out / "README.md").read_text()
    assert f"alpagym-ray serve-driver --config {out / 'driver.yaml'}" in readme
    assert f"--checkpoint {out / 'checkpoint'} --host 127.0.0.1 --port 7001 --device cpu" in readme
    for word in ("alpasim_wizard", "+deploy=local", "topology=1gpu", "driver_source=external",
                 "'scenes.scene_ids=[clipgt-aaa,clipgt-bbb]'", "policy_version 7", "127.0.0.1:7001", "--simulate"):
        assert word in readme, word
    settings = serve_cmd.read_driver_config(out / "driver.yaml")
    assert settings["checkpoint"] == str(out / "checkpoint") and settings["port"] == 7001
    assert settings["sample"] is False
    # an existing export is kept unless --force
    assert export_cmd.main(["--checkpoint", str(checkpoint), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert export_cmd.main(["--checkpoint", str(checkpoint), "--out", str(out), "--force"]) == 0


def test_export_refuses_drivesim_only_policies(tmp_path, capsys):
    from learners.checkpoint import save_checkpoint
    from learners.trajectory_policy import TrajectoryPolicy, TrajectoryPolicyConfig

    ckpt = save_checkpoint(TrajectoryPolicy(TrajectoryPolicyConfig(obs_keys=("ego_history", "route", "map_points"),
                                                                   size="tiny")), tmp_path / "priv")
    assert export_cmd.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "['map_points']" in err and "only drivesim provides" in err
    assert not (tmp_path / "x").exists()
    # serve-driver refuses it too, before loading any weights
    assert serve_cmd.main(["--checkpoint", str(ckpt), "--port", "0"]) == 2
    assert "['map_points']" in capsys.readouterr().err


def test_export_and_driver_config_bad_input(tmp_path, capsys):
    assert export_cmd.main(["--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "missing" in capsys.readouterr().err
    with pytest.raises(ExportError, match="scene ids"):
        ExportSettings(scene_ids=("a b",))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {model_type: other, checkpoint_path: x}\n")
    with pytest.raises(ValueError, match="model_type"):
        serve_cmd.read_driver_config(bad)
    bad.write_text("model: {model_type: alpagym_ray, checkpoint_path: x}\nprot: 5\n")
    with pytest.raises(ValueError, match=r"unknown keys \['prot'\]"):
        serve_cmd.read_driver_config(bad)
    assert serve_cmd.main([]) == 2
    assert "--checkpoint" in capsys.readouterr().err


def _wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return int(path.read_text())
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode}: {proc.stderr.read()}")
        time.sleep(0.1)
    raise AssertionError(f"{path} not written within {timeout} s")


def _cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "alpagym_ray.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_exported_config_serves_and_shuts_down(checkpoint, tmp_path):
    out = tmp_path / "export"
    assert export_cmd.main(["--checkpoint", str(checkpoint), "--out", str(out), "--port", "0"]) == 0
    port_file = tmp_path / "port"
    proc = _cli("serve-driver", "--config", str(out / "driver.yaml"), "--port-file", str(port_file))
    try:
        port = _wait_for_file(port_file, proc)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = m.egodriver_stub(channel)
            version = stub.get_version(m.Empty(), timeout=30)
            assert "TrajectoryPolicy" in version.version_id and "policy_version 7" in version.version_id
            stub.shut_down(m.Empty(), timeout=30)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_runtime_cli_serves_and_shuts_down(tmp_path):
    from envs.drivesim.generate import small_scene_set

    small_scene_set(tmp_path / "scenes", n=2)
    port_file, yaml_file = tmp_path / "port", tmp_path / "run" / "generated-runtime-server.yaml"
    proc = _cli("alpasim-runtime", "--scenes", str(tmp_path / "scenes"), "--port-file", str(port_file),
                "--server-yaml", str(yaml_file), "--control-step-us", "100000")
    try:
        port = _wait_for_file(port_file, proc)
        assert yaml.safe_load(yaml_file.read_text()) == {"host": "127.0.0.1", "port": port}
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = m.runtime_stub(channel)
            assert len(stub.get_runtime_info(m.Empty(), timeout=30).scenes) == 2
            stub.shut_down(m.Empty(), timeout=30)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_runtime_cli_simulate_checks_a_driver(tmp_path, capsys):
    import json

    from alpagym_ray.commands import alpasim_runtime
    from envs.alpasim.driver_server import DriverServer
    from envs.drivesim.generate import small_scene_set
    from learners.baselines import ConstantVelocityPolicy

    ids = small_scene_set(tmp_path / "scenes", n=2).ids
    driver = DriverServer(ConstantVelocityPolicy())
    port = driver.start()
    try:
        rc = alpasim_runtime.main(["--scenes", str(tmp_path / "scenes"), "--driver", f"127.0.0.1:{port}",
                                   "--simulate", ",".join(ids), "--rollouts", "2", "--max-steps", "4",
                                   "--camera-px", "0", "--log-level", "WARNING"])
    finally:
        driver.stop()
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    lines = [json.loads(x) for x in out if x.startswith("{")]
    assert [x["scene_id"] for x in lines] == [ids[0], ids[0], ids[1], ids[1]]
    assert all(x["success"] and 0 <= x["episode_metrics"]["scene_score"] <= 1 for x in lines)
    assert alpasim_runtime.main(["--scenes", str(tmp_path / "scenes"), "--simulate", ids[0]]) == 2
    assert "--driver" in capsys.readouterr().err


def test_runtime_cli_bad_input(tmp_path, capsys):
    from alpagym_ray.commands import alpasim_runtime

    assert alpasim_runtime.main(["--scenes", str(tmp_path), "--control-step-us", "150000"]) == 2
    assert "multiple of 100000" in capsys.readouterr().err
    assert alpasim_runtime.main(["--scenes", str(tmp_path / "none")]) == 2
    assert "not a scene set" in capsys.readouterr().err
