import numpy as np
import pytest

from cosed.config import PoolConfig
from cosed.latents import CandidateSource, LatentPool, initial_latents, plan_candidates
from cosed.seeds import derive_seed, gaussian_latent


def filled_pool(steps, iterations=(1, 2, 3)):
    pool = LatentPool()
    for step in steps:
        pool.add_run(step, {k: np.full((4, 8, 8), 10 * step + k, dtype=np.float32) for k in iterations})
    return pool


@pytest.mark.parametrize("step", [2, 3, 4, 5])
def test_candidate_count_is_window_times_earlier_steps_plus_fresh(step):
    cfg = PoolConfig(iterations=[1, 2, 3], fresh=1, max_candidates=100)
    sources = plan_candidates(step, filled_pool(range(1, step)), cfg, 0, "t")
    assert len(sources) == (step - 1) * 3 + 1
    assert [s.kind for s in sources].count("fresh") == 1
    assert sources[-1].kind == "fresh"


def test_step_1_has_n_first_fresh_candidates_with_distinct_seeds():
    sources = plan_candidates(1, LatentPool(), PoolConfig(n_first=4), 7, "t")
    assert [s.kind for s in sources] == ["fresh"] * 4
    assert len({s.seed for s in sources}) == 4
    assert sources[2].seed == derive_seed(7, "t", 1, "fresh", 2)


def test_pool_reaches_every_earlier_step_not_only_the_previous_one():
    sources = plan_candidates(4, filled_pool([1, 2, 3]), PoolConfig(max_candidates=100), 0, "t")
    assert {(s.step, s.iteration) for s in sources if s.kind == "pool"} == {
        (j, k) for j in (1, 2, 3) for k in (1, 2, 3)}


def test_previous_mode_is_linear_chaining_and_none_is_independent():
    pool = filled_pool([1, 2, 3])
    previous = plan_candidates(4, pool, PoolConfig(steps="previous"), 0, "t")
    assert {s.step for s in previous if s.kind == "pool"} == {3}
    independent = plan_candidates(4, pool, PoolConfig(steps="none", fresh=1), 0, "t")
    assert [s.kind for s in independent] == ["fresh"]


def test_cap_samples_the_pool_uniformly_and_reproducibly():
    cfg = PoolConfig(max_candidates=6, fresh=1)
    pool = filled_pool(range(1, 6))
    first = plan_candidates(6, pool, cfg, 0, "t")
    assert len(first) == 6 and first[-1].kind == "fresh"
    assert first == plan_candidates(6, pool, cfg, 0, "t")
    assert first != plan_candidates(6, pool, cfg, 1, "t")
    picked = [(s.step, s.iteration) for s in first if s.kind == "pool"]
    assert picked == sorted(picked) and len(set(picked)) == 5


def test_pool_keeps_float16_copies_on_the_cpu():
    pool = filled_pool([1])
    assert len(pool) == 3
    assert pool.latent(1, 2).dtype == np.float16
    assert pool.latent(1, 2)[0, 0, 0] == 12


def test_initial_latents_use_pooled_values_and_seeded_noise():
    pool = filled_pool([1])
    seed = derive_seed(0, "t", 2, "fresh", 0)
    sources = [CandidateSource.pooled(1, 3), CandidateSource.fresh(seed)]
    starts = initial_latents(sources, pool, (4, 8, 8))
    assert starts.shape == (2, 4, 8, 8) and starts.dtype == np.float32
    assert np.all(starts[0] == 13)
    np.testing.assert_array_equal(starts[1], gaussian_latent(seed, (4, 8, 8)).numpy())


def test_seeds_depend_only_on_their_coordinates():
    assert derive_seed(0, "a", 1, "fresh", 0) == derive_seed(0, "a", 1, "fresh", 0)
    variants = {derive_seed(*args) for args in [(0, "a", 1, "fresh", 0), (1, "a", 1, "fresh", 0),
                                                 (0, "b", 1, "fresh", 0), (0, "a", 2, "fresh", 0),
                                                 (0, "a", 1, "video", 0), (0, "a", 1, "fresh", 1)]}
    assert len(variants) == 6
    assert all(0 <= s < 2 ** 63 for s in variants)
