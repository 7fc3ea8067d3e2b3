"""The cluster files: checked against the schemas KubeRay and Ray publish, against each other and the READMEs.

KubeRay's CRDs come from ../shared/data/kuberay (the team's workspace); Ray's launcher schema and config
validation, RuntimeEnv and CLI come from the installed Ray; cosed's CLI from cosed.cli.
"""

import copy
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from cosed.cuda_compat import min_driver

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
DOCKERFILE = (CLUSTER / "Dockerfile").read_text()
IMAGE_WORKDIR = re.search(r"^WORKDIR (\S+)", DOCKERFILE, re.M).group(1)
BASE_IMAGE = re.search(r"^FROM (\S+)", DOCKERFILE, re.M).group(1)
KUBERAY_CRDS = REPO.parent / "shared" / "data" / "kuberay"
READMES = [REPO / "README.md", CLUSTER / "README.md", *sorted((REPO / "docs").glob("*.md"))]
KUBERAY_FILES = ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml")  # kuberay-serviceaccount.yaml: a plain ServiceAccount
DLAMI_PARAMETER = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
# The GPU node the KubeRay worker pods are sized for (cluster/README.md: a g5.2xlarge-class node).
GPU_NODE_CPUS, GPU_NODE_MEMORY_GI = 8, 32


def load(name):
    return yaml.safe_load((CLUSTER / name).read_text())


def cluster_spec(name):
    spec = load(name)["spec"]
    return spec.get("rayClusterSpec", spec)


def image_cuda(image: str) -> str:
    """``rayproject/ray:2.60.0-py311-cu130`` -> ``"13.0"``."""
    digits = re.search(r"-cu(\d+)$", image).group(1)
    return f"{digits[:-1]}.{digits[-1]}"


def needs_kuberay_crds():
    return pytest.mark.skipif(not (KUBERAY_CRDS / "ray.io_rayclusters.yaml").is_file(),
                              reason=f"KubeRay's published CRDs are not at {KUBERAY_CRDS} "
                                     "(only the team's workspace has ../shared)")


# --- what the files say -------------------------------------------------------------------------

def test_cluster_launcher_has_an_autoscaling_gpu_worker_type():
    config = load("ray-cluster.yaml")
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers",
                "idle_timeout_minutes"):
        assert key in config
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu and all(t["min_workers"] <= t["max_workers"] and t["max_workers"] >= 2 for t in gpu)
    assert all(t["resources"]["CPU"] >= 3 for t in gpu)   # the sd, video and clip actors of one GPU (1 CPU each)
    assert config["idle_timeout_minutes"] > 0


def _gpu_groups(spec):
    groups = spec["workerGroupSpecs"]
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
    assert BASE_IMAGE.startswith(f"rayproject/ray:{ray.__version__}-")
    assert f'"ray[default]=={ray.__version__}"' in DOCKERFILE
    for name in KUBERAY_FILES:
        assert cluster_spec(name)["rayVersion"] == ray.__version__


def test_base_image_is_the_current_official_gpu_form():
    assert re.fullmatch(r"rayproject/ray:\d+\.\d+\.\d+-py3\d+-cu1\d\d", BASE_IMAGE), BASE_IMAGE


SUBSTITUTED = ("COSED_IMAGE", "COSED_REGISTRY", "COSED_BUCKET")


