"""The latency profile's backend: modeled waits, outputs derived from inputs (no Ray)."""

import numpy as np
import pytest

from cosed import simulate
from cosed.backend import LocalBackend, make_backend
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
    backend.render_many("a caption", [latents[:2], latents[2:]], cfg.sd, [1, 2])
    backend.animate(np.zeros((32, 32, 3), np.uint8), 7, cfg.video)
    assert waits == pytest.approx([0.5 * (2.5 + 2 * 2.1), 0.5 * (2.5 + 2.1), 0.5 * 45.0])


def test_outputs_are_derived_from_inputs(latency):
    profile, cfg = latency
    backend = simulate.SimulatedBackend(profile, cfg, time_scale=0)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, *backend.latent_shape(cfg.sd))).astype(np.float32)
    first = backend.render_many("cap", [latents], cfg.sd, [1, 2])[0]
    again = backend.render_many("cap", [latents[::-1].copy()], cfg.sd, [1, 2])[0]
    assert first.images.shape == (2, cfg.sd.height, cfg.sd.width, 3)
    np.testing.assert_array_equal(first.images[::-1], again.images)  # per candidate, not per batch
    assert not np.array_equal(first.images, backend.render_many("other", [latents], cfg.sd, [1])[0].images)
    assert first.captured[2].shape == latents.shape and first.captured[2].dtype == np.float16
    texts = backend.embed_texts(["a", "b", "a"])
    np.testing.assert_array_equal(texts[0], texts[2])
    assert np.allclose(np.linalg.norm(texts, axis=1), 1, atol=1e-6)
    clip = backend.animate(first.images[0], 3, cfg.video)
    assert clip.shape == (cfg.video.num_frames, cfg.video.height, cfg.video.width, 3)
    np.testing.assert_array_equal(clip, backend.animate(first.images[0], 3, cfg.video))
    assert not np.array_equal(clip, backend.animate(first.images[0], 4, cfg.video))
