"""Real servers for the sink tests, each on free 127.0.0.1 ports in a temp directory.

- :class:`InfluxServer`: Debian's ``influxdb`` package (``influxd``, 1.x).
- :class:`NatsServer`: Debian's ``nats-server`` with JetStream on.

Each is started by the test and stopped afterwards; nothing touches a system
service or its default port.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from tests.adapters.mosquitto import free_port
from tests.support import require_binary


class _Process:
    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log_path = directory / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def _spawn(self, args: list[str]) -> None:
        assert self.process is None, "already running"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)

    def _wait_ready(self, ready: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            assert self.process is not None
            if self.process.poll() is not None:
                self.process = None
                raise RuntimeError(f"server exited at start:\n{self.log_text()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server not ready within {timeout}s:\n{self.log_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self.process = None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class InfluxServer(_Process):
    """An ``influxd`` (InfluxDB 1.x) with its data in ``directory``.

    Parameters:
        auth: turn on ``auth-enabled``; then create the first (admin) user
            with :meth:`create_admin` before anything else.
    """

    def __init__(self, directory: Path, auth: bool = False) -> None:
        super().__init__(directory, "influxd")
        self.binary = require_binary("influxd")
        self.port = free_port()
        self.config_path = directory / "influxdb.conf"
        self.admin: tuple[str, str] | None = None
        d = directory
        # Every listener is given a free port or turned off: influxd's defaults
        # (8086, 8088) may belong to a system service.
        self.config_path.write_text(f"""\
reporting-disabled = true
bind-address = "127.0.0.1:{free_port()}"
[meta]
  dir = "{d}/meta"
[data]
  dir = "{d}/data"
  wal-dir = "{d}/wal"
  query-log-enabled = false
[monitor]
  store-enabled = false
[http]
  bind-address = "127.0.0.1:{self.port}"
  auth-enabled = {"true" if auth else "false"}
  log-enabled = false
  pprof-enabled = false
[continuous_queries]
  enabled = false
[logging]
  level = "warn"
""")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> InfluxServer:
        self._spawn([self.binary, "-config", str(self.config_path)])
        self._wait_ready(self._pings, timeout)
        return self

    def _pings(self) -> bool:
        try:
            return httpx.get(f"{self.url}/ping", timeout=0.5).status_code == 204
        except httpx.HTTPError:
            return False

    def create_admin(self, user: str, password: str) -> None:
        self.query(f"CREATE USER {user} WITH PASSWORD '{password}' WITH ALL PRIVILEGES",
                   login=False)
        self.admin = (user, password)

    def query(self, q: str, db: str | None = None, login: bool = True) -> list[dict[str, Any]]:
        """Run InfluxQL; returns the ``results`` list (raises on an error)."""
        params = {"q": q, **({"db": db} if db else {})}
        auth = self.admin if login and self.admin else None
        response = httpx.post(f"{self.url}/query", data=params, auth=auth, timeout=10)
        body = response.json()
        errors = [r["error"] for r in body.get("results", []) if "error" in r]
        if response.status_code != 200 or "error" in body or errors:
            raise RuntimeError(f"{q}: {response.status_code} {body}")
        return list(body["results"])

    def rows(self, q: str, db: str) -> list[dict[str, Any]]:
        """The rows of a SELECT as dicts (column -> value), every series together."""
        out = []
        for result in self.query(q, db):
            for series in result.get("series", []):
                for values in series["values"]:
                    row = dict(zip(series["columns"], values, strict=True))
                    row["_measurement"] = series["name"]
                    row.update(series.get("tags", {}))
                    out.append(row)
        return out

    def __enter__(self) -> InfluxServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class NatsServer(_Process):
    """A ``nats-server`` with JetStream, its store in ``directory``.

    Parameters:
        users: ``{user: password}``; when given, other clients are refused.
        permissions: ``{user: {publish: ..., subscribe: ...}}`` as nats-server reads them.
    """

    def __init__(self, directory: Path, users: dict[str, str] | None = None,
                 permissions: dict[str, dict[str, Any]] | None = None) -> None:
        super().__init__(directory, "nats-server")
        self.binary = require_binary("nats-server")
        self.port = free_port()
        self.config_path = directory / "nats.conf"
        lines = [
            "host: 127.0.0.1",
            f"port: {self.port}",
            f'jetstream {{ store_dir: "{directory}/js", max_memory_store: 64MB, '
            "max_file_store: 256MB }",
        ]
        if users:
            entries = ", ".join(
                f"{{user: {json.dumps(u)}, password: {json.dumps(p)}"
                + (f", permissions: {json.dumps(permissions[u])}" if permissions and u in permissions
                   else "") + "}"
                for u, p in users.items())
            lines.append(f"authorization {{ users: [{entries}] }}")
        self.config_path.write_text("\n".join(lines) + "\n")

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> NatsServer:
        seen = len(self.log_text())  # a restart appends to the same log
        self._spawn([self.binary, "-c", str(self.config_path)])
        self._wait_ready(lambda: "Server is ready" in self.log_text()[seen:], timeout)
        return self

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
