"""Chaos (e): `ray job stop` while a job is pending, then at three points of a run, then a resubmit.

Each stop leaves the output as it was (a stopped job's lease is taken over, its
finished tasks stay finished and are never redone); the resubmit does the rest,
each task exactly once, with no partial object left.
"""

import json
import os
import subprocess
import time

import pytest

from chaos import BIN, CREDENTIALS, keys, manifests, ray_head, s3_with_tasks, wait_for
from conftest import REPO, SMALL_TASKS
from cosed.tasks import LEASE
from cosed.video import decode_mp4
from test_chaos_storage import objects

pytestmark = pytest.mark.slow

TASKS = [{**t, "steps": t["steps"][:2]} for t in SMALL_TASKS] + [
    {"id": "toast", "title": "Toast", "steps": ["Slice the bread.", "Toast it until golden."]},
    {"id": "frame", "title": "Frame", "steps": ["Cut the mitres.", "Glue the corners."]}]
PREFIX = "e1"
# One actor per pool and one task at a time: small enough to share a busy 2-core machine.
SMALL_POOLS = "ray:\n  sd: {replicas: 1}\n  video: {replicas: 1}\n  max_concurrent_tasks: 1\n"


@pytest.fixture(scope="module")
def s3():
    with s3_with_tasks(TASKS) as pair:
        yield pair


@pytest.fixture(scope="module")
def head(s3, tiny_cache, tmp_path_factory):
    env = {**os.environ, **CREDENTIALS, "AWS_ENDPOINT_URL": s3[0].url, "RAY_AUTH_MODE": "disabled",
           "PATH": f"{BIN}:{os.environ['PATH']}", "COSED_CACHE": str(tiny_cache)}
    config = tmp_path_factory.mktemp("chaos") / "pools.yaml"
    config.write_text(SMALL_POOLS)
    env["COSED_CHAOS_CONFIG"] = str(config)
    with ray_head(env, num_cpus=4) as address:
        yield env, address


def submit(head, submission_id: str, tiny_cache, wait: bool) -> subprocess.CompletedProcess:
    """Submit, retrying while the head's job agent is still starting."""
    for _ in range(60):
        result = _submit(head, submission_id, tiny_cache, wait)
        if "No available agent" not in result.stderr:
            return result
        time.sleep(2)
    return result


def _submit(head, submission_id: str, tiny_cache, wait: bool) -> subprocess.CompletedProcess:
    env, address = head
    return subprocess.run([str(BIN / "ray"), "job", "submit", f"--address={address}", f"--working-dir={REPO}",
                           f"--submission-id={submission_id}", *([] if wait else ["--no-wait"]), "--",
                           "python", "ray_jobs/generate.py", "--tasks", "s3://tasks/t.jsonl",
                           "--out", f"s3://videos/{PREFIX}", "--cache-dir", str(tiny_cache), "--quiet",
                           "--config", env["COSED_CHAOS_CONFIG"],
                           "--preset", "legacy"],  # compared with the clean (legacy) outputs
                          env=env, capture_output=True, text=True, timeout=600)


def stop(head, submission_id: str) -> None:
    """`ray job stop`, through the job SDK (no CLI start-up delay), and wait until the job has ended."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(head[1])
    client.stop_job(submission_id)
    wait_for(lambda: client.get_job_status(submission_id) in (JobStatus.STOPPED, JobStatus.FAILED,
                                                               JobStatus.SUCCEEDED), 120, "the job to stop")


def finished_at(client) -> dict[str, str]:
    """Each finished task's manifest ETag: a redone task would change it."""
    return {task: client.head_object(Bucket="videos", Key=f"{PREFIX}/{task}/manifest.json")["ETag"]
            for task in manifests(client, "videos", PREFIX)}


def entrypoints(submission_id: str) -> list[int]:
    """The live (not zombie) processes this machine runs for a submitted job."""
    import psutil

    found = []
    for process in psutil.process_iter():
        try:
            if (submission_id in process.environ().get("RAY_JOB_CONFIG_JSON_ENV_VAR", "")
                    and process.status() != psutil.STATUS_ZOMBIE):
                found.append(process.pid)
        except (psutil.Error, OSError):
            continue
    return found


def lease_holder(client):
    from cosed.lease import Holder

    try:
        return Holder(**json.loads(client.get_object(Bucket="videos", Key=f"{PREFIX}/{LEASE}")["Body"].read()))
    except client.exceptions.NoSuchKey:
        return None


def part_keys(client) -> set[str]:
    return set(keys(client, "videos", f"{PREFIX}/.cosed-parts/"))


