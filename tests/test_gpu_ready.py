"""Memory plans, the numerical guard, negative prompts and `cosed doctor`, all without a GPU."""

import json

import numpy as np
import pytest

from cosed import runner
from cosed.backend import LocalBackend
from cosed.cli import main
from cosed.config import RunConfig
from cosed.doctor import FAIL, OK, WARN, cluster_checks, driver_check, gpu_check, out_check, probe_checks
from cosed.generate import render_batch
from cosed.memory import InsufficientGPUMemory, plan_memory
from cosed.models.profiles import resolve_profile
from cosed.numerics import NumericalError, degenerate
from cosed.seeds import gaussian_latent

from conftest import SMALL_TASKS, write_jsonl

NEEDS = {"plain": 39.0, "savers": 19.0, "offload": 13.0}


@pytest.mark.parametrize("gpu, level", [(80.0, "plain"), (40.0, "savers"), (16.0, "offload")])
def test_auto_plan_turns_savers_on_only_when_the_gpu_is_too_small(gpu, level):
    plan = plan_memory(NEEDS, gpu, "auto")
    assert plan.level == level
    assert ("model_cpu_offload" in plan.savers) == (level == "offload")
    assert (not plan.savers) == (level == "plain")


def test_a_gpu_too_small_for_every_plan_is_an_error_not_a_silent_start():
    with pytest.raises(InsufficientGPUMemory, match="13 GiB.*12 GiB"):
        plan_memory(NEEDS, 12.0, "auto")
    with pytest.raises(InsufficientGPUMemory, match="memory: auto"):
        plan_memory(NEEDS, 40.0, "off")
    assert plan_memory(NEEDS, None, "off").level == "plain"  # CPU: nothing to plan
    assert plan_memory(NEEDS, 80.0, "offload").level == "offload"


def test_backend_refuses_to_load_models_on_a_too_small_gpu(tiny_cache, monkeypatch):
    monkeypatch.setattr("cosed.backend.gpu_memory_gib", lambda device: 8.0)
    backend = LocalBackend(resolve_profile("sd21-svd", tiny_cache), RunConfig(profile="sd21-svd"))
    with pytest.raises(InsufficientGPUMemory):
        backend.sd  # noqa: B018  (the plan is checked before any download)


def test_byte_savers_are_planned_per_pool_from_the_gpu_size_and_offload_per_process(tiny_cache, monkeypatch):
    """Savers that change bytes are planned once, for each pool on GPUs of its own (as the design pins it),
    from the GPU size alone, and are in the fingerprint; a process whose GPU holds more models adds CPU
    offload (no byte changes), never another byte level."""
    from cosed.engine import task_fingerprint
    from cosed.runplan import resolve_run, with_memory_plan
    from cosed.tasks import Task

    profile, cfg = resolve_run(RunConfig(profile="sd21-svd", cache_dir=str(tiny_cache)))
    task = Task(id="t", title="T", steps=("Cut.", "Glue."))
    alone = with_memory_plan(cfg, profile, 24.0)  # SD 14 + CLIP 0.5, video 16: plain on 24 GiB GPUs
    assert alone.memory_plan == {} and alone.video == cfg.video
    assert task_fingerprint(task, profile, alone) == task_fingerprint(task, profile, cfg)
    small = with_memory_plan(cfg, profile, 16.0)  # video alone needs 16 > 14.4: savers (decode chunk 2)
    assert small.memory_plan == {"sd": "savers", "video": "savers"} and small.video.decode_chunk_size == 2
    assert task_fingerprint(task, profile, small) != task_fingerprint(task, profile, alone)
    # A process checks its GPU against the level it was given: three models on one 24 GiB GPU add offload.
    monkeypatch.setattr("cosed.backend.gpu_memory_gib", lambda device: 24.0)
    plan = LocalBackend(profile, alone, gpu_shared_by=("sd", "clip")).memory_plan("sd")
    assert plan.level == "plain" and not plan.savers
    shared = LocalBackend(profile, alone).memory_plan("video")
    assert shared.level == "plain" and shared.savers == ("model_cpu_offload",)
    monkeypatch.setattr("cosed.backend.gpu_memory_gib", lambda device: 8.0)
    with pytest.raises(InsufficientGPUMemory):
        LocalBackend(profile, alone).memory_plan("video")  # even offloaded, three models need more


