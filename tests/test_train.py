import numpy as np
import pytest
import torch

from cosed.heldout import (TaskScenes, compare_selectors, generation_retrieval, rank_of_true, selector_scorer,
                           split_beside, split_by_title, write_split)
from cosed.selector import ContrastiveSelector, plain_clip_scores, softmax_over_candidates
from cosed.train import TrainConfig, contrastive_loss, train_selector


def separable_tasks(count=80, steps=2, seed=0) -> list[TaskScenes]:
    """Each task has a code; its last step shows the code turned by one fixed rotation.

    Plain CLIP similarity (the untrained selector) cannot see that the last step
    belongs with the earlier ones; the separate next/past projections can learn
    the rotation, and it is the same for every task, so it carries to held-out tasks.
    Vectors have norm 10, like raw CLIP features.
    """
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(np.random.default_rng(99).normal(size=(64, 64)))
    scenes = []
    for index in range(count):
        code = rng.normal(size=64)
        code /= np.linalg.norm(code)

        def embed(vector):
            full = np.concatenate([vector, rng.normal(scale=0.01, size=448)])
            return 10 * full / np.linalg.norm(full)

        rows = [embed(code) for _ in range(steps - 1)] + [embed(rotation @ code)]
        scenes.append(TaskScenes(task_id=str(index), text=np.stack(rows), image=np.stack(rows), title=f"dish {index}"))
    return scenes


def test_training_improves_the_generation_time_decision_on_held_out_tasks():
    train, held = split_by_title(separable_tasks(count=300), holdout=0.2, seed=0)
    assert len(held) == 60 and not {s.task_id for s in train} & {s.task_id for s in held}
    untrained = ContrastiveSelector.untrained()
    before = generation_retrieval(selector_scorer(untrained), held)
    selector, losses = train_selector(train, TrainConfig(epochs=30, batch_size=48, lr=0.01))
    report = compare_selectors(selector, untrained, held)
    assert report["trained"]["top1"]["mean"] == 1.0 and report["trained"]["mrr"]["mean"] == 1.0
    assert before["top1"]["mean"] < 0.5 and report["untrained"] == before
    assert report["clip"]["top1"]["mean"] < 0.5 and report["trained"]["queries"] == 60
    assert losses[-1] < losses[0]


def test_the_loss_is_cross_entropy_of_the_eq8_softmax_over_next_scenes():
    scenes = separable_tasks(count=3, steps=3)
    selector = ContrastiveSelector.untrained()
    selector.temperature = 0.5
    loss = contrastive_loss(selector, scenes, [2, 1, 2])
    next_text = np.stack([scenes[0].text[2], scenes[1].text[1], scenes[2].text[2]])
    next_image = np.stack([scenes[0].image[2], scenes[1].image[1], scenes[2].image[2]])
    past_text = np.concatenate([scenes[0].text[:2], scenes[1].text[:1], scenes[2].text[:2]])
    past_image = np.concatenate([scenes[0].image[:2], scenes[1].image[:1], scenes[2].image[:2]])
    as_t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    # The generation-time probability p(c | j) of Eq. 8, from the same similarity the scorer uses.
    p = softmax_over_candidates(selector.similarity(as_t(next_text), as_t(next_image), as_t(past_text),
                                                    as_t(past_image)).detach().double().numpy())
    owner = [0, 0, 1, 2, 2]
    expected = -np.mean([np.log(p[owner[k], k]) for k in range(5)])
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def selector_on_plane() -> ContrastiveSelector:
    """2-d images, identity image maps, zero text maps: Eq. 7 is <v_c, v_j> / sqrt(4)."""
    selector = ContrastiveSelector(embed_dim=2, proj_dim=2)
    with torch.no_grad():
        for name in ("next_text", "past_text"):
            getattr(selector, name).weight.zero_()
        for name in ("next_image", "past_image"):
            getattr(selector, name).weight.copy_(torch.eye(2))
    return selector


def test_the_old_sharp_keys_softmax_and_eq8_pick_different_candidates():
    """Past scene j = (4, 0); a second key k = (0, 4). Candidate a = (2, 2) is closer to j than b = (1, -5).

    Eq. 8 (softmax over candidates for j, scale 1/sqrt(4)) prefers a. The old
    rule normalised each candidate over the keys at temperature 0.07: b puts
    almost all its mass on j (a splits it between j and k), so it preferred b.
    """
    selector = selector_on_plane()
    j, k = np.array([[4.0, 0.0]]), np.array([[0.0, 4.0]])
    candidates = np.array([[2.0, 2.0], [1.0, -5.0]])
    zeros = np.zeros((2, 2))
    eq8 = selector.score(zeros, candidates, zeros[:1], j)
    assert eq8.argmax() == 0
    keys = np.concatenate([j, k])
    sharp = torch.log_softmax(torch.tensor(candidates @ keys.T / 0.07), dim=1)[:, 0].numpy()
    assert sharp.argmax() == 1
    # What training optimises for j is -log of exactly this Eq. 8 probability (see the test above), and the
    # sharp keys-softmax rule would have pushed j's continuation towards b instead.
    p_eq8 = softmax_over_candidates(selector.similarity(torch.zeros(2, 2), torch.tensor(candidates, dtype=torch.float32),
                                                        torch.zeros(1, 2), torch.tensor(j, dtype=torch.float32))
                                    .detach().double().numpy())[:, 0]
    assert p_eq8.argmax() == eq8.argmax() == 0


def test_split_keeps_every_title_on_one_side_and_is_saved(tmp_path):
    scenes = separable_tasks(count=40)
    for index, scene in enumerate(scenes):
        scene.title = ["Banana Bread", "banana  bread!", "Pancakes", f"Unique {index}"][index % 4]
    train, held = split_by_title(scenes, holdout=0.3, seed=2)
    side = {s.task_id: "train" for s in train} | {s.task_id: "held" for s in held}
    for shared in ("banana bread", "pancakes"):
        members = {side[s.task_id] for s in scenes if s.title.lower().strip("!").split() == shared.split()}
        assert len(members) == 1
    assert abs(len(held) - 12) <= 10 and train and held
    assert split_by_title(scenes, holdout=0.3, seed=2) == (train, held)
    write_split(str(tmp_path), train, held, 0.3, 2)
    saved = split_beside(str(tmp_path / "selector.safetensors"))
    assert saved["train"] == [s.task_id for s in train] and saved["held_out"] == [s.task_id for s in held]
    assert split_beside(str(tmp_path / "elsewhere" / "selector.safetensors")) is None


def test_ties_count_as_random_picks():
    assert rank_of_true(np.array([1.0, 1.0, 1.0, 0.0])) == (pytest.approx(1 / 3), pytest.approx(1 / 2))
    assert rank_of_true(np.array([0.5, 0.9, 0.1])) == (0.0, 0.5)
    assert plain_clip_scores(np.eye(2), np.eye(2), np.eye(2)[:1], np.eye(2)[:1]).tolist() == [2.0, 0.0]


def test_single_step_tasks_cannot_be_queries_and_are_dropped():
    one = TaskScenes("x", np.zeros((1, 512)), np.zeros((1, 512)))
    train, held = split_by_title([one] + separable_tasks(count=4), holdout=0.5, seed=1)
    assert "x" not in {s.task_id for s in train + held} and len(train) == len(held) == 2
