"""`cosed train-captioner`: fine-tune a caption LM on Alpaca-format (window of two -> visual caption) pairs.

The paper's step 1 (§4.1) is a decoder instruction-tuned on exactly these pairs (Bordalo et
al.; the authors' pairs are ``captions_train.json``). Two recipes, both transformers' `Trainer`,
seeded, loss on the answer tokens only:

- ``paper``: the authors' (`PAPER_RECIPE`): LoRA adapters via ``peft`` on any causal LM, the Alpaca
  text prompt, whole examples cut to 400 tokens keeping the start; only the adapters are saved;
- ``full``: full fine-tuning on the model's chat template (this project's earlier recipe).

Pairs are held out in whole groups: with ``recipes`` (the recipes file, e.g. ``dataset.json``) a
group is a recipe, else a caption chain (a pair whose previous caption is another pair's caption
belongs with it). With ``eval_pairs`` the held-out set is that file and every training pair of a
recipe it touches is dropped: zero recipe overlap. The held-out pairs are scored like
``cosed eval-captions``.
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
class LoraSettings:
    """peft LoRA adapters; the authors' values by default."""

    r: int = 8
    alpha: int = 32
    dropout: float = 0.1
    targets: tuple[str, ...] = ("q_proj", "v_proj")


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
    recipe: str = "full"
    grad_accum: int = 1
    scheduler: str = "linear"
    max_length: int | None = None          # whole example (prompt + answer), cut keeping the start
    lora: LoraSettings | None = None       # None: full fine-tuning


# The authors' recipe: gcs src/PlanGPT/scripts/train_alpaca.sh:22-43 and
# src/models/sequence-context-decoder/run_arguments.json (10 epochs, batch 2 x accumulation 4, lr 1e-5 cosine,
# weight decay 0.01, warmup ratio 0.03, model_max_length 400, seed 11731, lora true) and
# checkpoint/adapter_config.json (r 8, alpha 32, dropout 0.1, q_proj / v_proj); the prompt is
# src/PlanGPT/src/data_mod/datasets.py:180 (Alpaca, the caption followed by the EOS token), truncated on the
# tokenizer's default side (right: the start is kept), :47-56.
PAPER_RECIPE = {"epochs": 10.0, "lr": 1e-5, "batch_size": 2, "grad_accum": 4, "weight_decay": 0.01,
                "warmup_ratio": 0.03, "scheduler": "cosine", "max_length": 400, "seed": 11731}
RECIPES = ("paper", "full")


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


def split_pairs(pairs: list[tuple[str, str, str]], holdout: float, seed: int,
                recipes: dict[str, list[str]] | None = None) -> tuple[list[int], list[int]]:
    """(train, held-out) indices: whole chains (with ``recipes``: whole recipes), seeded, about ``holdout`` of
    the pairs held out."""
    groups = recipe_groups(pairs, recipes)[0] if recipes else chain_groups(pairs)
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


def _norm(text: str) -> str:
    return " ".join(text.split())