def envsubst(text: str, values: dict[str, str]) -> str:
    """What `envsubst '$COSED_IMAGE $COSED_REGISTRY $COSED_BUCKET'` does: those three names only."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m[1] or m[2], m[0])
                  if (m[1] or m[2]) in SUBSTITUTED else m[0], text)


def test_every_cluster_file_runs_the_cosed_image_named_by_one_variable_and_no_ray_ml():
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    images = {image for name in ("ray-cluster.yaml", *KUBERAY_FILES) for image in _images(load(name))}
    assert images == {"${COSED_IMAGE}"}  # no tracked file is edited to name the image: envsubst fills it
    readme = (CLUSTER / "README.md").read_text()
    assert f"export COSED_IMAGE=$COSED_REGISTRY/cosed:{version}" in readme
    assert "export FILL='$COSED_IMAGE $COSED_REGISTRY $COSED_BUCKET'" in readme and 'envsubst "$FILL"' in readme
    values = {"COSED_IMAGE": f"r.example/cosed:{version}", "COSED_REGISTRY": "r.example", "COSED_BUCKET": "b"}
    for name in ("ray-cluster.yaml", *KUBERAY_FILES):
        filled = envsubst((CLUSTER / name).read_text(), values)
        assert {image for image in _images(yaml.safe_load(filled))} == {f"r.example/cosed:{version}"}
        assert "${COSED_" not in filled
    assert "$RAY_HEAD_IP" in envsubst((CLUSTER / "ray-cluster.yaml").read_text(), values)  # the rest untouched
    assert not any("ray-ml" in (CLUSTER / name).read_text() for name in ("ray-cluster.yaml", *KUBERAY_FILES,
                                                                        "README.md"))
    assert not load("ray-cluster.yaml")["setup_commands"]  # nothing unpinned installed at node start


# --- one GPU stack: image CUDA = torch's CUDA, minimum driver stated ------------------------------

def test_the_images_cuda_is_the_cuda_of_the_pinned_torch():
    """The Dockerfile pins torch; the installed torch is that same PyPI build, so its CUDA is the image's."""
    import torch

    (pinned,) = re.findall(r'"torch==([^"]+)"', DOCKERFILE)
    assert torch.__version__.split("+")[0] == pinned
    if torch.version.cuda is None:
        pytest.skip("this torch is a CPU-only build: nothing to compare with the image's CUDA")
    assert torch.version.cuda == image_cuda(BASE_IMAGE), (torch.version.cuda, BASE_IMAGE)
    assert image_cuda("rayproject/ray:2.60.0-py311-cu128") == "12.8"


def test_the_gpu_stack_and_its_minimum_driver_are_stated_the_same_everywhere():
    driver = min_driver(image_cuda(BASE_IMAGE))
    assert driver
    assert f"driver >= {driver}" in DOCKERFILE
    readme = (CLUSTER / "README.md").read_text().replace("≥", ">=")
    assert BASE_IMAGE in readme and f"driver >= {driver}" in readme
    for name in ("runtime_env.yaml", "ray-cluster.yaml", *KUBERAY_FILES):
        text = (CLUSTER / name).read_text()
        assert BASE_IMAGE in text, name
        assert not re.search(r"rayproject/ray:[\w.-]+", text.replace(BASE_IMAGE, "")), name
    assert f"driver must be >= {driver}" in (CLUSTER / "ray-cluster.yaml").read_text()


def test_dockerfile_installs_as_the_image_user_and_smoke_tests_the_installed_package():
    lines = DOCKERFILE.splitlines()
    workdir = lines.index(f"WORKDIR {IMAGE_WORKDIR}")
    assert f"RUN mkdir -p {IMAGE_WORKDIR}" in lines[:workdir]   # created by the image's user, not root
    assert not re.search(r"^USER root", DOCKERFILE, re.M)
    smoke = DOCKERFILE[DOCKERFILE.index("RUN cd /tmp"):]
    assert "site-packages" in smoke and "torch.version.cuda" in smoke and "CUDA_VERSION" in smoke


# --- KubeRay: the published CRDs ------------------------------------------------------------------

def crd_schema(filename: str, version: str = "v1") -> dict:
    crd = yaml.safe_load((KUBERAY_CRDS / filename).read_text())
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return served["schema"]["openAPIV3Schema"]


