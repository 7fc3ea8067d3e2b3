"""Each documented variant changes the candidate plan or the scoring as README "Selector variants" says."""

import dataclasses

import numpy as np
import pytest

from cosed.config import PoolConfig, RunConfig, load_config
from cosed.engine import sequence_task
from cosed.latents import LatentPool, fresh_keys, plan_candidates
from cosed.tasks import Task


def filled_pool(steps, iterations=(1, 2, 3, 4)):
    pool = LatentPool()
    for step in steps:
        pool.add_run(step, {k: np.full((4, 8, 8), 10 * step + k, dtype=np.float32) for k in iterations})
    return pool


def test_default_caps_nothing_and_pools_iterations_1_to_3():
    cfg = PoolConfig()
    assert cfg.max_candidates is None and cfg.iterations == [1, 2, 3] and cfg.fresh_as == "candidate"
    sources = plan_candidates(8, filled_pool(range(1, 8)), cfg, 0, "t")
    assert len(sources) == 7 * 3 + 1 and sources[-1].kind == "fresh"


def test_pooled_iterations_2_to_4_take_the_later_latents():
    sources = plan_candidates(3, filled_pool([1, 2]), PoolConfig(iterations=[2, 3, 4]), 0, "t")
    assert {s.iteration for s in sources if s.kind == "pool"} == {2, 3, 4}


def test_fresh_as_key_moves_the_fresh_render_from_the_candidates_to_the_past_keys():
    pool, cfg = filled_pool([1, 2]), PoolConfig(fresh_as="key")
    sources = plan_candidates(3, pool, cfg, 0, "t")
    assert {s.kind for s in sources} == {"pool"} and len(sources) == 6
    keys = fresh_keys(3, cfg, 0, "t")
    assert [k.kind for k in keys] == ["fresh"] and keys[0] == plan_candidates(3, pool, PoolConfig(), 0, "t")[-1]
    assert fresh_keys(1, cfg, 0, "t") == [] and len(plan_candidates(1, LatentPool(), cfg, 0, "t")) == 4
    assert fresh_keys(3, PoolConfig(), 0, "t") == []


def test_a_cap_samples_the_pool_with_a_seed_and_key_mode_leaves_all_room_to_the_pool():
    pool = filled_pool(range(1, 5))
    capped = plan_candidates(5, pool, PoolConfig(max_candidates=5), 0, "t")
    assert len(capped) == 5 and capped[-1].kind == "fresh"
    assert capped == plan_candidates(5, pool, PoolConfig(max_candidates=5), 0, "t")
    keyed = plan_candidates(5, pool, PoolConfig(max_candidates=5, fresh_as="key"), 0, "t")
    assert len(keyed) == 5 and {s.kind for s in keyed} == {"pool"}


@pytest.mark.parametrize("overrides, message", [
    ({"pool.fresh_as": "both"}, "fresh_as"),
    ({"pool.fresh_as": "key", "pool.steps": "none"}, "fresh_as key"),
    ({"selector_mode": "audio"}, "selector_mode"),
    ({"pool.max_candidates": 0}, "max_candidates"),
])
def test_bad_variant_options_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


TASK = Task(id="sauce", title="Sauce", steps=("Dice the onion.", "Fry the onion.", "Chop tomatoes."))


def run_variant(tiny_run, **changes):
    profile, cfg, backend = tiny_run
    pool = dataclasses.replace(cfg.pool, **changes.pop("pool", {}))
    variant = dataclasses.replace(cfg, pool=pool, **changes)
    # LocalBackend reads the selector mode from its config: give it the variant's.
    backend_cfg, backend.cfg = backend.cfg, variant
    try:
        return sequence_task(TASK, list(TASK.steps), backend, variant)
    finally:
        backend.cfg = backend_cfg


@pytest.mark.slow
def test_fresh_key_and_selector_modes_change_the_scores_on_the_tiny_models(tiny_run):
    full = run_variant(tiny_run)
    keyed = run_variant(tiny_run, pool={"fresh_as": "key"})
    assert [s.kind for s in keyed.steps[2].sources] == ["pool"] * 6 and keyed.steps[2].fresh_keys
    assert len(full.steps[2].sources) == 7 and not full.steps[2].fresh_keys
    text = run_variant(tiny_run, selector_mode="text")
    assert np.allclose(text.steps[1].scores, text.steps[1].scores[0])  # one shared caption: nothing to tell apart
    image = run_variant(tiny_run, selector_mode="image")
    np.testing.assert_allclose(image.steps[1].scores, full.steps[1].scores, rtol=1e-4)
    clip = run_variant(tiny_run, selector_mode="clip")
    assert not np.allclose(clip.steps[1].scores, full.steps[1].scores)
    assert RunConfig().selector_mode == "full"
