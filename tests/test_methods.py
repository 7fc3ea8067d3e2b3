"""Method names of `cosed evaluate`: `chain` (Bordalo et al.'s single-preceding-step latent chaining) and its
old name `previous`, still accepted."""

import pytest

from cosed.config import RunConfig
from cosed.evaluate import method_config, plan_runs


def test_previous_is_the_old_name_of_chain():
    cfg = RunConfig()
    assert [r.name for r in plan_runs(["independent", "previous", "cosed"], None, cfg)] == [
        "independent", "chain", "cosed"]
    assert method_config(cfg, "previous") == method_config(cfg, "chain")
    assert method_config(cfg, "chain").pool.steps == "previous"
    with pytest.raises(ValueError, match="chain"):
        method_config(cfg, "mora-like")


def test_independent_keeps_its_fresh_candidate_under_the_paper_preset():
    from cosed.config import load_config

    paper = load_config(None, {}, default_preset="paper")
    independent = method_config(paper, "independent")
    assert independent.pool.fresh_as == "candidate" and independent.pool.steps == "none"
