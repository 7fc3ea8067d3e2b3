"""A task's own scene image: parsed, checked, fingerprinted, encoded into the pool as step 0, a past scene.

Whole runs (a corrupt image is that task's error, Ray == in process): tests/test_transitions_videos.py (slow).
"""

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from cosed import scene_image
from cosed.backend import make_backend
from cosed.calls import EmbedImages, EncodeScene
from cosed.config import PoolConfig, RunConfig
from cosed.engine import sequence_task, task_fingerprint
from cosed.generate import encode_scene, latent_shape
from cosed.latents import CandidateSource, LatentPool, plan_candidates
from cosed.parts import TaskParts
from cosed.runner import resolve_run
from cosed.tasks import InvalidTask, Task, TaskSet, parse_task


def picture(path, fmt="PNG", seed=0, size=(40, 30)):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    path.write_bytes(buffer.getvalue())
    return str(path)


def test_the_field_is_parsed_as_a_path_or_an_s3_uri():
    assert parse_task({"id": "a", "steps": ["x"]}, max_steps=5).scene_image == ""
    assert parse_task({"id": "a", "steps": ["x"], "scene_image": "s3://b/k.jpg"}, max_steps=5).scene_image == "s3://b/k.jpg"
    for bad in (3, "", "  ", "https://example.com/me.png"):
        with pytest.raises(InvalidTask) as caught:
            parse_task({"id": "a", "steps": ["x"], "scene_image": bad}, max_steps=5)
        assert caught.value.field == "scene_image"


def test_a_missing_or_corrupt_image_is_its_tasks_error_and_png_and_jpeg_pass(tmp_path):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "text.png").write_text("hello")
    tasks = [Task(id="png", title="", steps=("x",), scene_image=picture(tmp_path / "a.png")),
             Task(id="jpeg", title="", steps=("x",), scene_image=picture(tmp_path / "a.jpg", "JPEG")),
             Task(id="none", title="", steps=("x",)),
             Task(id="corrupt", title="", steps=("x",), scene_image=str(tmp_path / "corrupt.png")),
             Task(id="text", title="", steps=("x",), scene_image=str(tmp_path / "text.png")),
             Task(id="gone", title="", steps=("x",), scene_image=str(tmp_path / "gone.png"))]
    checked = scene_image.with_checked_images(TaskSet(tasks=tasks))
    assert [t.id for t in checked.tasks] == ["png", "jpeg", "none"]
    assert [(e.task_id, e.field) for e in checked.errors] == [("corrupt", "scene_image"), ("text", "scene_image"),
                                                              ("gone", "scene_image")]
    assert "not found" in checked.errors[2].reason and "not a PNG or JPEG" in checked.errors[1].reason


def test_the_fingerprint_follows_the_images_bytes_not_its_name(tmp_path, tiny_run):
    profile, cfg, _ = tiny_run
    plain = Task(id="t", title="T", steps=("a", "b"))
    task = dataclasses.replace(plain, scene_image=picture(tmp_path / "me.png", seed=1))
    first = task_fingerprint(task, profile, cfg)
    assert first != task_fingerprint(plain, profile, cfg)
    moved = dataclasses.replace(task, scene_image=picture(tmp_path / "elsewhere.png", seed=1))
    assert task_fingerprint(moved, profile, cfg) == first
    picture(tmp_path / "me.png", seed=2)  # other bytes under the same name
    assert task_fingerprint(task, profile, cfg) != first


def test_step_zero_in_the_pool_feeds_every_step_including_the_first():
    pool, cfg = LatentPool(), PoolConfig(iterations=[1, 2], n_first=2, fresh=1)
    assert [s.kind for s in plan_candidates(1, pool, cfg, 0, "t")] == ["fresh", "fresh"]
    pool.add_run(0, {1: np.zeros(2), 2: np.zeros(2)})
    first = plan_candidates(1, pool, cfg, 0, "t")
    assert first[:2] == [CandidateSource.pooled(0, 1), CandidateSource.pooled(0, 2)] and len(first) == 4
    pool.add_run(1, {1: np.zeros(2), 2: np.zeros(2)})
    pooled = [(s.step, s.iteration) for s in plan_candidates(2, pool, cfg, 0, "t") if s.kind == "pool"]
    assert pooled == [(0, 1), (0, 2), (1, 1), (1, 2)]


