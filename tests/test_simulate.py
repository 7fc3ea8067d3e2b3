"""The latency profile's backend: modeled waits, outputs derived from inputs (no Ray)."""

import numpy as np
import pytest

from cosed import simulate
from cosed.backend import LocalBackend, make_backend
from cosed.calls import ClipRequest, EmbedTexts, RenderRequest
from cosed.config import RunConfig
from cosed.runner import resolve_run


@pytest.fixture()
def latency():
    profile, cfg = resolve_run(RunConfig(profile="latency"))
    return profile, cfg


def test_make_backend_picks_by_profile_data(latency, tiny_run):
    assert isinstance(make_backend(*latency), simulate.SimulatedBackend)
    assert isinstance(make_backend(tiny_run[0], tiny_run[1]), LocalBackend)


def test_calls_wait_for_their_modeled_time_times_the_scale(latency, monkeypatch):
    waits = []
    monkeypatch.setattr(simulate.time, "sleep", waits.append)
    monkeypatch.setenv(simulate.TIME_SCALE_ENV, "0.5")
    backend = make_backend(*latency)
    profile, cfg = latency
    latents = np.zeros((3, *backend.latent_shape(cfg.sd)), np.float32)
    backend.render([RenderRequest("a caption", latents[:2], cfg.sd, (1, 2)),
                    RenderRequest("a caption", latents[2:], cfg.sd, (1, 2))])
    backend.frames(np.zeros((32, 32, 3), np.uint8), clip_request(cfg, 7))
    assert waits == pytest.approx([0.5 * (2.5 + 2 * 2.1), 0.5 * (2.5 + 2.1), 0.5 * 45.0])


def clip_request(cfg, seed):
    return ClipRequest("t", 1, "unused-scene.png", seed, cfg.video, "caption", "unused-clip.mp4")


def test_outputs_are_derived_from_inputs(latency):
    profile, cfg = latency
    backend = simulate.SimulatedBackend(profile, cfg, time_scale=0)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, *backend.latent_shape(cfg.sd))).astype(np.float32)
    first = backend.render_one(RenderRequest("cap", latents, cfg.sd, (1, 2)))
    again = backend.render_one(RenderRequest("cap", latents[::-1].copy(), cfg.sd, (1, 2)))
    assert np.stack(first.images).shape == (2, cfg.sd.height, cfg.sd.width, 3)
    np.testing.assert_array_equal(np.stack(first.images[::-1]), np.stack(again.images))  # per candidate, not batch
    other = backend.render_one(RenderRequest("other", latents, cfg.sd, (1,)))
    assert not np.array_equal(np.stack(first.images), np.stack(other.images))
    assert first.captured[2].shape == latents.shape and first.captured[2].dtype == np.float16
    texts = backend.embed_texts(EmbedTexts(("a", "b", "a")))
    np.testing.assert_array_equal(texts[0], texts[2])
    assert np.allclose(np.linalg.norm(texts, axis=1), 1, atol=1e-6)
    clip = backend.frames(first.images[0], clip_request(cfg, 3))
    assert clip.shape == (cfg.video.num_frames, cfg.video.height, cfg.video.width, 3)
    np.testing.assert_array_equal(clip, backend.frames(first.images[0], clip_request(cfg, 3)))
    assert not np.array_equal(clip, backend.frames(first.images[0], clip_request(cfg, 4)))


def test_a_task_renders_its_first_step_before_the_clip_pool_embeds_its_captions(latency):
    """`engine.sequence_task`'s call order, which the cost model and the simulator follow: step 1's SD call
    goes out before the captions' CLIP embedding (a run's first wave then never waits on the CLIP pool)."""
    from cosed.engine import sequence_task
    from cosed.tasks import Task

    profile, cfg = latency
    calls = []

    class Recording(simulate.SimulatedBackend):
        def render(self, requests):
            calls.append("render")
            return super().render(requests)

        def embed_texts(self, request):
            calls.append("embed_texts")
            return super().embed_texts(request)

        def embed_images(self, request):
            calls.append("embed_images")
            return super().embed_images(request)

    task = Task(id="t", title="T", steps=("one", "two", "three"))
    sequence_task(task, ["c1", "c2", "c3"], Recording(profile, cfg, time_scale=0), cfg)
    assert calls[:3] == ["render", "embed_texts", "embed_images"] or \
        calls[:4] == ["render", "embed_texts", "embed_texts", "embed_images"]  # cut captions embedded too
    assert calls.count("embed_texts") == (2 if cfg.selector_text_chars is None else 3)  # and once for CLIP-T
