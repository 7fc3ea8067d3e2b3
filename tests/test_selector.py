import math

import numpy as np
import pytest
import torch

from cosed.config import PoolConfig
from cosed.latents import LatentPool, plan_candidates
from cosed.selector import ContrastiveSelector, clip_pick_scores, contrastive_scores


def unit(v):
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_parameter_count_is_four_512_to_256_maps():
    assert ContrastiveSelector().num_parameters() == 4 * 512 * 256 == 524_288


def test_eq7_eq8_on_hand_made_embeddings():
    rng = np.random.default_rng(0)
    selector = ContrastiveSelector()
    nt, nv, pt, pv = (unit(rng.normal(size=(n, 512))) for n in (3, 3, 2, 2))
    weights = {name: getattr(selector, name).weight.detach().numpy().astype(np.float64)
               for name in ("next_text", "next_image", "past_text", "past_image")}
    next_scene = np.concatenate([nt @ weights["next_text"].T, nv @ weights["next_image"].T], axis=1)
    past_scene = np.concatenate([pt @ weights["past_text"].T, pv @ weights["past_image"].T], axis=1)
    sim = next_scene @ past_scene.T / math.sqrt(512)
    expected = sum(np.exp(sim[:, j]) / np.exp(sim[:, j]).sum() for j in range(2))
    np.testing.assert_allclose(selector.score(nt, nv, pt, pv), expected, rtol=1e-5)


def test_eq8_sums_softmax_over_candidates_per_past_scene():
    sim = np.array([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    p = np.exp(sim) / np.exp(sim).sum(axis=0)
    np.testing.assert_allclose(contrastive_scores(sim), p.sum(axis=1))
    assert contrastive_scores(sim).sum() == pytest.approx(2.0)


def test_untrained_selector_tracks_plain_clip_similarity():
    rng = np.random.default_rng(1)
    selector = ContrastiveSelector.untrained(seed=0)
    for name in ("next_text", "next_image"):
        w = getattr(selector, name).weight.detach()
        torch.testing.assert_close(w @ w.T, torch.eye(256), atol=1e-5, rtol=0)
    torch.testing.assert_close(selector.next_text.weight, selector.past_text.weight)
    past_t, past_v = unit(rng.normal(size=(1, 512))), unit(rng.normal(size=(1, 512)))
    near = unit(past_v + 0.1 * rng.normal(size=(1, 512)))
    far = unit(rng.normal(size=(1, 512)))
    scores = selector.score(np.repeat(past_t, 2, 0), np.concatenate([far, near]), past_t, past_v)
    assert scores.argmax() == 1


def test_selector_picks_the_candidate_from_step_1_when_step_3_returns_to_step_1():
    """Step 3 revisits step 1's scene: the candidate started from step 1's latent must win."""
    rng = np.random.default_rng(2)
    pool = LatentPool()
    for step in (1, 2):
        pool.add_run(step, {k: np.zeros((4, 8, 8)) for k in (1, 2, 3)})
    sources = plan_candidates(3, pool, PoolConfig(), run_seed=0, task_id="t")
    scene1, scene2 = unit(rng.normal(size=512)), unit(rng.normal(size=512))
    caption = unit(rng.normal(size=512))
    captions = unit(rng.normal(size=(2, 512)))
    # Candidates look like the scene their latent came from, plus noise; the fresh one like neither.
    looks = {1: scene1, 2: scene2}
    images = unit(np.stack([(looks[s.step] if s.kind == "pool" else unit(rng.normal(size=512)))
                            + 0.3 * unit(rng.normal(size=512)) for s in sources]))
    images[sources.index(next(s for s in sources if s.step == 1 and s.iteration == 2))] = unit(scene1 + 0.05 * unit(rng.normal(size=512)))
    scores = ContrastiveSelector.untrained().score(np.repeat(caption[None], len(sources), 0), images,
                                                   captions, np.stack([scene1, unit(rng.normal(size=512))]))
    chosen = sources[int(np.argmax(scores))]
    assert (chosen.kind, chosen.step, chosen.iteration) == ("pool", 1, 2)


def test_first_step_pick_is_cosine_with_caption():
    caption = unit([1.0, 0.0, 0.0])
    images = unit([[0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 0.1, 0.0]])
    np.testing.assert_allclose(clip_pick_scores(images, caption), images @ caption)
    assert clip_pick_scores(images, caption).argmax() == 2


def test_checkpoint_round_trip_is_safetensors(tmp_path):
    selector = ContrastiveSelector.untrained(seed=3)
    path = tmp_path / "selector.safetensors"
    selector.save(path, metadata={"epochs": 0})
    assert path.read_bytes()[8:9] == b"{"  # safetensors header, not a pickle
    loaded = ContrastiveSelector.load(path)
    for key, value in selector.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