def unknown_fields(instance, schema: dict, path: str = "") -> list[str]:
    """Fields the schema does not declare: kubectl's default strict field validation rejects them,
    where a plain JSON-schema check (which allows extra keys) would not notice a misspelt field."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(instance, dict):
        declared, extra = schema.get("properties"), schema.get("additionalProperties")
        problems = []
        for key, value in instance.items():
            if declared is not None and key in declared:
                problems += unknown_fields(value, declared[key], f"{path}/{key}")
            elif isinstance(extra, dict):
                problems += unknown_fields(value, extra, f"{path}/{key}")
            elif declared is not None and extra is not True:
                problems.append(f"{path}/{key}: unknown field")
        return problems
    if isinstance(instance, list) and isinstance(schema.get("items"), dict):
        return [p for i, value in enumerate(instance) for p in unknown_fields(value, schema["items"], f"{path}/{i}")]
    return []


def schema_problems(instance, schema: dict) -> list[str]:
    import jsonschema

    found = [f"/{'/'.join(map(str, e.absolute_path))}: {e.message}"
             for e in jsonschema.Draft7Validator(schema).iter_errors(instance)]
    return found + unknown_fields(instance, schema)


@needs_kuberay_crds()
@pytest.mark.parametrize("name, crd", [("kuberay-raycluster.yaml", "ray.io_rayclusters.yaml"),
                                       ("kuberay-rayjob.yaml", "ray.io_rayjobs.yaml")])
def test_kuberay_manifests_validate_against_the_published_crds(name, crd):
    assert schema_problems(load(name), crd_schema(crd)) == []


@needs_kuberay_crds()
def test_the_crd_check_catches_misspelt_fields_wrong_types_and_bad_enums():
    schema = crd_schema("ray.io_rayclusters.yaml")
    misspelt = load("kuberay-raycluster.yaml")
    misspelt["spec"]["authOption"] = misspelt["spec"].pop("authOptions")
    assert schema_problems(misspelt, schema) == ["/spec/authOption: unknown field"]
    wrong = load("kuberay-raycluster.yaml")
    wrong["spec"]["workerGroupSpecs"][0]["replicas"] = "one"
    wrong["spec"]["authOptions"]["mode"] = "tokens"
    problems = schema_problems(wrong, schema)
    assert any("replicas" in p for p in problems) and any("tokens" in p for p in problems)
    deep = load("kuberay-raycluster.yaml")
    deep["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["envFrom"][0]["secretRefs"] = {}
    assert any("secretRefs: unknown field" in p for p in schema_problems(deep, schema))


def test_kuberay_token_auth_is_on_with_the_secret_the_readme_creates():
    secrets = {cluster_spec(name)["authOptions"]["secretName"] for name in KUBERAY_FILES}
    for name in KUBERAY_FILES:
        assert cluster_spec(name)["authOptions"]["mode"] == "token"
    (secret,) = secrets
    readme = (CLUSTER / "README.md").read_text()
    assert f"kubectl create secret generic {secret} --from-literal=auth_token=" in readme
    assert f"kubectl get secret {secret} -o jsonpath='{{.data.auth_token}}'" in readme


def _containers(spec):
    yield "head", spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    for group in _gpu_groups(spec):
        yield group["groupName"], group["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("name", KUBERAY_FILES)
def test_kuberay_pods_get_the_s3_and_model_secrets(name):
    readme = (CLUSTER / "README.md").read_text()
    for _, container in _containers(cluster_spec(name)):
        refs = {ref["secretRef"]["name"] for ref in container["envFrom"]}
        assert {"cosed-s3", "cosed-hf"} <= refs
    assert "kubectl create secret generic cosed-s3" in readme
    assert "kubectl create secret generic cosed-hf --from-literal=HF_TOKEN=" in readme


@pytest.mark.parametrize("name", KUBERAY_FILES)
def test_kuberay_gpu_pods_fit_their_node_with_room_for_the_kubelet(name):
    from cosed.config import RayConfig

    pools = RayConfig()
    cpus_needed = sum(1 for _ in (pools.sd, pools.video, pools.clip))
    for group in _gpu_groups(cluster_spec(name)):
        resources = group["template"]["spec"]["containers"][0]["resources"]
        requests, limits = resources["requests"], resources["limits"]
        assert requests == limits  # what the scheduler reserves is what the pod may use
        cpus, memory = float(requests["cpu"]), float(requests["memory"].removesuffix("Gi"))
        assert cpus_needed <= cpus <= GPU_NODE_CPUS - 0.5
        assert 24 <= memory <= 0.85 * GPU_NODE_MEMORY_GI
    assert "g5.2xlarge" in (CLUSTER / "README.md").read_text()


# --- KubeRay pods sized for their models; drivers and writers off the head -------------------------

GFD_DRIVER_LABELS = {"nvidia.com/cuda.driver-version.major", "nvidia.com/cuda.driver.major"}  # current, deprecated
SCRATCH_GI = 8  # ephemeral storage beyond the model cache: logs, /tmp/ray, spilled objects


def gibibytes(quantity: str) -> float:
    return float(quantity.removesuffix("Gi")) if quantity.endswith("Gi") else float(quantity.removesuffix("G")) / 1.073741824


def _profile_of(group) -> str:
    return group["template"]["metadata"]["annotations"]["cosed.io/profile"]


@pytest.mark.parametrize("name", KUBERAY_FILES)
def test_kuberay_gpu_pods_cache_their_models_on_a_volume_sized_for_their_profile(name):
    from cosed.models.profiles import profile_data

    spec = cluster_spec(name)
    hf_home = re.search(r"^ENV HF_HOME=(\S+)", DOCKERFILE, re.M).group(1)
    for group in _gpu_groups(spec):
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        download = profile_data(_profile_of(group))["download_gib"]
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == hf_home]
        assert _env(container)["HF_HOME"] == hf_home
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        cache = gibibytes(volume["emptyDir"]["sizeLimit"])
        assert cache >= 1.25 * download, (cache, download)  # room for the download, never the container's layer
        resources = container["resources"]
        assert resources["requests"]["ephemeral-storage"] == resources["limits"]["ephemeral-storage"]
        assert gibibytes(resources["requests"]["ephemeral-storage"]) >= cache + SCRATCH_GI
        assert pod["securityContext"]["fsGroup"] == 100  # the image's user can write the volume
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
    assert head["requests"]["ephemeral-storage"] == head["limits"]["ephemeral-storage"]
    if "entrypoint" in load(name)["spec"]:  # the RayJob's profile is the one its cache is sized for
        profile = re.search(r"--profile (\S+)", load(name)["spec"]["entrypoint"]).group(1)
        assert {_profile_of(g) for g in _gpu_groups(spec)} == {profile}


def test_the_model_cache_check_catches_a_volume_too_small_for_the_profile():
    from cosed.models.profiles import profile_data

    assert 1.25 * profile_data("flux-ltx")["download_gib"] > gibibytes(
        _gpu_groups(cluster_spec("kuberay-raycluster.yaml"))[0]["template"]["spec"]["volumes"][0]["emptyDir"]["sizeLimit"])
    assert gibibytes("16Gi") == 16 and round(gibibytes("16G"), 2) == 14.9


@pytest.mark.parametrize("name", KUBERAY_FILES)
def test_kuberay_hf_secret_is_required_where_the_profile_is_gated(name):
    from cosed.doctor import gated_models
    from cosed.models.profiles import resolve_profile

    spec = cluster_spec(name)
    (profile,) = {_profile_of(g) for g in _gpu_groups(spec)}
    gated = bool(gated_models(resolve_profile(profile)))
    assert gated  # sd21-svd: SVD-XT 1.1 is gated
    for _, container in _containers(spec):
        refs = {ref["secretRef"]["name"]: ref["secretRef"] for ref in container["envFrom"]}
        assert refs["cosed-hf"].get("optional", False) is not gated
        assert refs["cosed-s3"].get("optional") is True  # static keys, or the ServiceAccount's role instead


@pytest.mark.parametrize("name", KUBERAY_FILES)
def test_kuberay_gpu_groups_run_only_on_nodes_whose_driver_runs_the_images_cuda(name):
    driver = int(min_driver(image_cuda(BASE_IMAGE)))
    for group in _gpu_groups(cluster_spec(name)):
        terms = group["template"]["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"]
        keys = set()
        for term in terms:  # terms are ORed: each alone must demand the driver
            (expression,) = term["matchExpressions"]
            assert expression["operator"] == "Gt" and expression["values"] == [str(driver - 1)]
            keys.add(expression["key"])
        assert keys == GFD_DRIVER_LABELS
    assert "nvidia.com/cuda.driver-version.major" in (CLUSTER / "README.md").read_text()


@pytest.mark.parametrize("name", KUBERAY_FILES)
def test_kuberay_pods_run_as_the_service_account_the_cluster_files_create(name):
    account = load("kuberay-serviceaccount.yaml")
    assert account["kind"] == "ServiceAccount" and account["apiVersion"] == "v1"
    spec = cluster_spec(name)
    groups = [spec["headGroupSpec"], *_gpu_groups(spec)]
    assert {g["template"]["spec"]["serviceAccountName"] for g in groups} == {account["metadata"]["name"]}
    trust = json.loads((CLUSTER / "iam" / "pod-identity-trust.json").read_text())["Statement"][0]
    assert trust["Principal"] == {"Service": "pods.eks.amazonaws.com"} and "sts:TagSession" in trust["Action"]
    readme = (CLUSTER / "README.md").read_text()
    for step in ("kubectl apply -f cluster/kuberay-serviceaccount.yaml", "create-pod-identity-association",
                 "eks.amazonaws.com/role-arn="):
        assert step in readme, step


def _ray_start_resources(group) -> dict:
    """``rayStartParams.resources`` as `ray start --resources` reads it: KubeRay passes the string on as is."""
    raw = group.get("rayStartParams", {}).get("resources")
    return json.loads(json.loads(raw)) if raw else {}


def test_worker_nodes_advertise_the_drivers_and_writers_resource_and_the_heads_do_not():
    from cosed.distributed.policies import WORKER_RESOURCE

    for name in KUBERAY_FILES:
        spec = cluster_spec(name)
        assert all(_ray_start_resources(g).get(WORKER_RESOURCE, 0) >= 1 for g in _gpu_groups(spec)), name
        assert WORKER_RESOURCE not in _ray_start_resources(spec["headGroupSpec"])
    types = load("ray-cluster.yaml")["available_node_types"]
    for kind, node_type in types.items():
        advertised = node_type["resources"].get(WORKER_RESOURCE, 0)
        assert advertised >= 1 if node_type["resources"].get("GPU") else advertised == 0, kind
    assert f"--resources '{{\"{WORKER_RESOURCE}\": 1}}'" in (CLUSTER / "README.md").read_text()


def _env(container) -> dict:
    return {item["name"]: item.get("value") for item in container.get("env", [])}


@pytest.mark.parametrize("name", KUBERAY_FILES)
def test_kuberay_head_tells_the_job_the_clusters_maximum_gpus(name):
    spec = cluster_spec(name)
    maximum = sum(g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
                  for g in _gpu_groups(spec))
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert float(_env(head)["COSED_AUTOSCALE_MAX_GPUS"]) == maximum > 0


# --- cluster launcher: Ray's schema and config validation, token, AMI, IAM -------------------------

def launcher_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_launcher_yaml_passes_rays_schema_and_config_validation():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load("ray-cluster.yaml")
    jsonschema.validate(config, launcher_schema())
    validate_config(prepare_config(copy.deepcopy(config)))
    misspelt = copy.deepcopy(config)
    misspelt["docker"]["run_option"] = misspelt["docker"].pop("run_options")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(misspelt, launcher_schema())


def test_launcher_turns_token_auth_on_on_every_node_with_a_token_from_here():
    config = load("ray-cluster.yaml")
    docker = config["docker"]
    assert "--env RAY_AUTH_MODE=token" in docker["run_options"]  # head and workers alike
    assert not any("RAY_AUTH_MODE" in o for o in docker.get("head_run_options", []) + docker.get("worker_run_options", []))
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert config["file_mounts"]["~/.cache/huggingface/token"] == "~/.cache/huggingface/token"
    assert "ENV HF_HOME=/home/ray/.cache/huggingface" in DOCKERFILE   # where huggingface_hub looks for it
    commands = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=disabled" not in commands
    assert "ray get-auth-token --generate" in (CLUSTER / "README.md").read_text()


def test_launcher_head_tells_the_job_the_clusters_maximum_gpus():
    config = load("ray-cluster.yaml")
    gpu = [t for t in config["available_node_types"].values() if t["resources"].get("GPU")]
    maximum = sum(t["max_workers"] * t["resources"]["GPU"] for t in gpu)
    assert maximum <= config["max_workers"] * max(t["resources"]["GPU"] for t in gpu)
    assert f"--env COSED_AUTOSCALE_MAX_GPUS={maximum:g}" in config["docker"]["head_run_options"]


def test_launcher_uses_the_current_dlami_from_awss_parameter_and_room_for_image_and_models():
    for name, node in load("ray-cluster.yaml")["available_node_types"].items():
        config = node["node_config"]
        assert config["ImageId"] == f"resolve:ssm:{DLAMI_PARAMETER}", name   # never a stale ami-... id
        (root,) = config["BlockDeviceMappings"]
        assert root["DeviceName"] == "/dev/sda1" and root["Ebs"]["VolumeType"] == "gp3"
        assert root["Ebs"]["VolumeSize"] >= (200 if node["resources"].get("GPU") else 100), name
    assert DLAMI_PARAMETER in (CLUSTER / "ray-cluster.yaml").read_text().split("ImageId:")[0]  # the command


def test_launcher_iam_is_written_out_for_a_head_that_names_its_own_profile():
    nodes = load("ray-cluster.yaml")["available_node_types"]
    head, worker = (nodes[k]["node_config"]["IamInstanceProfile"]["Name"] for k in ("head", "gpu_worker"))
    policy = {role: json.loads((CLUSTER / "iam" / f"{role}-policy.json").read_text()) for role in ("head", "worker")}
    actions = {role: {a for s in p["Statement"] for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}
               for role, p in policy.items()}
    # What Ray's AWS node provider calls from the head when it launches and ends workers.
    assert {"ec2:RunInstances", "ec2:CreateTags", "ec2:TerminateInstances", "ec2:DescribeInstances",
            "iam:PassRole", "ssm:GetParameters"} <= actions["head"]
    (pass_role,) = [s for s in policy["head"]["Statement"] if s["Action"] == "iam:PassRole"]
    assert pass_role["Resource"].endswith(f":role/{worker}")
    assert not [a for a in actions["worker"] if a.startswith(("ec2:", "iam:"))]
    assert json.loads((CLUSTER / "iam" / "ec2-trust.json").read_text())["Statement"][0]["Principal"] == {
        "Service": "ec2.amazonaws.com"}
    readme = (CLUSTER / "README.md").read_text()
    assert head == "cosed-ray-head" and worker == "cosed-ray-worker" and "cosed-ray-$role" in readme


# --- runtime env ---------------------------------------------------------------------------------

def test_runtime_env_installs_what_pyproject_needs():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    env = load("runtime_env.yaml")
    assert env["working_dir"] == "." and env["pip"] == [d for d in deps if not d.startswith("ray")]


def test_runtime_env_is_a_valid_ray_runtime_env_with_time_to_install_torch():
    from ray._private.ray_constants import DEFAULT_RUNTIME_ENV_TIMEOUT_SECONDS
    from ray.runtime_env import RuntimeEnv

    env = RuntimeEnv(**load("runtime_env.yaml"))
    assert env["config"]["setup_timeout_seconds"] >= 3 * DEFAULT_RUNTIME_ENV_TIMEOUT_SECONDS
    with pytest.raises((TypeError, ValueError)):
        RuntimeEnv(**{**load("runtime_env.yaml"), "config": {"setup_timeout_seconds": "long"}})


# --- every command line in the READMEs, parsed by the CLI that runs it ------------------------------

# Not checked beyond the repository paths they name: shell built-ins, the AWS CLI, helm, installers.
IGNORED = {"make", "git", "export", "mkdir", "printf", "helm", "for", "do", "done", "openssl", "cd", "sed",
           "aws", "base64", "pip", "grafana-server", "envsubst", "head"}
REPO_PREFIXES = ("cluster/", "ray_jobs/", "cosed/", "file://cluster/")


class _Parsed(Exception):
    """Raised by the patched argparse once a script's command line has parsed: nothing runs."""


