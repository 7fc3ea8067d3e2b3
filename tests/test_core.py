"""The job's state machine (`JobCore`), the virtual-time simulator and `cosed plan`, all without Ray."""

import itertools
import json
from pathlib import Path

import pytest

from cosed.calls import ClipDone, ClipRequest
from cosed.cli import main
from cosed.config import RunConfig, VideoConfig
from cosed.distributed.core import (CancelClip, CancelWriter, CorePolicy, DriverFailed, JobCore, RecordFailure,
                                    ReplaceDriver, Retrying, SendCaptions, SendClip, Sequenced, StartTask, StartWriter,
                                    Stop)
from cosed.distributed.costs import CostModel
from cosed.distributed.policies import admission
from cosed.distributed.preemptions import PreemptionModel, parse_rate
from cosed.distributed.simulator import Cluster, Overheads, Simulation, simulate
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


def tag(start: StartTask, *events):
    """Events as a driver reports them: each with the attempt that made it."""
    return [(start.key, event) for event in events]


def test_a_later_attempt_joins_the_clip_calls_of_the_attempt_before():
    job, started = core()
    (start,) = of(StartTask, started)
    (sent,) = of(SendClip, job.on_driver_events(start.driver, tag(start, clip(TASKS[0], 1)), 1.0))
    # The driver dies mid-task: the task is tried again on a fresh driver; its first clip is still rendering.
    actions = job.on_driver_lost(start.driver, start.key, "driver lost (ActorDiedError)", 2.0)
    assert of(ReplaceDriver, actions)
    (again,) = of(StartTask, actions)
    assert again.task == TASKS[0] and again.key == ("t0", 1)
    assert not of(SendClip, job.on_driver_events(again.driver, tag(again, clip(TASKS[0], 1)), 3.0))  # joined
    (second,) = of(SendClip, job.on_driver_events(again.driver, tag(again, clip(TASKS[0], 2), Sequenced(2)), 4.0))
    assert not of(StartWriter, job.on_clip_result(sent.call, ClipDone("clip-t0-1", 1, 6), None, "", 5.0))
    (writer,) = of(StartWriter, job.on_clip_result(second.call, ClipDone("clip-t0-2", 1, 6), None, "", 6.0))
    assert writer.key == ("t0", 1)
    # The dead attempt's events, should any still arrive, change nothing.
    assert job.on_driver_events(start.driver, tag(start, clip(TASKS[0], 2)), 7.0) == []


def test_a_lost_object_redoes_the_task_counted_against_its_retries():
    """Candidates gone with their node (`DriverFailed("lost")`): the task is retried (its driver resumes at the
    step, `cosed.steps`), not failed; each loss spends one of ``task_retries``."""
    job, started = core(task_retries=1)
    (start,) = of(StartTask, started)
    job.on_driver_events(start.driver, tag(start, clip(TASKS[0], 1)), 1.0)
    actions = job.on_driver_events(start.driver, tag(start, DriverFailed("lost", "ObjectLostError")), 2.0)
    assert not job.failed and not of(ReplaceDriver, actions)  # the driver is healthy: it takes the retry
    (again,) = of(StartTask, actions)
    assert again.key == ("t0", 1) and again.driver == start.driver
    actions = job.on_driver_events(again.driver, tag(again, DriverFailed("lost", "ObjectLostError")), 3.0)
    assert job.failed == [("t0", "objects lost: ObjectLostError (2 attempts)")]


def test_a_lost_clip_call_is_sent_again_as_the_same_value():
    job, started = core()
    (start,) = of(StartTask, started)
    (sent,) = of(SendClip, job.on_driver_events(start.driver, tag(start, clip(TASKS[0], 1)), 1.0))
    assert not of(SendClip, job.on_clip_result(sent.call, None, "retry", "ActorDiedError", 2.0))
    (resent,) = of(SendClip, job.on_tick(10.0))  # after a short backoff
    assert resent.request == sent.request and resent.call != sent.call


def test_a_clip_call_whose_only_actor_is_restarting_waits_a_model_load_not_the_call_floor():
    job, started = core(call_patience_s=4.0, restart_patience_s=900.0)
    job.on_members("video", ["v0"], 0.0)
    (start,) = of(StartTask, started)
    (sent,) = of(SendClip, job.on_driver_events(start.driver, tag(start, clip(TASKS[0], 1)), 1.0))
    now, call = 1.0, sent.call
    for _ in range(6):  # six failures over 60 s: past call_attempts and the call floor
        assert not of(RecordFailure, job.on_clip_result(call, None, "restarting", "ActorUnavailableError", now))
        now += 10.0
        (again,) = of(SendClip, job.on_tick(now))
        call = again.call
    assert of(RecordFailure, job.on_clip_result(call, None, "retry", "ActorDiedError", now))  # not restarting