def new_partial_task(client, parts_before: set[str]) -> bool:
    """This job has stored a part (a scene or a clip) of a task whose manifest is not written yet."""
    done = manifests(client, "videos", PREFIX)
    return any(k.split("/")[2] not in done for k in part_keys(client) - parts_before)


def test_ray_job_stop_at_three_points_then_resubmit_does_each_task_once(s3, head, tiny_cache, clean_outputs):
    from ray.job_submission import JobSubmissionClient

    _, client = s3
    # Ray 2.60 records a job stopped while PENDING as STOPPED, then may start its entrypoint anyway
    # (ray-project/ray#58353): that run must see its status and end without taking the lease.
    jobs = JobSubmissionClient(head[1])
    assert submit(head, "cosed-chaos-e-0", tiny_cache, wait=False).returncode == 0
    stop(head, "cosed-chaos-e-0")
    try:
        wait_for(lambda: "Running entrypoint" in jobs.get_job_logs("cosed-chaos-e-0"), 15, "the entrypoint")
    except TimeoutError:
        pass  # never started: nothing to end
    wait_for(lambda: not entrypoints("cosed-chaos-e-0"), 120, "the stopped job's entrypoint to end")
    holder = lease_holder(client)
    assert holder is None or holder.gone(), holder  # none, or left by a process that is gone: taken over
    print(f"job 0, stopped while pending, has ended: its log ends {jobs.get_job_logs('cosed-chaos-e-0')[-300:]!r}",
          flush=True)
    points = [
        ("with the lease taken, before any task finished",
         lambda done, parts: any(k.endswith("/" + LEASE) for k in keys(client, "videos", PREFIX + "/"))),
        ("right after a task finished", lambda done, parts: len(manifests(client, "videos", PREFIX)) > len(done)),
        ("in the middle of a task", lambda done, parts: new_partial_task(client, parts)),
    ]
    seen: dict[str, str] = {}
    for number, (where, reached) in enumerate(points, start=1):
        done, parts = set(seen), part_keys(client)
        result = submit(head, f"cosed-chaos-e-{number}", tiny_cache, wait=False)
        assert result.returncode == 0, result.stderr
        wait_for(lambda: reached(done, parts), 300, where, pause=0 if number == 3 else 0.3)
        stop(head, f"cosed-chaos-e-{number}")
        print(f"stopped job {number} {where}: {sorted(manifests(client, 'videos', PREFIX))} finished", flush=True)
        now = finished_at(client)
        assert {t: now[t] for t in seen} == seen, f"a finished task was redone before the stop {where}"
        seen = now
    result = submit(head, "cosed-chaos-e-final", tiny_cache, wait=True)
    summary = json.loads(client.get_object(Bucket="videos", Key=f"{PREFIX}/summary.json")["Body"].read())
    assert set(summary["skipped_ids"]) == set(seen), result.stdout[-3000:]
    assert set(summary["done_ids"]) == {t["id"] for t in TASKS} - set(seen)
    assert summary["failed"] == 0 and summary["stale_ids"] == [] and summary["done_ids"]
    final = finished_at(client)
    assert {t: final[t] for t in seen} == seen
    for task in TASKS:
        manifest = json.loads(client.get_object(Bucket="videos", Key=f"{PREFIX}/{task['id']}/manifest.json")["Body"].read())
        video = client.get_object(Bucket="videos", Key=f"{PREFIX}/{task['id']}/video.mp4")["Body"].read()
        assert len(decode_mp4(video)) == manifest["video_frames"]
        expected = {f"{PREFIX}/{task['id']}/{name}" for name in ("manifest.json", "video.mp4", "storyboard.png")} | {
            f"{PREFIX}/{task['id']}/{s[key]}" for s in manifest["steps"] for key in ("image", "clip")}
        assert set(keys(client, "videos", f"{PREFIX}/{task['id']}/")) == expected
    markers = set()
    for task in TASKS:
        fingerprint = json.loads(client.get_object(Bucket="videos", Key=f"{PREFIX}/{task['id']}/manifest.json")[
            "Body"].read())["fingerprint"]
        markers.add(f"{PREFIX}/.cosed-done/{fingerprint[:2]}/{fingerprint}/{task['id']}")
    assert set(keys(client, "videos", PREFIX + "/")) - {k for k in keys(client, "videos", PREFIX + "/")
                                                        if k.split("/")[1] in {t["id"] for t in TASKS}} == {
        f"{PREFIX}/summary.json", f"{PREFIX}/.cosed-run/plan.json", *markers}  # no part, no lease, nothing else
    assert objects(client, PREFIX) == clean_outputs("tiny", TASKS)  # every byte as in a clean run
    print(f"stops left {len(seen)} of {len(TASKS)} tasks finished; the resubmit did {len(summary['done_ids'])}")
