"""The job's state machine (`JobCore`), the virtual-time simulator and `cosed plan`, all without Ray."""

import json

import pytest

from cosed.calls import ClipDone, ClipRequest
from cosed.cli import main
from cosed.config import RunConfig, VideoConfig
from cosed.distributed.core import (DriverFailed, JobCore, ReplaceDriver, SendClip, Sequenced, StartTask,
                                    StartWriter, Stop)
from cosed.distributed.costs import CostModel
from cosed.distributed.policies import admission
from cosed.distributed.simulator import Cluster, Overheads, simulate
from cosed.runner import resolve_run
from cosed.storage import StorageUnavailable
from cosed.tasks import Task

from conftest import write_jsonl

TASKS = [Task(id=f"t{i}", title="", steps=("a", "b")) for i in range(3)]


def core(drivers=1, **policy):
    from cosed.distributed.core import CorePolicy

    job = JobCore([(t, f"fp-{t.id}", ["c", "c"]) for t in TASKS], drivers, admission(drivers),
                  CorePolicy(**policy))
    started = job.start(0.0) + job.on_members("video", ["v0", "v1"], 0.0)
    return job, started


def clip(task: Task, step: int) -> ClipRequest:
    return ClipRequest(task.id, step, f"scene-{task.id}-{step}", 7, VideoConfig(), "c", f"clip-{task.id}-{step}")


def of(kind, actions):
    return [a for a in actions if isinstance(a, kind)]


def test_a_later_attempt_joins_the_clip_calls_of_the_attempt_before():
    job, started = core()
    (start,) = of(StartTask, started)
    (sent,) = of(SendClip, job.on_driver_events(start.driver, start.key, [clip(TASKS[0], 1)], 1.0))
    # The driver dies mid-task: the task is tried again on a fresh driver; its first clip is still rendering.
    actions = job.on_driver_lost(start.driver, start.key, "driver lost (ActorDiedError)", 2.0)
    assert of(ReplaceDriver, actions)
    (again,) = of(StartTask, actions)
    assert again.task == TASKS[0] and again.key == ("t0", 1)
    assert not of(SendClip, job.on_driver_events(again.driver, again.key, [clip(TASKS[0], 1)], 3.0))  # joined
    (second,) = of(SendClip, job.on_driver_events(again.driver, again.key, [clip(TASKS[0], 2), Sequenced(2)], 4.0))
    assert not of(StartWriter, job.on_clip_result(sent.call, ClipDone("clip-t0-1", 1, 6), None, "", 5.0))
    (writer,) = of(StartWriter, job.on_clip_result(second.call, ClipDone("clip-t0-2", 1, 6), None, "", 6.0))
    assert writer.key == ("t0", 1)
    # The dead attempt's events, should any still arrive, change nothing.
    assert job.on_driver_events(start.driver, start.key, [clip(TASKS[0], 2)], 7.0) == []


def test_a_lost_object_redoes_the_task_counted_against_its_retries():
    """Candidates gone with their node (`DriverFailed("lost")`): the task is retried (its driver resumes at the
    step, `cosed.steps`), not failed; each loss spends one of ``task_retries``."""
    job, started = core(task_retries=1)
    (start,) = of(StartTask, started)
    job.on_driver_events(start.driver, start.key, [clip(TASKS[0], 1)], 1.0)
    actions = job.on_driver_events(start.driver, start.key, [DriverFailed("lost", "ObjectLostError")], 2.0)
    assert not job.failed and not of(ReplaceDriver, actions)  # the driver is healthy: it takes the retry
    (again,) = of(StartTask, actions)
    assert again.key == ("t0", 1) and again.driver == start.driver
    actions = job.on_driver_events(again.driver, again.key, [DriverFailed("lost", "ObjectLostError")], 3.0)
    assert job.failed == [("t0", "objects lost: ObjectLostError (2 attempts)")]