def shell_blocks(text: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"```bash\n(.*?)```", text, re.S)]


def command_lines(block: str) -> list[list[str]]:
    """Each simple command of a bash block as argv: continuations joined, comments dropped, split at
    ``&&``, ``||``, ``|``, ``;``; redirections and leading ``NAME=value`` assignments removed."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        if line.lstrip().startswith("cosed ") and " [" in line:   # a usage synopsis: `a|b` are alternatives
            commands.append(shlex.split(line, comments=True))
            continue
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
        lexer.whitespace_split, lexer.commenters = True, "#"
        argv = []
        for token in [*lexer, ";"]:
            if token in (";", "&&", "||", "|", "&"):
                while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):
                    argv.pop(0)
                if argv:
                    commands.append(argv)
                argv = []
            else:
                argv.append(token)
        commands = [c[:min([i for i, t in enumerate(c) if t in (">", ">>", "<")] or [len(c)])] for c in commands]
    return [c for c in commands if c]


def check_repo_paths(argv: list[str]) -> None:
    for token in argv:
        path = token.split("=", 1)[-1] if token.startswith("--") else token
        path = path.removeprefix("file://").removeprefix(f"{IMAGE_WORKDIR}/")
        if path.startswith(REPO_PREFIXES) and "$" not in path:
            assert (REPO / path).exists(), f"{' '.join(argv)}: {path} does not exist"


def check_cosed(argv: list[str]) -> None:
    from cosed.cli import build_parser

    if any(t.startswith("[") for t in argv):  # a synopsis: every option it names must exist for its verb
        verb, parser = argv[1], build_parser()
        sub = parser._subparsers._group_actions[0].choices[verb]
        known = {o for action in sub._actions for o in action.option_strings}
        named = {o for t in argv for o in re.findall(r"--[a-z][a-z-]*", t)}
        assert named <= known, f"{' '.join(argv)}: unknown options {named - known}"
        return
    build_parser().parse_args(argv[1:])


def check_python_script(argv: list[str], monkeypatch) -> None:
    import argparse
    import runpy
    import sys

    script = argv[1].removeprefix(f"{IMAGE_WORKDIR}/")
    assert (REPO / script).is_file(), script
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        m.setattr(sys, "argv", [str(REPO / script), *argv[2:]])
        try:
            runpy.run_path(str(REPO / script), run_name="__main__")
        except _Parsed:
            return
    raise AssertionError(f"{script} ran without parsing a command line")


def check_ray(argv: list[str], monkeypatch) -> None:
    """Ray's own click CLI parses the line (``make_context`` down to the leaf command), running nothing."""
    import click
    from ray.scripts.scripts import cli

    command, args, parent, name = cli, argv[1:], None, "ray"
    while isinstance(command, click.Group):
        ctx = command.make_context(name, list(args), parent=parent)
        protected = getattr(ctx, "_protected_args", None)
        name, command, args = command.resolve_command(ctx, [*(ctx.protected_args if protected is None else protected),
                                                            *ctx.args])
        parent = ctx
    params = command.make_context(name, list(args), parent=parent).params
    if name == "exec":      # what it runs on the head is a README command too
        for inner in command_lines(params["cmd"]):
            check_command(inner, monkeypatch)
    if name == "submit" and params.get("entrypoint"):   # ray job submit -- python ...
        check_command(list(params["entrypoint"]), monkeypatch)


