"""The ``stdout`` sink: print points, for ``--dry-run`` and for looking at a rig."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Literal

import orjson

from plexus.point import Point, json_lines
from plexus.sinks.base import SendResult, Sink


@dataclass
class StdoutSinkOptions:
    """Options of the ``stdout`` sink."""

    format: Literal["text", "json"] = field(
        default="text",
        metadata={"help": "'text': time metric=value {tags}; 'json': one JSON object per line"},
    )


class StdoutSink(Sink):
    """Write every point to standard output."""

    type_name = "stdout"
    Options = StdoutSinkOptions

    def __init__(self, options: StdoutSinkOptions | None = None, name: str | None = None) -> None:
        super().__init__(options or StdoutSinkOptions(), name)
        self.source_id = ""

    def open(self, source_id: str) -> None:
        self.source_id = source_id

    def send(self, points: list[Point], key: str) -> SendResult:
        if self.options.format == "json":
            text = json_lines(self.source_id, points).decode()
        else:
            text = "".join(_text_line(p) for p in points)
        sys.stdout.write(text)
        self.record_sent(len(text.encode()))
        sys.stdout.flush()
        return SendResult(len(points))


def _text_line(point: Point) -> str:
    metric, value, ts, tags = point
    clock = time.strftime("%H:%M:%S", time.localtime(ts / 1000)) + f".{ts % 1000:03d}"
    shown = orjson.dumps(value).decode() if not isinstance(value, str) else value
    tag_text = " " + " ".join(f"{k}={v}" for k, v in tags.items()) if tags else ""
    return f"{clock} {metric}={shown}{tag_text}\n"
