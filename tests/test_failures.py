"""The failure model: CLI exit classes, storage behaviour, resume by fingerprint, the output lease."""

import dataclasses
import json
import os
import re
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
from botocore.stub import Stubber

from cosed import runner, storage
from cosed.cli import main
from cosed.lease import LeaseHeld, LeaseLost, OutputLease
from cosed.storage import StorageUnavailable
from cosed.tasks import LEASE

from conftest import REPO, SMALL_TASKS, write_jsonl

TEA = SMALL_TASKS[2]


@pytest.fixture
def s3_mock(monkeypatch):
    """An in-process S3 (moto) behind the project's own client."""
    from moto import mock_aws

    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setattr(storage, "_s3_client", None)
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="videos")
        yield client
    monkeypatch.setattr(storage, "_s3_client", None)


# --- CLI: one line, the right exit class ---------------------------------------------------------

@pytest.mark.parametrize("config, words", [
    ('sd:\n  height: "abc"\n', "sd.height must be int"),
    ("video:\n  width: 100\n", "video.width must be a positive multiple of 8"),
    ("video:\n  height: -64\n", "video.height must be a positive multiple of 8"),
    ("sd: [\n", "not valid YAML at line 2"),
    ("pool:\n  iterations: [1, two]\n", "pool.iterations[1] must be int"),
    ("ray:\n  sd:\n    replicas: many\n", "ray.sd.replicas must be a number or 'auto'"),
    ("storage:\n  retry_seconds: soon\n", "storage.retry_seconds must be float"),
])
def test_config_errors_exit_2_with_one_line(tmp_path, capsys, config, words):
    (tmp_path / "run.yaml").write_text(config)
    tasks = write_jsonl(tmp_path / "t.jsonl", [TEA])
    assert main(["generate", "--tasks", str(tasks), "--out", str(tmp_path / "o"), "--no-ray",
                 "--config", str(tmp_path / "run.yaml")]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_task_file_problems_exit_2(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("\n \n")
    (tmp_path / "folder").mkdir()
    for tasks, words in [("empty.jsonl", "holds no tasks"), ("folder", "is a folder"), ("none.jsonl", "not found")]:
        assert main(["generate", "--tasks", str(tmp_path / tasks), "--out", str(tmp_path / "o"), "--no-ray"]) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1


def test_storage_access_problems_exit_2(tmp_path, capsys, s3_mock, monkeypatch):
    tasks = write_jsonl(tmp_path / "t.jsonl", [TEA])
    assert main(["generate", "--tasks", "s3://no-such-bucket/t.jsonl", "--out", str(tmp_path / "o"), "--no-ray"]) == 2
    assert "NoSuchBucket" in capsys.readouterr().err
    assert main(["generate", "--tasks", str(tasks), "--out", "s3://no-such-bucket/run", "--no-ray"]) == 2
    assert "NoSuchBucket" in capsys.readouterr().err
    with Stubber(storage.s3_client()) as stub:
        stub.add_client_error("get_object", service_error_code="AccessDenied", service_message="Access Denied",
                              http_status_code=403)
        assert main(["generate", "--tasks", "s3://videos/t.jsonl", "--out", str(tmp_path / "o"), "--no-ray"]) == 2
    err = capsys.readouterr().err
    assert "AccessDenied" in err and len(err.strip().splitlines()) == 1


def test_no_credentials_exit_2(tmp_path, capsys, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setattr(storage, "_s3_client", None)
    assert main(["generate", "--tasks", "s3://videos/t.jsonl", "--out", str(tmp_path / "o"), "--no-ray"]) == 2
    assert "no credentials" in capsys.readouterr().err


def test_an_internal_error_exits_3_with_the_traceback_in_a_log_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COSED_CACHE", str(tmp_path / "cache"))

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(runner, "prepare_run", broken)
    tasks = write_jsonl(tmp_path / "t.jsonl", [TEA])
    assert main(["generate", "--tasks", str(tasks), "--out", str(tmp_path / "o"), "--no-ray"]) == 3
    err = capsys.readouterr().err
    assert "internal error" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    (log,) = (tmp_path / "cache" / "logs").glob("crash-*.log")
    assert str(log) in err and "Traceback" in log.read_text() and "KeyError" in log.read_text()
    assert not (tmp_path / "o" / LEASE).exists()  # released on the way out


def test_a_relative_out_under_ray_job_submit_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"metadata": {"job_submission_id": "x"}}))
    tasks = write_jsonl(tmp_path / "t.jsonl", [TEA])
    assert main(["generate", "--tasks", str(tasks), "--out", "out/run1"]) == 2
    assert "ray job submit" in capsys.readouterr().err


