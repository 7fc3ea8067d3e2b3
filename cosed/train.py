"""Selector training (method.md §5, paper Eq. 9): the decision Eq. 8 makes, learned in-batch.

Per task one step is the "next scene" and its earlier steps are the "past
scenes". Logits are `ContrastiveSelector.similarity` (Eq. 7 over the
checkpoint's temperature) between every next scene and every past scene of
the batch; for each past scene, a softmax over the batch's next scenes, whose
target is its own task's next scene — the softmax over candidates of Eq. 8.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

from cosed import storage
from cosed.calls import EmbedImages, RenderRequest
from cosed.config import RunConfig
from cosed.generate import batches
from cosed.seeds import derive_seed, gaussian_latent
from cosed.heldout import TaskScenes, compare_selectors, split_by_title, write_split
from cosed.selector import ContrastiveSelector
from cosed.tasks import Task


@dataclass
class TrainConfig:
    """Paper defaults (Adam, lr 0.01, batch 500, 10 epochs) plus an optional temperature.

    ``temperature`` divides Eq. 7's logits during training and is saved in the
    checkpoint, so scoring at generation divides by it too; 1 (the default) is
    exactly Eq. 7, sensible because the selector sees raw CLIP features.
    """

    epochs: int = 10
    batch_size: int = 500
    lr: float = 0.01
    temperature: float = 1.0
    holdout: float = 0.2
    seed: int = 0


def load_image(uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(storage.read_bytes(uri))).convert("RGB"))


def generated_image_keys(task: Task, captions: list[str], cfg: RunConfig, sd_model: str) -> list[str]:
    """What decides a rendered step image, so its embedding can be cached without rendering it again."""
    sd = cfg.sd
    return [hashlib.sha256(f"generated\x1f{sd_model}\x1f{cfg.seed}\x1f{task.id}\x1f{n}\x1f{caption}\x1f"
                           f"{sd.height}x{sd.width}x{sd.num_inference_steps}x{sd.guidance_scale}".encode()).hexdigest()
            for n, caption in enumerate(captions, start=1)]


def render_step_images(task: Task, captions: list[str], steps: list[int], backend, cfg: RunConfig) -> list[np.ndarray]:
    """One seeded text-to-image render for each listed step (numbered from 1)."""
    shape = backend.latent_shape(cfg.sd)
    starts = np.stack([gaussian_latent(derive_seed(cfg.seed, task.id, n, "train-image"), shape).numpy() for n in steps])
    images = []
    requests = [RenderRequest(tuple(captions[steps[i] - 1] for i in rows), starts[list(rows)], cfg.sd, ())
                for rows in batches(len(steps), cfg.sd.batch_size)]
    for rendered in backend.render(requests):
        images.extend(backend.fetch(handle) for handle in rendered.images)
    return images


def image_embeddings(task: Task, captions: list[str], backend, cache, cfg: RunConfig, sd_model: str,
                     generate_missing: bool) -> np.ndarray:
    """Embeddings of the task's own step images, or of seeded renders (rendered only when not cached)."""
    if task.step_images:
        return cache.images([load_image(uri) for uri in task.step_images])
    if not generate_missing:
        raise ValueError(f"task {task.id!r} has no step_images; pass --generate-missing to render them")
    keys = generated_image_keys(task, captions, cfg, sd_model)
    return cache.keyed(keys, lambda missing: backend.embed_images(EmbedImages(tuple(
        render_step_images(task, captions, [i + 1 for i in missing], backend, cfg)))))


def contrastive_loss(selector: ContrastiveSelector, batch: list[TaskScenes], query_steps: list[int]) -> torch.Tensor:
    """Mean over the batch's past scenes of -log p(own next scene | past scene), p the Eq. 8 softmax over next scenes."""
    tensor = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32))  # noqa: E731
    next_text = tensor([s.text[q] for s, q in zip(batch, query_steps)])
    next_image = tensor([s.image[q] for s, q in zip(batch, query_steps)])
    past_text = tensor(np.concatenate([s.text[:q] for s, q in zip(batch, query_steps)]))
    past_image = tensor(np.concatenate([s.image[:q] for s, q in zip(batch, query_steps)]))
    owner = torch.as_tensor(np.repeat(np.arange(len(batch)), query_steps))
    logits = selector.similarity(next_text, next_image, past_text, past_image)
    return torch.nn.functional.cross_entropy(logits.T, owner)


