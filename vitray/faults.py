"""Fault injection for the reliability tests and benchmarks: kill a Ray Train worker process, and an S3 proxy on
127.0.0.1 that fails a share of the requests it forwards (timeouts, 500, 503, throttling) or denies access.

Nothing here runs in a normal training job; it exists so that recovery paths are exercised for real.
"""
from __future__ import annotations

import http.client
import http.server
import os
import random
import signal
import socketserver
import threading
import time

TRAIN_WORKER = "ray::RayTrainWorker"  # the process title Ray gives each Train worker


def crash_point(where: str, step: int, rank: int, ready=None) -> None:
    """For the reliability tests: VITRAY_TEST_CRASH=<where>:<step>:<rank>:<flag file>[,<another>...] makes that rank
    die abruptly at the point `where` of the save of `step` ("mid-upload", "before-commit"), once each (the flag
    file records that it happened), as soon as `ready()` holds (e.g. Ray Train has registered the save). Unset in
    every real run."""
    for spec in filter(None, os.environ.get("VITRAY_TEST_CRASH", "").split(",")):
        at, at_step, at_rank, flag = spec.split(":", 3)
        if at == where and int(at_step) == step and int(at_rank) == rank and not os.path.exists(flag):
            if ready is not None:
                wait_for(ready, 120, what=f"the crash point {where} of step {step}")
            open(flag, "w").close()
            os._exit(17)


def hold_point() -> None:
    """For the elastic test: while the file VITRAY_TEST_HOLD names exists, every rank waits before its next step.
    A run on a real cluster is still training when Ray Train grows it back (a step takes seconds); the tiny model
    here could finish all its steps first. Unset in every real run."""
    flag = os.environ.get("VITRAY_TEST_HOLD", "")
    while flag and os.path.exists(flag):
        time.sleep(0.1)


def train_worker_pids() -> list[int]:
    """The Ray Train worker processes of the Ray cluster this process started (`ray.init()` makes its raylet a
    child of the driver, and the workers children of the raylet). Only those: another run on the same machine
    (a second test lane, a colleague's job) has workers of the same title that are not ours to kill."""
    import psutil

    pids = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:  # gone, or not ours to read: not a worker of this run
            continue
        if cmd.startswith(TRAIN_WORKER):
            pids.append(p.pid)
    return sorted(pids)


def kill_train_worker(index: int = -1) -> int:
    """SIGKILL one live Ray Train worker process of this process's Ray cluster (as a preempted node would lose
    it); its pid."""
    pids = train_worker_pids()
    if not pids:
        raise RuntimeError("no Ray Train worker process is running in the Ray cluster this process started")
    pid = pids[index]
    os.kill(pid, signal.SIGKILL)
    return pid


def kill_job(proc) -> None:
    """SIGKILL a job started in its own session (`start_new_session=True`) with every process under it — the
    driver and the local Ray it started, whose workers need not share its process group — and return once all are
    gone: nothing the job ran can still write after this (a trial finishing just then wrote a record too late)."""
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    os.killpg(proc.pid, signal.SIGKILL)
    for child in tree:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    wait_for(lambda: not any(map(_running, tree)), 30, interval=0.1, what="every process of the killed job to end")


def _running(process) -> bool:
    """Still running: a dead process whose new parent has not reaped it yet (a zombie) does not count."""
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_for(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    """Poll until `predicate()` is truthy; its value. Raises TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} did not happen within {timeout:.0f} s")


_ERRORS = {
    503: b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>",
    500: b"<Error><Code>InternalError</Code><Message>We encountered an internal error.</Message></Error>",
    403: b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>",
}
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class FaultyS3Proxy:
    """An HTTP proxy on 127.0.0.1 in front of an S3 endpoint. mode="flaky": each request fails with probability
    `rate` — 503 SlowDown (throttling), 500 InternalError, or a dropped connection (what a timeout looks like to
    the client) — at most `max_failures_per_request` times for the same request, so clients whose retry policy
    allows that many retries always get through. mode="deny": every request gets 403 AccessDenied.

        with FaultyS3Proxy(s3.endpoint.url, rate=0.2) as proxy:   # proxy.url is the endpoint to give clients
    """

    def __init__(self, target_url: str, mode: str = "flaky", rate: float = 0.2, max_failures_per_request: int = 2,
                 seed: int = 0):
        self.target = target_url.split("://", 1)[-1]
        self.mode, self.rate, self.max_failures = mode, rate, max_failures_per_request
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.failures: dict[tuple, int] = {}
        self.requests = self.injected = 0
        self.server: socketserver.ThreadingTCPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def _decide(self, key: tuple) -> int | str | None:
        with self.lock:
            self.requests += 1
            if self.mode == "deny":
                return 403
            if self.failures.get(key, 0) >= self.max_failures or self.random.random() >= self.rate:
                return None
            self.failures[key] = self.failures.get(key, 0) + 1
            self.injected += 1
            return self.random.choice([503, 500, "drop"])

    def __enter__(self) -> "FaultyS3Proxy":
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))

            def _handle(self):
                body = self._body()
                fault = proxy._decide((self.command, self.path, self.headers.get("Range"), len(body)))
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if fault is not None:
                    payload = _ERRORS[fault]
                    self.send_response(fault)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(proxy.target, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    response = conn.getresponse()
                    data = response.read()
                    self.send_response(response.status)
                    for k, v in response.getheaders():
                        if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length":
                            self.send_header(k, v)
                    length = response.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                    self.send_header("Content-Length", length or "0")
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True, name="faulty-s3-proxy").start()
        return self

    def __exit__(self, *exc) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
