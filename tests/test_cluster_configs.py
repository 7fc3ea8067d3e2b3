"""The cluster YAMLs parse and say what cluster/README.md says they do."""

from pathlib import Path

import yaml

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"


def load(name):
    return yaml.safe_load((CLUSTER / name).read_text())


def test_cluster_launcher_has_an_autoscaling_gpu_worker_type():
    config = load("ray-cluster.yaml")
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers",
                "idle_timeout_minutes"):
        assert key in config
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu and all(t["min_workers"] <= t["max_workers"] and t["max_workers"] >= 2 for t in gpu)
    assert config["idle_timeout_minutes"] > 0


def _gpu_groups(cluster_spec):
    groups = cluster_spec["workerGroupSpecs"]
    return [g for g in groups
            if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")]


def test_kuberay_raycluster_autoscales_a_gpu_group():
    config = load("kuberay-raycluster.yaml")
    assert config["kind"] == "RayCluster" and config["apiVersion"].startswith("ray.io/")
    spec = config["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    (group,) = _gpu_groups(spec)
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_kuberay_rayjob_runs_the_generate_entry_point():
    config = load("kuberay-rayjob.yaml")
    assert config["kind"] == "RayJob"
    spec = config["spec"]
    assert spec["entrypoint"].split()[:2] == ["python", "ray_jobs/generate.py"]
    assert (Path(__file__).resolve().parent.parent / "ray_jobs" / "generate.py").is_file()
    assert "--tasks" in spec["entrypoint"] and "--out" in spec["entrypoint"]
    assert spec["rayClusterSpec"]["enableInTreeAutoscaling"] is True
    assert _gpu_groups(spec["rayClusterSpec"])