def recipe_groups(pairs: list[tuple[str, str, str]], recipes: dict[str, list[str]]) -> tuple[list[int], list[set[str]]]:
    """(a group id per pair, the recipe ids of each pair's group). Pairs join when their current step or
    their raw-text context is a step of the same recipe (a step text found in one recipe only), or when
    one's previous caption is the other's caption (one task's chain)."""
    owner: dict[str, str | None] = {}
    for rid, steps in recipes.items():
        for step in steps:
            key = _norm(step)
            owner[key] = rid if owner.get(key, rid) == rid else None
    ids = {rid: len(pairs) + k for k, rid in enumerate(recipes)}
    parent = list(range(len(pairs) + len(ids)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    chain = chain_groups(pairs)
    for i, (previous, current, _) in enumerate(pairs):
        parent[root(i)] = root(chain[i])
        for text in (current, previous):
            rid = owner.get(_norm(text)) if text else None
            if rid is not None:
                parent[root(i)] = root(ids[rid])
    members: dict[int, set[str]] = {}
    for rid, node in ids.items():
        members.setdefault(root(node), set()).add(rid)
    groups = [root(i) for i in range(len(pairs))]
    return groups, [members.get(g, set()) for g in groups]


def split_by_eval_file(train: list[tuple[str, str, str]], held: list[tuple[str, str, str]],
                       recipes: dict[str, list[str]]) -> tuple[list[int], dict[str, Any]]:
    """The training pairs that share no group (recipe or caption chain) with the eval file's pairs, and a
    report: recipes on each side, training pairs dropped, and the recipes file's recipes each side touches."""
    groups, owners = recipe_groups(train + held, recipes)
    held_groups = set(groups[len(train):])
    kept = [i for i in range(len(train)) if groups[i] not in held_groups]
    train_recipes = set().union(*(owners[i] for i in kept)) if kept else set()
    held_recipes = set().union(*(owners[len(train) + i] for i in range(len(held)))) if held else set()
    report = {"by": "recipes", "train_pairs": len(kept), "dropped_train_pairs": len(train) - len(kept),
              "eval_pairs": len(held), "train_recipes": len(train_recipes), "eval_recipes": len(held_recipes),
              "recipe_overlap": len(train_recipes & held_recipes),
              "recipes_file": len(recipes),
              "recipes_file_in_train": len(train_recipes), "recipes_file_in_eval": len(held_recipes),
              "unmatched_train_pairs": sum(1 for i in kept if not owners[i])}
    return kept, report


def read_recipes(uri: str) -> dict[str, list[str]]:
    """Recipe id -> step texts, from the recipes layout (``dataset.json``: an object keyed by id with ``steps``)."""
    data = json.loads(storage.read_bytes(uri))
    if not isinstance(data, dict):
        raise ValueError(f"{uri}: expected the recipes layout (an object keyed by recipe id)")
    return {str(rid): [str(s) for s in r.get("steps", [])] for rid, r in data.items() if isinstance(r, dict)}


class AnswerDataset:
    """Tokenised examples for `Trainer`: prompt ids with labels -100, then the answer ids as labels."""

    def __init__(self, prompt_format: PromptFormat, pairs: list[tuple[str, str, str]], max_answer_tokens: int,
                 max_length: int | None = None):
        self.examples = []
        for previous, current, caption in pairs:
            prompt = prompt_format.prompt_ids(previous, current)
            answer = prompt_format.answer_ids(previous, current, caption)[:max_answer_tokens]
            ids, labels = prompt + answer, [-100] * len(prompt) + answer
            self.examples.append({"input_ids": ids[:max_length], "labels": labels[:max_length]})

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]


def warmup_arguments(ratio: float) -> dict[str, float]:
    """The warmup as a share of all steps on every transformers ``pyproject`` allows: ``warmup_ratio`` where
    TrainingArguments has it (4.x, where ``warmup_steps=0.03`` meant 0 steps), else a float ``warmup_steps``
    below 1, which 5.x reads as the ratio."""
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    return {"warmup_ratio": ratio} if "warmup_ratio" in fields else {"warmup_steps": ratio}


def training_arguments(tc: CaptionerTrainConfig, output_dir: str, device, progress: bool = False):
    import torch
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir, num_train_epochs=tc.epochs, learning_rate=tc.lr,
        per_device_train_batch_size=tc.batch_size, gradient_accumulation_steps=tc.grad_accum,
        weight_decay=tc.weight_decay, **warmup_arguments(tc.warmup_ratio),
        lr_scheduler_type=tc.scheduler, seed=tc.seed, data_seed=tc.seed, logging_steps=1, save_strategy="no",
        report_to=[], disable_tqdm=not progress, use_cpu=torch.device(device).type == "cpu",
        bf16=torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported(), dataloader_num_workers=0)