def test_storage_gone_stops_admission_and_fails_only_what_never_started():
    job, started = core(drivers=1)
    (start,) = of(StartTask, started)
    actions = job.on_driver_events(start.driver, tag(start, DriverFailed("storage", "storage endpoint x down")), 1.0)
    (stop,) = of(Stop, actions)
    assert isinstance(stop.reason, StorageUnavailable)
    assert not of(StartTask, actions) and job.finished  # a driver is free, tasks are queued: none starts
    assert sorted(t for t, _ in job.failed) == ["t0", "t1", "t2"]  # its own task, and the two never started
    assert job.on_tick(100.0) == []


def test_a_stale_poll_answering_with_the_next_tasks_events_credits_them_to_that_task():
    # The runtime's order: slot d sequences t0 with a poll outstanding; t0 fails (a bad input), the slot is
    # reused for t1, and t0's poll, still outstanding, answers with t1's events.
    job, started = core()
    (a,) = of(StartTask, started)
    actions = job.on_driver_events(a.driver, tag(a, DriverFailed("error", "bad input")), 1.0)
    (b,) = of(StartTask, actions)
    assert b.driver == a.driver and b.task == TASKS[1]
    late = tag(a, clip(TASKS[0], 1)) + tag(b, clip(TASKS[1], 1), clip(TASKS[1], 2), Sequenced(2))
    assert job.sequencing(b.driver, b.key) and not job.sequencing(a.driver, a.key)
    sent = of(SendClip, job.on_driver_events(a.driver, late, 2.0))
    assert [s.request.task_id for s in sent] == ["t1", "t1"]  # t1's two clips; t0's stale scene dropped
    assert job.tasks["t1"].state == "rendering" and [t for t, _ in job.failed] == ["t0"] and "t0" not in job.tasks
    assert not job.sequencing(b.driver, b.key)  # the runtime stops polling: t1 is sequenced
    writers = [of(StartWriter, job.on_clip_result(s.call, ClipDone(s.request.clip, 1, 6), None, "", 3.0)) for s in sent]
    assert [w.key for ws in writers for w in ws] == [("t1", 0)]


def test_clips_queued_behind_others_never_pass_a_deadline_but_sequencing_and_writing_do():
    from cosed.distributed.core import CorePolicy

    job = JobCore([(TASKS[0], "fp", ["c", "c"])], 1, admission(1),
                  CorePolicy(sequence_deadline_s=100.0, write_deadline_s=50.0, timeout_floor_s=10_000.0))
    (start,) = of(StartTask, job.start(0.0) + job.on_members("video", ["v0"], 0.0))
    (sent,) = of(SendClip, job.on_driver_events(start.driver, tag(start, clip(TASKS[0], 1), Sequenced(1)), 90.0))
    assert not of(Retrying, job.on_tick(5_000.0))  # its clip waited far past both deadlines: neither applies
    assert job.tasks["t0"].state == "rendering"
    (writer,) = of(StartWriter, job.on_clip_result(sent.call, ClipDone(sent.request.clip, 1, 6), None, "", 5_001.0))
    assert not job.on_tick(5_050.0)
    actions = job.on_tick(5_052.0)  # the writer ran past its own deadline
    assert of(CancelWriter, actions) and of(Retrying, actions)[0].task_id == "t0"
    (retry,) = of(StartTask, actions)
    assert retry.key == ("t0", 1)
    assert not of(ReplaceDriver, job.on_tick(5_052.0 + 99.0))  # the retry's sequencing counts from its start
    assert of(ReplaceDriver, job.on_tick(5_052.0 + 101.0)) and job.tasks["t0"].attempt == 2


