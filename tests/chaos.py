"""Helpers for the chaos tests: a local S3 server, a TCP proxy that can cut it off or answer every request
with 503 SlowDown, waiting."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import boto3

BIN = Path(sys.executable).parent
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(check, timeout: float, what: str, pause: float = 0.3):
    deadline = time.time() + timeout
    while time.time() < deadline:
        result = check()
        if result:
            return result
        time.sleep(pause)
    raise TimeoutError(f"timed out waiting for {what}")


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


class MotoServer:
    """``moto_server`` on 127.0.0.1 in its own process group (stopped by its id only)."""

    def __init__(self):
        self.port = free_port()
        self.process = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for(lambda: port_open(self.port), 30, "the S3 server")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self):
        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(10)


@contextmanager
def ray_head(env: dict, num_cpus: int):
    """`ray start --head --block` in its own process group and temp dir: the test stops only what it started,
    and no later `ray.init()` on this machine finds it. Yields the job API's address once it answers."""
    import shutil

    # Every port of its own, all distinct: other clusters may run on this machine at the same time.
    names = ("port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "metrics-export-port", "runtime-env-agent-port", "node-manager-port", "object-manager-port",
             "ray-client-server-port")
    chosen: set[int] = set()
    while len(chosen) < len(names):
        chosen.add(free_port())
    ports = dict(zip(names, sorted(chosen)))
    dashboard = ports["dashboard-port"]
    temp = f"/tmp/cosed-head-{ports['port']}"
    log = open(f"{temp}.log", "w")
    process = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block",
                                *(f"--{name}={number}" for name, number in ports.items()),
                                f"--temp-dir={temp}", f"--num-cpus={num_cpus}", "--num-gpus=0",
                                "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--disable-usage-stats"],
                               env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        try:
            wait_for(lambda: port_open(dashboard) or process.poll() is not None, 120, "the Ray dashboard")
            if process.poll() is not None:
                raise RuntimeError("`ray start --head` exited")
        except (TimeoutError, RuntimeError) as exc:
            raise RuntimeError(f"{exc}; its output ends: {open(f'{temp}.log').read()[-3000:]}") from None
        wait_for(lambda: subprocess.run([str(BIN / "ray"), "job", "list", f"--address={address}"], env=env,
                                        capture_output=True).returncode == 0, 120, "the Ray job API")
        yield address
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            pass
        try:  # what is left of the group (gcs_server, raylet); workers exit with their raylet
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(10)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
        os.remove(f"{temp}.log")


SLOW_DOWN = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>"
             b"<Message>Please reduce your request rate.</Message><RequestId>chaos</RequestId></Error>")


class Proxy:
    """Forwards 127.0.0.1:port to the S3 server; `cut()` refuses and drops every connection until `restore()`;
    `throttle()` answers every request ``503 SlowDown`` (as S3 does: no body to a HEAD) until `ease()`."""

    def __init__(self, target_port: int):
        self.target = target_port
        self.port = free_port()
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        self.listener: socket.socket | None = None
        self.throttling = False
        self.slowed = 0  # requests answered SlowDown
        self.restore()

    def throttle(self) -> None:
        """From now on every request is answered SlowDown: connections already open are dropped (a client
        reconnects, and meets the storm)."""
        self.throttling = True
        self._drop_connections()

    def ease(self) -> None:
        self.throttling = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        self.listener.close()
        self._drop_connections()

    def _drop_connections(self) -> None:
        with self.lock:
            for sock in self.sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            self.sockets.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            if self.throttling:
                threading.Thread(target=self._slow_down, args=(client,), daemon=True).start()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self.lock:
                self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()
            if self.throttling:  # throttled while this one connected: it must not pass requests through
                for sock in (client, upstream):
                    sock.shutdown(socket.SHUT_RDWR)

    def _slow_down(self, client: socket.socket) -> None:
        """Read one whole request (the body too, so closing does not reset the connection) and answer 503."""
        try:
            client.settimeout(30)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = client.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, body = data.split(b"\r\n\r\n", 1)
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            if headers.get("expect", "").lower() != "100-continue":
                length = int(headers.get("content-length", 0))
                while len(body) < length:
                    chunk = client.recv(65536)
                    if not chunk:
                        return
                    body += chunk
            payload = b"" if lines[0].startswith("HEAD ") else SLOW_DOWN
            client.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                           b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(payload) + payload)
            self.slowed += 1
        except OSError:
            pass
        finally:
            client.close()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@contextmanager
def s3_with_tasks(tasks: list[dict]):
    """(server, client): a moto server with a ``tasks`` bucket holding ``t.jsonl`` and an empty ``videos`` bucket."""
    server = MotoServer()
    client = server.client()
    for bucket in ("tasks", "videos"):
        client.create_bucket(Bucket=bucket)
    client.put_object(Bucket="tasks", Key="t.jsonl", Body="".join(json.dumps(t) + "\n" for t in tasks).encode())
    try:
        yield server, client
    finally:
        server.stop()


def keys(client, bucket: str, prefix: str = "") -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def manifests(client, bucket: str, prefix: str) -> set[str]:
    return {k.split("/")[-2] for k in keys(client, bucket, prefix + "/") if k.endswith("/manifest.json")}
