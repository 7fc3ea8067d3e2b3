"""Chaos (d): the S3 endpoint goes away, or throttles, in the middle of a run, in process and on Ray.

The run goes through a TCP proxy in front of a local S3 server; cutting the
proxy refuses and drops every connection, as a restarting server would. An
outage shorter than the retry budget is ridden out; a longer one stops the run
(exit 1, the endpoint named) without starting any task after it was detected,
and running the same command again completes it with the same bytes. A storm
of ``503 SlowDown`` answers to every request, longer than that retry budget, is
not an outage: the run pauses admission and completes with the same bytes.
"""

import json
import os
import subprocess
import sys
import threading
import time

import pytest

import re

from chaos import CREDENTIALS, Proxy, keys, manifests, s3_with_tasks, wait_for
from conftest import REPO, SMALL_TASKS

pytestmark = pytest.mark.slow

TASKS = [{**t, "steps": t["steps"][:2]} for t in SMALL_TASKS]
OUTAGE_SECONDS = 20
STORM_SECONDS = 20  # every request answered SlowDown this long: far past the 3 s outage budget the tests set


@pytest.fixture(scope="module")
def s3():
    with s3_with_tasks(TASKS) as pair:
        yield pair


@pytest.fixture
def proxy(s3):
    proxy = Proxy(s3[0].port)
    yield proxy
    proxy.cut()