def test_gpu_check_names_what_is_missing():
    paper = resolve_profile("sd21-svd")
    assert gpu_check(paper, "auto", []).status == FAIL
    assert gpu_check(paper, "auto", [80.0]).status == OK
    assert "savers" in gpu_check(paper, "auto", [24.0]).detail
    assert gpu_check(paper, "off", [24.0]).status == FAIL
    assert gpu_check(resolve_profile("flux-ltx"), "auto", [24.0, 24.0]).status in (WARN, FAIL)


def test_doctor_prints_its_table_and_exits_1_without_gpu_or_weights(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    monkeypatch.setattr("cosed.doctor.local_gpus", lambda: [])
    assert main(["doctor", "--profile", "sd21-svd", "--out", str(tmp_path / "out")]) == 1
    out = capsys.readouterr().out
    assert "FAIL  GPU" in out and "no CUDA GPU" in out
    assert "weights video" in out and "gated" in out and "fix:" in out
    assert "ok    output" in out and "ok    H.264" in out
    assert "FAIL  HF token" in out and "cosed-hf" in out  # the missing secret, named before any GPU starts
    assert not list((tmp_path / "out").iterdir())  # the probe was deleted


def test_doctor_names_the_hugging_face_token_a_gated_profile_needs():
    from cosed.doctor import hf_token_check

    paper = resolve_profile("sd21-svd")
    missing = hf_token_check(paper, False, {"video": False})
    assert missing.status == FAIL and "stabilityai/stable-video-diffusion-img2vid-xt-1-1" in missing.detail
    assert "kubectl create secret generic cosed-hf" in missing.fix and "~/.cache/huggingface/token" in missing.fix
    assert hf_token_check(paper, True, {"video": False}).status == OK
    assert hf_token_check(paper, False, {"video": True}).status == WARN  # cached here; new GPU nodes still download
    assert hf_token_check(resolve_profile("flux-ltx"), False, {}) is None  # nothing gated: no line
    assert hf_token_check(resolve_profile("tiny"), False, {}) is None


def test_doctor_lines_for_an_unwritable_output_and_an_unreachable_cluster(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    check = out_check(str(blocker / "out"))
    assert check.status == FAIL and check.fix
    (check,) = cluster_checks("127.0.0.1:9", resolve_profile("sd21-svd"), "auto", timeout=10)
    assert check.status == FAIL and "127.0.0.1:9" in check.detail and check.fix


def test_doctor_checks_the_cluster_gpus_against_the_profile():
    paper = resolve_profile("sd21-svd")
    big = probe_checks("HEAD:6379", {"nodes": 3, "gpus": [1, 1], "memory": [[80.0], [80.0]]}, paper, "auto")
    assert [c.status for c in big] == [OK, OK] and "plain" in big[1].detail
    small = probe_checks("HEAD:6379", {"nodes": 2, "gpus": [1], "memory": [[8.0]]}, paper, "auto")
    assert small[1].status == FAIL and small[1].fix
    assert probe_checks("HEAD:6379", {"nodes": 1, "gpus": [], "memory": []}, paper, "auto")[1].status == FAIL
    assert probe_checks("HEAD:6379", {"nodes": 2, "gpus": [1], "memory": [None]}, paper, "auto")[1].status == WARN


def test_doctor_passes_for_the_tiny_profile_on_the_cpu(tiny_cache, capsys, monkeypatch):
    monkeypatch.setattr("cosed.doctor.local_gpus", lambda: [])
    assert main(["doctor", "--cache-dir", str(tiny_cache)]) == 0
    assert "doctor: ready" in capsys.readouterr().out


def test_degenerate_flags_nan_and_black_but_not_dark_images():
    images = np.full((2, 4, 4, 3), 0.5, np.float32)
    assert degenerate(images) is None
    assert degenerate(np.where(np.arange(2)[:, None, None, None] == 1, np.nan, images)) == "NaN or inf values"
    black = images.copy()
    black[0] = 0.0
    assert degenerate(black) == "an all-black output"
    black[0, 0, 0, 0] = 0.01
    assert degenerate(black) is None


@pytest.fixture
def sd_pipe(tiny_run):
    _, cfg, backend = tiny_run
    return backend.sd, cfg


def _nan_decoder(pipe, times):
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] <= times else output

    return pipe.vae.decoder.register_forward_hook(poison), calls


def test_a_nan_image_is_retried_once_and_then_fails_with_the_reason(sd_pipe):
    pipe, cfg = sd_pipe
    latents = gaussian_latent(3, (4, cfg.sd.height // 8, cfg.sd.width // 8)).numpy()[None]
    clean = render_batch(pipe, "onion", latents, cfg.sd, [1])
    hook, calls = _nan_decoder(pipe, times=1)
    try:
        retried = render_batch(pipe, "onion", latents, cfg.sd, [1])
    finally:
        hook.remove()
    assert calls["n"] == 2 and np.array_equal(retried.images, clean.images)
    hook, _ = _nan_decoder(pipe, times=99)
    try:
        with pytest.raises(NumericalError, match="NaN"):
            render_batch(pipe, "onion", latents, cfg.sd, [1])
    finally:
        hook.remove()


@pytest.mark.slow
def test_a_nan_clip_fails_the_task_and_is_never_marked_done(tiny_cache, tmp_path):
    profile, cfg = runner.resolve_run(RunConfig(profile="tiny", cache_dir=str(tiny_cache)))
    backend = LocalBackend(profile, cfg)
    backend.video.vae.decoder.register_forward_hook(lambda module, args, output: output * float("nan"))
    tasks = write_jsonl(tmp_path / "tasks.jsonl", SMALL_TASKS[2:])
    summary = runner.run_in_process(str(tasks), str(tmp_path / "out"), cfg, progress=False, backend=backend)
    assert not summary.done and [e.task_id for e in summary.failed] == ["tea"]
    assert "NaN" in str(summary.failed[0])
    assert not (tmp_path / "out" / "tea" / "manifest.json").exists()
    errors = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert "NaN" in json.dumps(errors)


def test_negative_prompt_is_off_by_default_and_changes_the_image_when_set(sd_pipe):
    import dataclasses

    pipe, cfg = sd_pipe
    assert cfg.sd.negative_prompt is None
    latents = gaussian_latent(5, (4, cfg.sd.height // 8, cfg.sd.width // 8)).numpy()[None]
    plain = render_batch(pipe, "onion", latents, cfg.sd, [1]).images
    negative = render_batch(pipe, "onion", latents, dataclasses.replace(cfg.sd, negative_prompt="blurry"), [1]).images
    assert not np.array_equal(plain, negative)


@pytest.mark.parametrize("name", ["tiny", "tiny-flux-ltx"])
def test_every_memory_saver_runs_on_each_pipeline_family(name, tiny_cache):
    import dataclasses

    import torch

    from cosed.generate import latent_shape
    from cosed.memory import SAVERS, MemoryPlan
    from cosed.models.loaders import load_pipeline
    from cosed.video import animate

    profile, cfg = runner.resolve_run(RunConfig(profile=name, cache_dir=str(tiny_cache)))
    savers = MemoryPlan("savers", savers=SAVERS["savers"])
    cpu = torch.device("cpu")
    sd_plain, sd_saving = (load_pipeline(profile.spec("sd"), "sd", cpu, plan) for plan in (None, savers))
    latents = gaussian_latent(11, latent_shape(sd_plain, cfg.sd)).numpy()[None]
    plain = render_batch(sd_plain, "onion", latents, cfg.sd, [1]).images
    saving = render_batch(sd_saving, "onion", latents, cfg.sd, [1]).images
    assert np.abs(plain.astype(int) - saving.astype(int)).max() <= 2  # sliced attention / VAE: same image
    video = load_pipeline(profile.spec("video"), "video", cpu, savers)
    clip = animate(video, plain[0], 1, dataclasses.replace(cfg.video, decode_chunk_size=2), "onion")
    assert clip.shape == (cfg.video.num_frames, cfg.video.height, cfg.video.width, 3)


# --- driver and CUDA (cosed.cuda_compat) ---------------------------------------------------------

@pytest.mark.parametrize("driver, cuda, status, words", [
    (None, None, OK, ["no NVIDIA driver", "CPU only"]),
    (None, "13.0", OK, ["no NVIDIA driver", "CUDA 13.0", ">= 580"]),
    ("535.104.05", "13.0", FAIL, ["535.104.05", "too old", "CUDA 13.0", ">= 580"]),
    ("580.65.06", "13.0", OK, ["580.65.06", "CUDA 13.0"]),
    ("595.91.07", "13.2", OK, ["595.91.07"]),
    ("570.124.06", "12.8", OK, ["CUDA 12.8"]),        # any 12.x runs on >= 525 (minor-version compatibility)
    ("520.61.05", "12.8", FAIL, ["too old", ">= 525"]),
    ("580.65.06", None, WARN, ["CPU only"]),
    ("580.65.06", "14.0", WARN, ["no known minimum"]),
])
def test_driver_verdict_says_when_driver_and_torch_cuda_do_not_match(driver, cuda, status, words):
    check = driver_check(driver, cuda, "2.14.1")
    assert check.status == status and check.name == "driver"
    assert all(w in check.detail for w in words), check.detail
    assert bool(check.fix) == (status != OK)


def test_driver_versions_compare_as_numbers_and_the_table_follows_nvidia():
    from cosed.cuda_compat import driver_at_least, min_driver

    assert (min_driver("13.0"), min_driver("13.2"), min_driver("12.8"), min_driver("11.8")) == (
        "580", "580", "525", "450.80.02")
    assert min_driver("9.2") is None
    assert driver_at_least("580.95.05", "580") and driver_at_least("1000.1", "580")
    assert not driver_at_least("579.99.01", "580") and not driver_at_least("450.80.01", "450.80.02")


def test_local_driver_reads_nvidia_smi_when_present(tmp_path, monkeypatch):
    from cosed.doctor import local_driver

    monkeypatch.setenv("PATH", str(tmp_path))
    assert local_driver() is None                      # no nvidia-smi at all
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 580.95.05\necho 580.95.05\n")
    fake.chmod(0o755)
    assert local_driver() == "580.95.05"


def test_doctor_on_this_machine_names_the_driver_and_torchs_cuda(tiny_cache, capsys, monkeypatch):
    import torch

    monkeypatch.setattr("cosed.doctor.local_gpus", lambda: [])
    assert main(["doctor", "--cache-dir", str(tiny_cache)]) == 0
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.split()[1:2] == ["driver"]]
    assert f"torch {torch.__version__} built for " in line
    assert (f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU only") in line
    assert "NVIDIA driver" in line


def test_ray_auth_line_says_what_a_remote_client_lacks(tmp_path):
    from cosed.doctor import ray_auth_check

    home = {"HOME": str(tmp_path)}
    assert ray_auth_check(None, home) is None          # a local cluster: Ray handles its own token
    bare = ray_auth_check("HEAD:6379", home)
    assert bare.status == WARN and "RAY_AUTH_MODE=token" in bare.detail and "RAY_AUTH_TOKEN" in bare.fix
    assert ray_auth_check("HEAD:6379", {**home, "RAY_AUTH_MODE": "token"}).status == WARN   # mode, no token
    assert ray_auth_check("HEAD:6379", {**home, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "t"}).status == OK
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("t")
    assert ray_auth_check("HEAD:6379", {**home, "RAY_AUTH_MODE": "token"}).status == OK


def test_doctor_reports_each_gpu_nodes_driver_against_its_torch():
    paper = resolve_profile("sd21-svd")
    probe = {"nodes": 3, "gpus": [1, 1], "memory": [[80.0], [80.0]], "drivers": ["580.95.05", "535.104.05"],
             "torch": [["13.0", "2.14.1"], ["13.0", "2.14.1"]]}
    lines = probe_checks("HEAD:6379", probe, paper, "auto")
    drivers = [c for c in lines if c.name == "cluster driver"]
    assert [c.status for c in drivers] == [OK, FAIL] and "535.104.05" in drivers[1].detail
    older = {k: v for k, v in probe.items() if k not in ("drivers", "torch")}
    assert not [c for c in probe_checks("HEAD:6379", older, paper, "auto") if c.name == "cluster driver"]


def test_doctor_reports_gpu_nodes_without_a_hugging_face_token_for_a_gated_profile():
    probe = {"nodes": 3, "gpus": [1, 1], "memory": [[80.0], [80.0]], "tokens": [True, False]}
    (token,) = [c for c in probe_checks("HEAD:6379", probe, resolve_profile("sd21-svd"), "auto")
                if c.name == "cluster HF token"]
    assert token.status == FAIL and "1 of 2 GPU nodes" in token.detail and "cosed-hf" in token.fix
    everyone = {**probe, "tokens": [True, True]}
    assert [c.status for c in probe_checks("HEAD:6379", everyone, resolve_profile("sd21-svd"), "auto")
            if c.name == "cluster HF token"] == [OK]
    assert not [c for c in probe_checks("HEAD:6379", probe, resolve_profile("flux-ltx"), "auto")
                if c.name == "cluster HF token"]