def check_command(argv: list[str], monkeypatch) -> None:
    program = argv[0].rsplit("/", 1)[-1]
    check_repo_paths(argv)
    if program == "cosed":
        check_cosed(argv)
    elif program in ("python", "python3") and argv[1] != "-m":
        check_python_script(argv, monkeypatch)
    elif program == "ray":
        check_ray(argv, monkeypatch)
    elif program == "kubectl" and argv[1] == "exec" and "--" in argv:   # what it runs in the pod
        check_command(argv[argv.index("--") + 1:], monkeypatch)
    elif program in ("kubectl", "docker") or program in IGNORED or argv[:3] == ["python3", "-m", "venv"]:
        pass  # kubectl, docker: the repository files they name exist (check_repo_paths)
    else:
        raise AssertionError(f"no check for this README command: {' '.join(argv)}")


def readme_commands() -> list[tuple[str, list[str]]]:
    return [(str(readme.relative_to(REPO)), argv)
            for readme in READMES for block in shell_blocks(readme.read_text()) for argv in command_lines(block)]


def test_every_readme_command_line_parses_with_the_cli_that_runs_it(monkeypatch):
    commands = readme_commands()
    programs = {argv[0].rsplit("/", 1)[-1] for _, argv in commands}
    assert {"cosed", "ray", "kubectl", "docker"} <= programs
    assert any(argv[:3] == ["ray", "job", "submit"] and "ray_jobs/generate.py" in " ".join(argv) for _, argv in commands)
    failures = []
    for where, argv in commands:
        try:
            check_command(argv, monkeypatch)
        except (AssertionError, SystemExit, Exception) as exc:  # noqa: B014 - report every line at once
            failures.append(f"{where}: {' '.join(argv)}: {type(exc).__name__}: {exc}")
    assert failures == []


