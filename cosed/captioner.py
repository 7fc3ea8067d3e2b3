"""The visual-caption model of method.md §1: an instruction-tuned causal LM that turns a window of
two (previous caption, current step) into one self-contained caption, greedily, in batches.

Captions must not depend on where or with what they were made, so that an in-process run, any
Ray actor, a retry and a resume all record the same caption for a step:

- every prompt is rendered with the tokenizer's own chat template, then left-padded to one fixed
  token length (`CaptionerConfig.prompt_tokens`; a longer window loses its oldest tokens);
- every ``generate`` call gets a batch of exactly ``batch_size`` rows (short batches are filled with
  copies of their first prompt), so a pair is computed with the same shapes whatever shares its batch;
- captions are cached by (weights checksum, generation settings, previous caption, step) in cosed's
  storage layer (a local folder or ``s3://``), first writer wins, so every node reads one answer.

Importing this module loads no model library: transformers is imported when a model loads, so a
job process can build prompts, keys and checksums without it.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from cosed import storage
from cosed.cliptext import truncate_to_clip

INSTRUCTION = "Give me the image caption for this recipe."
# The reference's plain-text prompt (method.md §1), for models whose tokenizer has no chat template.
ALPACA_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
CACHE_FORMAT = "captions-v1"
_CONTENT = "\x00cosed-window\x00"  # stands for the user turn while the template is split around it


def pair_input(previous: str, current: str) -> str:
    """The window of two as the authors' pairs write it: previous caption and current step, or the first step alone."""
    return f"Step 1: {previous}\nStep 2: {current}" if previous else f"Step 1: {current}"


def window_context(steps: list[str] | tuple[str, ...], captions: list[str], index: int) -> str:
    """The window's "Step 1" for step ``index`` (0-based) of a task, as the reference's inference builds it
    (gcs src/PlanGPT/src/inference/inference_window.py:111-120, WINDOW = 2): nothing at the first step; at the
    second, step 1's *raw text* (the window still holds raw steps); from the third on, the caption just made
    for the step before. ``captions`` needs entries up to ``index - 1`` only from the third step on."""
    if index == 0:
        return ""
    return steps[0] if index == 1 else captions[index - 1]


def chat_messages(previous: str, current: str, caption: str | None = None) -> list[dict[str, str]]:
    """The Alpaca instruction and input as one user turn, and the caption as the assistant's answer when given."""
    messages = [{"role": "user", "content": f"{INSTRUCTION}\n\n{pair_input(previous, current)}"}]
    if caption is not None:
        messages.append({"role": "assistant", "content": caption})
    return messages


@dataclass(frozen=True)
class CaptionerConfig:
    """Generation settings. Each decides the captions, so each is part of the cache key."""

    max_new_tokens: int = 77        # the CLIP text encoder's context; captions are cut to it again afterwards
    prompt_tokens: int = 384        # every prompt is left-padded (or left-truncated) to this many tokens
    batch_size: int = 8             # rows per generate call, always (short batches are filled)

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


# ---------------------------------------------------------------------------------------------
# Where the weights are, and their checksum (no model library needed)


def resolve_source(source: str, cache_dir: str | os.PathLike | None = None) -> str:
    """A hub id, a local folder, or ``tiny:captioner`` (built once into the cache dir)."""
    from cosed.models.profiles import default_cache_dir, resolve_source as resolve

    return resolve(source, Path(cache_dir) if cache_dir else default_cache_dir())


def _local_folder(source: str) -> Path | None:
    """The folder holding ``source``'s files: itself, or its snapshot in the local Hugging Face cache."""
    if Path(source).is_dir():
        return Path(source)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError), or not a repo id at all
        return None


@lru_cache(maxsize=256)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of one file; the size and mtime in the key make a rewritten file hash again."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@lru_cache(maxsize=16)
def _hub_file_digests(repo: str) -> tuple[tuple[str, str], ...]:
    """(file, sha256) of a hub repo's safetensors from its LFS metadata, without downloading them."""
    from huggingface_hub import HfApi

    info = HfApi().model_info(repo, files_metadata=True)
    return tuple(sorted((s.rfilename, s.lfs.sha256) for s in info.siblings
                        if s.rfilename.endswith(".safetensors") and "/" not in s.rfilename and s.lfs))


