"""The offline model zoo: real architectures, small sizes, random weights from a fixed seed.

Nothing here is a stub. Each model is a genuine diffusers / transformers /
open_clip model built from a config, saved in its library's standard format,
and loaded back by the same loaders that read hub weights. The CLIP tokenizer
files are written from the BPE vocabulary that open_clip ships, so token ids
match the real CLIP tokenizer exactly.
"""

from __future__ import annotations

import fcntl
import gzip
import json
import logging
import shutil
from pathlib import Path

import torch

from cosed.models.loaders import quiet_libraries

TINY_VERSION = "tiny-v1"
MODERN_VERSION = "tiny-modern-v1"  # twins of the modern pipelines, a zoo of their own so tiny-v1 caches stay valid
CAPTION_VERSION = "tiny-captioner-v1"  # the captioner's twin, apart too: adding it to tiny-v1 would rebuild no cache
_SEED = 0
_ZOOS = {"flux": MODERN_VERSION, "ltx": MODERN_VERSION, "t5-tokenizer": MODERN_VERSION, "captioner": CAPTION_VERSION}


def zoo_of(model: str) -> str:
    """Which zoo builds a tiny model: later twins live apart from the original zoo, so its caches stay valid."""
    return _ZOOS.get(model, TINY_VERSION)


def ensure_tiny_models(cache_dir: Path, version: str = TINY_VERSION) -> Path:
    """Build a zoo once under ``cache_dir`` (safe when many processes ask at once)."""
    cache_dir = Path(cache_dir)
    root = cache_dir / version
    if (root / ".complete").is_file():
        return root
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f"{version}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / ".complete").is_file():
            return root
        staging = cache_dir / f"{version}.staging"
        shutil.rmtree(staging, ignore_errors=True)
        quiet_libraries()
        builders = {TINY_VERSION: build_tiny_models, MODERN_VERSION: build_modern_models,
                    CAPTION_VERSION: build_caption_models}
        builders[version](staging)
        (staging / ".complete").write_text("ok\n")
        shutil.rmtree(root, ignore_errors=True)
        staging.rename(root)
    return root


def build_tiny_models(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    write_clip_tokenizer(root / "tokenizer")
    build_sd(root / "sd", root / "tokenizer")
    build_video(root / "video")
    build_clip(root / "clip")
    build_lm(root / "lm", root / "tokenizer")


def build_modern_models(root: Path) -> None:
    """Twins of FLUX.1-schnell and LTX-Video, with their own CLIP and T5 tokenizers."""
    root.mkdir(parents=True, exist_ok=True)
    write_clip_tokenizer(root / "tokenizer")
    write_t5_tokenizer(root / "t5-tokenizer", root / "tokenizer")
    build_flux(root / "flux", root / "tokenizer", root / "t5-tokenizer")
    build_ltx(root / "ltx", root / "t5-tokenizer")


def build_caption_models(root: Path) -> None:
    """A twin of the captioner (Qwen2.5-0.5B-Instruct's classes) with a ChatML chat template."""
    root.mkdir(parents=True, exist_ok=True)
    write_clip_tokenizer(root / "clip-tokenizer")
    build_captioner(root / "captioner", root / "clip-tokenizer")
    shutil.rmtree(root / "clip-tokenizer")


def write_clip_tokenizer(folder: Path) -> None:
    """vocab.json + merges.txt of the real CLIP BPE, from open_clip's bundled vocabulary."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    byte_symbols = list(bytes_to_unicode().values())
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def _clip_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def build_sd(folder: Path, tokenizer_dir: Path) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(_SEED)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(
        sample_size=64, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        block_out_channels=(8, 16, 16, 16), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, projection_dim=32))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder,
                                   tokenizer=_clip_tokenizer(tokenizer_dir), scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)


def build_video(folder: Path) -> None:
    from diffusers import (AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, StableVideoDiffusionPipeline,
                           UNetSpatioTemporalConditionModel)
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(_SEED)
    unet = UNetSpatioTemporalConditionModel(
        sample_size=8, in_channels=8, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=32, num_attention_heads=(2, 4),
        addition_time_embed_dim=32, projection_class_embeddings_input_dim=96)
    vae = AutoencoderKLTemporalDecoder(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4)
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, image_size=224, patch_size=32))
    scheduler = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, interpolation_type="linear",
        num_train_timesteps=1000, prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002,
        steps_offset=1, timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True)
    pipe = StableVideoDiffusionPipeline(vae=vae, image_encoder=image_encoder, unet=unet, scheduler=scheduler,
                                        feature_extractor=CLIPImageProcessor(crop_size=224, size=224))
    pipe.save_pretrained(folder, safe_serialization=True)


def build_clip(folder: Path) -> None:
    """open_clip ViT-B-32 with random weights, in open_clip's hub folder layout."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(_SEED)
    logging.disable(logging.WARNING)  # open_clip warns that no weights were loaded: that is the point here
    try:
        model = open_clip.create_model("ViT-B-32", pretrained=None)
    finally:
        logging.disable(logging.NOTSET)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    config = {"model_cfg": open_clip.get_model_config("ViT-B-32"),
              "preprocess_cfg": {"mean": list(model.visual.image_mean), "std": list(model.visual.image_std)}}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def build_lm(folder: Path, tokenizer_dir: Path) -> None:
    """A two-layer GPT-2 with the CLIP BPE vocabulary, for the `lm` caption rewriter's tests."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(_SEED)
    tokenizer = _clip_tokenizer(tokenizer_dir)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def write_t5_tokenizer(folder: Path, clip_tokenizer_dir: Path, vocab_size: int = 1000) -> None:
    """A T5-style (Unigram, ``</s>``-terminated) fast tokenizer trained here, so no sentencepiece file is needed.

    The training text is the CLIP BPE vocabulary, so the result is the same on every machine.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    words = [w.replace("</w>", "") for w in json.loads((clip_tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))]
    corpus = [" ".join(words[i:i + 64]) for i in range(512, 20000, 64)]
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                             special_tokens=[("</s>", tokenizer.token_to_id("</s>"))])
    T5TokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                    extra_ids=0, model_max_length=512).save_pretrained(folder)


