"""Real peers for the service tests: a notify socket, a running plexus-gateway, Prometheus."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.adapters.mosquitto import free_port
from tests.support import require_binary, wait_until

REPO = Path(__file__).resolve().parents[2]
FUNCS = "tests.gateway_funcs"

__all__ = ["FUNCS", "GatewayProcess", "NotifySocket", "PrometheusServer", "REPO", "free_port",
           "wait_until"]


class NotifySocket:
    """A Unix datagram socket that plays systemd's end of the notify protocol.

    ``path`` is a short file name under /tmp (a socket path is limited to 108
    bytes), or an abstract name (``@...``) with ``abstract=True``.
    """

    def __init__(self, abstract: bool = False) -> None:
        self._dir = tempfile.mkdtemp(prefix="pxn", dir="/tmp")
        if abstract:
            self.address = f"@plexus-test-{os.getpid()}-{id(self):x}"
            bind_to = "\0" + self.address[1:]
        else:
            self.address = bind_to = os.path.join(self._dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(bind_to)
        self.sock.settimeout(0.2)
        #: (monotonic time, {key: value}) of every message, in order
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._lock:
                self.messages.append((time.monotonic(), fields))

    def with_key(self, key: str, value: str | None = None) -> list[tuple[float, dict[str, str]]]:
        with self._lock:
            return [(t, m) for t, m in self.messages
                    if key in m and (value is None or m[key] == value)]

    def wait_for(self, key: str, value: str | None = None, count: int = 1,
                 timeout: float = 15.0) -> list[tuple[float, dict[str, str]]]:
        found = wait_until(lambda: len(self.with_key(key, value)) >= count, timeout)
        assert found, f"no {count} x {key}={value} from the gateway; got {self.messages}"
        return self.with_key(key, value)

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(2)
        if not self.address.startswith("@"):
            Path(self.address).unlink(missing_ok=True)
        os.rmdir(self._dir)


class GatewayProcess:
    """``plexus-gateway --config RIG`` in a child process, its log in a file."""

    def __init__(self, rig: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.rig = rig
        self.log_path = rig.with_suffix(".log")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in wait())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "plexus.cli", "--config", str(rig), "--no-status", *args],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 20.0, count: int = 1) -> str:
        found = wait_until(lambda: self.log.count(text) >= count or self.proc.poll() is not None,
                           timeout)
        assert found and self.log.count(text) >= count, \
            f"{text!r} not in the gateway's log:\n{self.log}"
        return self.log

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = 30.0) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(5)
        self._log.close()
        return code


class PrometheusServer:
    """Debian's ``prometheus`` on a free 127.0.0.1 port, scraping ``targets`` every second.

    Its data lives in ``directory``; nothing touches the system service.
    """

    def __init__(self, directory: Path, targets: list[str]) -> None:
        self.binary = require_binary("prometheus")
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = directory / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            "scrape_configs:\n  - job_name: plexus\n    static_configs:\n"
            f"      - targets: [{', '.join(targets)}]\n")
        self.log_path = directory / "prometheus.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={config}", f"--storage.tsdb.path={directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self._log, stderr=subprocess.STDOUT)
        ready = wait_until(self._ready, 30.0, 0.1)
        if not ready:
            self.stop()
            raise RuntimeError(f"prometheus did not start:\n{self.log}")

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited at start:\n{self.log}")
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        answer = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=5).json()
        assert answer["status"] == "success", answer
        return list(answer["data"]["result"])

    def targets(self) -> list[dict[str, Any]]:
        answer = httpx.get(f"{self.url}/api/v1/targets", timeout=5).json()
        return list(answer["data"]["activeTargets"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