def test_a_lost_clip_call_is_sent_again_as_the_same_value():
    job, started = core()
    (start,) = of(StartTask, started)
    (sent,) = of(SendClip, job.on_driver_events(start.driver, start.key, [clip(TASKS[0], 1)], 1.0))
    assert not of(SendClip, job.on_clip_result(sent.call, None, "retry", "ActorDiedError", 2.0))
    (resent,) = of(SendClip, job.on_tick(10.0))  # after a short backoff
    assert resent.request == sent.request and resent.call != sent.call


def test_storage_gone_stops_admission_and_fails_only_what_never_started():
    job, started = core(drivers=1)
    (start,) = of(StartTask, started)
    actions = job.on_driver_events(start.driver, start.key, [DriverFailed("storage", "storage endpoint x down")], 1.0)
    (stop,) = of(Stop, actions)
    assert isinstance(stop.reason, StorageUnavailable)
    assert not of(StartTask, actions) and job.finished  # a driver is free, tasks are queued: none starts
    assert sorted(t for t, _ in job.failed) == ["t0", "t1", "t2"]  # its own task, and the two never started
    assert job.on_tick(100.0) == []


def latency():
    profile, cfg = resolve_run(RunConfig(profile="latency"))
    return cfg, CostModel.from_dict(profile.costs)


def test_the_simulator_runs_the_runtime_policies_to_the_end():
    cfg, costs = latency()
    result = simulate([2, 5, 3, 4, 8] * 10, cfg, costs, Cluster(gpus=8))
    assert result.tasks == 50 and result.failed == 0
    assert 0.5 < result.efficiency <= 1.0 and result.makespan_s >= result.bound_s
    assert result.dispatch_messages_per_call <= 3 and result.bottleneck in ("sd", "video")


def test_gpus_that_join_a_large_run_get_only_actors_that_place():
    cfg, costs = latency()
    joins = tuple((30.0 * (i + 1), 8) for i in range(8))  # 64 GPUs in steps of 8, early in the run
    result = simulate([2, 5, 3, 4, 8] * 300, cfg, costs, Cluster(gpus=1024, joins=joins), Overheads())
    assert result.tasks == 1500 and result.unplaced_actors == 0
    assert sum(result.grown.values()) >= 64 and result.gpus == 1088


def test_cosed_plan_prints_each_size_and_writes_one_record_per_size(tmp_path, capsys):
    tasks = write_jsonl(tmp_path / "t.jsonl", [{"id": f"t{i}", "steps": ["s"] * (2 + i % 5)} for i in range(40)])
    out = tmp_path / "plan.json"
    assert main(["plan", "--tasks", str(tasks), "--profile", "latency", "--gpus", "4,16", "--tasks-total", "200",
                 "--deadline", "3h", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "200 tasks" in printed and "4 GPUs:" in printed and "16 GPUs:" in printed and "deadline 3h:" in printed
    records = json.loads(out.read_text())
    assert [r["gpus"] for r in records[:2]] == [4, 16] and len(records) == 3
    for record in records:
        assert {"gpus", "makespan_s", "gpu_hours", "efficiency", "bottleneck", "dispatch_messages_per_call"} <= set(record)
    deadline = records[2]
    assert deadline["makespan_s"] <= 3 * 3600
    assert main(["plan", "--tasks", str(tasks), "--profile", "latency", "--gpus", str(deadline["gpus"] - 1),
                 "--tasks-total", "200", "--json", str(out)]) == 0
    assert json.loads(out.read_text())[0]["makespan_s"] > 3 * 3600  # one GPU fewer misses it


@pytest.mark.parametrize("value", ["8x", "soon"])
def test_a_bad_deadline_is_a_usage_error(tmp_path, value, capsys):
    tasks = write_jsonl(tmp_path / "t.jsonl", [{"id": "a", "steps": ["s"]}])
    assert main(["plan", "--tasks", str(tasks), "--profile", "latency", "--deadline", value]) == 2
    assert "not a duration" in capsys.readouterr().err
