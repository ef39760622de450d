"""The HTTP plumbing of the receiver: reading bodies, the handler and the server."""

from __future__ import annotations

import socket
import socketserver
import struct
import sys
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BufferedIOBase
from typing import TYPE_CHECKING, Any

from plexus.testing.rules import HTTPError

if TYPE_CHECKING:
    from plexus.testing.receiver import Receiver

# An oversized body is read and thrown away up to this size so the client
# receives the 413 instead of a reset (a server that closes with unread input
# makes the kernel send RST, which can overtake the response). Beyond it the
# connection is closed.
DRAIN_LIMIT = 64 * 1024 * 1024
_READ_CHUNK = 256 * 1024


def gunzip(data: bytes, limit: int) -> bytes:
    """Decompress gzip (concatenated members too), never past ``limit`` + 1 bytes."""
    out: list[bytes] = []
    total = 0
    while True:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            chunk = inflater.decompress(data, limit - total + 1)
        except zlib.error as exc:
            raise HTTPError(400, "invalid gzip body") from exc
        total += len(chunk)
        if total > limit:
            raise HTTPError(413, f"payload too large (max {limit} bytes, decompressed)")
        out.append(chunk)
        if not inflater.eof:
            raise HTTPError(400, "invalid gzip body (truncated)")
        data = inflater.unused_data
        if not data:
            return b"".join(out)


def read_exact(rfile: BufferedIOBase, n: int) -> bytes:
    data = rfile.read(n)
    if len(data) < n:
        raise ConnectionError("client closed the connection mid-body")
    return data


def drain(rfile: BufferedIOBase, n: int) -> None:
    while n > 0:
        n -= len(read_exact(rfile, min(n, _READ_CHUNK)))


def read_chunked(rfile: BufferedIOBase, limit: int) -> tuple[bytes | None, int]:
    parts: list[bytes] = []
    total = 0
    while True:
        line = rfile.readline(1024)
        if not line:
            raise ConnectionError("client closed the connection mid-body")
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise HTTPError(400, "bad chunked encoding", close=True) from None
        if size == 0:
            while rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                pass  # trailer fields: ignored
            return (b"".join(parts) if total <= limit else None), total
        total += size
        if total > DRAIN_LIMIT:
            raise HTTPError(413, f"payload too large (max {limit} bytes)", close=True)
        if total > limit:
            parts.clear()
            drain(rfile, size)
        else:
            parts.append(read_exact(rfile, size))
        read_exact(rfile, 2)  # the CRLF after each chunk


class Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 so clients keep connections alive as they do with the platform;
    # every answer carries Content-Length for that reason.
    protocol_version = "HTTP/1.1"
    server_version = "plexus-testing"
    # Headers and body go out in one write, but a reset test must not wait
    # on Nagle either.
    disable_nagle_algorithm = True
    server: Server

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass  # the client (or go_down) closed the socket first
        finally:
            self.server.track(self.connection, False)

    def do_POST(self) -> None:
        self.server.receiver._serve(self)

    do_GET = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_POST

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the Receiver logs requests itself when asked to


class Server(ThreadingHTTPServer):
    daemon_threads = True
    # Handler threads of idle keep-alive connections must not block stop().
    block_on_close = False
    allow_reuse_address = True  # come_up() binds the same port again
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], receiver: Receiver) -> None:
        self.receiver = receiver
        # Set when going down: cuts injected delays short.
        self.closing = threading.Event()
        self._conns: set[socket.socket] = set()
        self._resets: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(address, Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a DNS lookup that can
        # stall for seconds on a badly configured host; the name is unused.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def track(self, conn: socket.socket, alive: bool) -> None:
        with self._conns_lock:
            if alive:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    def mark_reset(self, conn: socket.socket) -> None:
        # SO_LINGER with a zero timeout turns close() into a real RST.
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with self._conns_lock:
            self._resets.add(conn)

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            reset = request in self._resets
            self._resets.discard(request)
        if reset:
            # Skip shutdown(SHUT_WR): it would send a polite FIN before the RST.
            request.close()
        else:
            super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes the handler thread's read
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # clients hanging up mid-request are routine here
        super().handle_error(request, client_address)

