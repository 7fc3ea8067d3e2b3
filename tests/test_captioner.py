"""The lm rewriter's captioner: chat-template prompts, batch-independent greedy captions, the shared
caption cache, training on the authors' pairs, and the captioner's place in fingerprints and profiles."""

import dataclasses
import json
import shutil
import subprocess
import sys

from collections import Counter

import pytest
import torch
from safetensors.torch import load_file, save_file

from cosed.caption_eval import read_pairs
from cosed.captioner import (Captioner, CaptionCache, CaptionerConfig, PromptFormat, chat_messages, pair_input,
                             weights_checksum, window_context)
from cosed.cli import main
from cosed.config import RunConfig
from cosed.engine import _captioner_checksum, captioner_checksum, task_fingerprint
from cosed.models.fetch import hub_files, lm_weight_files
from cosed.models.loaders import load_lm
from cosed.models.profiles import available_profiles, profile_data, resolve_profile
from cosed.rewrite import make_rewriter, truncate_to_clip
from cosed.runner import resolve_run
from cosed.tasks import Task

from conftest import SHARED_RECIPES, needs_shared_recipes, write_jsonl

PAIRS = [
    ("", "Preheat the oven to 350 degrees."),
    ("an oven with its door open", "Grease a baking pan with butter."),
    ("a pan greased with butter", "Whisk the eggs and the sugar in a large bowl."),
    ("", "Boil water in a kettle."),
    ("a kettle on a stove", "Pour the water over the tea leaves and steep for three minutes."),
    ("a cup of tea", "Add milk and honey."),
    ("", "Cut the board to length with a hand saw."),
    ("a board on a workbench " * 60, "Sand the edges smooth."),  # longer than the prompt: cut from the left
    ("a sanded board", "Drill two holes and screw it to the wall."),
    ("", "Dice the onion."),
    ("a diced onion on a board", "Fry the onion until golden."),
]


@pytest.fixture(scope="module")
def twin(tiny_cache):
    """The untrained tiny twin, loaded once; tests give it their own cache roots."""
    return Captioner("tiny:captioner", cache_dir=tiny_cache).load()


def sibling(twin, root, config=None):
    """A captioner on the same loaded model with its own cache root (and counters)."""
    other = Captioner(twin.source, cache_dir=twin.cache_dir, cache_root=str(root), config=config or twin.config)
    other.model, other.tokenizer = twin.model, twin.tokenizer
    return other


