"""Servers on loopback for the remote-shard tests: an HTTP file server whose failures the test
decides (a transfer cut half way, 503 twice, 404, a stall past the read timeout), with Range
requests as object stores answer them, and moto's S3 API server."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from alignvl_scale.runtime.distributed import free_port


class FaultyFiles(ThreadingHTTPServer):
    """Serves `root` at http://127.0.0.1:PORT/. `faults[path]` is a list of faults, one used up
    per request of that path: "cut" (the headers promise the whole body, half of it is sent,
    then the connection closes), "503", "404", "stall" (the headers, then nothing for `stall_s`
    seconds). `requests` records (path, Range header) per request."""

    daemon_threads = True

    def __init__(self, root: Path, stall_s: float = 3.0) -> None:
        self.root, self.stall_s = Path(root), stall_s
        self.faults: dict[str, list[str]] = defaultdict(list)
        self.requests: list[tuple[str, str | None]] = []
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FaultyFiles

    def log_message(self, *_) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        server, path = self.server, self.path.split("?")[0]
        server.requests.append((path, self.headers.get("Range")))
        fault = server.faults[path].pop(0) if server.faults[path] else None
        file = server.root / path.lstrip("/")
        if fault in ("503", "404") or not file.is_file():
            code = 503 if fault == "503" else 404
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = file.read_bytes()
        start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
        body = data[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if fault == "stall":
            time.sleep(server.stall_s)
            return
        try:
            self.wfile.write(body[: len(body) // 2] if fault == "cut" else body)
        except OSError:  # the reader gave up on this connection (a stall it timed out)
            pass
        if fault == "cut":
            self.close_connection = True


@contextmanager
def serving(root: Path, stall_s: float = 3.0):
    server = FaultyFiles(root, stall_s)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing answered on port {port} in {timeout} s")


@contextmanager
def moto_s3():
    """moto's S3 API server on loopback; yields the environment that points boto3 and s3fs at
    it (AWS_ENDPOINT_URL and dummy credentials)."""
    executable = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    port = free_port()
    proc = subprocess.Popen([executable, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(port, 30)
        yield {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
               "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    finally:
        proc.kill()
        proc.wait()
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()  # fsspec keeps filesystems by arguments, not by endpoint


def upload(folder: Path, bucket: str, prefix: str, environ: dict) -> None:
    """Every file of `folder` into s3://bucket/prefix/ (boto3, against the endpoint in `environ`)."""
    import boto3

    client = boto3.client("s3", endpoint_url=environ["AWS_ENDPOINT_URL"], aws_access_key_id="test",
                          aws_secret_access_key="test", region_name="us-east-1")
    try:
        client.create_bucket(Bucket=bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    for file in sorted(folder.iterdir()):
        if file.is_file():
            client.upload_file(str(file), bucket, f"{prefix}/{file.name}")


@contextmanager
def environment(values: dict):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
