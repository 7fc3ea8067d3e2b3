"""`cosed doctor`: what a run needs and whether this machine (or cluster) has it.

Each check is one table line with its fix; a failed check means a run would
stop, so ``doctor`` exits 1. Checks run without starting a model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cosed.cuda_compat import FAIL, OK, WARN, driver_verdict
from cosed.memory import LEVELS, InsufficientGPUMemory, plan_memory
from cosed.models.profiles import CAPTION, KINDS, Profile


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""


def gpu_check(profile: Profile, memory: str, gpus: list[float]) -> Check:
    """GPUs (memory in GiB each) against the profile's needs; pure, so it is tested without a GPU."""
    needs = {level: profile.memory_gib(level) for level in LEVELS}
    if not gpus:
        if profile.random_weights:
            return Check("GPU", OK, "no CUDA GPU; the random-weight tiny models run on the CPU")
        return Check("GPU", FAIL, f"no CUDA GPU visible; {profile.name} needs about {needs['plain'] or '?'} GiB "
                     "(plain plan, all models on one GPU)",
                     "run on a GPU node with CUDA drivers (nvidia-smi must list it), or use --profile tiny")
    smallest = min(gpus)
    label = f"{len(gpus)} × {smallest:.0f} GiB"
    try:
        plan = plan_memory(needs, smallest, memory, what=f"profile {profile.name}")
        return Check("GPU", OK, f"{label}; memory plan {plan.describe()}")
    except InsufficientGPUMemory as exc:
        largest = max(profile.memory_gib("offload", (k,)) or 0.0 for k in KINDS)
        if largest <= smallest * 0.9 and len(gpus) >= 2:
            return Check("GPU", WARN, f"{label}: the models do not fit one GPU together, each fits its own",
                         "give each pool its own GPU (ray: sd/video num_gpus: 1)")
        return Check("GPU", FAIL, f"{label}: {exc}", "use a GPU with more memory (README: Running on GPUs)")


def local_gpus() -> list[float]:
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_properties(i).total_memory / 2**30 for i in range(torch.cuda.device_count())]


def driver_check(driver: str | None, torch_cuda: str | None, torch_version: str, name: str = "driver") -> Check:
    """The host's NVIDIA driver against torch's CUDA build (pure: cosed.cuda_compat decides)."""
    verdict = driver_verdict(driver, torch_cuda, torch_version)
    return Check(name, verdict.status, verdict.detail, verdict.fix)