def test_encoding_noises_the_vae_latent_to_each_iterations_timestep(tiny_run):
    """DDIM (the tiny SD twin): the latent a run holds after k steps is sqrt(a_t) z0 + sqrt(1 - a_t) noise at
    the k-th timestep of the run's schedule, one seeded noise for every k; after the last step, z0 itself."""
    import copy

    import torch

    from cosed.seeds import gaussian_latent

    _, cfg, backend = tiny_run
    pipe = backend.sd
    image = np.random.default_rng(3).integers(0, 256, (cfg.sd.height, cfg.sd.width, 3), dtype=np.uint8)
    steps = cfg.sd.num_inference_steps
    latents = encode_scene(pipe, image, cfg.sd, [1, 3, steps], seed=7)
    pixels = torch.tensor(image, dtype=torch.float32).permute(2, 0, 1)[None] / 127.5 - 1
    with torch.no_grad():
        clean = pipe.vae.encode(pixels).latent_dist.mode() * pipe.vae.config.scaling_factor
    noise = gaussian_latent(7, tuple(clean.shape[1:]))[None]
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(steps)
    for k in (1, 3):
        a = scheduler.alphas_cumprod[scheduler.timesteps[k]]
        expected = (a.sqrt() * clean + (1 - a).sqrt() * noise)[0].half().numpy()
        np.testing.assert_allclose(latents[k].astype(np.float32), expected.astype(np.float32), atol=2e-3)
    np.testing.assert_allclose(latents[steps].astype(np.float32), clean[0].half().float().numpy(), atol=2e-3)
    assert latents[1].shape == latent_shape(pipe, cfg.sd) and latents[1].dtype == np.float16


def test_the_scene_image_is_step_zero_of_the_pool_and_a_past_scene_of_the_selector(tmp_path, monkeypatch):
    """On the latency profile (no model runs): the step-0 entries the pool holds are the encoded image at every
    configured iteration; every selector call gets the image's embedding as its first past scene."""
    monkeypatch.setenv("COSED_TIME_SCALE", "0")
    profile, cfg = resolve_run(RunConfig(profile="latency"))
    backend = make_backend(profile, cfg)
    task = Task(id="u", title="U", steps=("one", "two"), scene_image=picture(tmp_path / "me.jpg", "JPEG"))
    added, scores = {}, []
    original_add = LatentPool.add_run
    monkeypatch.setattr(LatentPool, "add_run", lambda pool, step, captured: added.setdefault(step, captured)
                        is None or original_add(pool, step, captured))
    score = backend.selector_scores
    monkeypatch.setattr(backend, "selector_scores", lambda request: scores.append(request) or score(request))
    result = sequence_task(task, ["c1", "c2"], backend, cfg, TaskParts.of(str(tmp_path / "out"), "u", "fp"))
    image, digest = scene_image.load(task.scene_image, cfg.sd.width, cfg.sd.height)
    assert sorted(added[0]) == cfg.pool.iterations
    encoded = backend.encode_scene(EncodeScene(image, cfg.sd, tuple(cfg.pool.iterations),
                                               _seed(cfg, task)))
    for k in cfg.pool.iterations:
        np.testing.assert_array_equal(added[0][k], encoded[k])
    embedding = backend.embed_images(EmbedImages((image,)))[0]
    assert len(scores) == 2  # step 1 is scored by the selector too, against the image
    for request in scores:
        np.testing.assert_array_equal(request.past_image[0], embedding)
    assert any(s.kind == "pool" and s.step == 0 for s in result.steps[0].sources)
    assert result.record()["scene_image"]["sha256"] == digest
    assert result.metrics["clip_i_scene_image"] is not None


def _seed(cfg, task):
    from cosed.seeds import derive_seed

    return derive_seed(cfg.seed, task.id, 0, "scene-image")


def test_flux_encoding_lands_on_the_sigmas_the_pipeline_itself_runs(tiny_cache):
    """FLUX (the tiny-flux-ltx twin): after k steps a run stands at (1 - sigma_k) z0 + sigma_k noise, with the
    sigmas FluxPipeline sets for itself at this resolution (read from a real call's scheduler)."""
    import torch

    from cosed.backend import LocalBackend
    from cosed.generate import render_batch
    from cosed.seeds import gaussian_latent

    profile, cfg = resolve_run(RunConfig(profile="tiny-flux-ltx", cache_dir=str(tiny_cache)))
    pipe = LocalBackend(profile, cfg).sd
    steps = cfg.sd.num_inference_steps
    shape = latent_shape(pipe, cfg.sd)
    render_batch(pipe, "a kitchen", np.zeros((1, *shape), np.float32), cfg.sd, [1])
    sigmas = pipe.scheduler.sigmas.clone()  # as the pipeline left its scheduler
    image = np.random.default_rng(4).integers(0, 256, (cfg.sd.height, cfg.sd.width, 3), dtype=np.uint8)
    latents = encode_scene(pipe, image, cfg.sd, [1, 2], seed=11)
    pixels = torch.tensor(image, dtype=torch.float32).permute(2, 0, 1)[None] / 127.5 - 1
    with torch.no_grad():
        raw = pipe.vae.encode(pixels).latent_dist.mode()
    clean = (raw - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    noise = gaussian_latent(11, shape)[None]
    for k in (1, 2):
        expected = ((1 - sigmas[k]) * clean + sigmas[k] * noise)[0]
        np.testing.assert_allclose(latents[k].astype(np.float32), expected.half().float().numpy(), atol=2e-3)
    assert 0 < float(sigmas[2]) < float(sigmas[1]) < 1 and steps >= 2