def generate(proxy: Proxy, out: str, tiny_cache, tmp_path, *extra: str, ray: bool = False) -> subprocess.Popen:
    """`cosed generate` in a process of its own (``ray``: on a local Ray cluster it starts, else --no-ray)."""
    env = {**os.environ, **CREDENTIALS, "AWS_ENDPOINT_URL": proxy.url, "PYTHONPATH": str(REPO),
           "COSED_CACHE": str(tmp_path / "cache"), "RAY_AUTH_MODE": "disabled"}
    return subprocess.Popen([sys.executable, "-m", "cosed.cli", "generate", *([] if ray else ["--no-ray"]), "--quiet",
                             "--tasks", "s3://tasks/t.jsonl", "--out", out, "--cache-dir", str(tiny_cache),
                             "--preset", "legacy", *extra],  # compared with the clean (legacy) outputs
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def outage_after_first_manifest(proxy: Proxy, client, prefix: str, seconds: float,
                                end_early: threading.Event | None = None) -> threading.Thread:
    def run():
        wait_for(lambda: manifests(client, "videos", prefix), 120, "the first finished task")
        proxy.cut()
        (end_early or threading.Event()).wait(seconds)
        proxy.restore()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_20_s_outage_mid_run_is_ridden_out(s3, proxy, tiny_cache, tmp_path):
    _, client = s3
    outage = outage_after_first_manifest(proxy, client, "d1", OUTAGE_SECONDS)
    process = generate(proxy, "s3://videos/d1", tiny_cache, tmp_path)
    stdout, stderr = process.communicate(timeout=300)
    outage.join(1)
    assert process.returncode == 0, stdout[-2000:] + stderr[-3000:]
    assert not outage.is_alive()
    assert manifests(client, "videos", "d1") == {t["id"] for t in TASKS}
    summary = json.loads(client.get_object(Bucket="videos", Key="d1/summary.json")["Body"].read())
    assert summary["done"] == len(TASKS) and summary["failed"] == 0


def test_a_short_retry_budget_fails_naming_the_endpoint_and_a_resubmit_completes(s3, proxy, tiny_cache, tmp_path):
    _, client = s3
    (tmp_path / "short.yaml").write_text("storage:\n  retry_seconds: 3\n")
    gave_up = threading.Event()
    outage = outage_after_first_manifest(proxy, client, "d2", OUTAGE_SECONDS, gave_up)
    process = generate(proxy, "s3://videos/d2", tiny_cache, tmp_path, "--config", str(tmp_path / "short.yaml"))
    _, stderr = process.communicate(timeout=300)
    gave_up.set()
    assert process.returncode == 1, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("cosed: error:") and proxy.url in last and "run the same command again" in last
    outage.join(60)
    finished = manifests(client, "videos", "d2")
    assert 0 < len(finished) < len(TASKS)
    process = generate(proxy, "s3://videos/d2", tiny_cache, tmp_path)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stdout[-2000:] + stderr[-3000:]
    summary = json.loads(client.get_object(Bucket="videos", Key="d2/summary.json")["Body"].read())
    assert set(summary["skipped_ids"]) == finished
    assert set(summary["done_ids"]) == {t["id"] for t in TASKS} - finished
    assert not [k for k in keys(client, "videos", "d2/") if k.endswith(".part")]


def objects(client, prefix: str) -> dict[str, object]:
    """The task files under ``prefix`` as `conftest.outputs` reads a local run (manifests without timings)."""
    from cosed.engine import manifest_without_timings

    files = {}
    for key in keys(client, "videos", prefix + "/"):
        rel = key[len(prefix) + 1:]
        if not rel.split("/")[0].startswith(".") and rel.split("/")[0] not in ("summary.json", "errors.jsonl",
                                                                                "errors"):
            body = client.get_object(Bucket="videos", Key=key)["Body"].read()
            files[rel] = manifest_without_timings(json.loads(body)) if rel.endswith("manifest.json") else body
    return files


def test_on_ray_storage_gone_past_its_budget_stops_the_run_and_a_resubmit_completes(s3, proxy, tiny_cache, tmp_path,
                                                                                    clean_outputs):
    _, client = s3
    (tmp_path / "short.yaml").write_text("storage:\n  retry_seconds: 3\nray:\n  max_concurrent_tasks: 1\n")
    gave_up = threading.Event()
    outage = outage_after_first_manifest(proxy, client, "d3", 600, gave_up)  # down until the run has given up
    process = generate(proxy, "s3://videos/d3", tiny_cache, tmp_path, "--config", str(tmp_path / "short.yaml"),
                       ray=True)
    _, stderr = process.communicate(timeout=400)
    gave_up.set()
    outage.join(60)
    assert process.returncode == 1, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("cosed: error: storage endpoint") and proxy.url in last, last
    assert "run the same command again" in last
    # The summary could not reach the bucket: the run kept it locally and said where.
    kept = re.search(r"the summary is kept at (\S+\.json)", stderr).group(1)
    trace = json.loads(open(kept).read())["trace"]
    assert trace["stopped_at"] is not None and trace["started"]
    assert all(started <= trace["stopped_at"] for started, _ in trace["started"])  # nothing started after
    finished = manifests(client, "videos", "d3")
    assert 0 < len(finished) < len(TASKS)
    process = generate(proxy, "s3://videos/d3", tiny_cache, tmp_path, ray=True)
    stdout, stderr = process.communicate(timeout=400)
    assert process.returncode == 0, stdout[-2000:] + stderr[-3000:]
    summary = json.loads(client.get_object(Bucket="videos", Key="d3/summary.json")["Body"].read())
    assert set(summary["skipped_ids"]) == finished
    assert objects(client, "d3") == clean_outputs("tiny", TASKS)  # every byte, as a clean run
    assert not [k for k in keys(client, "videos", "d3/") if "/.cosed-parts/" in k]


def test_on_ray_a_slowdown_storm_past_the_outage_budget_pauses_admission_and_is_ridden_out(
        s3, proxy, tiny_cache, tmp_path, clean_outputs):
    _, client = s3
    # With throttling counted as an outage (before throttle_seconds), this budget made the run exit 1.
    (tmp_path / "short.yaml").write_text("storage:\n  retry_seconds: 3\nray:\n  max_concurrent_tasks: 1\n")

    def storm():  # from the first stored scene: every task still has its clips and files to write
        wait_for(lambda: [k for k in keys(client, "videos", "d4/") if "/.cosed-parts/" in k], 300, "the first scene")
        proxy.throttle()
        time.sleep(STORM_SECONDS)
        proxy.ease()

    thread = threading.Thread(target=storm, daemon=True)
    thread.start()
    process = generate(proxy, "s3://videos/d4", tiny_cache, tmp_path, "--config", str(tmp_path / "short.yaml"),
                       ray=True)
    stdout, stderr = process.communicate(timeout=400)
    thread.join(1)
    assert process.returncode == 0, stdout[-2000:] + stderr[-3000:]
    assert not thread.is_alive() and proxy.slowed > 0
    summary = json.loads(client.get_object(Bucket="videos", Key="d4/summary.json")["Body"].read())
    assert summary["done"] == len(TASKS) and summary["failed"] == 0
    # Admission paused while the storage pushed back, said so once each way, and no task started meanwhile.
    assert summary["storage_pauses"] >= 1 and summary["storage_paused_s"] > 0
    assert "storage is throttling" in stderr and "admission resumes" in stderr
    paused = summary["trace"]["paused"]
    assert all(not start < at < (end or float("inf")) for at, _ in summary["trace"]["started"] for start, end in paused)
    assert objects(client, "d4") == clean_outputs("tiny", TASKS)  # every byte, as a clean run
    assert not [k for k in keys(client, "videos", "d4/") if "/.cosed-parts/" in k]