def weights_checksum(source: str, cache_dir: str | os.PathLike | None = None) -> str:
    """sha256 over the model's top-level safetensors files (name and sha256 of each).

    Read from the files when they are local (a folder, ``tiny:``, or the hub cache), else from
    the hub's LFS metadata, which gives the same digests: a job process on a node without the
    weights computes the same checksum as the actor that loads them.
    """
    from cosed.models.hub import ModelUnavailable, hub_error

    resolved = resolve_source(source, cache_dir)
    folder = _local_folder(resolved)
    files = sorted(folder.glob("*.safetensors")) if folder else []
    if files:
        digests = [(f.name, _file_sha256(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns)) for f in files]
    elif Path(resolved).exists():
        raise ModelUnavailable(f"the captioner folder {resolved} holds no .safetensors weights")
    else:
        try:
            digests = list(_hub_file_digests(resolved))
        except Exception as exc:  # offline, gated, not found: one sentence that says what to do
            raise hub_error("caption LM", resolved, exc) from exc
        if not digests:
            raise ModelUnavailable(f"the hub repo {resolved} has no top-level .safetensors weights")
    adapters = folder / "adapter_config.json" if folder else None
    if adapters is not None and adapters.is_file():  # LoRA adapters: the base's weights decide the captions too
        base = json.loads(adapters.read_text(encoding="utf-8"))["base_model_name_or_path"]
        digests.append(("base", weights_checksum(base, cache_dir)))
    return hashlib.sha256("".join(f"{name} {sha}\n" for name, sha in digests).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# The caption cache


class CaptionCache:
    """One small object per caption, ``<root>/<sha256>.txt``, under a local folder or an ``s3://`` prefix.

    The key covers everything that decides a caption: the weights checksum, the generation
    settings and the pair. The first writer of a key wins; later writers read its caption back.
    """

    def __init__(self, root: str, checksum: str, config: CaptionerConfig):
        self.root = str(root)
        self.checksum = checksum
        self.config = config

    def uri(self, previous: str, current: str) -> str:
        payload = json.dumps([CACHE_FORMAT, self.checksum, self.config.key(), previous, current], ensure_ascii=False)
        return storage.join(self.root, hashlib.sha256(payload.encode("utf-8")).hexdigest() + ".txt")

    def get(self, previous: str, current: str) -> str | None:
        try:
            return storage.read_bytes(self.uri(previous, current)).decode("utf-8")
        except FileNotFoundError:
            return None

    def get_many(self, pairs: list[tuple[str, str]]) -> list[str | None]:
        if storage.is_s3(self.root) and len(pairs) > 1:
            with ThreadPoolExecutor(max_workers=16) as pool:
                return list(pool.map(lambda pair: self.get(*pair), pairs))
        return [self.get(*pair) for pair in pairs]

    def put(self, previous: str, current: str, caption: str) -> str:
        """Store ``caption`` unless another writer got there first; the stored caption either way."""
        uri = self.uri(previous, current)
        if storage.create_exclusive(uri, caption.encode("utf-8")) is not None:
            return caption
        return storage.read_bytes(uri).decode("utf-8")


# ---------------------------------------------------------------------------------------------
# The captioner


class Captioner:
    """A caption LM behind a cache: ``caption_pairs`` generates only what the cache lacks.

    ``generate_calls`` counts model ``generate`` calls and ``generated`` the pairs they captioned
    (cache hits and the filler rows of a short batch count in neither). The model loads on
    `load` or on the first cache miss.
    """

    def __init__(self, source: str, *, device: Any = "cpu", cache_dir: str | os.PathLike | None = None,
                 cache_root: str | None = None, config: CaptionerConfig = CaptionerConfig(),
                 dtype: str = "bfloat16"):
        from cosed.models.profiles import default_cache_dir

        self.source = source
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.folder = resolve_source(source, self.cache_dir)
        self.checksum = weights_checksum(self.folder)
        self.config = config
        self.device = device
        self.dtype = dtype
        self.cache = CaptionCache(cache_root or storage.join(str(self.cache_dir), "captions"), self.checksum, config)
        self.generate_calls = 0
        self.generated = 0
        self.model = None
        self.tokenizer = None
        self._format: PromptFormat | None = None

    def use_cache(self, root: str) -> None:
        """Keep captions under ``root`` from now on (a Ray caption actor serves runs of any output prefix)."""
        if self.cache.root != root:
            self.cache = CaptionCache(root, self.checksum, self.config)

    def load(self) -> "Captioner":
        """Load the model and tokenizer (once) through the one LM loader."""
        if self.model is None:
            from cosed.models.loaders import load_lm

            self.model, self.tokenizer = load_lm(self.folder, self.device, dtype=self.dtype)
        return self

    def caption_pairs(self, pairs: list[tuple[str, str]]) -> list[str]:
        """One caption per (previous caption, current step) pair, in order.

        Greedy, at most ``max_new_tokens`` new tokens, cut to CLIP's 77 tokens; an empty answer
        falls back to the step itself. Byte-identical for a pair whatever else is in ``pairs``.
        """
        pairs = [(previous or "", current) for previous, current in pairs]
        captions = dict(zip(pairs, self.cache.get_many(pairs)))
        missing = [pair for pair in dict.fromkeys(pairs) if captions[pair] is None]
        for start in range(0, len(missing), self.config.batch_size):
            batch = missing[start:start + self.config.batch_size]
            for pair, text in zip(batch, self._generate(batch)):
                caption = truncate_to_clip(text) or truncate_to_clip(pair[1])
                captions[pair] = self.cache.put(*pair, caption)
        return [captions[pair] for pair in pairs]

    def prompt_format(self) -> "PromptFormat":
        self.load()
        if self._format is None:
            self._format = PromptFormat(self.tokenizer, self.config.prompt_tokens)
        return self._format

    def _generate(self, pairs: list[tuple[str, str]]) -> list[str]:
        import torch

        self.load()
        size, length = self.config.batch_size, self.config.prompt_tokens
        rows = [self.prompt_format().prompt_ids(*pair) for pair in pairs]
        rows += [rows[0]] * (size - len(rows))
        pad = self.pad_token_id
        input_ids = torch.full((size, length), pad, dtype=torch.long)
        attention_mask = torch.zeros((size, length), dtype=torch.long)
        for row, ids in enumerate(rows):
            input_ids[row, length - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, length - len(ids):] = 1
        with torch.inference_mode():
            output = self.model.generate(input_ids=input_ids.to(self.model.device),
                                         attention_mask=attention_mask.to(self.model.device),
                                         generation_config=self.generation_config())
        self.generate_calls += 1
        self.generated += len(pairs)
        new = output if self.model.config.is_encoder_decoder else output[:, length:]
        return [text.strip() for text in self.tokenizer.batch_decode(new[:len(pairs)], skip_special_tokens=True)]

    @property
    def pad_token_id(self) -> int:
        tokenizer = self.tokenizer
        eos = self.model.generation_config.eos_token_id
        eos = eos[0] if isinstance(eos, list) else eos
        return next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, eos, 0) if t is not None)

    def generation_config(self):
        """Plain greedy decoding that stops at the model's end tokens and the tokenizer's end of turn;
        nothing is taken from the model's sampling defaults (temperature, top-p, repetition penalty)."""
        from transformers import GenerationConfig

        eos = self.model.generation_config.eos_token_id
        eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        eos = list(dict.fromkeys(t for t in eos + [self.tokenizer.eos_token_id] if t is not None))
        return GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=self.config.max_new_tokens,
                                eos_token_id=eos, pad_token_id=self.pad_token_id,
                                bos_token_id=self.model.generation_config.bos_token_id,
                                decoder_start_token_id=self.model.generation_config.decoder_start_token_id)


