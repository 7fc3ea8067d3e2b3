"""Chaos (d): the S3 endpoint goes away for 20 s in the middle of a run.

The run goes through a TCP proxy in front of a local S3 server; cutting the
proxy refuses and drops every connection, as a restarting server would.
"""

import json
import os
import subprocess
import sys
import threading

import pytest

from chaos import CREDENTIALS, Proxy, keys, manifests, s3_with_tasks, wait_for
from conftest import REPO, SMALL_TASKS

pytestmark = pytest.mark.slow

TASKS = [{**t, "steps": t["steps"][:2]} for t in SMALL_TASKS]
OUTAGE_SECONDS = 20


@pytest.fixture(scope="module")
def s3():
    with s3_with_tasks(TASKS) as pair:
        yield pair


@pytest.fixture
def proxy(s3):
    proxy = Proxy(s3[0].port)
    yield proxy
    proxy.cut()


def generate(proxy: Proxy, out: str, tiny_cache, tmp_path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, **CREDENTIALS, "AWS_ENDPOINT_URL": proxy.url, "PYTHONPATH": str(REPO),
           "COSED_CACHE": str(tmp_path / "cache")}
    return subprocess.Popen([sys.executable, "-m", "cosed.cli", "generate", "--no-ray", "--quiet",
                             "--tasks", "s3://tasks/t.jsonl", "--out", out, "--cache-dir", str(tiny_cache), *extra],
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
