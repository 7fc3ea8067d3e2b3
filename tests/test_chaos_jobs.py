"""Chaos (e): `ray job stop` at three different points of a run, then a resubmit.

Each stop leaves the output as it was (a stopped job's lease is taken over, its
finished tasks stay finished and are never redone); the resubmit does the rest,
each task exactly once, with no partial object left.
"""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from chaos import BIN, CREDENTIALS, free_port, keys, manifests, port_open, s3_with_tasks, wait_for
from conftest import REPO, SMALL_TASKS, outputs, write_jsonl
from cosed import runner
from cosed.tasks import LEASE
from cosed.video import decode_mp4
from test_chaos_storage import objects

pytestmark = pytest.mark.slow

TASKS = [{**t, "steps": t["steps"][:2]} for t in SMALL_TASKS] + [
    {"id": "toast", "title": "Toast", "steps": ["Slice the bread.", "Toast it until golden."]},
    {"id": "salad", "title": "Salad", "steps": ["Wash the leaves.", "Toss with dressing."]},
    {"id": "frame", "title": "Frame", "steps": ["Cut the mitres.", "Glue the corners."]},
    {"id": "rice", "title": "Rice", "steps": ["Rinse the rice.", "Simmer it covered."]},
    {"id": "plant", "title": "Plant", "steps": ["Fill the pot.", "Water the seedling."]}]
PREFIX = "e1"
# One actor per pool and one task at a time: small enough to share a busy 2-core machine.
SMALL_POOLS = "ray:\n  sd: {replicas: 1}\n  video: {replicas: 1}\n  max_concurrent_tasks: 1\n"


@pytest.fixture(scope="module")
def s3():
    with s3_with_tasks(TASKS) as pair:
        yield pair


@pytest.fixture(scope="module")
def head(s3, tiny_cache, tmp_path_factory):
    """`ray start --head --block` in its own process group, so the test stops only what it started."""
    dashboard, port = free_port(), free_port()
    env = {**os.environ, **CREDENTIALS, "AWS_ENDPOINT_URL": s3[0].url, "RAY_AUTH_MODE": "disabled",
           "PATH": f"{BIN}:{os.environ['PATH']}", "COSED_CACHE": str(tiny_cache)}
    # Every port of its own: other clusters may run on this machine at the same time.
    ports = [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
        "node-manager-port", "object-manager-port", "ray-client-server-port")]
    process = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", *ports,
                                f"--temp-dir=/tmp/cosed-chaos-{port}",
                                "--num-cpus=4", "--num-gpus=0", "--include-dashboard=true",
                                "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                                "--disable-usage-stats"], env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dashboard}"
    config = tmp_path_factory.mktemp("chaos") / "pools.yaml"
    config.write_text(SMALL_POOLS)
    env["COSED_CHAOS_CONFIG"] = str(config)
    wait_for(lambda: port_open(dashboard), 120, "the Ray dashboard")
    wait_for(lambda: subprocess.run([str(BIN / "ray"), "job", "list", f"--address={address}"], env=env,
                                    capture_output=True).returncode == 0, 120, "the Ray job API")
    yield env, address
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        pass
    try:  # what is left of the group (gcs_server, raylet); workers exit with their raylet
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(10)
    shutil.rmtree(f"/tmp/cosed-chaos-{port}", ignore_errors=True)


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
                           "--config", env["COSED_CHAOS_CONFIG"]],
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


def partial_task(client) -> bool:
    """Some task has stored a scene or a clip (its parts) but not yet its manifest."""
    done = manifests(client, "videos", PREFIX)
    return any(k.split("/")[2] not in done for k in keys(client, "videos", f"{PREFIX}/.cosed-parts/"))


def test_ray_job_stop_at_three_points_then_resubmit_does_each_task_once(s3, head, tiny_cache, tiny_run, tmp_path):
    _, client = s3
    _, cfg, backend = tiny_run
    runner.run_in_process(str(write_jsonl(tmp_path / "t.jsonl", TASKS)), str(tmp_path / "ref"), cfg, progress=False,
                          backend=backend)
    points = [
        ("with the lease taken, before any task finished",
         lambda before: any(k.endswith("/" + LEASE) for k in keys(client, "videos", PREFIX + "/"))),
        ("right after a task finished", lambda before: len(manifests(client, "videos", PREFIX)) > len(before)),
        ("in the middle of a task", lambda before: partial_task(client)),
    ]
    seen: dict[str, str] = {}
    for number, (where, reached) in enumerate(points, start=1):
        before = set(seen)
        result = submit(head, f"cosed-chaos-e-{number}", tiny_cache, wait=False)
        assert result.returncode == 0, result.stderr
        wait_for(lambda: reached(before), 300, where, pause=0 if number == 3 else 0.3)
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
    assert set(keys(client, "videos", PREFIX + "/")) - {k for k in keys(client, "videos", PREFIX + "/")
                                                        if k.split("/")[1] in {t["id"] for t in TASKS}} == {
        f"{PREFIX}/summary.json"}  # no part, no lease, nothing else left behind
    assert objects(client, PREFIX) == outputs(tmp_path / "ref")  # every byte as in a clean run
    print(f"stops left {len(seen)} of {len(TASKS)} tasks finished; the resubmit did {len(summary['done_ids'])}")