class PromptFormat:
    """How a pair becomes token ids for one tokenizer, in generation and in training alike.

    The prompt is the tokenizer's chat template rendered around one user turn (the instruction and
    the window of two), or the reference's Alpaca layout when the tokenizer has no template. The
    template's frame is tokenized once and kept whole; a window too long for ``prompt_tokens``
    loses its oldest tokens.
    """

    def __init__(self, tokenizer, prompt_tokens: int, alpaca: bool = False):
        self.tokenizer = tokenizer
        self.prompt_tokens = prompt_tokens
        # ``alpaca``: the reference's text prompt even where the tokenizer has a chat template (the paper recipe)
        self.templated = bool(getattr(tokenizer, "chat_template", None)) and not alpaca
        head, tail = self.render(_CONTENT).split(_CONTENT)
        self.head, self.tail = self.encode(head), self.encode(tail)
        if prompt_tokens - len(self.head) - len(self.tail) < 1:
            raise ValueError(f"prompt_tokens {prompt_tokens} leaves no room inside the prompt's frame "
                             f"({len(self.head) + len(self.tail)} tokens)")

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def content(self, previous: str, current: str) -> str:
        """The user's text: the chat message of `chat_messages`, or the Alpaca instruction and input."""
        if self.templated:
            return chat_messages(previous, current)[0]["content"]
        return f"### Instruction:\n{INSTRUCTION}\n\n### Input:\n{pair_input(previous, current)}"

    def render(self, content: str, caption: str | None = None) -> str:
        """The prompt text for one user turn, and with ``caption`` the whole exchange (for training)."""
        if not self.templated:
            prompt = f"{content}\n\n### Response:\n"
            return prompt if caption is None else prompt + caption + (self.tokenizer.eos_token or "")
        messages = [{"role": "user", "content": content}]
        if caption is None:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        messages.append({"role": "assistant", "content": caption})
        return self.tokenizer.apply_chat_template(messages, tokenize=False)

    def prompt_ids(self, previous: str, current: str) -> list[int]:
        """At most ``prompt_tokens`` ids: the frame whole, the window cut from the left when too long."""
        room = self.prompt_tokens - len(self.head) - len(self.tail)
        return self.head + self.encode(self.content(previous, current))[-room:] + self.tail

    def answer_ids(self, previous: str, current: str, caption: str) -> list[int]:
        """The ids that follow the prompt in the whole exchange: the caption and the template's end of turn."""
        content = self.content(previous, current)
        prompt, exchange = self.render(content), self.render(content, caption)
        answer = exchange[len(prompt):] if exchange.startswith(prompt) else caption + (self.tokenizer.eos_token or "")
        return self.encode(answer)
