"""The Ray path on a local cluster declared with 4 logical GPUs (no hardware needed)."""

import dataclasses
import json

import pytest

from cosed import runner
from cosed.config import PoolResources, RunConfig
from cosed.distributed.job import run_on_ray, start_pools
from cosed.distributed.sizing import plan_pools

from conftest import SMALL_TASKS, local_ray, outputs, write_jsonl

pytestmark = pytest.mark.slow

# The small tasks, a line with no steps (rejected: reported, the others finish) and a one-step task (no
# pairs of scenes: its CLIP-I is None).
ONE_STEP = dict(SMALL_TASKS[2], id="one-step", steps=["Boil water."])
TASKS = [*SMALL_TASKS, {"id": "nosteps"}, ONE_STEP]


@pytest.fixture(scope="module", autouse=True)
def cluster():
    with local_ray(num_cpus=6, num_gpus=4):
        yield


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_run):
    """The in-process result the Ray path must reproduce, every file of it."""
    _, cfg, backend = tiny_run
    folder = tmp_path_factory.mktemp("ref")
    runner.run_in_process(str(write_jsonl(folder / "t.jsonl", TASKS)), str(folder / "out"), cfg,
                          progress=False, backend=backend)
    return outputs(folder / "out")


def ray_config(tiny_config, **ray_fields) -> RunConfig:
    return dataclasses.replace(tiny_config, ray=dataclasses.replace(tiny_config.ray, **ray_fields))


def test_sd_video_and_clip_actors_are_pinned_to_gpus_as_the_plan_says(tiny_config):
    """Whole-GPU actors each have a GPU of their own; the CLIP actor shares the GPU of the one actor that hosts
    it; the GPUs the actors ask for add up to the cluster's, exactly."""
    from cosed.distributed.costs import CostModel, batch_work
    from cosed.runner import resolve_run

    profile, cfg = resolve_run(tiny_config)
    costs = CostModel.from_dict(profile.costs)
    pools = start_pools(cfg, costs, batch_work([3, 3, 2], cfg, costs))
    try:
        plan = pools.cluster_plan
        stats = {s["name"]: s for s in pools.stats()}
        shapes = {a.name: a.num_gpus for a in pools.actors.values()}
        assert sum(shapes.values()) == pytest.approx(4.0) and plan.gpus == pytest.approx(4.0)
        gpu_of = {name: tuple(s["gpu_ids"]) for name, s in stats.items()}
        assert all(len(ids) == 1 for ids in gpu_of.values())
        assert {s["cuda_visible_devices"] for s in stats.values()} == {ids[0] for ids in gpu_of.values()}
        whole = [n for n, g in shapes.items() if g == 1.0]
        assert len({gpu_of[n] for n in whole}) == len(whole)
        (guest,) = [n for n, g in shapes.items() if g < 0.5]
        (host,) = [n for n, g in shapes.items() if 0.5 <= g < 1.0]
        assert gpu_of[guest] == gpu_of[host] and stats[guest]["kind"] == "clip"
    finally:
        pools.shutdown()


@pytest.mark.parametrize("drivers", [1, 3])
def test_ray_path_equals_in_process_and_reports_a_rejected_task(tmp_path, tiny_config, reference, drivers):
    tasks = write_jsonl(tmp_path / "t.jsonl", TASKS)
    summary = run_on_ray(str(tasks), str(tmp_path / "out"), ray_config(tiny_config, max_concurrent_tasks=drivers),
                         progress=False)
    assert sorted(summary.done) == ["one-step", "sauce", "shelf", "tea"] and not summary.failed
    assert [e.task_id for e in summary.rejected] == ["nosteps"]
    assert outputs(tmp_path / "out") == reference  # manifests, scenes, clips, videos, storyboards: every byte
    assert set(summary.extra["busy_fraction"]) == {"sd", "video", "clip"}
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["done"] == 4
    assert json.loads((tmp_path / "out" / "errors.jsonl").read_text())["field"] == "steps"
    assert json.loads((tmp_path / "out" / "one-step" / "manifest.json").read_text())["metrics"]["clip_i"] is None


# A killed model actor's or driver's work, redone once with every byte as in a clean run: tests/test_chaos.py
# (actors killed while the run renders, a driver killed while its earlier tasks render), on both twins.


def test_pool_plan_for_single_gpu_and_cpu_only_nodes(tiny_config):
    legacy = dataclasses.replace(tiny_config.ray, clip=PoolResources(replicas=1))
    one_gpu = plan_pools(legacy, cluster_gpus=1, cluster_cpus=8)
    assert {k: (p.replicas, p.num_gpus) for k, p in one_gpu.items()} == {
        "sd": (1, 0.3333), "video": (1, 0.3333), "clip": (1, 0.3333)}
    cpu = plan_pools(legacy, cluster_gpus=0, cluster_cpus=2)
    assert all(p.num_gpus == 0 and p.replicas == 1 for p in cpu.values())
    grown = plan_pools(legacy, cluster_gpus=8, cluster_cpus=32, fixed_gpus={"sd": 1, "video": 1, "clip": 1})
    assert (grown["sd"].replicas, grown["video"].replicas, grown["clip"].replicas) == (4, 3, 1)


def test_placement_shared_lends_idle_sd_actors_the_last_clips_and_changes_no_byte(tmp_path, tiny_config, reference):
    """`ray.placement: shared`: SD actors load the video model too; once every task is read, the three SD
    actors have more room than the tasks left need and clips wait for the one video actor (made 2 s slower
    a call, as a heavier video model would be), the idle SD actors make clips. Every file is the in-process
    run's."""
    tasks = write_jsonl(tmp_path / "t.jsonl", TASKS)
    cfg = ray_config(tiny_config, placement="shared", rescale_seconds=0.5, max_concurrent_tasks=3,
                     sd=PoolResources(replicas=3), video=PoolResources(replicas=1), chaos_slow_kind="video",
                     chaos_slow_s=2.0)
    summary = run_on_ray(str(tasks), str(tmp_path / "out"), cfg, progress=False)
    assert sorted(summary.done) == ["one-step", "sauce", "shelf", "tea"] and not summary.failed
    assert outputs(tmp_path / "out") == reference
    by_kind: dict[str, int] = {}
    for actor in summary.actors:
        by_kind[actor["kind"]] = by_kind.get(actor["kind"], 0) + actor["methods"].get("animate", 0)
    assert by_kind.get("sd", 0) >= 1, by_kind  # a lent SD actor made clips
    assert summary.extra["pools"]["video"]["lent"] >= 1
