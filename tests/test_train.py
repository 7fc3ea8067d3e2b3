import numpy as np
import pytest

from cosed.selector import ContrastiveSelector
from cosed.train import TaskScenes, TrainConfig, contrastive_loss, retrieval_metrics, split, train_selector


def separable_tasks(count=80, steps=2, seed=0) -> list[TaskScenes]:
    """Each task has a code; its last step shows the code turned by one fixed rotation.

    Plain CLIP similarity (the untrained selector) cannot see that the last step
    belongs with the earlier ones; the separate next/past projections can learn
    the rotation, and it is the same for every task, so it carries to held-out tasks.
    """
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(np.random.default_rng(99).normal(size=(64, 64)))
    scenes = []
    for index in range(count):
        code = rng.normal(size=64)
        code /= np.linalg.norm(code)

        def embed(vector):
            full = np.concatenate([vector, rng.normal(scale=0.01, size=448)])
            return full / np.linalg.norm(full)

        rows = [embed(code) for _ in range(steps - 1)] + [embed(rotation @ code)]
        scenes.append(TaskScenes(task_id=str(index), text=np.stack(rows), image=np.stack(rows)))
    return scenes


def test_training_on_a_separable_set_reaches_top1_on_held_out_tasks():
    train, held = split(separable_tasks(count=300), holdout=0.2, seed=0)
    assert len(held) == 60 and not {s.task_id for s in train} & {s.task_id for s in held}
    before = retrieval_metrics(ContrastiveSelector.untrained(), held)
    selector, losses = train_selector(train, TrainConfig(epochs=30, batch_size=48, lr=0.01))
    after = retrieval_metrics(selector, held)
    assert after["top1"] == 1.0 and after["mrr"] == 1.0
    assert before["top1"] < 0.5
    assert losses[-1] < losses[0]


def test_loss_is_the_multi_positive_in_batch_cross_entropy():
    scenes = separable_tasks(count=3, steps=3)

    selector = ContrastiveSelector.untrained()
    loss = contrastive_loss(selector, scenes, [2, 1, 2], temperature=0.07)
    import torch

    q = selector.next_scene(torch.tensor(np.stack([scenes[0].text[2], scenes[1].text[1], scenes[2].text[2]]), dtype=torch.float32),
                            torch.tensor(np.stack([scenes[0].image[2], scenes[1].image[1], scenes[2].image[2]]), dtype=torch.float32))
    keys_t = np.concatenate([scenes[0].text[:2], scenes[1].text[:1], scenes[2].text[:2]])
    keys_v = np.concatenate([scenes[0].image[:2], scenes[1].image[:1], scenes[2].image[:2]])
    k = selector.past_scene(torch.tensor(keys_t, dtype=torch.float32), torch.tensor(keys_v, dtype=torch.float32))
    log_p = torch.log_softmax(q @ k.T / (2 * 0.07), dim=1)
    expected = -(log_p[0, :2].mean() + log_p[1, 2:3].mean() + log_p[2, 3:].mean()) / 3
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_single_step_tasks_cannot_be_queries_and_are_dropped():
    one = TaskScenes("x", np.zeros((1, 512)), np.zeros((1, 512)))
    train, held = split([one] + separable_tasks(count=4), holdout=0.5, seed=1)
    assert "x" not in {s.task_id for s in train + held} and len(train) == len(held) == 2