def test_a_failed_task_cancels_the_clip_calls_nobody_else_waits_for():
    job, started = core(drivers=2)
    first, second = of(StartTask, started)
    (mine,) = of(SendClip, job.on_driver_events(first.driver, tag(first, clip(first.task, 1)), 1.0))
    (other,) = of(SendClip, job.on_driver_events(second.driver, tag(second, clip(second.task, 1)), 1.0))
    # The first task's second scene fails fatally: the task fails and its other clip call is cancelled.
    (bad,) = of(SendClip, job.on_driver_events(first.driver, tag(first, clip(first.task, 2), Sequenced(2)), 2.0))
    actions = job.on_clip_result(bad.call, None, "fatal", "ValueError: bad scene", 3.0)
    assert [r.task_id for r in of(RecordFailure, actions)] == [first.task.id]
    assert [c.call for c in of(CancelClip, actions)] == [mine.call]  # not the other task's call
    assert job.on_clip_result(mine.call, None, "retry", "TaskCancelledError", 4.0) == []  # its answer is ignored
    assert sum(job.slots.load.values()) == 1  # only the other task's call is counted on an actor
    assert of(StartWriter, job.on_driver_events(second.driver, tag(second, Sequenced(1)), 5.0)) == []
    assert of(StartWriter, job.on_clip_result(other.call, ClipDone(other.request.clip, 1, 6), None, "", 6.0))


def test_a_failed_caption_call_backs_off_and_avoids_the_actor_that_failed():
    from cosed.distributed.core import CorePolicy

    job = JobCore([(t, f"fp-{t.id}", None) for t in TASKS[:1]], 1, admission(1), CorePolicy(caption_batch=1))
    job.start(0.0)
    (first,) = of(SendCaptions, job.on_members("caption", ["c0", "c1", "c2"], 0.0))
    run = job.tasks["t0"]
    assert not of(SendCaptions, job.on_captions(first.batch, None, "retry", "ActorDiedError", 1.0))  # backs off
    for attempt in range(20):  # whichever actor failed, the resend goes elsewhere
        (again,) = of(SendCaptions, job.on_tick(2.0 + 10 * attempt))
        assert again.actor != first.actor and again.pairs == first.pairs
        assert not of(SendCaptions, job.on_captions(again.batch, None, "retry", "ActorDiedError", 3.0 + 10 * attempt))
        first = again
        if run.state == "failed":
            break
    assert run.state == "failed" and run.caption_failures == 4 and "t0" not in job.tasks  # call_attempts


def test_a_writer_run_again_after_it_wrote_the_manifest_and_removed_parts_succeeds(tmp_path):
    from cosed.engine import MANIFEST, assemble_task, task_uri

    profile, cfg = resolve_run(RunConfig(profile="latency"))
    task = TASKS[0]
    manifest = {"task_id": task.id, "fingerprint": "fp-1", "steps": []}
    path = task_uri(str(tmp_path), task, MANIFEST)  # written; every part (sequence record included) removed
    Path(path).parent.mkdir(parents=True)
    Path(path).write_text(json.dumps(manifest))
    assert assemble_task(str(tmp_path), task, "fp-1", profile, cfg) == manifest
    with pytest.raises(FileNotFoundError):  # another fingerprint: not done, and its parts are missing
        assemble_task(str(tmp_path), task, "fp-2", profile, cfg)


def test_the_failure_rules_runtime_and_simulator_share():
    from cosed.distributed.policies import give_up, hung, needs_rescue, rescue_donor, unreachable_limit

    assert not give_up(4, 4, 119.0, 120.0) and not give_up(3, 4, 1e6, 120.0) and give_up(4, 4, 120.0, 120.0)
    assert unreachable_limit(True, False, False, 120.0, 900.0) == 900.0  # only restarting, its pool's last member
    assert unreachable_limit(True, False, True, 120.0, 900.0) == 120.0  # its node is gone: replaced
    assert hung(121.0, 120.0, 10.0, 1.0) and not hung(119.0, 120.0, 10.0, 1.0) and not hung(200.0, 120.0, 10.0, 30.0)
    assert needs_rescue(1, 0, 120.0, False, 120.0) and not needs_rescue(1, 0, 119.0, False, 120.0)
    assert not needs_rescue(1, 0, None, False, 120.0) and not needs_rescue(1, 1, 500.0, False, 120.0)
    assert rescue_donor("clip", {"sd": 3, "video": 5, "clip": 0}, {"sd": 3, "video": 1, "clip": 0}) == "sd"