# Setting RAY_AUTH_MODE in any way, or naming it next to "disabled" (reading it, as `cosed doctor` does, is fine).
TURNS_AUTH_OFF = re.compile(r"""environ\[\s*["']RAY_AUTH_MODE["']\s*\]\s*=|(setdefault|putenv|setenv|update)\(\s*"""
                            r"""\{?\s*["']RAY_AUTH_MODE|RAY_AUTH_MODE\W{0,8}disabled""")


def test_product_code_never_turns_ray_auth_off():
    sources = [p for p in (REPO / "cosed").rglob("*.py")] + list((REPO / "ray_jobs").glob("*.py"))
    assert not [p for p in sources if TURNS_AUTH_OFF.search(p.read_text())]
    for turns_off in ('os.environ["RAY_AUTH_MODE"] = "x"', "os.environ.setdefault('RAY_AUTH_MODE', m)",
                      'env.update({"RAY_AUTH_MODE": m})', "RAY_AUTH_MODE=disabled"):
        assert TURNS_AUTH_OFF.search(turns_off), turns_off
    assert not TURNS_AUTH_OFF.search('environ.get("RAY_AUTH_MODE", "")')


# --- storage ------------------------------------------------------------------------------------

def test_local_writes_are_group_readable_and_leave_no_temporary_files(tmp_path):
    storage.write_text(str(tmp_path / "a" / "manifest.json"), "{}")
    mode = stat.S_IMODE(os.stat(tmp_path / "a" / "manifest.json").st_mode)
    assert mode & 0o044 == 0o044 and mode == 0o666 & ~_umask()
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["manifest.json"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_every_s3_object_gets_a_content_type(s3_mock):
    expected = [("video.mp4", "video/mp4"), ("s.png", "image/png"), ("m.json", "application/json"),
                ("errors.jsonl", "application/x-ndjson"), ("report.html", "text/html; charset=utf-8"),
                ("metrics.csv", "text/csv; charset=utf-8"), ("notes.txt", "text/plain; charset=utf-8"),
                ("w.safetensors", "application/octet-stream"), ("odd.bin", "application/octet-stream")]
    assert {Path(name).suffix for name, _ in expected} >= set(storage.CONTENT_TYPES)   # every type is tested
    for name, kind in expected:
        storage.write_bytes(f"s3://videos/run/{name}", b"x")
        assert s3_mock.head_object(Bucket="videos", Key=f"run/{name}")["ContentType"] == kind


def test_s3_client_asks_checksums_only_when_required_off_aws(monkeypatch):
    monkeypatch.setattr(storage, "_s3_client", None)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    config = storage.s3_client().meta.config
    assert config.request_checksum_calculation == "when_required"
    assert config.response_checksum_validation == "when_required"
    assert config.retries["mode"] == "adaptive"
    monkeypatch.setattr(storage, "_s3_client", None)


def test_an_unreachable_endpoint_fails_after_the_retry_budget_naming_it(monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setattr(storage, "_s3_client", None)
    storage.configure(2)
    try:
        start = time.monotonic()
        with pytest.raises(storage.StorageUnavailable, match=f"127.0.0.1:{port}.*within 2 s"):
            storage.write_text("s3://videos/x.json", "{}")
        assert time.monotonic() - start >= 1.5
    finally:
        storage.configure(120)
        monkeypatch.setattr(storage, "_s3_client", None)


def client_error(code: str, status: int) -> Exception:
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": ""}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "PutObject")


def test_storage_errors_are_throttling_or_an_outage():
    from botocore.exceptions import EndpointConnectionError, ReadTimeoutError

    throttled = [client_error("SlowDown", 503), client_error("503", 503),  # a HEAD's SlowDown has no body
                 client_error("TooBusy", 429), client_error("RequestLimitExceeded", 400),
                 client_error("Throttling", 400)]
    unreachable = [client_error("ServiceUnavailable", 503), client_error("InternalError", 500),
                   client_error("502", 502), EndpointConnectionError(endpoint_url="http://s3"),
                   ReadTimeoutError(endpoint_url="http://s3")]
    assert {storage.classify(e) for e in throttled} == {storage.THROTTLED}
    assert {storage.classify(e) for e in unreachable} == {storage.UNREACHABLE}
    assert storage.classify(client_error("AccessDenied", 403)) == storage.ACCESS
    assert storage.classify(client_error("NoSuchKey", 404)) == storage.OTHER


def failing(*errors: Exception):
    """A storage call that raises ``errors`` in turn, then answers."""
    left = list(errors)

    def call(_client):
        if left:
            raise left.pop(0)
        return "answered"

    return call


def test_throttling_has_a_budget_of_its_own_and_the_error_says_which_ran_out(monkeypatch):
    from botocore.exceptions import EndpointConnectionError

    slept = []
    monkeypatch.setattr(storage, "s3_client", lambda: None)
    monkeypatch.setattr(storage.time, "sleep", slept.append)
    storage.configure(0, 60)  # no outage tolerated, a minute of throttling
    try:
        # Throttled six times: ridden out with jittered, growing, capped backoff (the outage budget is 0 s).
        assert storage._s3_call("s3://videos/x", failing(*[client_error("SlowDown", 503)] * 6)) == "answered"
        assert len(slept) == 6 and len(set(slept)) == 6 and slept[-1] > slept[0] and max(slept) <= 10
        with pytest.raises(StorageUnavailable, match="did not answer within 0 s") as gone:
            storage._s3_call("s3://videos/x", failing(EndpointConnectionError(endpoint_url="http://s3")))
        assert not isinstance(gone.value, storage.StorageThrottled)
        storage.configure(0, 0)
        with pytest.raises(storage.StorageThrottled, match="kept answering 503 SlowDown"):
            storage._s3_call("s3://videos/x", failing(client_error("SlowDown", 503)))
    finally:
        storage.configure(120)


def test_storage_pressure_lasts_while_answers_are_throttled_and_eases_after_a_calm(monkeypatch):
    calm = storage.PRESSURE_CALM_S
    assert not storage.pressure(-float("inf"), -float("inf"), 100.0)
    assert storage.pressure(throttled=99.0, answered=50.0, now=100.0 + 10 * calm)  # nothing got through since
    assert storage.pressure(throttled=99.0, answered=99.5, now=100.0)  # one got through, but too soon
    assert not storage.pressure(throttled=99.0, answered=99.5, now=99.1 + calm)
    # botocore's needs-retry hook feeds it with every answer, the retries inside a call included.
    monkeypatch.setattr(storage, "_answers", storage._Answers())
    http = type("Answer", (), {"status_code": 503})()
    storage._note_answer(response=(http, {"Error": {"Code": "SlowDown"}}))
    assert storage.under_pressure()
    storage._note_answer(response=None)  # refused: an outage is not pressure
    assert storage._answers.answered == -float("inf")


def test_a_storage_error_while_recording_failures_never_aborts_the_run(tmp_path, tiny_run, monkeypatch):
    _, cfg, backend = tiny_run
    real = storage.write_text

    def flaky(uri, text):
        if "/errors" in uri:
            raise OSError("disk says no")
        return real(uri, text)

    def boom(*args, **kwargs):
        raise RuntimeError("model blew up")

    monkeypatch.setattr(storage, "write_text", flaky)
    monkeypatch.setattr(runner, "generate_task", boom)
    tasks = write_jsonl(tmp_path / "t.jsonl", [TEA, {"id": "x", "steps": []}])
    summary = runner.run_in_process(str(tasks), str(tmp_path / "o"), cfg, progress=False, backend=backend)
    assert [e.task_id for e in summary.failed] == ["tea"] and len(summary.rejected) == 1
    record = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert record["failed"] == 1 and record["rejected"] == 1


def test_each_failure_is_its_own_object_and_errors_jsonl_is_assembled_at_the_end(tmp_path, tiny_run, monkeypatch):
    _, cfg, backend = tiny_run
    monkeypatch.setattr(runner, "generate_task", lambda task, *a, **k: (_ for _ in ()).throw(RuntimeError(task.id)))
    tasks = write_jsonl(tmp_path / "t.jsonl", [SMALL_TASKS[1], TEA, {"id": "bad"}])
    summary = runner.run_in_process(str(tasks), str(tmp_path / "o"), cfg, progress=False, backend=backend)
    objects = sorted(p.name for p in (tmp_path / "o" / "errors" / summary.run_id).iterdir())
    assert objects == ["shelf.json", "tea.json"]
    lines = [json.loads(x) for x in (tmp_path / "o" / "errors.jsonl").read_text().splitlines()]
    assert [(e["task_id"], e["field"]) for e in lines] == [("bad", "steps"), ("shelf", None), ("tea", None)]


# --- resume by fingerprint ----------------------------------------------------------------------

@pytest.mark.slow
def test_resume_skips_only_tasks_whose_fingerprint_matches(tmp_path, tiny_run, capsys):
    from cosed.evaluate import read_manifests

    _, cfg, backend = tiny_run
    out = tmp_path / "cosed"
    tasks = write_jsonl(tmp_path / "t.jsonl", [TEA])

    def run(c, **kwargs):
        return runner.run_in_process(str(tasks), str(out), c, progress=False, backend=backend, **kwargs)

    first = run(cfg)
    fingerprint = json.loads((out / "tea" / "manifest.json").read_text())["fingerprint"]
    assert first.done == ["tea"] and len(fingerprint) == 32
    assert run(cfg).skipped == ["tea"]
    assert len(read_manifests(str(tmp_path), "cosed")) == 1
    # A job stopped while removing a finished task's parts leaves some: the next run, finding it done, removes them.
    leftover = out / ".cosed-parts" / "tea" / fingerprint / "sequence.json"
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_text("{}")
    assert run(cfg).skipped == ["tea"] and not leftover.exists()
    reseeded = run(dataclasses.replace(cfg, seed=1))
    assert reseeded.done == ["tea"] and reseeded.stale == ["tea"] and "1 redone" in reseeded.lines()[0]
    assert json.loads((out / "tea" / "manifest.json").read_text())["fingerprint"] != fingerprint
    write_jsonl(tasks, [{**TEA, "steps": ["Boil water.", "Pour it."]}])
    edited = run(dataclasses.replace(cfg, seed=1))
    assert edited.stale == ["tea"]
    # A manifest from an older config left behind is not read by evaluate.
    write_jsonl(tasks, [{**TEA, "steps": ["Boil water.", "Pour it twice."]}])
    summary = json.loads((out / "summary.json").read_text())
    summary["fingerprints"]["tea"] = "0" * 32
    (out / "summary.json").write_text(json.dumps(summary))
    assert read_manifests(str(tmp_path), "cosed") == []


def test_overwrite_keeps_the_old_task_until_its_replacement_is_written(tmp_path, tiny_run, monkeypatch):
    """--overwrite redoes a finished task into place: its manifest is still there while the task is redone
    (the writer replaces it once every part of the new version is stored: tests/test_runplan.py)."""
    _, cfg, backend = tiny_run
    out = tmp_path / "o"
    (out / "tea").mkdir(parents=True)
    (out / "tea" / "manifest.json").write_text('{"fingerprint": "old"}')
    seen = []
    monkeypatch.setattr(runner, "generate_task",
                        lambda *a, **k: seen.append((out / "tea" / "manifest.json").exists()))
    tasks = write_jsonl(tmp_path / "t.jsonl", [TEA])
    runner.run_in_process(str(tasks), str(out), cfg, progress=False, backend=backend, overwrite=True)
    assert seen == [True]


def test_a_garbage_manifest_is_redone_not_skipped(tmp_path, tiny_run, monkeypatch):
    _, cfg, backend = tiny_run
    out = tmp_path / "o"
    (out / "tea").mkdir(parents=True)
    (out / "tea" / "manifest.json").write_bytes(b"\0\0\0")
    monkeypatch.setattr(runner, "generate_task", lambda *a, **k: None)
    tasks = write_jsonl(tmp_path / "t.jsonl", [TEA])
    summary = runner.run_in_process(str(tasks), str(out), cfg, progress=False, backend=backend)
    assert summary.stale == ["tea"] and summary.done == ["tea"]


# --- one writer per output prefix ---------------------------------------------------------------

@pytest.fixture(params=["local", "s3"])
def prefix(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run")
    request.getfixturevalue("s3_mock")
    return "s3://videos/run"


def test_a_second_writer_fails_fast_naming_the_holder(prefix):
    with OutputLease(prefix, 60):
        with pytest.raises(LeaseHeld, match=f"host {socket.gethostname()}, pid {os.getpid()}.*expires"):
            OutputLease(prefix, 60).acquire()
    with OutputLease(prefix, 60):  # released: free again
        pass
    assert not storage.exists(storage.join(prefix, LEASE))


def test_the_lease_is_renewed_while_held(prefix):
    lease = OutputLease(prefix, 30)
    lease.seconds = 0.6  # renew every 0.2 s
    with lease:
        first = json.loads(storage.read_bytes(storage.join(prefix, LEASE)))["expires"]
        time.sleep(1.0)
        later = json.loads(storage.read_bytes(storage.join(prefix, LEASE)))["expires"]
        assert later > first


def test_a_crashed_holder_blocks_only_until_its_lease_expires_or_its_process_is_gone(prefix):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    holder = {"host": socket.gethostname(), "pid": int(dead.stdout), "job": None, "token": "t",
              "expires": time.time() + 600}
    storage.write_text(storage.join(prefix, LEASE), json.dumps(holder))
    with OutputLease(prefix, 60):  # its process is gone: taken over
        pass
    other_host = {**holder, "host": "elsewhere", "expires": time.time() - 1}
    storage.write_text(storage.join(prefix, LEASE), json.dumps(other_host))
    with OutputLease(prefix, 60):  # expired: taken over
        pass
    alive = {**holder, "host": "elsewhere", "expires": time.time() + 600}
    storage.write_text(storage.join(prefix, LEASE), json.dumps(alive))
    with pytest.raises(LeaseHeld, match="host elsewhere"):
        OutputLease(prefix, 60).acquire()
    # A holder on this host that runs blocks; once killed and left unreaped (a zombie, as `ray job stop`
    # leaves its entrypoint until the job supervisor exits) it is gone.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        storage.write_text(storage.join(prefix, LEASE), json.dumps({**holder, "pid": child.pid}))
        with pytest.raises(LeaseHeld, match=f"pid {child.pid}"):
            OutputLease(prefix, 60).acquire()
        child.kill()
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # dead, still unreaped
        with OutputLease(prefix, 60):
            pass
    finally:
        child.kill()
        child.wait()


def test_a_second_cli_job_on_the_same_output_exits_2(tmp_path, capsys):
    tasks = write_jsonl(tmp_path / "t.jsonl", [TEA])
    with OutputLease(str(tmp_path / "o"), 60):
        assert main(["generate", "--tasks", str(tasks), "--out", str(tmp_path / "o"), "--no-ray"]) == 2
    err = capsys.readouterr().err
    assert "another job is writing this output" in err and f"pid {os.getpid()}" in err


def test_the_lease_fences_a_job_that_lost_it_to_another(prefix):
    """Taken over while this job still runs: the fence and the job's own check both refuse to go on."""
    lease = OutputLease(prefix, 60).acquire()
    try:
        lease.fence()  # held: fine
        other = {"host": "elsewhere", "pid": 1, "job": None, "token": "theirs", "expires": time.time() + 600}
        storage.write_text(storage.join(prefix, LEASE), json.dumps(other))
        with pytest.raises(LeaseLost, match="no longer this job's"):
            lease.fence()
    finally:
        lease._stop.set()


def test_a_job_that_cannot_renew_stops_before_another_could_take_over(prefix, monkeypatch):
    lease = OutputLease(prefix, 10).acquire()  # renews every 1.25 s; counts as held for 5 s after a renewal
    try:
        lease.check()
        monkeypatch.setattr("cosed.lease.storage.replace_if", lambda *a, **k: (_ for _ in ()).throw(
            StorageUnavailable("storage endpoint gone")))
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            try:
                lease.check()
            except LeaseLost as exc:
                assert "could not renew" in str(exc)
                break
            time.sleep(0.2)
        else:
            pytest.fail("the job kept writing with a lease it could not renew")
        # It stopped while the lease it last wrote had at least half its length to run: nobody could take it yet.
        expires = json.loads(storage.read_bytes(storage.join(prefix, LEASE)))["expires"]
        assert expires - time.time() >= 10 / 2 - 1.5
    finally:
        lease._stop.set()


def test_a_lease_whose_renewals_are_throttled_is_kept_and_renewed_once_it_eases(tmp_path, monkeypatch):
    from chaos import wait_for

    lease = OutputLease(str(tmp_path / "run"), 10).acquire()  # renews every 1.25 s; held for 5 s after a renewal
    try:
        renew = storage.replace_if
        monkeypatch.setattr("cosed.lease.storage.replace_if", lambda *a, **k: (_ for _ in ()).throw(
            storage.StorageThrottled("storage endpoint kept answering 503 SlowDown")))
        wait_for(lambda: time.monotonic() > lease.held_until + 1, 15, "the lease's held span to pass")
        lease.check()  # the storage answers, slowly: the run goes on (every write it makes is fenced)
        monkeypatch.setattr("cosed.lease.storage.replace_if", renew)
        wait_for(lambda: lease.held_until > time.monotonic(), 15, "a renewal once the throttling eased")
        lease.fence()  # renewed in place (If-Match on its own tag): still this job's
    finally:
        lease._stop.set()


def test_nothing_is_written_past_a_lost_lease(tmp_path, tiny_run, monkeypatch):
    _, cfg, backend = tiny_run
    out = str(tmp_path / "o")
    lease = OutputLease(out, 60).acquire()
    try:
        other = {"host": "elsewhere", "pid": 1, "job": None, "token": "theirs", "expires": time.time() + 600}
        storage.write_text(storage.join(out, LEASE), json.dumps(other))
        tasks = write_jsonl(tmp_path / "t.jsonl", [TEA])
        with pytest.raises(LeaseLost):
            runner.run_in_process(str(tasks), out, cfg, progress=False, backend=backend, lease=lease)
        assert not (tmp_path / "o" / "tea").exists()  # no scene, clip, video or manifest: every write is fenced
    finally:
        lease._stop.set()
