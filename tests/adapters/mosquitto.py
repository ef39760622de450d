"""A real mosquitto broker for tests, on a free 127.0.0.1 port.

The broker runs from a config written to a temp directory, so tests never
touch a system-wide broker. It can be stopped and started again on the same
port (to test reconnects), protected with a password file, and given an
extra TLS listener whose CA is generated with ``openssl`` on the fly.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support import require_binary


def free_port() -> int:
    """A port nothing listens on right now (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass
class TlsFiles:
    """PEM files of a throw-away CA and a server certificate it signed."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def make_tls_files(directory: Path, common_name: str = "localhost",
                   alt_names: str = "DNS:localhost,IP:127.0.0.1") -> TlsFiles:
    """Generate a CA and a server certificate for ``alt_names`` with openssl."""
    openssl = require_binary("openssl")
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = directory / "ca.key", directory / "ca.crt"
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.crt"
    ext = directory / "server.ext"
    ext.write_text(f"subjectAltName={alt_names}\n" if alt_names else "basicConstraints=CA:FALSE\n")
    # EC keys: generated in milliseconds, where RSA takes noticeable time.
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run = lambda *args: subprocess.run([openssl, *args], check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca_cert),
        "-days", "2", "-subj", "/CN=plexus-test-ca")
    run("req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={common_name}")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
        "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return TlsFiles(ca_cert=ca_cert, server_cert=cert, server_key=key)


class MosquittoBroker:
    """A mosquitto process owned by a test.

    Parameters:
        directory: where the config, password file and log go.
        users: ``{username: password}``; when given, anonymous clients are refused.
        tls: server certificate files for an extra TLS listener (see
            :func:`make_tls_files`); its port is :attr:`tls_port`.
        extra_config: more mosquitto.conf lines (limits, log types).

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, directory: Path, users: dict[str, str] | None = None,
                 tls: TlsFiles | None = None, extra_config: tuple[str, ...] = ()) -> None:
        self.binary = require_binary("mosquitto")
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.users = users
        self.tls = tls
        self.extra_config = extra_config
        self.port = free_port()
        self.tls_port = free_port() if tls is not None else None
        self.log_path = directory / "mosquitto.log"
        self.config_path = directory / "mosquitto.conf"
        self.process: subprocess.Popen[bytes] | None = None
        self._write_config()

    def _write_config(self) -> None:
        lines = [
            f"listener {self.port} 127.0.0.1",
            "persistence false",  # a restart loses every session, like a real crash
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
        ]
        lines += self.extra_config
        if os.geteuid() == 0:
            # As root mosquitto drops to user "mosquitto", which cannot read our temp files.
            lines.append("user root")
        if self.users:
            passwd = require_binary("mosquitto_passwd")
            password_file = self.directory / "passwords"
            password_file.unlink(missing_ok=True)
            for i, (user, password) in enumerate(self.users.items()):
                args = [passwd, "-b", *(["-c"] if i == 0 else []), str(password_file), user, password]
                subprocess.run(args, check=True, capture_output=True)
            lines += ["allow_anonymous false", f"password_file {password_file}"]
        else:
            lines.append("allow_anonymous true")
        if self.tls is not None:
            lines += [
                f"listener {self.tls_port} 127.0.0.1",
                f"cafile {self.tls.ca_cert}",
                f"certfile {self.tls.server_cert}",
                f"keyfile {self.tls.server_key}",
            ]
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 10.0) -> None:
        """Start the broker on its port and wait until it accepts connections."""
        assert self.process is None, "broker already running"
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        try:
            self.process = subprocess.Popen(
                [self.binary, "-c", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        ports = [self.port] + ([self.tls_port] if self.tls_port else [])
        while not all(_port_open(p) for p in ports):
            if self.process.poll() is not None:
                self.process = None
                raise RuntimeError(f"mosquitto exited at start:\n{self.log_text()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mosquitto did not listen within {timeout}s:\n{self.log_text()}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the broker process (its clients see the connection drop)."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self.process = None

    def restart(self) -> None:
        """Stop the broker and start it again on the same port."""
        self.stop()
        self.start()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> MosquittoBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
