"""The paper preset reproduces the reference's settings (README "Presets"): each one reaches the model call
or the selector it changes, and the preset is recorded in the manifest and the fingerprint."""

import dataclasses

import numpy as np
import pytest
import yaml

from cosed.calls import EmbedTexts, RenderRequest, Score
from cosed.cli import build_parser, config_from_args
from cosed.config import RunConfig, load_config
from cosed.engine import sequence_task, task_fingerprint
from cosed.presets import PAPER, PAPER_NEGATIVE_PROMPT, preset_record
from cosed.runner import resolve_run
from cosed.tasks import Task


def parsed(*argv):
    return config_from_args(build_parser().parse_args(list(argv)))


def test_paper_is_the_default_of_generate_and_evaluate_and_legacy_stays_available(tmp_path):
    paper = parsed("generate", "--tasks", "t.jsonl", "--out", "o")
    assert paper.preset == "paper" and paper.pool.iterations == [2, 3, 4] and paper.pool.fresh_as == "key"
    assert paper.sd.negative_prompt == PAPER_NEGATIVE_PROMPT and paper.video.seed == 42
    assert paper.selector_text_chars == 77
    assert parsed("evaluate", "--tasks", "t.jsonl", "--out", "o").preset == "paper"
    legacy = parsed("generate", "--tasks", "t.jsonl", "--out", "o", "--preset", "legacy")
    assert legacy == dataclasses.replace(RunConfig(), preset="legacy")
    assert parsed("train-selector", "--tasks", "t.jsonl", "--out", "o").preset == "legacy"
    # A config file sits over the preset, flags over the file.
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"pool": {"iterations": [1, 2]}, "preset": "paper"}))
    mine = parsed("generate", "--tasks", "t.jsonl", "--out", "o", "--config", str(path))
    assert mine.pool.iterations == [1, 2] and mine.pool.fresh_as == "key"
    assert preset_record(mine)["overridden"] == ["pool.iterations"]
    path.write_text(yaml.safe_dump({"preset": "legacy"}))
    assert parsed("generate", "--tasks", "t.jsonl", "--out", "o", "--config", str(path)).preset == "legacy"
    with pytest.raises(ValueError, match="preset"):
        load_config(None, {"preset": "lumiere"})


def test_every_paper_setting_names_its_source_and_lands_in_the_fingerprint(tiny_run):
    profile, _, _ = tiny_run
    assert all(s.source and ("CoSeD" in s.source or "gcs" in s.source) for s in PAPER)
    task = Task(id="t", title="T", steps=("a", "b"))
    paper = load_config(None, {}, default_preset="paper")
    prints = {task_fingerprint(task, profile, cfg) for cfg in (
        paper, RunConfig(), dataclasses.replace(paper, video=dataclasses.replace(paper.video, seed=7)))}
    assert len(prints) == 3


def test_the_negative_prompt_reaches_the_text_to_image_pipeline(tiny_run, monkeypatch):
    profile, cfg, backend = tiny_run
    paper = load_config(None, {"profile": "tiny", "cache_dir": cfg.cache_dir}, default_preset="paper")
    _, paper = resolve_run(paper)
    pipe = backend.sd
    calls = []
    original = type(pipe).__call__

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", spy)
    latents = np.random.default_rng(0).standard_normal((2, *backend.latent_shape(paper.sd))).astype(np.float32)
    with_negative = backend.render([RenderRequest("a bowl of soup", latents, paper.sd, (2,))])[0]
    without = backend.render([RenderRequest("a bowl of soup", latents, cfg.sd, (2,))])[0]
    assert calls[0]["negative_prompt"] == [PAPER_NEGATIVE_PROMPT] * 2 and calls[1]["negative_prompt"] is None
    assert not np.array_equal(np.stack(with_negative.images), np.stack(without.images))


class Recording:
    """The real backend, with every render and score request kept."""

    def __init__(self, backend):
        self.backend, self.renders, self.scores = backend, [], []

    def render(self, requests):
        self.renders.append(requests)
        return self.backend.render(requests)

    def selector_scores(self, request: Score):
        self.scores.append(request)
        return self.backend.selector_scores(request)

    def __getattr__(self, name):
        return getattr(self.backend, name)


TASK = Task(id="sauce", title="Sauce", steps=("Dice the onion.", "Fry the onion in a pan with oil until golden.",
                                              "Chop tomatoes."))


@pytest.mark.slow
def test_paper_preset_keys_the_fresh_image_pools_iterations_2_to_4_and_cuts_selector_text(tiny_run):
    profile, cfg, backend = tiny_run
    paper = dataclasses.replace(load_config(None, {"profile": "tiny", "cache_dir": cfg.cache_dir},
                                            default_preset="paper"), selector_text_chars=10)
    _, paper = resolve_run(paper)
    recorded = Recording(backend)
    result = sequence_task(TASK, list(TASK.steps), recorded, paper)
    assert all(r.capture == (2, 3, 4) for batch in recorded.renders for r in batch)
    third = result.steps[2]
    # Candidates: the pool alone, iterations 2-4 of steps 1 and 2; the fresh render is a key, not a candidate.
    assert [(s.kind, s.step, s.iteration) for s in third.sources] == [
        ("pool", j, k) for j in (1, 2) for k in (2, 3, 4)]
    assert [k.kind for k in third.fresh_keys] == ["fresh"]
    score = recorded.scores[-1]
    assert len(score.next_image) == 6 and len(score.past_image) == 2 + 1
    np.testing.assert_array_equal(score.past_image[:2], np.stack([s.image_embedding for s in result.steps[:2]]))
    # The fresh key is the render of the fresh seed with the current caption; its text is the whole caption,
    # the candidates' and past scenes' texts are cut to selector_text_chars characters.
    full = backend.embed_texts(EmbedTexts((TASK.steps[2],)))
    cut = backend.embed_texts(EmbedTexts(tuple(c[:10] for c in TASK.steps)))
    np.testing.assert_allclose(score.past_text[2], full[0], rtol=1e-6)
    np.testing.assert_allclose(score.past_text[:2], cut[:2], rtol=1e-6)
    np.testing.assert_allclose(score.next_text[0], cut[2], rtol=1e-6)
    # The same run with the fresh image as a candidate: the same pool candidates plus it, past set = steps only.
    candidate = dataclasses.replace(paper, pool=dataclasses.replace(paper.pool, fresh_as="candidate"))
    recorded = Recording(backend)
    other = sequence_task(TASK, list(TASK.steps), recorded, candidate)
    assert other.steps[2].sources[:6] == third.sources
    assert other.steps[2].sources[-1].kind == "fresh" and not other.steps[2].fresh_keys
    assert len(recorded.scores[-1].past_image) == 2
