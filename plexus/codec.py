"""How points are stored by the persistent buffer: records and blocks.

The persistent buffer stores what will be sent, so a point is encoded once.
Each sink lane has a codec, chosen by its sink (:meth:`Sink.codec`):

- a **record** is one point's bytes, written to the inbox file by ``put``;
- a **block** is many records joined into what the sink sends, compressed
  (gzip) as it is stored. A block of the ``plexus`` sink *is* a gzipped
  ``POST /ingest`` body: it goes on the wire as it was stored.

:class:`PointCodec` (records are the JSON of the point tuple) serves every
other sink; its blocks are decoded back to points. :class:`IngestCodec` writes
the platform's point objects. Every codec can decode its blocks back to point
tuples: the HTTP sink needs that to isolate a point the platform refuses.
"""

from __future__ import annotations

import zlib
from typing import Any

import orjson

from plexus.point import Point

#: orjson (3.13) hands back its output in a bytes object with about 4 KB of
#: capacity, whatever its length. Records wait in memory between the inbox and
#: SQLite (tens of thousands at a time), so a record is always a right-sized copy
#: (``b"%b" % ...``, ~500 instructions; the dict-free alternatives cost more):
#: kept as orjson made them, 50,000 records of 65 bytes took 200 MB.
_dumps = orjson.dumps

#: gzip level of stored blocks: level 1 already gives ~7 bytes a point on a
#: typical numeric stream (blocks of 1,000+ points) at a third of level 6's CPU.
BLOCK_GZIP_LEVEL = 1


def gzip_bytes(raw: bytes, level: int = BLOCK_GZIP_LEVEL) -> bytes:
    """One gzip member (header mtime 0), straight from zlib: the gzip module
    costs milliseconds to import and does the same."""
    packer = zlib.compressobj(level, zlib.DEFLATED, 31)
    return packer.compress(raw) + packer.flush()


def compress(raw: bytes) -> bytes:
    return gzip_bytes(raw)


def decompress(data: bytes) -> bytes:
    """Inflate a stored block; ValueError when it is damaged (gzip has a CRC)."""
    try:
        inflater = zlib.decompressobj(31)
        raw = inflater.decompress(data)
        if not inflater.eof or inflater.unused_data:
            raise ValueError("truncated or trailing data")
        return raw
    except zlib.error as exc:
        raise ValueError(f"damaged block: {exc}") from None


class PointCodec:
    """Records are the JSON of the point tuple; blocks are JSON arrays of them."""

    #: Names the layout of a stored block, so a block is only ever read the way it
    #: was written (stored with every block).
    tag = "points"

    def record(self, point: Point) -> bytes:
        return b"%b" % _dumps(point)  # a right-sized copy (see _dumps)

    def block(self, records: list[bytes]) -> bytes:
        return b"[" + b",".join(records) + b"]"

    def body(self, raw: bytes) -> bytes:
        """The records part of a raw block (for joining several blocks into one)."""
        return raw[1:-1]

    def points(self, raw: bytes) -> list[Point]:
        """Point tuples from a raw block; ValueError when it is not one of ours."""
        rows = _loads(raw)
        if type(rows) is not list:
            raise ValueError("a block must be a JSON array")
        return [_as_point(row) for row in rows]


class IngestCodec(PointCodec):
    """Records are the platform's point objects; a block is a whole ``/ingest`` body."""

    def __init__(self, source_id: str) -> None:
        self.source_id = source_id
        self.tag = f"ingest:{source_id}"
        self._prefix = b'{"source_id":' + orjson.dumps(source_id) + b',"points":['

    def record(self, point: Point) -> bytes:
        metric, value, ts, tags = point
        if tags:
            return b"%b" % _dumps({"metric": metric, "value": value, "timestamp": ts,
                                   "tags": tags})
        return b"%b" % _dumps({"metric": metric, "value": value, "timestamp": ts})

    def block(self, records: list[bytes]) -> bytes:
        return self._prefix + b",".join(records) + b"]}"

    def body(self, raw: bytes) -> bytes:
        return raw[len(self._prefix):-2]

    def points(self, raw: bytes) -> list[Point]:
        doc = _loads(raw)
        rows = doc.get("points") if type(doc) is dict else None
        if type(rows) is not list:
            raise ValueError("a block must be an ingest body with a points array")
        out: list[Point] = []
        for row in rows:
            if type(row) is not dict:
                raise ValueError(f"not a point object: {str(row)[:60]}")
            out.append(_as_point([row.get("metric"), row.get("value"), row.get("timestamp"),
                                  row.get("tags")]))
        return out


POINTS = PointCodec()

# Codecs of plugin sinks, by tag: a persistent buffer that recovers records after a
# crash must read them before its lane (and so its sink's codec) is set up again.
_KNOWN: dict[str, PointCodec] = {}


def register_codec(codec: PointCodec) -> None:
    """Make blocks tagged ``codec.tag`` readable by every buffer of this process.

    The gateway registers each sink's codec before it opens the sink's buffer.
    """
    if codec.tag != POINTS.tag and not codec.tag.startswith("ingest:"):
        _KNOWN[codec.tag] = codec


def codec_for_tag(tag: str) -> PointCodec:
    """The codec that wrote blocks tagged ``tag`` (blocks outlive the process)."""
    if tag == POINTS.tag:
        return POINTS
    if tag in _KNOWN:
        return _KNOWN[tag]
    if tag.startswith("ingest:"):
        return IngestCodec(tag[len("ingest:"):])
    raise ValueError(f"unknown block layout {tag!r}")


def _loads(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None


def _as_point(row: Any) -> Point:
    if type(row) is not list or len(row) != 4 or type(row[0]) is not str \
            or type(row[2]) is not int or not (row[3] is None or type(row[3]) is dict):
        raise ValueError(f"not a stored point: {str(row)[:60]}")
    return (row[0], row[1], row[2], row[3])
