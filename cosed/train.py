"""Selector training (method.md §5, paper Eq. 9) and held-out retrieval evaluation.

Per task one step is the query ("next scene") and its earlier steps are the
keys ("past scenes"). Logits are every query against every key of the batch;
the positives of a query are its own task's keys (multi-positive
cross-entropy: the mean log-softmax over positives).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

from cosed import storage
from cosed.config import RunConfig
from cosed.generate import batches
from cosed.seeds import derive_seed, gaussian_latent
from cosed.selector import ContrastiveSelector
from cosed.tasks import Task


@dataclass
class TrainConfig:
    """Paper defaults (Adam, lr 0.01, batch 500, 10 epochs) plus the training temperature.

    Eq. 7's 1/sqrt(512) keeps logits within about +-0.1, too flat for a softmax
    over the ~1,500 keys of a batch; training logits are the mean of the two
    modalities' inner products over ``temperature``, the usual contrastive
    temperature (scoring at generation time stays exactly Eq. 7-8).
    """

    epochs: int = 10
    batch_size: int = 500
    lr: float = 0.01
    temperature: float = 0.07
    holdout: float = 0.2
    seed: int = 0


@dataclass
class TaskScenes:
    """CLIP embeddings of one task's steps: caption text and step image, (steps, 512) each."""

    task_id: str
    text: np.ndarray
    image: np.ndarray


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
    for rows in batches(len(steps), cfg.sd.batch_size):
        (rendered,) = backend.render_many([captions[steps[i] - 1] for i in rows], [starts[list(rows)]], cfg.sd, [])
        images.extend(rendered.images)
    return images


def image_embeddings(task: Task, captions: list[str], backend, cache, cfg: RunConfig, sd_model: str,
                     generate_missing: bool) -> np.ndarray:
    """Embeddings of the task's own step images, or of seeded renders (rendered only when not cached)."""
    if task.step_images:
        return cache.images([load_image(uri) for uri in task.step_images])
    if not generate_missing:
        raise ValueError(f"task {task.id!r} has no step_images; pass --generate-missing to render them")
    keys = generated_image_keys(task, captions, cfg, sd_model)
    return cache.keyed(keys, lambda missing: backend.embed_images(
        render_step_images(task, captions, [i + 1 for i in missing], backend, cfg)))


def split(scenes: list[TaskScenes], holdout: float, seed: int) -> tuple[list[TaskScenes], list[TaskScenes]]:
    """A seeded split into (train, held-out); tasks of one step cannot form a query and are dropped."""
    usable = [s for s in scenes if len(s.text) >= 2]
    order = torch.randperm(len(usable), generator=torch.Generator().manual_seed(seed)).tolist()
    n_held = int(round(holdout * len(usable)))
    return [usable[i] for i in order[n_held:]], [usable[i] for i in order[:n_held]]


def contrastive_loss(selector: ContrastiveSelector, batch: list[TaskScenes], query_steps: list[int],
                     temperature: float = 0.07) -> torch.Tensor:
    """Multi-positive in-batch cross-entropy of Eq. 9."""
    tensor = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32))  # noqa: E731
    q_text = tensor([s.text[q] for s, q in zip(batch, query_steps)])
    q_image = tensor([s.image[q] for s, q in zip(batch, query_steps)])
    k_text = tensor(np.concatenate([s.text[:q] for s, q in zip(batch, query_steps)]))
    k_image = tensor(np.concatenate([s.image[:q] for s, q in zip(batch, query_steps)]))
    owner = torch.as_tensor(np.repeat(np.arange(len(batch)), query_steps))
    logits = selector.next_scene(q_text, q_image) @ selector.past_scene(k_text, k_image).T / (2 * temperature)
    positives = (owner[None, :] == torch.arange(len(batch))[:, None]).float()
    log_p = torch.log_softmax(logits, dim=1)
    return -((log_p * positives).sum(1) / positives.sum(1)).mean()


def train_selector(train: list[TaskScenes], tc: TrainConfig,
                   selector: ContrastiveSelector | None = None, on_epoch=None) -> tuple[ContrastiveSelector, list[float]]:
    """Adam over shuffled batches of tasks; each epoch draws one query step per task."""
    selector = selector or ContrastiveSelector.untrained(seed=tc.seed)
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
                loss = contrastive_loss(selector, batch, queries, tc.temperature)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item() * len(batch)
                count += len(batch)
            losses.append(total / max(count, 1))
            if on_epoch:
                on_epoch(epoch + 1, losses[-1])
    return selector.eval(), losses


def retrieval_metrics(selector: ContrastiveSelector, held: list[TaskScenes]) -> dict[str, float]:
    """Rank each held-out task's true last scene among all held-out tasks' last scenes (Eq. 8 scores)."""
    if len(held) < 2:
        return {"top1": float("nan"), "mrr": float("nan"), "queries": len(held)}
    cand_text = np.stack([s.text[-1] for s in held])
    cand_image = np.stack([s.image[-1] for s in held])
    ranks = []
    for own, scenes in enumerate(held):
        scores = selector.score(cand_text, cand_image, scenes.text[:-1], scenes.image[:-1])
        ranks.append(1 + int(np.sum(scores > scores[own])))
    ranks = np.asarray(ranks)
    return {"top1": float(np.mean(ranks == 1)), "mrr": float(np.mean(1.0 / ranks)), "queries": len(held)}


def train_report(tc: TrainConfig, selector: ContrastiveSelector, losses: list[float], trained: dict,
                 untrained: dict, n_train: int, extra: dict) -> dict:
    return {"train_config": asdict(tc), "parameters": selector.num_parameters(), "loss_per_epoch": losses,
            "train_tasks": n_train, "held_out": {"trained": trained, "untrained": untrained}, **extra}


def collect_scenes(tasks: list[Task], rewriter, backend, cache, cfg: RunConfig, sd_model: str,
                   generate_missing: bool, progress: bool = True) -> list[TaskScenes]:
    """Caption and image embeddings of every step of every task (cached on disk)."""
    from tqdm.auto import tqdm

    scenes = []
    for task in tqdm(tasks, desc="embedding", unit="task", disable=not progress):
        captions = rewriter.captions(task)
        images = image_embeddings(task, captions, backend, cache, cfg, sd_model, generate_missing)
        scenes.append(TaskScenes(task_id=task.id, text=cache.texts(captions), image=images))
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
    train, held = split(scenes, tc.holdout, tc.seed)
    if not train:
        raise ValueError("no task with two or more steps to train on")
    untrained = retrieval_metrics(ContrastiveSelector.untrained(seed=tc.seed), held)

    def log_epoch(epoch: int, loss: float) -> None:
        if progress:
            print(f"epoch {epoch}/{tc.epochs}: loss {loss:.4f}", flush=True)

    selector, losses = train_selector(train, tc, on_epoch=log_epoch)
    trained = retrieval_metrics(selector, held)
    report = train_report(tc, selector, losses, trained, untrained, len(train), {
        "profile": profile.name, "random_weights": profile.random_weights, "clip": profile.model_names()["clip"],
        "rewriter": cfg.rewriter, "tasks": len(task_set.tasks), "rejected": len(task_set.errors),
        "held_out_tasks": len(held), "images": "generated" if generate_missing else "step_images"})
    selector.save(storage.join(out, "selector.safetensors"),
                  metadata={"parameters": report["parameters"], "train_config": report["train_config"]})
    storage.write_text(storage.join(out, "selector.json"), json.dumps(report, indent=2) + "\n")
    return report
