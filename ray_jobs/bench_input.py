"""Input at scale: the job process's peak RSS, its seconds to the end of read + resume scan, and its requests.

    python ray_jobs/bench_input.py [--tasks 10000,100000] [--where local,s3] [--delay-ms 20] [--shards 100]

Builds N tasks from ../shared/data/recipes/dataset.json (the team's data set, not shipped; ids made
distinct) as a prefix of JSONL shards, in a temp folder and on a local S3 server (``moto_server``)
behind a small front that adds ``--delay-ms`` to every request and counts them. Each case runs in a
fresh process what a job does before its first model call: the run plan, then `prepare_run` (read
and validate every shard, fingerprints, the resume scan by listing) into an empty output, then the
same again into an output where all but 5 % of the tasks are done (their manifests and done markers written
directly; on S3 only up to 20,000 tasks, as the local server takes about 100 PUTs a second). "requests":
all the job's S3 requests, and in brackets those to the output (the resume scan: its listings).
"s to first task": until the job's first window of pending tasks is ready (what the first model call
waits for, beside the pools' start); "s to scan end": the whole input pulled through the window, as
the job does over the run, the peak RSS being that of the whole pass. "(imports)": the part spent
importing cosed (torch among it) before any task is read. Prints a table; no asserts.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_RECIPES = REPO.parent / "shared" / "data" / "recipes" / "dataset.json"
TINY_CACHE = REPO / ".cache" / "test-models"
RESUME_ON_S3_UP_TO = 20_000  # moto takes about 100 PUTs a second: 2 objects a task to make beforehand
UNFINISHED = 0.05  # the resume case: all tasks but these finished (20,000 tasks: 19,000 done, 1,000 to redo)

# What the job does before its first model call, in a fresh process: prints one JSON line.
CHILD = """
import json, sys, time
start = time.perf_counter()


def peak_rss_mb():  # VmHWM: this process's own peak (ru_maxrss keeps the parent's across exec on Linux)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


from cosed.config import RunConfig
from cosed.runner import prepare_run
from cosed.runplan import plan_run
tasks, out, cache = sys.argv[1:4]
imports = {"import_s": time.perf_counter() - start, "import_rss_mb": peak_rss_mb()}
plan = plan_run(RunConfig(profile="tiny", cache_dir=cache), out, lambda: None, False, say=lambda line: None)
summary, feed = prepare_run(tasks, out, plan, False)
first = feed.peek(WINDOW)
first_s = time.perf_counter() - start if first else None
todo = 0
while batch := feed.take(WINDOW):  # the job's pulls, a window at a time (each let go once pulled)
    todo += len(batch)
print(json.dumps({"seconds": time.perf_counter() - start, "first_s": first_s, "todo": todo,
                  "skipped": len(summary.skipped), "rejected": len(summary.rejected),
                  "fingerprints": summary.fingerprints if len(sys.argv) > 4 else None,
                  "rss_mb": peak_rss_mb(), **imports}))