@pytest.mark.parametrize("line", [
    "cosed generate --tasks t.jsonl --out o --no-such-flag",
    "cosed generate --out o",                                       # --tasks is required
    "ray job submit --adress http://127.0.0.1:8265 -- python x.py",
    "ray dashbord cluster/ray-cluster.yaml",
    "python ray_jobs/generate.py --tasks t.jsonl",                  # --out is required
    "python ray_jobs/bench_cluster.py --gpus four",
    "kubectl apply -f cluster/no-such-file.yaml",
    "ray exec cluster/ray-cluster.yaml 'cosed doctor --adress auto'",
    "terraform apply",
])
def test_the_command_check_rejects_what_the_cli_would(line, monkeypatch):
    (argv,) = command_lines(line)
    with pytest.raises((AssertionError, SystemExit, Exception)):
        check_command(argv, monkeypatch)


def test_command_lines_split_like_bash():
    block = ('FOO=1 ray up -y cluster/ray-cluster.yaml   # a comment\n'
             'a && b | c; d \\\n   --flag "two words" > out.txt\n')
    assert command_lines(block) == [["ray", "up", "-y", "cluster/ray-cluster.yaml"], ["a"], ["b"], ["c"],
                                    ["d", "--flag", "two words"]]


# --- Grafana dashboard ---------------------------------------------------------------------------

