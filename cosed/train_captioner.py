"""`cosed train-captioner`: fine-tune a caption LM on Alpaca-format (window of two -> visual caption) pairs.

The paper's step 1 (§4.1) is a decoder instruction-tuned on exactly these pairs (Bordalo et
al.; the authors' pairs are ``captions_train.json``). Full fine-tuning with transformers'
`Trainer`, seeded; each example is the captioner's own prompt (`cosed.captioner.PromptFormat`:
the chat template, left-truncated like at generation) followed by the caption and the template's
end of turn, and the loss covers the answer tokens only. Pairs are held out in whole chains (a
pair whose previous caption is another pair's caption belongs with it), so no held-out caption
was a training target, and the held-out pairs are scored like ``cosed eval-captions``.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cosed import storage
from cosed.captioner import Captioner, CaptionerConfig, PromptFormat, weights_checksum
from cosed.caption_eval import read_pairs, rewrite_pairs, score_captions
from cosed.rewrite import LMRewriter, TemplateRewriter

REPORT = "captioner.json"


@dataclass(frozen=True)
class CaptionerTrainConfig:
    """Training settings; all of them go into ``captioner.json``."""

    epochs: float = 3.0
    lr: float = 2e-5
    batch_size: int = 8
    holdout: float = 0.1
    limit: int | None = None
    seed: int = 0
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_answer_tokens: int = 2 * CaptionerConfig.max_new_tokens  # longer references are cut for training


@dataclass(frozen=True)
class PairSet:
    """The pairs used, each with its record number (from 1) in the pairs file."""

    pairs: list[tuple[str, str, str]]
    numbers: list[int]
    skipped: list[int]
    sha256: str


def load_pair_set(uri: str, limit: int | None = None) -> PairSet:
    data = storage.read_bytes(uri)
    pairs, skipped = read_pairs(data, skip_malformed=True)
    numbers = [n for n in range(1, len(pairs) + len(skipped) + 1) if n not in set(skipped)]
    if limit is not None:
        pairs, numbers = pairs[:limit], numbers[:limit]
    if not pairs:
        raise ValueError(f"no usable pairs in {uri}")
    return PairSet(pairs=pairs, numbers=numbers, skipped=skipped, sha256=hashlib.sha256(data).hexdigest())


def chain_groups(pairs: list[tuple[str, str, str]]) -> list[int]:
    """A group id per pair: pairs joined when one's previous caption is the other's caption (one task's chain)."""
    parent = list(range(len(pairs)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    by_caption: dict[str, int] = {}
    for i, (_, _, caption) in enumerate(pairs):
        by_caption.setdefault(caption, i)
    for i, (previous, _, caption) in enumerate(pairs):
        for j in (by_caption.get(previous), by_caption[caption]):
            if j is not None:
                parent[root(i)] = root(j)
    return [root(i) for i in range(len(pairs))]


def split_pairs(pairs: list[tuple[str, str, str]], holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) indices: whole chains, seeded, about ``holdout`` of the pairs held out."""
    groups = chain_groups(pairs)
    order = sorted(set(groups))
    np.random.default_rng(seed).shuffle(order)
    target, held = round(holdout * len(pairs)), set()
    sizes = Counter(groups)
    taken = 0
    for group in order:
        if taken >= target:
            break
        held.add(group)
        taken += sizes[group]
    return ([i for i, g in enumerate(groups) if g not in held], [i for i, g in enumerate(groups) if g in held])


class AnswerDataset:
    """Tokenised examples for `Trainer`: prompt ids with labels -100, then the answer ids as labels."""

    def __init__(self, prompt_format: PromptFormat, pairs: list[tuple[str, str, str]], max_answer_tokens: int):
        self.examples = []
        for previous, current, caption in pairs:
            prompt = prompt_format.prompt_ids(previous, current)
            answer = prompt_format.answer_ids(previous, current, caption)[:max_answer_tokens]
            self.examples.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]


def fine_tune(model, tokenizer, prompt_format: PromptFormat, pairs: list[tuple[str, str, str]],
              tc: CaptionerTrainConfig, device, progress: bool = False) -> list[dict[str, float]]:
    """Full fine-tuning with `Trainer`; returns the loss of every optimiser step."""
    import torch
    from transformers import DataCollatorForSeq2Seq, PrinterCallback, Trainer, TrainingArguments

    with tempfile.TemporaryDirectory(prefix="cosed-captioner-") as scratch:
        args = TrainingArguments(
            output_dir=scratch, num_train_epochs=tc.epochs, learning_rate=tc.lr,
            per_device_train_batch_size=tc.batch_size, weight_decay=tc.weight_decay,
            warmup_steps=tc.warmup_ratio,  # a float below 1 is a ratio of all steps
            lr_scheduler_type="linear", seed=tc.seed, data_seed=tc.seed, logging_steps=1, save_strategy="no",
            report_to=[], disable_tqdm=not progress, use_cpu=torch.device(device).type == "cpu",
            bf16=torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported(), dataloader_num_workers=0)
        tokenizer.padding_side = "right"  # training pads after the answer: positions 0.. as in generation
        try:
            collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
            trainer = Trainer(model=model, args=args, train_dataset=AnswerDataset(prompt_format, pairs, tc.max_answer_tokens),
                              data_collator=collator, processing_class=tokenizer)
            if not progress:
                trainer.remove_callback(PrinterCallback)  # it prints every step's log when tqdm is off
            trainer.train()
        finally:
            tokenizer.padding_side = "left"
    return [{"step": entry["step"], "epoch": round(entry["epoch"], 4), "loss": entry["loss"]}
            for entry in trainer.state.log_history if "loss" in entry]


def evaluate_rewriters(rewriters: dict[str, Any], pairs: list[tuple[str, str, str]],
                       embed_texts: Callable[[list[str]], np.ndarray]) -> dict[str, dict[str, float]]:
    """The `eval-captions` measures (BLEU, chrF, CLIP text similarity) of each rewriter on ``pairs``."""
    references = [reference for _, _, reference in pairs]
    windows = [(previous, current) for previous, current, _ in pairs]
    return {name: score_captions(rewrite_pairs(rewriter, windows), references, embed_texts)
            for name, rewriter in rewriters.items()}


def train_captioner(pairs_uri: str, out: str, base: str, tc: CaptionerTrainConfig, *, device, cache_dir: Path,
                    embed_texts: Callable[[list[str]], np.ndarray] | None = None,
                    config: CaptionerConfig = CaptionerConfig(), random_weights: bool = False,
                    progress: bool = False) -> dict[str, Any]:
    """Fine-tune ``base`` on the pairs, save it under ``out`` (folder or s3:// prefix) with ``captioner.json``,
    and score it on the held-out pairs against the base model and ``template``."""
    import torch
    import transformers

    from cosed.models.loaders import load_lm, save_lm

    pair_set = load_pair_set(pairs_uri, tc.limit)
    train_index, held_index = split_pairs(pair_set.pairs, tc.holdout, tc.seed)
    train_pairs = [pair_set.pairs[i] for i in train_index]
    base_captioner = Captioner(base, device=device, cache_dir=cache_dir, config=config)
    model, tokenizer = load_lm(base_captioner.folder, device, dtype="float32")
    saved_dtype = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
    prompt_format = PromptFormat(tokenizer, config.prompt_tokens)

    start = time.perf_counter()
    transformers.set_seed(tc.seed)
    losses = fine_tune(model, tokenizer, prompt_format, train_pairs, tc, device, progress)
    seconds = time.perf_counter() - start

    with tempfile.TemporaryDirectory(prefix="cosed-captioner-out-") as staging:
        folder = Path(out) if not storage.is_s3(out) else Path(staging)
        model.eval()
        if str(saved_dtype).removeprefix("torch.") in ("bfloat16", "float16"):
            model.to(getattr(torch, str(saved_dtype).removeprefix("torch.")))
        save_lm(model, tokenizer, folder)
        checksum = weights_checksum(str(folder))
        report: dict[str, Any] = {
            "base": base, "base_checksum": base_captioner.checksum, "checksum": checksum,
            "random_weights": random_weights,
            "data": {"pairs": pairs_uri, "sha256": pair_set.sha256, "used": len(pair_set.pairs),
                     "skipped_malformed": pair_set.skipped, "train": len(train_index), "held_out": len(held_index)},
            "settings": {**asdict(tc), "generation": asdict(config),
                         "prompt": "chat template" if prompt_format.templated else "alpaca (no chat template)",
                         "transformers": transformers.__version__, "torch": torch.__version__},
            "split": {"seed": tc.seed, "holdout": tc.holdout, "by": "caption chains",
                      "held_out_pairs": [pair_set.numbers[i] for i in held_index]},
            "loss": losses, "train_seconds": round(seconds, 2),
        }
        if held_index and embed_texts is not None:
            del model  # scored as saved: loaded back through the one LM loader
            held_pairs = [pair_set.pairs[i] for i in held_index]
            trained = Captioner(str(folder), device=device, cache_dir=cache_dir, config=config)
            rewriters = {"trained": LMRewriter(trained.load()), "base": LMRewriter(base_captioner.load()),
                         "template": TemplateRewriter()}
            report["held_out"] = evaluate_rewriters(rewriters, held_pairs, embed_texts)
        (folder / REPORT).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if storage.is_s3(out):
            for path in sorted(p for p in folder.iterdir() if p.is_file()):
                storage.write_bytes(storage.join(out, path.name), path.read_bytes())
    return report
