"""The cluster YAMLs parse and say what cluster/README.md says they do."""

import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
DOCKERFILE = (CLUSTER / "Dockerfile").read_text()
IMAGE_WORKDIR = re.search(r"^WORKDIR (\S+)", DOCKERFILE, re.M).group(1)


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
    python, script = spec["entrypoint"].split()[:2]
    assert python == "python" and script == f"{IMAGE_WORKDIR}/ray_jobs/generate.py"
    assert (REPO / "ray_jobs" / "generate.py").is_file() and "COPY --chown=ray:users ray_jobs" in DOCKERFILE
    assert "runtimeEnvYAML" not in spec or "archive/main" not in spec["runtimeEnvYAML"]
    assert "--tasks" in spec["entrypoint"] and "--out" in spec["entrypoint"]
    assert spec["rayClusterSpec"]["enableInTreeAutoscaling"] is True
    assert _gpu_groups(spec["rayClusterSpec"])


def _images(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "image" and isinstance(value, str):
                yield value
            else:
                yield from _images(value)
    elif isinstance(node, list):
        for value in node:
            yield from _images(value)


def test_one_ray_version_everywhere():
    import ray

    pinned = [d for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
              if d.startswith("ray")]
    assert pinned == [f"ray[default]=={ray.__version__}"]
    base = re.search(r"^FROM (\S+)", DOCKERFILE, re.M).group(1)
    assert base.startswith(f"rayproject/ray:{ray.__version__}-")
    assert f'"ray[default]=={ray.__version__}"' in DOCKERFILE
    assert load("kuberay-raycluster.yaml")["spec"]["rayVersion"] == ray.__version__
    assert load("kuberay-rayjob.yaml")["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__


def test_base_image_is_the_current_official_gpu_form():
    base = re.search(r"^FROM (\S+)", DOCKERFILE, re.M).group(1)
    assert re.fullmatch(r"rayproject/ray:\d+\.\d+\.\d+-py3\d+-cu12\d", base), base


def test_every_cluster_file_runs_the_cosed_image_and_no_ray_ml():
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    images = {image for name in ("ray-cluster.yaml", "kuberay-raycluster.yaml", "kuberay-rayjob.yaml")
              for image in _images(load(name))}
    assert images == {f"REGISTRY/cosed:{version}"}
    assert not any("ray-ml" in (CLUSTER / name).read_text() for name in ("ray-cluster.yaml", "kuberay-raycluster.yaml",
                                                                        "kuberay-rayjob.yaml", "README.md"))
    assert not load("ray-cluster.yaml")["setup_commands"]  # nothing unpinned installed at node start


def test_gpu_workers_have_room_for_the_pools():
    """A single-GPU worker hosts the sd, video and clip actors (num_cpus 1 each) and loads their weights."""
    from cosed.config import RayConfig

    pools = RayConfig()
    cpus_needed = sum(1 for _ in (pools.sd, pools.video, pools.clip))
    for name in ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml"):
        spec = load(name)["spec"]
        spec = spec.get("rayClusterSpec", spec)
        for group in _gpu_groups(spec):
            limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert int(limits["cpu"]) >= cpus_needed and int(limits["memory"].rstrip("Gi")) >= 32
    for node in load("ray-cluster.yaml")["available_node_types"].values():
        if node["resources"].get("GPU"):
            assert node["resources"]["CPU"] >= cpus_needed


def test_runtime_env_installs_what_pyproject_needs():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    env = load("runtime_env.yaml")
    assert env["working_dir"] == "." and env["pip"] == [d for d in deps if not d.startswith("ray")]
