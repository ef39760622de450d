"""The sink contract.

A sink delivers batches of points somewhere (the Plexus platform, a file,
stdout). Each sink has its own buffer and uploader thread (see
``plexus.pipeline``), so a slow or failing sink never stalls another one and
never makes it lose data: fan-out copies every point into every sink's buffer.

The life of a sink: the gateway builds it (``cls(options, name=...)``;
raise ``ConfigError`` for options it cannot use), calls :meth:`Sink.codec`
once, then :meth:`Sink.open` once when it starts. When ``open`` raises, the
sink is isolated: the error is logged and shown in its status, ``open`` is
tried again with backoff (1 s doubling to 60 s) while its points wait in its
buffer, and the other sinks keep delivering (``plexus.sink_opener``).
:meth:`Sink.close` is called once at shutdown if ``open`` returned.

``send`` is called from that sink's uploader thread only, one batch at a time.
It returns a :class:`SendResult` when the batch is done with (delivered, or
some points permanently rejected), raises :class:`RetryableSinkError` when the
same batch should be sent again later, and :class:`AuthenticationError` when
credentials are missing or refused. Any other exception is treated as
retryable.

A sink that puts bytes on a wire reports them with :meth:`Sink.record_sent`
(one call per request, message or write, with the body's size as sent):
that is what a sink's ``upload: {max_bytes_per_s}`` budget counts. A sink
that never calls it is charged an estimate instead (the points' JSON size).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from plexus.codec import POINTS, PointCodec
from plexus.point import Point

if TYPE_CHECKING:
    from plexus.buffer import Batch


@dataclass
class SendResult:
    """Outcome of one batch.

    ``delivered`` points were stored by the receiver; ``rejected`` lists
    ``(index in the batch, reason)`` for points the receiver will never accept
    (they are dropped and counted, never retried).
    """

    delivered: int
    rejected: list[tuple[int, str]] = field(default_factory=list)


class Sink:
    """Base class of every sink.

    Subclasses set ``type_name`` (the ``type:`` used in YAML) and ``Options``
    (a dataclass of the sink's options with defaults), and implement
    :meth:`send`.

    Parameters:
        options: an instance of ``Options``.
        name: the sink's name in logs and status (defaults to its type).
    """

    type_name: ClassVar[str] = ""
    Options: ClassVar[type] = object
    #: pip extra that brings the driver library, named in errors.
    extra: ClassVar[str | None] = None
    #: driver modules the sink imports when it opens (checked by ``--check``).
    requires: ClassVar[tuple[str, ...]] = ()
    #: Body bytes this sink reported sending (see :meth:`record_sent`).
    bytes_sent: int = 0
    #: True once the sink has called :meth:`record_sent`: its byte counts are trusted.
    reports_bytes: bool = False

    def __init__(self, options: Any, name: str | None = None) -> None:
        self.options = options
        self.name = name or self.type_name

    def open(self, source_id: str) -> None:
        """Prepare to send points of ``source_id`` (called once, before ``send``).

        Raise (anything) when the sink cannot work yet: the gateway logs it,
        shows it in the status and calls ``open`` again later, with backoff,
        while the other sinks deliver. Release what a failed attempt took.
        """

    def preflight(self) -> list[str]:
        """What would stop this sink, found without opening it (``--check``).

        Check files it will write (see :func:`plexus.cannot_write`) and
        settings only it can judge. One message per problem, without the
        sink's name (the caller adds it and the rig file's line).
        """
        return []

    def preflight_online(self, timeout: float) -> list[str]:
        """``--check --online``: reach the destination without sending points, within
        about ``timeout`` seconds. One message per problem."""
        return []

    def send(self, points: list[Point], key: str) -> SendResult:
        """Deliver ``points``; ``key`` is stable when the same batch is retried."""
        raise NotImplementedError

    def record_sent(self, nbytes: int) -> None:
        """Report ``nbytes`` of body put on the wire (compressed size, if compressed).

        Call it for every request, message or write, including ones that then
        fail: the bytes went out all the same. The uploader charges the sink's
        byte budget with them and waits before the next request when the
        budget is spent; this call itself never blocks.
        """
        self.bytes_sent += nbytes
        self.reports_bytes = True

    def send_batch(self, batch: Batch) -> SendResult:
        """Deliver a batch; the uploader calls this. By default: ``send(points, key)``.

        A sink whose :meth:`codec` stores blocks in its own wire format can
        send ``batch.body`` as it is (see ``HttpSink``).
        """
        return self.send(batch.points, batch.key)

    def codec(self, source_id: str) -> PointCodec:
        """How a persistent buffer should store this sink's points (its records and
        blocks); by default the JSON of the point tuples, decoded back for ``send``."""
        return POINTS

    def close(self) -> None:
        """Release resources (called once, after the last ``send``, if ``open`` returned)."""