""".replace("WINDOW", "200")  # about the window of a job with a few drivers (`cosed.distributed.window.task_window`)


class DelayFront:
    """An HTTP front for the S3 server: ``delay_s`` before each request is forwarded, and a count of them."""

    def __init__(self, target_port: int, delay_s: float, output: str = "/data/out"):
        front = self
        self.requests = 0
        self.output_requests = 0  # those that list or read the output: the resume scan's cost
        self.lock = threading.Lock()
        listing = "prefix=" + output.strip("/").partition("/")[2]

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def forward(self):
                with front.lock:
                    front.requests += 1
                    front.output_requests += self.path.startswith(output + "/") or listing in self.path
                time.sleep(delay_s)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                upstream = http.client.HTTPConnection("127.0.0.1", target_port, timeout=300)
                upstream.request(self.command, self.path, body=body, headers=dict(self.headers))
                response = upstream.getresponse()
                data = response.read()
                self.send_response(response.status)
                for name, value in response.getheaders():
                    if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()


def shard_lines(count: int, shards: int) -> list[str]:
    """``count`` tasks from the shared recipes with distinct ids, as ``shards`` JSONL texts."""
    recipes = json.loads(SHARED_RECIPES.read_text())
    keys = sorted(recipes, key=int)
    texts = [[] for _ in range(shards)]
    for i in range(count):
        recipe = recipes[keys[i % len(keys)]]
        record = {"id": f"r{i:07d}", "title": recipe["title"], "steps": recipe["steps"]}
        texts[i * shards // count].append(json.dumps(record) + "\n")
    return ["".join(lines) for lines in texts]


def run_child(tasks: str, out: str, env: dict, want_fingerprints: bool = False) -> dict:
    argv = [sys.executable, "-c", CHILD, tasks, out, str(TINY_CACHE)] + (["fp"] if want_fingerprints else [])
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"the job process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def finish_all(out: str, fingerprints: dict[str, str], env: dict) -> None:
    """Each task's manifest and done marker, written directly (what a finished run leaves that resume reads),
    but for the last `UNFINISHED` share of the tasks."""
    fingerprints = dict(list(fingerprints.items())[:round(len(fingerprints) * (1 - UNFINISHED))])
    os.environ.update(env)
    from cosed import storage
    from cosed.donemarks import mark_done

    storage._s3_client = None

    def finish(item):
        task_id, fingerprint = item
        storage.write_text(storage.join(out, task_id, "manifest.json"), json.dumps({"fingerprint": fingerprint}))
        mark_done(out, task_id, fingerprint)

    with ThreadPoolExecutor(32 if storage.is_s3(out) else 4) as pool:
        list(pool.map(finish, fingerprints.items()))


def bench(where: str, count: int, shards: int, delay_ms: float, folder: Path) -> list[dict]:
    texts = shard_lines(count, shards)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rows = []
    if where == "local":
        tasks, out = folder / f"in-{count}", folder / f"out-{count}"
        tasks.mkdir()
        for index, text in enumerate(texts):
            (tasks / f"part-{index:05d}.jsonl").write_text(text)
        first = run_child(str(tasks), str(out), env, want_fingerprints=True)
        rows.append({"case": "fresh", "requests": "-", **first})
        finish_all(str(out), first.pop("fingerprints"), env)
        rows.append({"case": "resume", "requests": "-", **run_child(str(tasks), str(out), env)})
        return rows
    sys.path.insert(0, str(REPO / "tests"))
    from chaos import MotoServer

    server = MotoServer()
    front = DelayFront(server.port, delay_ms / 1000)
    try:
        client = server.client()
        client.create_bucket(Bucket="data")
        for index, text in enumerate(texts):
            client.put_object(Bucket="data", Key=f"recipes/part-{index:05d}.jsonl", Body=text.encode())
        env.update(AWS_ENDPOINT_URL=front.url, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                   AWS_DEFAULT_REGION="us-east-1")
        for case in ("fresh", "resume")[:2 if count <= RESUME_ON_S3_UP_TO else 1]:
            before, scan = front.requests, front.output_requests
            row = run_child("s3://data/recipes/", "s3://data/out", env, want_fingerprints=case == "fresh")
            rows.append({"case": case, "requests": f"{front.requests - before} ({front.output_requests - scan})", **row})
            if case == "fresh" and count <= RESUME_ON_S3_UP_TO:  # straight to the server, not through the front
                finish_all("s3://data/out", row.pop("fingerprints"), {**env, "AWS_ENDPOINT_URL": server.url})
    finally:
        front.close()
        server.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="10000,100000", help="comma list of task counts")
    parser.add_argument("--where", default="local,s3", help="local, s3 or both")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="added to every S3 request by the front")
    parser.add_argument("--shards", type=int, default=100)
    args = parser.parse_args()
    if not SHARED_RECIPES.is_file():
        raise SystemExit(f"the shared recipes are not at {SHARED_RECIPES}")
    print(f"{'where':<7}{'tasks':>9} {'case':<8}{'peak RSS MB':>12}{'(imports)':>10}{'s to first task':>16}"
          f"{'s to scan end':>15}"
          f"{'(imports)':>10}{'requests':>14}{'todo':>9}{'skipped':>9}")
    with tempfile.TemporaryDirectory(prefix="bench-input-") as tmp:
        for count in (int(c) for c in args.tasks.split(",")):
            for where in args.where.split(","):
                folder = Path(tmp, f"{where}-{count}")
                folder.mkdir()
                for row in bench(where, count, args.shards, args.delay_ms, folder):
                    first = "-" if row["first_s"] is None else f"{row['first_s']:.1f}"
                    print(f"{where:<7}{count:>9} {row['case']:<8}{row['rss_mb']:>12.0f}{row['import_rss_mb']:>10.0f}"
                          f"{first:>16}{row['seconds']:>15.1f}{row['import_s']:>10.1f}{row['requests']!s:>14}{row['todo']:>9}"
                          f"{row['skipped']:>9}", flush=True)


if __name__ == "__main__":
    main()
