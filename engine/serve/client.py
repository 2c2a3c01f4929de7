"""A `sift serve` process and a plain HTTP client for it (standard library only): what the tests
and jobs/bench/serve.py use to start a real server on a free loopback port and talk to it."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url: str, method: str, path: str, body=None, raw: bytes | None = None, timeout: float = 120.0,
            headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """One HTTP request; returns (status, JSON body or {"text": ...} when not JSON). A POST says
    Content-Type: application/json unless `headers` says otherwise."""
    status, _, body = exchange(url, method, path, body, raw, timeout, headers)
    return status, body


def exchange(url: str, method: str, path: str, body=None, raw: bytes | None = None, timeout: float = 120.0,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], dict]:
    """`request`, with the response headers too (names in lower case)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        sent = {"Content-Type": "application/json"} if method == "POST" else {}
        conn.request(method, path, body=data, headers={**sent, **(headers or {})})
        response = conn.getresponse()
        text = response.read().decode()
        got = {k.lower(): v for k, v in response.getheaders()}
        try:
            return response.status, got, json.loads(text)
        except json.JSONDecodeError:
            return response.status, got, {"text": text}
    finally:
        conn.close()


def post(url: str, path: str, body=None, **kwargs) -> tuple[int, dict]:
    return request(url, "POST", path, body, **kwargs)


def get(url: str, path: str, **kwargs) -> tuple[int, dict]:
    return request(url, "GET", path, **kwargs)


class ServerProcess:
    """`sift serve MANIFEST --backend B --port P` under `python` (default: this interpreter), in
    its own process group; started on `start()` (or __enter__), ready on __enter__, interrupted
    (Ctrl-C) on __exit__. Starting apart from waiting lets a caller bring several up at once."""

    def __init__(self, manifest: str | Path, backend: str, python: str | None = None, port: int | None = None,
                 extra: list[str] | None = None, log: str | Path | None = None, ready_s: float = 300.0,
                 env: dict[str, str] | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [python or sys.executable, "-m", "engine.cli", "serve", str(manifest), "--backend", backend,
                    "--port", str(self.port), *(extra or [])]
        self.log_path = Path(log) if log else None
        self.ready_s = ready_s
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self.started = 0.0

    def start(self) -> "ServerProcess":
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               **self.env}
        out = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.started = time.monotonic()
        return self

    def __enter__(self) -> "ServerProcess":
        if self.proc is None:
            self.start()
        while True:  # asked at least once: a server started long ago may be ready by now
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before it was ready: {self.tail()}")
            try:
                status, body = get(self.url, "/health", timeout=5)
                if status == 200 and body.get("status") == "ok":
                    return self
            except OSError:
                pass
            if time.monotonic() > self.started + self.ready_s:
                self.__exit__(None, None, None)
                raise RuntimeError(f"server not ready in {self.ready_s:.0f} s: {self.tail()}")
            time.sleep(1.0)

    def tail(self, lines: int = 20) -> str:
        if self.log_path and self.log_path.is_file():
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def interrupt(self) -> None:
        """Ctrl-C: the CLI shuts Ray Serve and its embedded Ray down (seconds); __exit__ waits for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)

    def __exit__(self, *exc) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.interrupt()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
