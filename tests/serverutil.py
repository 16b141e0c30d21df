"""Start and stop a real `vidya serve` process on a free loopback port, for the server tests."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, *args: str, env: dict | None = None, wait: bool = True, timeout: float = 180) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = f"/tmp/vidya-test-server-{self.port}.log"
        self._log = open(self.log_path, "w+b")
        cmd = [sys.executable, "-m", "vidya.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--disable-uvicorn-access-log", *args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
        self.health_seen: list[int] = []
        if wait:
            self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                code = httpx.get(self.url + "/health", timeout=5).status_code
                self.health_seen.append(code)
                if code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def metric(self, name: str, **labels: str) -> float:
        """The value of `vidya:<name>` whose labels include `labels`."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        for m in re.finditer(rf"^vidya:{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$", text, re.M):
            have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
            if all(have.get(k) == v for k, v in labels.items()):
                return float(m.group(2))
        raise AssertionError(f"metric {name} {labels} not exported")

    def rss_mib(self) -> float:
        """The server process's resident memory, MiB (Linux)."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS in /proc/PID/status")

    def terminate(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