def local_driver() -> str | None:
    """The NVIDIA driver version nvidia-smi reports, or None when there is no nvidia-smi or it fails."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0] if out else None


def local_torch_build() -> tuple[str | None, str]:
    """(``torch.version.cuda``, torch's version): which CUDA this torch was built for (None: CPU only)."""
    import torch

    return torch.version.cuda, torch.__version__


def ray_auth_check(address: str | None, environ: Mapping[str, str]) -> Check | None:
    """A client of a remote cluster sends Ray's token only when RAY_AUTH_MODE=token is set here too
    (Ray 2.60 never turns it on by itself for an explicit address); pure, so tested without a cluster."""
    if not address:
        return None
    mode = environ.get("RAY_AUTH_MODE", "").lower()
    has_token = bool(environ.get("RAY_AUTH_TOKEN") or environ.get("RAY_AUTH_TOKEN_PATH")
                     or (Path(environ.get("HOME", str(Path.home()))) / ".ray" / "auth_token").is_file())
    if mode == "token" and has_token:
        return Check("Ray auth", OK, "RAY_AUTH_MODE=token and a token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
                                     "~/.ray/auth_token): this client authenticates")
    missing = [] if mode == "token" else ["RAY_AUTH_MODE=token"]
    missing += [] if has_token else ["a token (RAY_AUTH_TOKEN or ~/.ray/auth_token)"]
    return Check("Ray auth", WARN, f"no {' and no '.join(missing)}: a cluster with token auth (every cluster file "
                                   "in cluster/) refuses this client",
                 "export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<the cluster's token> (cluster/README.md: Token)")


def weights_checks(profile: Profile) -> list[Check]:
    from cosed.models.fetch import cached, hub_files

    if not hub_files(profile):
        return [Check("weights", OK, "no hub downloads (tiny models are built locally, folders are local)")]
    status = cached(profile)
    checks = []
    for item in hub_files(profile):
        spec = profile.spec(item.kind)
        if status[item.kind]:
            checks.append(Check(f"weights {item.kind}", OK, f"{item.repo} is in the hub cache"))
            continue
        reachable, why = hub_reachable(item.repo, spec.gated)
        fix = f"cosed models fetch --profile {profile.name}"
        if spec.gated:
            fix = f"accept the licence at https://huggingface.co/{item.repo}, set HF_TOKEN, then {fix}"
        # Only `--rewriter lm` loads the captioner: without it the other rewriters still run.
        optional = item.kind == CAPTION
        checks.append(Check(f"weights {item.kind}", WARN if reachable or optional else FAIL,
                            f"{item.repo} not cached; {why}" + ("; only --rewriter lm needs it" if optional else ""),
                            fix if reachable else
                            f"{fix} on a connected machine and copy HF_HOME here, or use --profile tiny"))
    return checks


HF_TOKEN_FIX = ("KubeRay: kubectl create secret generic cosed-hf --from-literal=HF_TOKEN=hf_... (the manifests "
                "require it); launcher: put the token in ~/.cache/huggingface/token before ray up; here: export "
                "HF_TOKEN=hf_... (cluster/README.md: S3 and model secrets)")


def gated_models(profile: Profile) -> list[str]:
    """The kinds of a profile whose hub download needs an accepted licence and a token."""
    return [k for k in (*KINDS, CAPTION) if k in profile.specs and profile.specs[k].gated and not profile.random_weights]


def hf_token_check(profile: Profile, has_token: bool, cached: Mapping[str, bool | None]) -> Check | None:
    """The Hugging Face token a gated profile needs, named here, before any GPU node starts (pure).

    Every new GPU node downloads the weights into its own cache, so a token is needed even where this
    machine has them cached (WARN then, since a node with a warm HF_HOME would not)."""
    gated = gated_models(profile)
    if not gated:
        return None
    repos = ", ".join(profile.spec(k).source for k in gated)
    if has_token:
        return Check("HF token", OK, f"set (HF_TOKEN or $HF_HOME/token): the gated {repos} can download")
    status = WARN if all(cached.get(k) for k in gated) else FAIL
    return Check("HF token", status, f"none set (HF_TOKEN, or the token file in HF_HOME): {profile.name} loads the gated "
                                     f"{repos}, which every new GPU node downloads", HF_TOKEN_FIX)


def cluster_token_check(probe: dict, profile: Profile) -> Check | None:
    """Whether every GPU node has a Hugging Face token, for a gated profile (pure; None for an older probe)."""
    tokens = probe.get("tokens")
    if not gated_models(profile) or not tokens:
        return None
    missing = sum(1 for has in tokens if not has)
    if not missing:
        return Check("cluster HF token", OK, f"every GPU node ({len(tokens)}) has a Hugging Face token")
    return Check("cluster HF token", FAIL, f"{missing} of {len(tokens)} GPU nodes have no Hugging Face token "
                                           f"(HF_TOKEN or $HF_HOME/token): {profile.name} loads a gated model",
                 HF_TOKEN_FIX)


def hub_reachable(repo: str, gated: bool) -> tuple[bool, str]:
    """Whether the hub would give us this repo now (network, token, licence)."""
    from huggingface_hub import auth_check, get_token

    if gated and not get_token():
        return False, "it is gated and no Hugging Face token is set"
    try:
        auth_check(repo)
    except Exception as exc:  # offline, gated, not found: report, do not raise
        return False, f"hub check failed ({type(exc).__name__})"
    return True, "downloadable (the first run would download it)"


def local_token_check(profile: Profile) -> Check | None:
    if not gated_models(profile):
        return None
    from huggingface_hub import get_token

    from cosed.models.fetch import cached

    return hf_token_check(profile, bool(get_token()), cached(profile))


def out_check(out: str) -> Check:
    """Write a small object under ``out`` and delete it again."""
    from cosed import storage

    probe = storage.join(out, f".cosed-doctor-{uuid.uuid4().hex[:8]}")
    try:
        storage.write_bytes(probe, b"cosed doctor probe\n")
        if storage.is_s3(probe):
            location = storage.parse_s3(probe)
            storage.s3_client().delete_object(Bucket=location.bucket, Key=location.key)
        else:
            Path(probe).unlink()
    except Exception as exc:  # any storage failure is what this check reports
        return Check("output", FAIL, f"cannot write and delete under {out}: {type(exc).__name__}: {exc}",
                     "check the path or bucket, its permissions, and AWS credentials / AWS_ENDPOINT_URL")
    return Check("output", OK, f"wrote and deleted a probe under {out}")


def encoder_check() -> Check:
    import av

    try:
        av.codec.Codec("libx264", "w")
    except Exception:  # av raises UnknownCodecError or similar
        return Check("H.264", FAIL, "PyAV has no libx264 encoder", "pip install --force-reinstall av (the wheels bundle libx264)")
    return Check("H.264", OK, f"libx264 via PyAV {av.__version__}")


_PROBE = """
import json, subprocess, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init(address=ADDRESS, logging_level="ERROR", log_to_driver=False)

@ray.remote(num_cpus=0)
def gpu_memory():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total,driver_version", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
        rows = [line.split(",") for line in out.strip().splitlines() if line.strip()]
        memory, driver = [int(r[0]) / 1024 for r in rows] or None, rows[0][1].strip() if rows else None
    except Exception:
        memory, driver = None, None
    try:
        import torch
        build = [torch.version.cuda, torch.__version__]
    except Exception:
        build = [None, "not installed"]
    try:
        from huggingface_hub import get_token
        token = bool(get_token())
    except Exception:
        token = False
    return memory, driver, build, token

nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0)]
refs = [gpu_memory.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
        for n in nodes]
answers = ray.get(refs, timeout=60)
print(json.dumps({"nodes": len(ray.nodes()), "gpus": [n["Resources"]["GPU"] for n in nodes],
                  "memory": [a[0] for a in answers], "drivers": [a[1] for a in answers],
                  "torch": [a[2] for a in answers], "tokens": [a[3] for a in answers]}))
"""


def cluster_checks(address: str | None, profile: Profile, memory: str, timeout: float = 90.0) -> list[Check]:
    """Connect to the cluster in a child process (a wrong address must not hang doctor); check its GPUs."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        return [Check("Ray", OK, "no --address or RAY_ADDRESS: runs start a local Ray cluster")]
    script = _PROBE.replace("ADDRESS", repr(address))
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [Check("Ray", FAIL, f"no answer from {address} in {timeout:.0f} s",
                      "check the address (HEAD:6379 for ray.init, http://HEAD:8265 for ray job submit) and firewalls")]
    if done.returncode != 0:
        error = (done.stderr.strip().splitlines() or ["unknown error"])[-1][:200]
        fix = ("the cluster uses token auth: export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<its token> "
               "(cluster/README.md: Token)"
               if "auth" in error.lower() or "token" in error.lower() else "check the address and that the cluster is up")
        return [Check("Ray", FAIL, f"cannot connect to {address}: {error}", fix)]
    return probe_checks(address, json.loads(done.stdout.strip().splitlines()[-1]), profile, memory)


def probe_checks(address: str, probe: dict, profile: Profile, memory: str) -> list[Check]:
    """The Ray and cluster-GPU lines from the probe's answer (pure, so tested without a cluster)."""
    checks = [Check("Ray", OK, f"{address}: {probe['nodes']} nodes, GPUs per GPU node {probe['gpus']}")]
    if not probe["gpus"]:
        checks.append(gpu_check(profile, memory, []) if not profile.random_weights else
                      Check("cluster GPU", OK, "no GPU nodes; the tiny models run on CPUs"))
        return checks
    known = [gib for node in probe["memory"] if node for gib in node]
    if not known:
        checks.append(Check("cluster GPU", WARN, "GPU memory unknown (nvidia-smi not found on the GPU nodes)",
                            "check the nodes' memory against README: Running on GPUs"))
        return checks
    line = gpu_check(profile, memory, known)
    checks.append(Check("cluster GPU", line.status, line.detail, line.fix))
    token = cluster_token_check(probe, profile)
    return checks + cluster_driver_checks(probe) + ([token] if token else [])


def cluster_driver_checks(probe: dict) -> list[Check]:
    """One line per distinct (driver, torch build) among the GPU nodes; none for an older probe answer."""
    seen = []
    for driver, build in zip(probe.get("drivers") or [], probe.get("torch") or []):
        if (driver, tuple(build)) not in seen:
            seen.append((driver, tuple(build)))
    return [driver_check(driver, cuda, version, "cluster driver") for driver, (cuda, version) in seen]


def run_checks(profile: Profile, memory: str = "auto", address: str | None = None, out: str | None = None) -> list[Check]:
    models = [f"{k} {profile.spec(k).source if not profile.random_weights else profile.model_names()[k]}" for k in KINDS]
    if profile.caption_model:
        models.append(f"{CAPTION} {profile.caption_model}")
    checks = [Check("profile", OK, f"{profile.name}: " + ", ".join(models))]
    checks.append(gpu_check(profile, memory, local_gpus()))
    checks.append(driver_check(local_driver(), *local_torch_build()))
    checks += weights_checks(profile)
    token = local_token_check(profile)
    checks += [token] if token else []
    checks.append(out_check(out) if out else Check("output", OK, "no --out given: not probed"))
    checks.append(encoder_check())
    auth = ray_auth_check(address or os.environ.get("RAY_ADDRESS"), os.environ)
    checks += [auth] if auth else []
    checks += cluster_checks(address, profile, memory)
    return checks


def format_table(checks: list[Check]) -> list[str]:
    width = max(len(c.name) for c in checks)
    lines = []
    for check in checks:
        lines.append(f"{check.status:<5} {check.name:<{width}}  {check.detail}")
        if check.fix and check.status != OK:
            lines.append(f"{'':<5} {'':<{width}}  fix: {check.fix}")
    return lines
