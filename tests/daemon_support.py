"""Starting the real daemon (`protoedge serve`) as a separate process for the daemon tests."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from protoedge.client import Client

REPO = Path(__file__).resolve().parent.parent
BUNDLE = REPO / "models" / "omniglot" / "bundle"
# One inference thread each: the machine's cores are shared with the rest of the suite.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def images(n: int, seed: int = 0) -> np.ndarray:
    """Stroke-like test images: a few bright random lines on black (ink high, like Omniglot)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, 1, 28, 28), np.uint8)
    for i in range(n):
        for _ in range(3):
            r, c = rng.integers(4, 24, 2)
            if rng.random() < 0.5:
                out[i, 0, r, max(c - 6, 0):c + 6] = 255
            else:
                out[i, 0, max(r - 6, 0):r + 6, c] = 255
    return out


class Server:
    """A `protoedge serve` subprocess; use as a context manager so it never outlives a test."""

    def __init__(self, tmp: Path, *args: str, tcp: bool = True, unix: bool = True, state: bool = True,
                 env: dict | None = None, bundle: Path = BUNDLE, socket_path: str | None = None):
        self.tmp = Path(tmp)
        self.port = free_port() if tcp else None
        self.socket_path = (socket_path or str(self.tmp / "pe.sock")) if unix else None
        self.state_dir = self.tmp / "state" if state else None
        self.log_path = self.tmp / "server.log"
        cmd = [sys.executable, "-m", "protoedge.cli", "serve", str(bundle), "--threads", "1"]
        if tcp:
            cmd += ["--port", str(self.port)]
        if unix:
            cmd += ["--socket", self.socket_path]
        if state:
            cmd += ["--state", str(self.state_dir)]
        self.cmd = cmd + list(args)
        self.env = env or ENV
        self.proc: subprocess.Popen | None = None

    @property
    def tcp_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def url(self) -> str:
        return self.tcp_url if self.port else self.unix_url

    def client(self, url: str | None = None, **kw) -> Client:
        return Client(url or self.url, **kw)

    def start(self, wait: bool = True, timeout: float = 60.0) -> "Server":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=self.tmp)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with self.client(timeout=5) as c:
            while not c.ready():
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"server not ready after {timeout} s:\n{self.output()}")
                time.sleep(0.02)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        with contextlib.suppress(Exception):
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