DASHBOARD = CLUSTER / "grafana" / "cosed.json"
GRAFANA_RANGES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


def exported_names() -> dict[str, str]:
    """Prometheus series name -> cosed metric, as Ray 2.60 exports them: prefix ``ray_``; counters end in
    ``_total``; histograms have ``_bucket``, ``_sum`` and ``_count`` (test_ray_exports_these_names checks it)."""
    from cosed.distributed.telemetry import METRICS

    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}
    return {f"ray_{name}{suffix}": name for name, spec in METRICS.items() for suffix in suffixes[spec.kind]}


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    variables = [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs + variables


def promql(expr: str):
    """Parse one dashboard expression with promql-parser, Grafana's variables filled in as Grafana would."""
    import promql_parser

    label_values = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", expr)
    if label_values:
        expr = label_values.group(1)   # a Grafana variable query: its selector must be PromQL
    for macro, value in GRAFANA_RANGES.items():
        expr = expr.replace(macro, value)
    return promql_parser.parse(re.sub(r"\$\{?\w+\}?", ".+", expr))


def series_names(expr: str) -> set[str]:
    import promql_parser

    names = set()
    promql_parser.walk(promql(expr), lambda node: names.add(node.name)
                       if isinstance(node, promql_parser.VectorSelector) else None)
    return names


def test_every_dashboard_query_is_promql_and_uses_only_declared_metrics():
    queries = dashboard_queries()
    assert len(queries) >= 10
    used = set().union(*(series_names(q) for q in queries))
    exported = exported_names()
    assert used and used <= set(exported), used - set(exported)
    from cosed.distributed.telemetry import METRICS

    assert {exported[n] for n in used} == set(METRICS)   # and every declared metric is charted


def test_the_dashboard_check_can_fail():
    import promql_parser  # noqa: F401  (the parser the check relies on)

    with pytest.raises(ValueError):
        promql("sum(rate(ray_cosed_scenes_done_total[$__rate_interval])")   # unbalanced
    assert series_names("sum(rate(ray_cosed_scenes_done[5m]))") - set(exported_names())  # no _total: not exported


def test_dashboard_has_the_panels_the_issue_asks_for_and_a_prometheus_datasource_variable():
    dashboard = json.loads(DASHBOARD.read_text())
    titles = " | ".join(p["title"].lower() for p in dashboard["panels"])
    for words in ("scenes per minute", "tasks in flight", "busy fraction per pool", "queue per pool",
                  "call latency per pool", "failed tasks", "retries"):
        assert words in titles, words
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert all(t["datasource"]["uid"] == "${datasource}" for p in dashboard["panels"] for t in p.get("targets", []))
    assert variables["Cluster"]["allValue"] == ".*"   # matches series without ray_io_cluster (launcher)
    readme = (CLUSTER / "README.md").read_text()
    assert "--from-file=cluster/grafana/cosed.json" in readme and "grafana_dashboard=1" in readme
    assert "/tmp/ray/session_latest/metrics/grafana/dashboards/cosed.json" in readme


def test_ray_exports_these_names(monkeypatch):
    """Record every declared metric in a Ray actor and scrape Ray's Prometheus endpoint: the names the
    dashboard uses are the names the installed Ray exports (e.g. counters with ``_total``)."""
    import socket
    import time
    import urllib.request

    import ray

    from cosed.distributed import telemetry

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")   # this test's own local cluster
    ray.shutdown()                                     # none other may be running in this process
    ray.init(address="local", num_cpus=1, num_gpus=0, _metrics_export_port=port, include_dashboard=True,
             logging_level="ERROR", log_to_driver=False)
    try:
        @ray.remote(num_cpus=0)
        class Recorder:
            def record_all(self) -> bool:   # again on every poll: Ray drops gauges nobody refreshes
                for name, spec in telemetry.METRICS.items():
                    telemetry.record(name, 1.0, **{tag: "x" for tag in spec.tags})
                return True

        recorder = Recorder.remote()
        wanted, seen, deadline = set(exported_names()), set(), time.time() + 120
        while time.time() < deadline and not wanted <= seen:
            assert ray.get(recorder.record_all.remote(), timeout=60)
            time.sleep(2)
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            except OSError:
                continue
            seen |= {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line.startswith("ray_cosed")}
        assert wanted <= seen, sorted(wanted - seen)
    finally:
        ray.shutdown()
