"""The ``file`` sink: JSON Lines, one point per line, rotated by size.

Each line is ``{"source_id", "metric", "value", "timestamp", "tags"}`` with
the timestamp in milliseconds, as sent to the platform. When the file would
grow past ``max_bytes`` it is renamed ``<path>.1`` (older ones shift to
``.2`` ... ``.<backups>``, the oldest is deleted) and a new file starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Annotated

from annotated_types import Ge

from plexus.point import Point, json_lines
from plexus.sinks.base import SendResult, Sink
from plexus.writable import cannot_write


@dataclass
class FileSinkOptions:
    """Options of the ``file`` sink."""

    path: str = field(metadata={"help": "the JSON Lines file (relative to the rig file)",
                                "path": True})
    max_bytes: Annotated[int, Ge(1)] = field(default=10_000_000,
                           metadata={"help": "rotate when the file would exceed this size"})
    backups: Annotated[int, Ge(0)] = field(default=5, metadata={"help": "rotated files kept (path.1 .. path.N)"})
    fsync: bool = field(default=False,
                        metadata={"help": "fsync after every batch (slower; survives power loss)"})


class FileSink(Sink):
    """Append points to a JSON Lines file, rotating it by size."""

    type_name = "file"
    Options = FileSinkOptions

    def __init__(self, options: FileSinkOptions, name: str | None = None) -> None:
        super().__init__(options, name)
        self.path = Path(options.path).expanduser()
        self._file: IO[bytes] | None = None
        self._size = 0
        self.source_id = ""

    def preflight(self) -> list[str]:
        reason = cannot_write(self.path)
        return [reason] if reason else []

    def open(self, source_id: str) -> None:
        self.source_id = source_id
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._open_file()

    def _open_file(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._file = os.fdopen(fd, "ab")
        self._size = self._file.tell()

    def send(self, points: list[Point], key: str) -> SendResult:
        lines = json_lines(self.source_id, points)
        opts: FileSinkOptions = self.options
        if self._size and self._size + len(lines) > opts.max_bytes:
            self._rotate()
        assert self._file is not None
        self._file.write(lines)
        self.record_sent(len(lines))
        self._file.flush()
        if opts.fsync:
            os.fsync(self._file.fileno())
        self._size += len(lines)
        return SendResult(len(points))

    def _rotate(self) -> None:
        assert self._file is not None
        self._file.close()
        backups: int = self.options.backups
        if backups <= 0:
            self.path.unlink(missing_ok=True)
        else:
            for n in range(backups - 1, 0, -1):
                older = Path(f"{self.path}.{n}")
                if older.exists():
                    os.replace(older, f"{self.path}.{n + 1}")
            os.replace(self.path, f"{self.path}.1")
        self._open_file()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
