"""A real job: `ray start --head`, an S3 server on 127.0.0.1, `ray job submit` of ray_jobs/generate.py."""

import json
import os
import subprocess

import boto3
import pytest

from cosed.video import decode_mp4

from chaos import BIN, CREDENTIALS, MotoServer, ray_head
from conftest import REPO

pytestmark = pytest.mark.slow

TASKS = [
    {"id": "soup", "title": "Soup", "steps": ["Chop the leeks.", "Sweat them in butter.", "Add stock and simmer."]},
    {"id": "frame", "title": "Picture frame", "steps": ["Cut the mitres.", "Glue the corners."]},
    {"id": "salad", "title": "Salad", "steps": ["Wash the leaves.", "Whisk the dressing.", "Toss together."]},
    {"id": "toast", "title": "Toast", "steps": ["Slice the bread.", "Toast it until golden."]},
]


@pytest.fixture(scope="module")
def s3_env():
    server = MotoServer()
    yield {"AWS_ENDPOINT_URL": server.url, **CREDENTIALS}
    server.stop()


@pytest.fixture(scope="module")
def head(s3_env, tiny_cache):
    """A local single-node cluster started the way cluster/README.md says (`ray start --head`)."""
    env = {**os.environ, **s3_env, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}",
           "COSED_CACHE": str(tiny_cache)}
    with ray_head(env, num_cpus=6) as address:
        yield env, address


def s3(env):
    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                        aws_secret_access_key="testing", region_name="us-east-1")


def submit(head, args, *extra):
    env, address = head
    return subprocess.run([str(BIN / "ray"), "job", "submit", f"--address={address}", f"--working-dir={REPO}",
                           *extra, "--", "python", "ray_jobs/generate.py", *args],
                          env=env, capture_output=True, text=True, timeout=600)


def keys(client, bucket, prefix=""):
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def check_task_objects(client, bucket, prefix, task):
    manifest = json.loads(client.get_object(Bucket=bucket, Key=f"{prefix}/{task['id']}/manifest.json")["Body"].read())
    assert [s["step"] for s in manifest["steps"]] == list(range(1, len(task["steps"]) + 1))
    video = client.get_object(Bucket=bucket, Key=f"{prefix}/{task['id']}/video.mp4")["Body"].read()
    assert len(decode_mp4(video)) == manifest["video_frames"] == len(task["steps"]) * manifest["config"]["video"]["num_frames"]
    for step in manifest["steps"]:
        clip = client.get_object(Bucket=bucket, Key=f"{prefix}/{task['id']}/{step['clip']}")["Body"].read()
        assert len(decode_mp4(clip)) == step["frames"]
        client.head_object(Bucket=bucket, Key=f"{prefix}/{task['id']}/{step['image']}")
    return manifest


@pytest.fixture(scope="module")
def buckets(s3_env):
    client = s3(s3_env)
    for bucket in ("tasks", "videos"):
        client.create_bucket(Bucket=bucket)
    body = "".join(json.dumps(t) + "\n" for t in TASKS) + '{"id": "bad", "steps": []}\n'
    client.put_object(Bucket="tasks", Key="batch/tasks.jsonl", Body=body.encode())
    return client


def test_ray_job_submit_over_an_s3_bucket(head, buckets, tiny_cache):
    result = submit(head, ["--tasks", "s3://tasks/batch/tasks.jsonl", "--out", "s3://videos/run1",
                           "--cache-dir", str(tiny_cache)])
    assert "tasks: 4 done" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
    for task in TASKS:
        check_task_objects(buckets, "videos", "run1", task)
    errors = buckets.get_object(Bucket="videos", Key="run1/errors.jsonl")["Body"].read().decode()
    assert json.loads(errors)["task_id"] == "bad"
    summary = json.loads(buckets.get_object(Bucket="videos", Key="run1/summary.json")["Body"].read())
    assert summary["done"] == 4 and set(summary["busy_fraction"]) == {"sd", "video", "clip"}
    assert "testing" not in json.dumps(summary) and all(
        "testing" not in buckets.get_object(Bucket="videos", Key=f"run1/{t['id']}/manifest.json")["Body"].read().decode()
        for t in TASKS)


# `ray job stop` and a resubmit: tests/test_chaos_jobs.py (three stop points, every byte compared).