def test_storage_pressure_pauses_admission_and_one_writer_runs_until_it_eases():
    job, started = core(drivers=2)
    first, second = of(StartTask, started)
    assert job.on_storage_pressure(True, 1.0) == []
    ready = []
    for start, task in ((first, TASKS[0]), (second, TASKS[1])):
        actions = job.on_driver_events(start.driver, tag(start, clip(task, 1), Sequenced(1)), 2.0)
        assert not of(StartTask, actions)  # drivers are free, t2 is queued: it waits for the storage
        (sent,) = of(SendClip, actions)
        ready += of(StartWriter, job.on_clip_result(sent.call, ClipDone(sent.request.clip, 1, 6), None, "", 3.0))
    assert [w.key for w in ready] == [("t0", 0)]  # one writer while the storage pushes back
    actions = job.on_storage_pressure(False, 10.0)
    assert [a.key for a in of(StartTask, actions)] == [("t2", 0)] and [w.key for w in of(StartWriter, actions)] == [
        ("t1", 0)]
    assert (job.storage_pauses, job.storage_paused_s) == (1, 9.0)


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


def test_preemptions_lengthen_the_run_and_the_work_they_cut_is_redone_exactly_once():
    cfg, costs = latency()
    counts = [2, 5, 3, 4, 8] * 40

    def run(rate: float):
        sim = Simulation(counts, cfg, costs, Cluster(gpus=32, preemptions=PreemptionModel(rate, 600.0)), seed=3)
        return sim, sim.run()

    def calls(sim, kind):
        return sum(a.calls for a in sim.actors.values() if a.kind == kind)

    base, clean = run(0.0)
    sim, hit = run(1.0)  # one node in four lost per hour: a few during the run
    assert clean.tasks == hit.tasks == 200 and hit.failed == 0
    lost = sim.lost
    assert lost.nodes >= 2 and lost.drivers >= 1 and lost.cut_calls.get("video") and lost.redone_calls.get("sd")
    assert hit.makespan_s > clean.makespan_s and hit.preemption["lost_gpu_hours"] > 0
    # Every clip is made exactly once; each clip call cut short with its node is sent again exactly once.
    assert len(sim.clips_done) == sum(counts) and set(sim.clips_done.values()) == {1}
    assert sim.clip_sends == sum(counts) + lost.cut_calls["video"]
    # The model calls made: the clean run's, plus exactly those of the attempts lost with their drivers.
    for kind in ("sd", "clip"):
        assert calls(sim, kind) == calls(base, kind) + lost.redone_calls.get(kind, 0)
    again = run(1.0)[1].to_dict()
    assert {k: v for k, v in again.items() if k != "core_us_per_event"} == \
        {k: v for k, v in hit.to_dict().items() if k != "core_us_per_event"}  # deterministic for a seed


@pytest.mark.parametrize("text,rate", [("5%/h", 0.05), ("5%", 0.05), ("0.05/h", 0.05), ("24%/d", 0.01)])
def test_a_preemption_rate_is_nodes_lost_per_node_hour(text, rate):
    assert parse_rate(text) == pytest.approx(rate)


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
    assert "with_preemptions" not in records[0]
    assert deadline["makespan_s"] <= 3 * 3600
    assert main(["plan", "--tasks", str(tasks), "--profile", "latency", "--gpus", str(deadline["gpus"] - 1),
                 "--tasks-total", "200", "--json", str(out)]) == 0
    assert json.loads(out.read_text())[0]["makespan_s"] > 3 * 3600  # one GPU fewer misses it


@pytest.mark.parametrize("value", ["8x", "soon"])
def test_a_bad_deadline_is_a_usage_error(tmp_path, value, capsys):
    tasks = write_jsonl(tmp_path / "t.jsonl", [{"id": "a", "steps": ["s"]}])
    assert main(["plan", "--tasks", str(tasks), "--profile", "latency", "--deadline", value]) == 2
    assert "not a duration" in capsys.readouterr().err