def with_lora(model, lora: LoraSettings):
    """The model wrapped with fresh LoRA adapters: only they train (peft freezes the rest)."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                            target_modules=list(lora.targets), bias="none", task_type="CAUSAL_LM"))


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, all) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def fine_tune(model, tokenizer, prompt_format: PromptFormat, pairs: list[tuple[str, str, str]],
              tc: CaptionerTrainConfig, device, progress: bool = False) -> list[dict[str, float]]:
    """Fine-tuning with `Trainer` (whatever of ``model`` is trainable); the loss of every optimiser step."""
    from transformers import DataCollatorForSeq2Seq, PrinterCallback, Trainer

    with tempfile.TemporaryDirectory(prefix="cosed-captioner-") as scratch:
        args = training_arguments(tc, scratch, device, progress)
        tokenizer.padding_side = "right"  # training pads after the answer: positions 0.. as in generation
        try:
            collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
            dataset = AnswerDataset(prompt_format, pairs, tc.max_answer_tokens, tc.max_length)
            trainer = Trainer(model=model, args=args, train_dataset=dataset,
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
                    progress: bool = False, eval_pairs_uri: str | None = None,
                    recipes_uri: str | None = None) -> dict[str, Any]:
    """Fine-tune ``base`` on the pairs, save it (the paper recipe: its LoRA adapters) under ``out`` (folder or
    s3:// prefix) with ``captioner.json``, and score it on the held-out pairs against the base and ``template``."""
    import torch
    import transformers

    from cosed.models.loaders import load_lm, save_lm

    pair_set = load_pair_set(pairs_uri, tc.limit)
    recipes = read_recipes(recipes_uri) if recipes_uri else {}
    if eval_pairs_uri:
        held_pairs = load_pair_set(eval_pairs_uri).pairs
        train_index, split_report = split_by_eval_file(pair_set.pairs, held_pairs, recipes)
        held_index: list[int] = []
    else:
        train_index, held_index = split_pairs(pair_set.pairs, tc.holdout, tc.seed, recipes)
        held_pairs = [pair_set.pairs[i] for i in held_index]
        split_report = {"by": "recipes" if recipes else "caption chains"}
    train_pairs = [pair_set.pairs[i] for i in train_index]
    base_captioner = Captioner(base, device=device, cache_dir=cache_dir, config=config)
    model, tokenizer = load_lm(base_captioner.folder, device, dtype="float32")
    saved_dtype = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
    paper = tc.recipe == "paper"
    prompt_format = PromptFormat(tokenizer, tc.max_length or config.prompt_tokens if paper else config.prompt_tokens,
                                 alpaca=paper)
    transformers.set_seed(tc.seed)
    if tc.lora is not None:
        model = with_lora(model, tc.lora)
    trainable, total = trainable_parameters(model)

    start = time.perf_counter()
    losses = fine_tune(model, tokenizer, prompt_format, train_pairs, tc, device, progress)
    seconds = time.perf_counter() - start

    with tempfile.TemporaryDirectory(prefix="cosed-captioner-out-") as staging:
        folder = Path(out) if not storage.is_s3(out) else Path(staging)
        model.eval()
        if str(saved_dtype).removeprefix("torch.") in ("bfloat16", "float16"):
            model.to(getattr(torch, str(saved_dtype).removeprefix("torch.")))
        if paper:
            tokenizer.chat_template = None  # the saved captioner prompts in Alpaca, as it was trained
        save_lm(model, tokenizer, folder)  # a peft model saves its adapters only (adapter_model.safetensors)
        checksum = weights_checksum(str(folder))
        report: dict[str, Any] = {
            "base": base, "base_checksum": base_captioner.checksum, "checksum": checksum,
            "random_weights": random_weights,
            "data": {"pairs": pairs_uri, "sha256": pair_set.sha256, "used": len(pair_set.pairs),
                     "skipped_malformed": pair_set.skipped, "train": len(train_index), "held_out": len(held_pairs)},
            "parameters": {"trainable": trainable, "total": total},
            "settings": {**asdict(tc), "generation": asdict(config),
                         "prompt": "chat template" if prompt_format.templated else "alpaca (no chat template)",
                         "transformers": transformers.__version__, "torch": torch.__version__},
            "split": {"seed": tc.seed, "holdout": tc.holdout, **split_report,
                      **({"eval_pairs_file": eval_pairs_uri} if eval_pairs_uri else {}),
                      **({"recipes_file": recipes_uri} if recipes_uri else {}),
                      "held_out_pairs": [pair_set.numbers[i] for i in held_index]},
            "loss": losses, "train_seconds": round(seconds, 2),
        }
        if held_pairs and embed_texts is not None:
            del model  # scored as saved: loaded back through the one LM loader
            trained = Captioner(str(folder), device=device, cache_dir=cache_dir, config=config)
            rewriters = {"trained": LMRewriter(trained.load()), "base": LMRewriter(base_captioner.load()),
                         "template": TemplateRewriter()}
            report["held_out"] = evaluate_rewriters(rewriters, held_pairs, embed_texts)
        (folder / REPORT).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if storage.is_s3(out):
            for path in sorted(p for p in folder.iterdir() if p.is_file()):
                storage.write_bytes(storage.join(out, path.name), path.read_bytes())
    return report