def test_prompts_use_the_tokenizers_chat_template_with_the_reference_window(twin):
    assert chat_messages("a pot", "Boil it.") == [{"role": "user", "content": (
        "Give me the image caption for this recipe.\n\nStep 1: a pot\nStep 2: Boil it.")}]
    assert chat_messages("", "Boil it.")[0]["content"].endswith("\n\nStep 1: Boil it.")
    prompt = PromptFormat(twin.tokenizer, 384)
    ids = prompt.prompt_ids("a pot", "Boil it.")
    text = twin.tokenizer.decode(ids)
    assert text == twin.tokenizer.apply_chat_template(chat_messages("a pot", "Boil it."), tokenize=False,
                                                      add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    long = prompt.prompt_ids(*PAIRS[7])
    assert len(long) == 384 and long[:len(prompt.head)] == prompt.head and long[-len(prompt.tail):] == prompt.tail
    assert twin.tokenizer.decode(long).endswith("Step 2: Sand the edges smooth.<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.answer_ids("a pot", "Boil it.", "a boiling pot") == prompt.encode("a boiling pot<|im_end|>\n")


def test_a_pairs_caption_does_not_depend_on_its_batch(twin, tmp_path):
    together = sibling(twin, tmp_path / "together")
    captions = together.caption_pairs(PAIRS)
    assert together.generate_calls == 2 and together.generated == len(PAIRS)  # batches of 8, the second filled
    # the twin has random weights, but it writes text: the test would see a padding or batching effect
    assert sum(c != truncate_to_clip(step) for c, (_, step) in zip(captions, PAIRS)) >= len(PAIRS) - 2
    assert all(len(c.split()) <= 75 for c in captions)

    alone = sibling(twin, tmp_path / "alone")
    assert [alone.caption_pairs([pair])[0] for pair in PAIRS] == captions
    assert alone.generate_calls == len(PAIRS)

    mixed = sibling(twin, tmp_path / "mixed")
    order = [10, 3, 7, 0, 5, 9, 1, 8, 2, 6, 4]
    chunks = [order[:3], order[3:4], order[4:]]
    for chunk in chunks:
        for index, caption in zip(chunk, mixed.caption_pairs([PAIRS[i] for i in chunk])):
            assert caption == captions[index], PAIRS[index]
    assert mixed.generate_calls == 3


def test_the_cache_answers_a_resubmit_without_generating(twin, tmp_path):
    first = sibling(twin, tmp_path / "captions")
    captions = first.caption_pairs(PAIRS[:5] + PAIRS[:2])  # a pair twice in one call is generated once
    assert first.generated == 5 and first.generate_calls == 1
    assert first.caption_pairs(PAIRS[:5]) == captions[:5] and first.generate_calls == 1
    resubmit = sibling(twin, tmp_path / "captions")
    assert resubmit.caption_pairs(list(reversed(PAIRS[:5]))) == list(reversed(captions[:5]))
    assert resubmit.generate_calls == 0 and resubmit.generated == 0
    assert len(list((tmp_path / "captions").glob("*.txt"))) == 5

    # the key holds the weights and the generation settings: other weights or settings never read these
    other = CaptionCache(str(tmp_path / "captions"), "0" * 64, twin.config)
    assert other.get(*PAIRS[0]) is None
    longer = CaptionCache(str(tmp_path / "captions"), twin.checksum, CaptionerConfig(max_new_tokens=20))
    assert longer.get(*PAIRS[0]) is None and first.cache.get(*PAIRS[0]) == captions[0]
    # first writer wins: a second writer of the same key gets the stored caption back
    assert first.cache.put(*PAIRS[0], "something else") == captions[0]


def test_the_lm_rewriter_captions_step_by_step_as_caption_pairs(twin, tiny_cache, tmp_path):
    task = Task(id="cake", title="Cake", steps=tuple(step for _, step in PAIRS[:3]))
    rewriter = make_rewriter("lm", model="tiny:captioner", cache_dir=tiny_cache, cache_root=str(tmp_path / "r"))
    captions = rewriter.captions(task)
    reference = sibling(twin, tmp_path / "p")
    # The reference's window: nothing, then step 1's raw text, then the caption made for the step before.
    for step, previous, caption in zip(task.steps, ["", task.steps[0], captions[1]], captions):
        assert reference.caption_pairs([(previous, step)]) == [caption]
    assert rewriter.captioner.generate_calls == 3 and rewriter.captioner.checksum == twin.checksum


def test_empty_answers_fall_back_to_the_step(twin, tmp_path, monkeypatch):
    captioner = sibling(twin, tmp_path)
    monkeypatch.setattr(captioner, "_generate", lambda pairs: [" "] * len(pairs))
    assert captioner.caption_pairs([("x", "Chop the onion.")]) == ["Chop the onion."]


def changed_weights(folder):
    weights = load_file(folder / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 0.5
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_the_fingerprint_holds_the_captioner_checksum_only_under_lm(tiny_cache, tmp_path):
    folder = tmp_path / "captioner"
    shutil.copytree(Captioner("tiny:captioner", cache_dir=tiny_cache).folder, folder)
    task = Task(id="tea", title="Tea", steps=("Boil water.",))
    profile = resolve_profile("tiny", tiny_cache)
    lm = RunConfig(rewriter="lm", rewriter_model=str(folder), cache_dir=str(tiny_cache))
    template = RunConfig(rewriter="template", cache_dir=str(tiny_cache))
    before = {cfg.rewriter: task_fingerprint(task, profile, cfg) for cfg in (lm, template)}
    checksum = captioner_checksum(lm)
    assert checksum == weights_checksum(str(folder)) and captioner_checksum(template) is None

    changed_weights(folder)
    _captioner_checksum.cache_clear()
    assert captioner_checksum(lm) != checksum
    assert task_fingerprint(task, profile, lm) != before["lm"]
    assert task_fingerprint(task, profile, template) == before["template"]

    # under template the profile's captioner stays out of the config; under lm it is the default model
    assert resolve_run(template)[1].rewriter_model is None
    assert resolve_run(dataclasses.replace(lm, rewriter_model=None))[1].rewriter_model == "tiny:captioner"


def test_generate_with_the_lm_rewriter_records_captions_and_checksum(tiny_cache, tmp_path, capsys):
    tasks = write_jsonl(tmp_path / "t.jsonl", [{"id": "tea", "title": "Tea", "steps": ["Boil water.", "Steep."]}])
    args = ["generate", "--tasks", str(tasks), "--out", str(tmp_path / "out"), "--no-ray", "--rewriter", "lm",
            "--cache-dir", str(tiny_cache), "--quiet"]
    assert main(args) == 0
    manifest = json.loads((tmp_path / "out" / "tea" / "manifest.json").read_text())
    twin = Captioner("tiny:captioner", cache_dir=tiny_cache, cache_root=str(tmp_path / "fresh"))
    assert manifest["captioner"] == twin.checksum and manifest["config"]["rewriter_model"] == "tiny:captioner"
    first = twin.caption_pairs([("", "Boil water.")])[0]
    # step 2's window holds step 1's raw text, as the reference's
    assert [s["caption"] for s in manifest["steps"]] == [first, twin.caption_pairs([("Boil water.", "Steep.")])[0]]
    assert main(args) == 0 and "1 skipped" in capsys.readouterr().out


@pytest.fixture(scope="module")
def trained(tiny_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "captioner"
    assert main(["train-captioner", "--pairs", str(SHARED_RECIPES / "captions_train.json"), "--out", str(out),
                 "--profile", "tiny", "--limit", "300", "--holdout", "0.1", "--cache-dir", str(tiny_cache),
                 "--quiet"]) == 0
    return out


@needs_shared_recipes()
def test_train_captioner_lowers_the_loss_and_writes_a_loadable_checkpoint(trained, tiny_cache, capsys):
    report = json.loads((trained / "captioner.json").read_text())
    losses = [entry["loss"] for entry in report["loss"]]
    assert len(losses) >= 30 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert report["base"] == "tiny:captioner" and report["random_weights"]
    assert report["data"]["used"] == 300 and report["data"]["train"] + report["data"]["held_out"] == 300
    assert report["data"]["skipped_malformed"] == [1517, 4417]  # the authors' two "Step 2:"-only inputs
    assert len(report["split"]["held_out_pairs"]) == report["data"]["held_out"] > 0
    assert report["settings"]["lr"] == 0.003 and report["settings"]["prompt"] == "chat template"
    assert set(report["held_out"]) == {"trained", "base", "template"}
    assert report["checksum"] == weights_checksum(str(trained)) != report["base_checksum"]
    assert all(p.suffix != ".bin" for p in trained.iterdir())

    model, tokenizer = load_lm(str(trained), "cpu")
    assert type(model).__name__ == "Qwen2ForCausalLM" and tokenizer.chat_template and tokenizer.padding_side == "left"
    captions = Captioner(str(trained), cache_dir=tiny_cache).caption_pairs(PAIRS[:3])
    assert len(captions) == 3 and all(captions)


@needs_shared_recipes()
def test_eval_captions_takes_a_trained_captioner(trained, tiny_cache, tmp_path):
    assert main(["eval-captions", "--pairs", str(SHARED_RECIPES / "captions_eval.json"), "--limit", "16",
                 "--rewriters", "template,lm", "--rewriter-model", str(trained), "--cache-dir", str(tiny_cache),
                 "--out", str(tmp_path / "scores.json")]) == 0
    scores = json.loads((tmp_path / "scores.json").read_text())["scores"]
    assert scores["lm"]["captioner"]["checksum"] == weights_checksum(str(trained)) and scores["lm"]["pairs"] == 16


def test_importing_the_captioner_loads_no_model_library(tiny_cache):
    """A job process builds cache keys and checksums for caption requests without transformers."""
    code = ("import sys, cosed.captioner as c, cosed.engine as e, cosed.config as k; "
            f"cfg = k.RunConfig(rewriter='lm', rewriter_model='tiny:captioner', cache_dir={str(tiny_cache)!r}); "
            "s = e.captioner_checksum(cfg); "
            "c.CaptionCache('/nonexistent', s, c.CaptionerConfig()).uri('a', 'b'); "
            "print(sorted(m for m in ('diffusers', 'transformers', 'open_clip') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


REAL = [name for name in available_profiles()
        if not profile_data(name).get("random_weights") and profile_data(name).get("backend") != "simulated"]


@pytest.mark.parametrize("name", REAL)
def test_real_profiles_name_a_permissive_captioner_with_a_tiny_twin_and_a_cost(name):
    data = profile_data(name)
    caption, twin = data["models"]["caption"], profile_data(data["tiny_twin"])
    assert caption["source"] == "Qwen/Qwen2.5-0.5B-Instruct" and caption["licence"] == "Apache-2.0"
    assert caption["gated"] is False and set(caption["memory_gib"]) == {"plain", "savers", "offload"}
    assert twin["models"]["caption"]["source"] == "tiny:captioner"
    assert twin["models"]["caption"]["pipeline"] == caption["pipeline"] == "AutoModelForCausalLM"
    for profile in (data, twin):
        assert set(profile["costs"]["caption"]) == {"fixed", "per_item"}
    resolved = resolve_profile(name)
    assert resolved.costs["caption"] == data["costs"]["caption"]  # the caption pool's cost entry
    assert "caption" not in resolved.model_names()
    assert [h.repo for h in hub_files(resolved) if h.kind == "caption"] == ["Qwen/Qwen2.5-0.5B-Instruct"]


def test_models_fetch_takes_the_captioners_safetensors_configs_and_template_only():
    files = ["config.json", "generation_config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json",
             "tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.jinja", "LICENSE", "README.md",
             "onnx/model.onnx", "gguf/model.safetensors"]
    assert lm_weight_files(files) == ["chat_template.jinja", "config.json", "generation_config.json", "merges.txt",
                                      "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.json"]


def test_cosed_profiles_lists_the_captioner(capsys):
    assert main(["profiles"]) == 0
    out = capsys.readouterr().out
    assert "caption Qwen/Qwen2.5-0.5B-Instruct" in out.replace("  ", " ") and "tiny:captioner" in out


@needs_shared_recipes()
def test_the_step_2_window_holds_step_1s_raw_text_as_in_the_authors_pairs():
    """A two-step pair of the authors' training file whose Step 1 is a recipe's raw first step: the input
    built for that recipe's step 2 is the pair's input, character for character."""
    recipes = json.loads((SHARED_RECIPES / "dataset.json").read_text())
    pair = next(p for p in json.loads((SHARED_RECIPES / "captions_train.json").read_text())
                if p["input"].startswith("Step 1: Cook linguine, according to the package instructions"))
    steps = next(r["steps"] for r in recipes.values() if pair["input"].startswith(f"Step 1: {r['steps'][0]}\n"))
    assert pair_input(window_context(steps, ["caption of step 1"], 1), steps[1]) + "\n" == pair["input"]
    assert window_context(steps, ["c1", "c2"], 2) == "c2" and window_context(steps, [], 0) == ""


@needs_shared_recipes()
def test_the_recipe_split_shares_no_recipe_with_the_eval_file():
    from cosed.train_captioner import read_recipes, split_by_eval_file

    def pairs(name):
        return read_pairs((SHARED_RECIPES / name).read_bytes(), skip_malformed=True)[0]

    train, held = pairs("captions_train.json"), pairs("captions_eval.json")
    recipes = read_recipes(str(SHARED_RECIPES / "dataset.json"))
    kept, report = split_by_eval_file(train, held, recipes)
    seen = Counter(" ".join(s.split()) for r in recipes.values() for s in set(r))
    # a step text of one recipe only names that recipe ("Serve." names none)
    owner = {" ".join(s.split()): rid for rid, r in recipes.items() for s in r if seen[" ".join(s.split())] == 1}

    def recipes_of(chosen):
        return {owner[" ".join(t.split())] for p in chosen for t in p[:2] if " ".join(t.split()) in owner}

    assert recipes_of([train[i] for i in kept]).isdisjoint(recipes_of(held))
    assert report["recipe_overlap"] == 0 and report["train_pairs"] == len(kept) > 1000
    assert report["recipes_file_in_train"] == 509 and report["recipes_file"] == 1382


def test_the_warmup_is_a_share_of_the_steps_on_this_transformers(tmp_path):
    from cosed.train_captioner import CaptionerTrainConfig, training_arguments

    args = training_arguments(CaptionerTrainConfig(warmup_ratio=0.03), str(tmp_path), "cpu")
    assert args.get_warmup_steps(1000) == 30


@needs_shared_recipes()
def test_train_captioner_paper_recipe_trains_lora_adapters_only_and_reloads_them(tiny_cache, tmp_path, capsys):
    from peft import PeftModel
    from safetensors.torch import load_file as load_tensors

    for name, count in (("captions_train.json", 24), ("captions_eval.json", 4)):
        (tmp_path / name).write_text(json.dumps(json.loads((SHARED_RECIPES / name).read_text())[:count]))
    out = tmp_path / "lora"
    assert main(["train-captioner", "--recipe", "paper", "--pairs", str(tmp_path / "captions_train.json"),
                 "--eval-pairs", str(tmp_path / "captions_eval.json"), "--recipes", str(SHARED_RECIPES / "dataset.json"),
                 "--out", str(out), "--profile", "tiny", "--epochs", "1", "--cache-dir", str(tiny_cache),
                 "--quiet"]) == 0
    report = json.loads((out / "captioner.json").read_text())
    base, _ = load_lm(Captioner("tiny:captioner", cache_dir=tiny_cache).folder, "cpu")
    lora = sum(8 * (m.in_features + m.out_features) for name, m in base.named_modules()
               if name.endswith(("q_proj", "v_proj")))
    assert report["parameters"]["trainable"] == lora < report["parameters"]["total"] / 10
    settings = report["settings"]
    assert (settings["recipe"], settings["lr"], settings["batch_size"], settings["grad_accum"], settings["scheduler"],
            settings["weight_decay"], settings["max_length"], settings["lora"]["r"], settings["lora"]["alpha"]) == (
        "paper", 1e-5, 2, 4, "cosine", 0.01, 400, 8, 32)
    assert report["split"]["recipe_overlap"] == 0 and report["data"]["held_out"] == 4
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["adapter_model.safetensors"]
    adapters = load_tensors(str(out / "adapter_model.safetensors"))
    assert sum(t.numel() for t in adapters.values()) == lora
    reloaded = PeftModel.from_pretrained(base, str(out))
    state = reloaded.state_dict()
    for key, value in adapters.items():
        match = [k for k in state if k.replace(".default", "") == key]
        assert match and torch.equal(state[match[0]], value)
    merged, tokenizer = load_lm(str(out), "cpu")  # the one LM loader merges the adapters into the base
    assert not tokenizer.chat_template  # the saved captioner prompts in Alpaca, as trained
    assert set(report["held_out"]) == {"trained", "base", "template"}
    assert f"paper: {lora:,} of" in capsys.readouterr().out


def test_an_adapter_folders_checksum_covers_its_base(tiny_cache, tmp_path):
    """LoRA adapters alone do not decide the captions: the checksum (in the fingerprint) includes the base's."""
    from safetensors.torch import save_file as save

    base = Captioner("tiny:captioner", cache_dir=tiny_cache).folder
    other = tmp_path / "other-base"
    shutil.copytree(base, other)
    weights = load_file(str(other / "model.safetensors"))
    first = next(iter(weights))
    weights[first] = weights[first] + 1
    save(weights, str(other / "model.safetensors"))
    sums = []
    for name, root in (("a", base), ("b", other)):
        folder = tmp_path / name
        folder.mkdir()
        save({"w": torch.zeros(2)}, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(root)}))
        sums.append(weights_checksum(str(folder)))
    assert sums[0] != sums[1]