def train_selector(train: list[TaskScenes], tc: TrainConfig,
                   selector: ContrastiveSelector | None = None, on_epoch=None) -> tuple[ContrastiveSelector, list[float]]:
    """Adam over shuffled batches of tasks; each epoch draws one next-scene step per task."""
    selector = selector or ContrastiveSelector.untrained(seed=tc.seed)
    selector.temperature = tc.temperature
    selector.train()
    optimizer = torch.optim.Adam(selector.parameters(), lr=tc.lr)
    gen = torch.Generator().manual_seed(tc.seed)
    losses = []
    with torch.enable_grad():
        for epoch in range(tc.epochs):
            order = torch.randperm(len(train), generator=gen).tolist()
            total, count = 0.0, 0
            for start in range(0, len(order), tc.batch_size):
                batch = [train[i] for i in order[start:start + tc.batch_size]]
                queries = [int(torch.randint(1, len(s.text), (1,), generator=gen)) for s in batch]
                loss = contrastive_loss(selector, batch, queries)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item() * len(batch)
                count += len(batch)
            losses.append(total / max(count, 1))
            if on_epoch:
                on_epoch(epoch + 1, losses[-1])
    return selector.eval(), losses


HELD_OUT_PROTOCOL = ("each held-out task and step i >= 2: its true step image among the step-i images of the other "
                     "held-out tasks, all with the true caption, scored against its steps before i (as at generation); "
                     "per-task means, 95% bootstrap intervals over tasks")


def train_report(tc: TrainConfig, selector: ContrastiveSelector, losses: list[float], held_out: dict,
                 n_train: int, extra: dict) -> dict:
    return {"train_config": asdict(tc), "parameters": selector.num_parameters(), "loss_per_epoch": losses,
            "train_tasks": n_train, "held_out": held_out, "held_out_protocol": HELD_OUT_PROTOCOL, **extra}


def collect_scenes(tasks: list[Task], rewriter, backend, cache, cfg: RunConfig, sd_model: str,
                   generate_missing: bool, progress: bool = True) -> list[TaskScenes]:
    """Caption and image embeddings of every step of every task (cached on disk)."""
    from tqdm.auto import tqdm

    scenes = []
    for task in tqdm(tasks, desc="embedding", unit="task", disable=not progress):
        captions = rewriter.captions(task)
        images = image_embeddings(task, captions, backend, cache, cfg, sd_model, generate_missing)
        scenes.append(TaskScenes(task_id=task.id, text=cache.texts(captions), image=images, title=task.title))
    return scenes


def run_training(tasks_uri: str, out: str, cfg: RunConfig, tc: TrainConfig, *, backend, profile,
                 generate_missing: bool = False, progress: bool = True) -> dict:
    """Embed, split, train, evaluate trained vs untrained, and write the checkpoint and its report."""
    import json

    from cosed.embed import EmbeddingCache
    from cosed.rewrite import make_rewriter
    from cosed.runner import profile_cache, read_tasks, write_errors

    task_set = read_tasks(tasks_uri, cfg)
    write_errors(out, task_set.errors)
    rewriter = make_rewriter(cfg.rewriter, model=cfg.rewriter_model, cache_dir=profile_cache(cfg))
    cache = EmbeddingCache(backend, profile.model_names()["clip"], profile_cache(cfg) / "embeddings")
    scenes = collect_scenes(task_set.tasks, rewriter, backend, cache, cfg, profile.model_names()["sd"],
                            generate_missing, progress)
    train, held = split_by_title(scenes, tc.holdout, tc.seed)
    if not train:
        raise ValueError("no task with two or more steps to train on")

    def log_epoch(epoch: int, loss: float) -> None:
        if progress:
            print(f"epoch {epoch}/{tc.epochs}: loss {loss:.4f}", flush=True)

    selector, losses = train_selector(train, tc, on_epoch=log_epoch)
    held_out = compare_selectors(selector, ContrastiveSelector.untrained(seed=tc.seed), held, tc.seed)
    report = train_report(tc, selector, losses, held_out, len(train), {
        "profile": profile.name, "random_weights": profile.random_weights, "clip": profile.model_names()["clip"],
        "rewriter": cfg.rewriter, "tasks": len(task_set.tasks), "rejected": len(task_set.errors),
        "held_out_tasks": len(held), "images": "generated" if generate_missing else "step_images"})
    write_split(out, train, held, tc.holdout, tc.seed)
    selector.save(storage.join(out, "selector.safetensors"),
                  metadata={"parameters": report["parameters"], "train_config": report["train_config"]})
    storage.write_text(storage.join(out, "selector.json"), json.dumps(report, indent=2) + "\n")
    return report
