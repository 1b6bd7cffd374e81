from pathlib import Path

import pytest
import yaml

from alpagym_ray.train_loop import check_resources, resource_demand

TOPOLOGIES = Path(__file__).resolve().parents[2] / "alpagym_ray" / "conf" / "topology"


def preset(name: str) -> dict:
    return yaml.safe_load((TOPOLOGIES / f"{name}.yaml").read_text())


def test_resource_demand_adds_workers_and_learner_ranks():
    topo = {"num_rollout_workers": 4, "rollout_cpus": 1, "rollout_gpus": 0.125, "num_learners": 2,
            "learner_cpus": 2, "learner_gpus": 0.5, "learner_use_gpu": True}
    assert resource_demand(topo) == {"CPU": 8.0, "GPU": 1.5}
    assert resource_demand({**topo, "learner_use_gpu": False})["GPU"] == 0.5


def test_a_topology_larger_than_a_fixed_cluster_is_an_error_naming_the_keys():
    """Ray would wait forever for the missing GPUs (seen with 4 workers x 1/4 GPU beside a 1/2 GPU
    learner on one GPU); the error says how much is missing and which keys to lower."""
    topo = {**preset("1gpu"), "rollout_gpus": 0.25}
    with pytest.raises(ValueError, match=r"1\.5 GPUs but the cluster has 1.*topology\.rollout_gpus"):
        check_resources(topo, {"CPU": 16.0, "GPU": 1.0}, can_grow=False)
    warning = check_resources(topo, {"CPU": 16.0, "GPU": 1.0}, can_grow=True)
    assert warning is not None and "waiting for the cluster to grow" in warning
    assert check_resources(preset("1gpu"), {"CPU": 16.0, "GPU": 1.0}, can_grow=False) is None


def test_presets_fit_the_machines_they_are_for():
    """1gpu: one GPU and an 8-core workstation; local_cpu: the 2-core CI machine; only the cluster
    preset expects an autoscaler."""
    assert check_resources(preset("1gpu"), {"CPU": 8.0, "GPU": 1.0}, can_grow=False) is None
    assert check_resources(preset("local_cpu"), {"CPU": 2.0}, can_grow=False) is None
    assert [p.stem for p in sorted(TOPOLOGIES.glob("*.yaml")) if preset(p.stem)["autoscaling"]] == ["cluster"]