def test_cosed_plan_sets_a_run_with_preemptions_beside_each_size(tmp_path, capsys):
    tasks = write_jsonl(tmp_path / "t.jsonl", [{"id": f"t{i}", "steps": ["s"] * (2 + i % 5)} for i in range(40)])
    out = tmp_path / "plan.json"
    assert main(["plan", "--tasks", str(tasks), "--profile", "latency", "--gpus", "16", "--tasks-total", "100",
                 "--preemptions", "50%/h", "--replace-after", "5m", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "with preemptions 50%/h (nodes replaced after 300 s):" in printed and "GPU-hours of work lost" in printed
    (record,) = json.loads(out.read_text())
    hit = record["with_preemptions"]
    assert hit["rate"] == "50%/h" and hit["preemption"]["nodes"] >= 1 and hit["tasks"] == 100
    assert hit["makespan_s"] > record["makespan_s"]
    assert main(["plan", "--tasks", str(tasks), "--profile", "latency", "--preemptions", "often"]) == 2


def test_the_core_holds_a_window_of_tasks_never_the_dataset():
    """2,000 tasks fed as the runtime feeds them (`Window`): the core never holds more than its window, is
    topped up as tasks finish, and drops each finished task's record; every task is done once."""
    from cosed.distributed.window import task_window

    cfg, costs = latency()
    counts = [2, 5, 3, 4, 8] * 400
    sim = Simulation(counts, cfg, costs, Cluster(gpus=16), seed=1)
    window = task_window(sim.core.admission)
    held, add = [], sim.core.add
    sim.core.add = lambda tasks: (add(tasks), held.append(sim.core.live))
    result = sim.run()
    assert result.tasks == 2000 and result.failed == 0 and sorted(sim.core.done) == sorted(f"t{i:06d}" for i in range(2000))
    assert max(held) <= window < 500 and len(held) > 2000 // window  # topped up over the run, never past the window
    assert sim.core.live == 0 and not sim.core.tasks  # records dropped once done


def test_a_task_whose_captions_cannot_be_made_is_its_own_error_and_the_window_goes_on():
    from cosed.distributed.core import CorePolicy
    from cosed.distributed.window import Window

    core = JobCore([], 1, admission(1), CorePolicy(), more=True)
    pending = iter([(Task(id=f"t{i}", title="", steps=("a", "b")), f"fp{i}") for i in range(5)])
    rejected = []

    def captions(task):
        if task.id == "t2":
            raise ValueError("task 't2' carries no captions")
        return ["c", "c"]

    window = Window(core, lambda n: list(itertools.islice(pending, n)), lambda chunk: chunk, captions, 3,
                    reject=lambda task, exc: rejected.append((task.id, str(exc))))
    assert window.refill() == 3 and [r[0] for r in rejected] == ["t2"] and list(core.queue) == ["t0", "t1", "t3"]
    assert not window.exhausted and core.more
    core.tasks.clear()  # as if all three finished
    assert window.refill() == 1 and window.exhausted and not core.more and list(core.queue)[-1] == "t4"


def test_slots_bind_each_call_to_the_least_loaded_actor_and_hold_none_past_the_depth():
    from cosed.distributed.slots import Slots

    slots = Slots(depth=2)
    slots.set_members(["a", "b", "c"])
    assert [slots.take() for _ in range(3)] == ["a", "b", "c"]  # each idle actor before any gets a second
    assert slots.take(avoid={"a"}) == "b"
    assert [slots.take(), slots.take()] == ["a", "c"]
    assert slots.take() is None and slots.open == 0  # all full: the next call waits in the job
    slots.give("b")
    assert slots.open == 1 and slots.take() == "b"  # the first actor that frees takes it
    slots.set_members(["a", "c"])  # "b" left with two calls out: they are counted until answered
    slots.give("b")
    assert slots.load["b"] == 1 and slots.take() is None  # and never make "b" a member again


def test_clips_past_the_video_actors_room_wait_in_the_job_and_go_to_the_first_actor_that_frees():
    """Late binding: two video actors hold two clips each; the fifth and sixth wait in the job, oldest first,
    and each goes to whichever actor answers first, never queued behind another on an actor drawn early."""
    tasks = [Task(id=f"t{i}", title="", steps=("a",)) for i in range(6)]
    job = JobCore([(t, f"fp-{t.id}", ["c"]) for t in tasks], 6, admission(6), CorePolicy(clip_depth=2))
    starts = of(StartTask, job.start(0.0) + job.on_members("video", ["v0", "v1"], 0.0))
    sent = []
    for start in starts:
        sent += of(SendClip, job.on_driver_events(start.driver, tag(start, clip(start.task, 1), Sequenced(1)), 1.0))
    assert sorted(s.actor for s in sent) == ["v0", "v0", "v1", "v1"] and len(job.held) == 2
    on_v1 = [s for s in sent if s.actor == "v1"][0]
    (next_one,) = of(SendClip, job.on_clip_result(on_v1.call, ClipDone(on_v1.request.clip, 1, 6), None, "", 2.0))
    assert next_one.actor == "v1" and next_one.request.task_id == starts[4].task.id  # the oldest waiting clip
    on_v0 = [s for s in sent if s.actor == "v0"][0]
    (last,) = of(SendClip, job.on_clip_result(on_v0.call, None, "fatal", "ValueError: bad scene", 3.0))
    assert last.actor == "v0" and last.request.task_id == starts[5].task.id and not job.held


@pytest.mark.parametrize("method", ["mora", "t2v", "talc"])
def test_the_simulator_makes_the_calls_each_method_makes(method):
    """`cosed plan --method`: mora renders step 1 only and waits for each previous clip; t2v makes every clip
    from its caption while sequencing (the job finds it, renders nothing); talc makes one video call per task."""
    from cosed.evaluate import method_config

    base, costs = latency()
    cfg = method_config(base, method)
    counts = [2, 5, 3, 4] * 5
    sim = Simulation(counts, cfg, costs, Cluster(gpus=8))
    result = sim.run()
    assert result.tasks == len(counts) and result.failed == 0

    def calls(kind):
        return sum(a.calls for a in sim.actors.values() if a.kind == kind)

    scenes = sum(counts)
    expected = {"mora": (len(counts), scenes), "t2v": (0, scenes), "talc": (0, len(counts))}[method]
    assert (calls("sd"), calls("video")) == expected  # mora: one batch of 4 candidates for each step 1
    assert sim.clip_sends == (scenes if method == "mora" else 0)
    if method == "mora":  # scene i waits for clip i-1: a task takes at least its clips end to end
        assert min(sim.latency) >= min(counts) * costs.seconds("animate")


def test_plan_refuses_a_text_to_video_method_on_a_profile_without_one(tmp_path, capsys):
    tasks = write_jsonl(tmp_path / "tasks.jsonl", [{"id": "a", "title": "A", "steps": ["x", "y"]}])
    assert main(["plan", "--tasks", str(tasks), "--profile", "latency", "--gpus", "8", "--method", "t2v"]) == 2
    assert "has no text-to-video model" in capsys.readouterr().err


def test_idle_sd_actors_are_lent_to_video_only_once_the_input_is_used_up_and_the_sd_pool_has_spare():
    """`policies.lend_to_video` (placement shared): never while tasks are left to read or while the tasks still
    to sequence keep the SD pool busy; then one per waiting clip, longest idle first; the SD pool keeps one."""
    from cosed.distributed.policies import lend_to_video

    idle = ["sd-3", "sd-1", "sd-2"]
    assert lend_to_video(idle, 8, input_done=False, clips_waiting=9, to_sequence=0) == []
    assert lend_to_video(idle, 8, input_done=True, clips_waiting=0, to_sequence=0) == []
    assert lend_to_video(idle, 8, input_done=True, clips_waiting=9, to_sequence=16, calls_per_task=0.5) == []
    assert lend_to_video(idle, 8, input_done=True, clips_waiting=9, to_sequence=12, calls_per_task=0.5) == ["sd-3",
                                                                                                          "sd-1"]
    assert lend_to_video(idle, 8, input_done=True, clips_waiting=1, to_sequence=0) == ["sd-3"]
    assert lend_to_video(idle, 3, input_done=True, clips_waiting=9, to_sequence=0) == ["sd-3", "sd-1"]
    assert lend_to_video(["sd-0"], 1, input_done=True, clips_waiting=9, to_sequence=0) == []


def test_placement_shared_ends_a_run_sooner_with_the_same_work():
    """In virtual time: SD actors lent at the end make clips, so the run ends sooner on the same calls."""
    import dataclasses

    cfg, costs = latency()
    counts = [2, 5, 3, 4, 6] * 40
    pooled = Simulation(counts, cfg, costs, Cluster(gpus=16))
    shared_cfg = dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, placement="shared"))
    shared = Simulation(counts, shared_cfg, costs, Cluster(gpus=16))
    a, b = pooled.run(), shared.run()
    assert a.tasks == b.tasks == len(counts) and not a.failed and not b.failed
    assert not a.lent and b.lent["actors"] >= 1
    assert sum(x.calls for x in shared.actors.values() if x.lent) > 0
    assert shared.clip_sends == pooled.clip_sends == sum(counts)  # no clip made twice
    assert b.makespan_s < a.makespan_s


def test_cosed_plan_placement_shared_says_how_many_sd_actors_took_clips(tmp_path, capsys):
    tasks = write_jsonl(tmp_path / "t.jsonl", [{"id": f"t{i}", "steps": ["s"] * (2 + i % 5)} for i in range(40)])
    out = tmp_path / "plan.json"
    assert main(["plan", "--tasks", str(tasks), "--profile", "latency", "--gpus", "16", "--tasks-total", "200",
                 "--placement", "shared", "--json", str(out)]) == 0
    assert "SD actors took clips from" in capsys.readouterr().out
    assert json.loads(out.read_text())[0]["lent"]["actors"] >= 1
