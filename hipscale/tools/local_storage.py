"""Object storage on loopback, for trying, testing and benchmarking remote datasets on one machine.

    with S3Server() as s3:                     # moto's S3-compatible server in a child process
        s3.env                                  # AWS_ENDPOINT_URL and test credentials for the clients
        s3.create_bucket("data")
        s3.pause(); s3.resume()                 # SIGSTOP / SIGCONT: a server that stops answering

    with RangeHTTPServer(folder) as http:       # serves a folder over HTTP from a child, honouring Range
        http.url                                # http://127.0.0.1:PORT
        http.requests                           # Counter of GET requests per path

Both listen on 127.0.0.1 only, on a port of their own, and stop when their ``with`` block ends.
``S3Server`` needs ``moto[server]`` (the ``remote-test`` extra).
"""
from __future__ import annotations

import collections
import http.server
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hipscale.processes import die_with_parent
from hipscale.training.distributed import free_port

S3_TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}


def _wait_for_port(port: int, process: subprocess.Popen | None, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode} before listening on {port}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {seconds:g} s")


def start_server_process(command: list[str], port: int, timeout_s: float, **popen: object) -> subprocess.Popen:
    """Starts a server child in a session of its own (it dies with this process) and waits until it listens."""
    process = subprocess.Popen(command, start_new_session=True, preexec_fn=die_with_parent, **popen)
    try:
        _wait_for_port(port, process, timeout_s)
    except BaseException:
        stop_server_process(process)
        raise
    return process


def stop_server_process(process: subprocess.Popen | None) -> None:
    """SIGKILLs a server child's session, if it still runs."""
    if process is not None and process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


class S3Server:
    """moto's S3 server on ``127.0.0.1:<free port>``, in memory, for the lifetime of the ``with`` block.

    Attributes:
        endpoint: ``http://127.0.0.1:PORT``.
        env: The environment variables that point boto3/s3fs clients at it (endpoint and test credentials).
    """

    def __init__(self, start_timeout_s: float = 60.0) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, **S3_TEST_CREDENTIALS}
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "S3Server":
        self.process = start_server_process([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                             str(self.port)], self.port, self.start_timeout_s,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc: object) -> None:
        stop_server_process(self.process)

    def client(self):
        """A boto3 S3 client of this server."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def create_bucket(self, name: str) -> str:
        """Creates a bucket; returns ``s3://<name>``."""
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def upload_folder(self, folder: Path, url: str) -> str:
        """Uploads every file under ``folder`` to the ``s3://bucket/prefix`` URL; returns ``url``."""
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        client = self.client()
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            client.upload_file(str(path), bucket, f"{prefix.rstrip('/')}/{path.relative_to(folder).as_posix()}"
                               if prefix else path.relative_to(folder).as_posix())
        return url

    def pause(self) -> None:
        """The server stops answering (connections are accepted by the kernel and then hang)."""
        os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """The server answers again."""
        os.killpg(self.process.pid, signal.SIGCONT)


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with ``Range: bytes=a-b`` support (206 answers); logs every GET path to the request log."""

    def send_head(self):  # noqa: ANN201 - the base class's protocol
        if self.command == "GET":
            with open(self.server.request_log, "a") as log:
                log.write(self.path + "\n")
        range_header = self.headers.get("Range")
        path = Path(self.translate_path(self.path))
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", range_header or "")
        if not match or not path.is_file():
            return super().send_head()
        size = path.stat().st_size
        first = int(match[1]) if match[1] else max(0, size - int(match[2] or 0))
        last = min(int(match[2]), size - 1) if match[1] and match[2] else size - 1
        if first >= size or first > last:
            self.send_error(416, "Requested Range Not Satisfiable")
            return None
        file = open(path, "rb")
        file.seek(first)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        self.send_header("Content-Length", str(last - first + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self._remaining = last - first + 1
        return file

    def copyfile(self, source, outputfile) -> None:  # noqa: ANN001 - the base class's protocol
        remaining = getattr(self, "_remaining", None)
        if remaining is None:
            return super().copyfile(source, outputfile)
        while remaining > 0 and (chunk := source.read(min(1 << 20, remaining))):
            outputfile.write(chunk)
            remaining -= len(chunk)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass


class RangeHTTPServer:
    """Serves ``folder`` on ``http://127.0.0.1:<port>`` from a child process, with Range requests.

    A child process, not a thread: processes forked while it runs (DataLoader workers) would otherwise
    inherit its listening socket and keep the port busy after it stops.

    Args:
        folder: What to serve.
        port: The port (0: a free one); a server can come back on the port of one that stopped.

    Attributes:
        url: The folder's URL.
    """

    def __init__(self, folder: Path, port: int = 0, start_timeout_s: float = 30.0) -> None:
        self.folder = Path(folder)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.request_log = Path(tempfile.mkstemp(prefix="hipscale-http-requests-")[1])
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen | None = None

    @property
    def requests(self) -> collections.Counter:
        """GET requests per path (``/shard-000000.tar``) so far."""
        return collections.Counter(self.request_log.read_text().splitlines())

    def __enter__(self) -> "RangeHTTPServer":
        self.process = subprocess.Popen([sys.executable, "-m", "hipscale.tools.local_storage", str(self.folder),
                                         str(self.port), str(self.request_log)], preexec_fn=die_with_parent)
        try:
            _wait_for_port(self.port, self.process, self.start_timeout_s)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


def _serve(folder: str, port: int, request_log: str) -> None:
    handler = lambda *args, **kwargs: _RangeHandler(*args, directory=folder, **kwargs)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.request_log = request_log
    server.serve_forever()


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]), sys.argv[3])