def _tiny_t5(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, dense_act_fn="gelu_new", feed_forward_proj="gated-gelu"))


def build_flux(folder: Path, tokenizer_dir: Path, t5_dir: Path) -> None:
    """FluxPipeline (FLUX.1-schnell's classes): packed 16-channel latents, CLIP + T5 text encoders."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5TokenizerFast

    torch.manual_seed(_SEED)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False,
        axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKL(
        sample_size=64, in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1,
        block_out_channels=(8, 16, 16, 16), norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.1159, scaling_factor=0.3611,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, projection_dim=32))
    t5_tokenizer = T5TokenizerFast.from_pretrained(t5_dir)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=_clip_tokenizer(tokenizer_dir),
                        text_encoder_2=_tiny_t5(len(t5_tokenizer)), tokenizer_2=t5_tokenizer, transformer=transformer)
    pipe.save_pretrained(folder, safe_serialization=True)


def build_ltx(folder: Path, t5_dir: Path) -> None:
    """LTXImageToVideoPipeline (LTX-Video's classes): sizes divisible by 32, 8k+1 frames."""
    from diffusers import (AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXImageToVideoPipeline,
                           LTXVideoTransformer3DModel)
    from transformers import T5TokenizerFast

    torch.manual_seed(_SEED)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4, attention_head_dim=8,
        cross_attention_dim=32, num_layers=1, caption_channels=32)
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=False,
        patch_size=1, patch_size_t=1, encoder_causal=True, decoder_causal=False)
    t5_tokenizer = T5TokenizerFast.from_pretrained(t5_dir)
    pipe = LTXImageToVideoPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                                   text_encoder=_tiny_t5(len(t5_tokenizer)), tokenizer=t5_tokenizer,
                                   transformer=transformer)
    pipe.save_pretrained(folder, safe_serialization=True)


# Qwen2.5-Instruct's chat template without its tool-calling branches: the same text for
# system, user and assistant turns, and its default system prompt when none is given.
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)
CHATML_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def write_chatml_tokenizer(folder: Path, clip_tokenizer_dir: Path, vocab_size: int = 2048):
    """A Qwen2 tokenizer (byte-level BPE with Qwen's pre-tokenizer) trained here, with ChatML special tokens.

    The real vocabulary has 151k entries; a small one keeps the twin's embedding and
    output layer small. The training text is the CLIP BPE vocabulary, so the result
    is the same on every machine.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    words = [w.replace("</w>", "") for w in json.loads((clip_tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))]
    words = [w for w in words if w.isascii() and w.isalnum()]  # CLIP's byte symbols would be learnt as text
    corpus = [" ".join(words[i:i + 64]) for i in range(256, 16000, 64)]
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=CHATML_SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus, trainer)
    trained = json.loads(bpe.to_str())["model"]
    tokenizer = Qwen2Tokenizer(vocab=trained["vocab"], merges=[tuple(m) if isinstance(m, list) else tuple(m.split(" "))
                                                                for m in trained["merges"]],
                               eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
                               model_max_length=32768, chat_template=CHATML_TEMPLATE)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_captioner(folder: Path, clip_tokenizer_dir: Path) -> None:
    """Qwen2ForCausalLM as Qwen2.5-0.5B-Instruct (GQA, RoPE, SwiGLU, RMSNorm, QKV bias, tied embeddings), tiny.

    Initialised wider than transformers' default (0.2, not 0.02): at 0.02 a two-layer model with
    tied embeddings only repeats its last input token, and the captions tests need varied text.
    """
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = write_chatml_tokenizer(folder, clip_tokenizer_dir)
    torch.manual_seed(_SEED)
    end_of_turn, end_of_text = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         rope_theta=1000000.0, tie_word_embeddings=True, initializer_range=0.2,
                         bos_token_id=end_of_text,
                         eos_token_id=end_of_turn, pad_token_id=end_of_text)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=end_of_text, eos_token_id=[end_of_turn, end_of_text],
                                               pad_token_id=end_of_text)
    model.save_pretrained(folder)
