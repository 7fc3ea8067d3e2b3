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


def test_temperature_is_saved_in_the_checkpoint_and_divides_the_logits(tmp_path):
    rng = np.random.default_rng(4)
    nt, nv, pt, pv = (10 * unit(rng.normal(size=(n, 512))) for n in (4, 4, 2, 2))
    selector = ContrastiveSelector.untrained(seed=1)
    selector.temperature = 0.25
    selector.save(tmp_path / "s.safetensors")
    loaded = ContrastiveSelector.load(tmp_path / "s.safetensors")
    assert loaded.temperature == 0.25
    np.testing.assert_allclose(loaded.score(nt, nv, pt, pv), selector.score(nt, nv, pt, pv))
    plain = ContrastiveSelector.untrained(seed=1)
    sharper = plain.similarity(*(torch.tensor(a, dtype=torch.float32) for a in (nt, nv, pt, pv))) / 0.25
    np.testing.assert_allclose(loaded.score(nt, nv, pt, pv), contrastive_scores(sharper.detach().double().numpy()), rtol=1e-5)


def test_a_checkpoint_without_temperature_loads_with_temperature_1(tmp_path):
    from safetensors.torch import save

    selector = ContrastiveSelector.untrained(seed=2)
    state = {k: v.contiguous() for k, v in selector.state_dict().items()}
    (tmp_path / "old.safetensors").write_bytes(save(state, metadata={"format": "cosed-selector-v1"}))
    assert ContrastiveSelector.load(tmp_path / "old.safetensors").temperature == 1.0


def test_modes_score_with_one_modality_or_plain_clip():
    rng = np.random.default_rng(5)
    selector = ContrastiveSelector.untrained(seed=0)
    caption = 10 * unit(rng.normal(size=(1, 512)))
    past_t, past_v = 10 * unit(rng.normal(size=(2, 512))), 10 * unit(rng.normal(size=(2, 512)))
    images = 10 * unit(np.stack([past_v[0] + 0.2 * rng.normal(size=512), rng.normal(size=512)]))
    texts = np.repeat(caption, 2, axis=0)
    text_only = selector.score(texts, images, past_t, past_v, mode="text")
    assert text_only[0] == pytest.approx(text_only[1])  # one shared caption: text alone cannot tell candidates apart
    assert selector.score(texts, images, past_t, past_v, mode="image").argmax() == 0
    # A caption shared by all candidates adds one constant per past scene, which Eq. 8's softmax removes:
    # at generation the full and image-only rules agree; they differ once candidates carry their own text.
    np.testing.assert_allclose(selector.score(texts, images, past_t, past_v),
                               selector.score(texts, images, past_t, past_v, mode="image"), rtol=1e-5)
    own_texts = np.concatenate([caption, 10 * unit(past_t[1:] + 0.1 * rng.normal(size=(1, 512)))])
    assert not np.allclose(selector.score(own_texts, images, past_t, past_v),
                           selector.score(own_texts, images, past_t, past_v, mode="image"))
    clip = selector.score(texts, images, past_t, past_v, mode="clip")
    expected = [sum(np.dot(unit(caption[0]), unit(t)) + np.dot(unit(v), unit(img)) for t, v in zip(past_t, past_v))
                for img in images]
    np.testing.assert_allclose(clip, expected, rtol=1e-5)
    with pytest.raises(ValueError, match="selector mode"):
        selector.score(texts, images, past_t, past_v, mode="both")


def test_untrained_eq7_logits_on_raw_features_are_not_flat():
    """With raw CLIP norms (~10) Eq. 7 gives logits of a few units, so the softmax of Eq. 8 is not near-linear."""
    rng = np.random.default_rng(6)
    v = 10 * unit(rng.normal(size=(1, 512)))
    near = 10 * unit(v + 3 * rng.normal(size=(1, 512)))
    sim = ContrastiveSelector.untrained().similarity(*(torch.tensor(a, dtype=torch.float32) for a in (v, v, v, v)))
    assert sim.item() > 1.5
    scores = ContrastiveSelector.untrained().score(np.concatenate([v, v]), np.concatenate([v, near]), v, v)
    assert scores[0] > 0.6
