"""cluster.yaml: Ray's own cluster-config validation, and what the project needs from it (GPU node
types that fit the `cluster` topology, setup that installs the synced project, start commands)."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "cluster.yaml"
CLUSTER_TOPOLOGY = ROOT / "alpagym_ray" / "conf" / "topology" / "cluster.yaml"

# vCPUs and GPUs of the EC2 instance types the config may use (AWS instance-type pages)
INSTANCE_TYPES = {
    "m6i.4xlarge": (16, 0), "m6i.8xlarge": (32, 0), "m5.4xlarge": (16, 0),
    "g5.2xlarge": (8, 1), "g5.12xlarge": (48, 4), "g5.48xlarge": (192, 8),
    "g6.12xlarge": (48, 4), "p4d.24xlarge": (96, 8), "p5.48xlarge": (192, 8),
}


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)  # what `ray up` runs before touching the cloud
    return config


def test_ray_validation_passes_and_keeps_our_fields(raw, prepared):
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] == raw["head_node_type"] == "head"
    # prepare_config fills defaults but must not replace what we set
    assert prepared["setup_commands"][: len(raw["setup_commands"])] == raw["setup_commands"]
    assert prepared["head_start_ray_commands"] == raw["head_start_ray_commands"]
    assert prepared["file_mounts"] == {"~/alpagym-ray": "."}


@pytest.mark.parametrize("breakage, error, match", [
    ("unknown_key", jsonschema.ValidationError, "'setup_comands' was unexpected"),
    ("head_not_a_node_type", ValueError, "head_node_type` must be one of"),
    ("min_workers_over_max", ValueError, "smaller than the sum of `min_workers`"),
])
def test_ray_validation_rejects_broken_variants(raw, breakage, error, match):
    """The same validation path fails on a broken copy, so the test above can fail."""
    config = copy.deepcopy(raw)
    if breakage == "unknown_key":
        config["setup_comands"] = ["pip install -e ."]
    elif breakage == "head_not_a_node_type":
        config["head_node_type"] = "no_such_type"
    else:
        config["available_node_types"]["rollout_gpu"]["min_workers"] = config["max_workers"] + 1
        config["available_node_types"]["rollout_gpu"]["max_workers"] = config["max_workers"] + 1
    with pytest.raises(error, match=match):
        validate_config(prepare_config(config))


def test_node_types_declare_the_resources_of_their_instance_types(prepared):
    gpu_types = 0
    for name, node_type in prepared["available_node_types"].items():
        instance = node_type["node_config"]["InstanceType"]
        assert instance in INSTANCE_TYPES, f"{name}: unknown instance type {instance}"
        cpus, gpus = INSTANCE_TYPES[instance]
        assert node_type["resources"].get("CPU") == cpus, name
        assert node_type["resources"].get("GPU", 0) == gpus, name
        assert node_type["node_config"]["ImageId"], name
        gpu_types += gpus > 0
    assert gpu_types >= 1
    assert prepared["available_node_types"]["head"]["resources"]["GPU"] == 0


def test_cluster_topology_fits_the_gpu_node_types(prepared):
    """Every actor of topology=cluster fits on one node type, and all of them fit at max scale."""
    topo = yaml.safe_load(CLUSTER_TOPOLOGY.read_text())
    actors = ([(topo["rollout_cpus"], topo["rollout_gpus"])] * topo["num_rollout_workers"]
              + [(topo["learner_cpus"], 1)] * topo["num_learners"])
    workers = {n: t for n, t in prepared["available_node_types"].items() if n != prepared["head_node_type"]}
    for cpus, gpus in actors:
        assert any(t["resources"]["CPU"] >= cpus and t["resources"]["GPU"] >= gpus for t in workers.values())
    # first-fit packing into the largest allowed fleet (per-type and global max_workers)
    nodes = []
    for t in sorted(workers.values(), key=lambda t: -t["resources"]["GPU"]):
        nodes += [dict(t["resources"]) for _ in range(t["max_workers"])]
    nodes = nodes[: prepared["max_workers"]]
    for cpus, gpus in actors:
        node = next((n for n in nodes if n["CPU"] >= cpus and n["GPU"] >= gpus), None)
        assert node is not None, f"no room for an actor of {cpus} CPU / {gpus} GPU"
        node["CPU"] -= cpus
        node["GPU"] -= gpus
    assert sum(min(t["min_workers"], t["max_workers"]) for t in workers.values()) <= prepared["max_workers"]


def test_setup_installs_the_synced_project_with_the_image_torch(raw):
    remote = next(iter(raw["file_mounts"]))
    assert raw["file_mounts"][remote] == "."             # the repository root, synced by `ray up`
    assert ".gitignore" in raw["rsync_filter"]            # .venv/ and runs/ stay local
    setup = raw["setup_commands"]
    install = [c for c in setup if re.search(r"\bpip install\b.*\s-e\s+" + re.escape(remote) + r"\b", c)]
    assert len(install) == 1, setup
    # the install is constrained to the torch already in the image (a CUDA build), written just before
    constraint = re.search(r"-c\s+(\S+)", install[0]).group(1)
    writer = setup[setup.index(install[0]) - 1]
    assert "torch.__version__" in writer and writer.rstrip().endswith(f"> {constraint}")
    # the venv holding the image's torch is activated before anything uses python or pip
    activate = next(i for i, c in enumerate(setup) if "bin/activate" in c)
    assert activate < setup.index(writer)


def test_start_commands_start_a_head_and_join_it(raw):
    head = " ".join(raw["head_start_ray_commands"])
    worker = " ".join(raw["worker_start_ray_commands"])
    assert "ray start --head" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "--dashboard-host=127.0.0.1" in head          # the Jobs API is reached through `ray dashboard`
    port = re.search(r"--head --port=(\d+)", head).group(1)
    assert f"--address=$RAY_HEAD_IP:{port}" in worker
    assert "--head" not in worker


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_every_command_is_valid_bash(prepared):
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    commands = [c for k in keys for c in prepared.get(k, [])]
    assert len(commands) >= 6
    for command in commands:
        result = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert result.returncode == 0, f"{command!r}: {result.stderr}"
