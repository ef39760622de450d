"""A local, Plexus-compatible ingest receiver for tests and for trying a rig.

:class:`Receiver` is a real HTTP server on 127.0.0.1 that speaks the
platform's ``POST /ingest`` protocol exactly as docs/protocol.md writes it down:
the same auth rules (401/403), the same body limits (5 MiB compressed and
decompressed, 413), gzip, the same per-point validation with errors that name
``points[i]``, and the same 200 body. It keeps what it accepted so a test can
assert what a user of the platform would see, and it can misbehave on purpose
(errors, slow answers, connection resets, going offline) to test retries.

In a test (the pytest plugin ``plexus.pytest_plugin`` provides the fixtures
``plexus_receiver`` and ``plexus_receiver_factory``)::

    from plexus import Plexus

    def test_delivers(plexus_receiver):
        with Plexus(api_key="plx_test", source_id="rig-01",
                    gateway_url=plexus_receiver.url) as px:
            px.send("motor.rpm", 3450)
        assert plexus_receiver.wait_for(1)
        assert plexus_receiver.metrics() == {"motor.rpm": [3450]}

Without pytest (a plugin's own test suite, a script)::

    from plexus.testing import Receiver

    with Receiver(api_keys=["plx_test"]) as rx:   # started, on a free port
        ...                                       # point the client at rx.url
        rx.wait_for(100, timeout=5.0)
        rx.points        # accepted points, source_id filled in, timestamp in ms
        rx.requests      # one RequestRecord per HTTP request
        rx.duplicates    # requests answered from the Idempotency-Key memory

Retry behaviour::

    rx.fail_next(2, status=503)          # two 503s, nothing stored
    rx.reject_keys_next(1)               # one 401 even with a good key
    rx.delay_next(1, 3.0)                # answer after 3 s (a client timeout);
                                         # the request is still processed
    rx.reset_next(1)                     # TCP RST before processing
    rx.reset_next(1, after_store=True)   # store, then RST: unknown outcome
    rx.go_down(); ...; rx.come_up()      # connection refused, same port after
    Receiver(rate_limit_interval=0.0005) # the gateway's per-source ceiling

Faults apply to ``POST /ingest`` requests only, each kind in the order the
calls were made. Within one request they act in this order: delay, reset
(before processing), fail, key rejection, normal processing, reset after
storing. So ``delay_next(1, 5)`` plus ``fail_next(1)`` gives a slow 503 that
stores nothing.

A whole gateway from a rig text, for testing a plugin through the gateway
(see :mod:`plexus.testing.gateway`)::

    with run_gateway("adapters: [{type: bme280}]", receiver=rx) as gw:
        gw.wait_until(lambda: rx.count >= 10)
        gw.status()["adapters"][0]["state"]
    check_rig("sinks: [{type: file, path: /proc/x}]")   # what --check says

Trying a rig against a local receiver (logs each request, and each accepted
point unless ``--quiet``; without ``--api-key`` any non-empty key is accepted)::

    python -m plexus.testing --port 8080 --api-key plx_test
    plexus-gateway --config rig.yaml   # with gateway_url: http://127.0.0.1:8080

This package uses only the standard library and orjson and never imports
pytest, so it can be imported anywhere (``run_gateway`` and ``check_rig``
load the gateway, and so pydantic, when called). It deliberately re-implements the
protocol's rules instead of reusing :mod:`plexus.point`: it is the independent
oracle the client is tested against, so a mistake in the client's validation
cannot hide itself here.

The package: :mod:`~plexus.testing.rules` (the protocol's rules, the
independent oracle), :mod:`~plexus.testing.http` (HTTP plumbing),
:mod:`~plexus.testing.receiver` (:class:`Receiver`) and
:mod:`~plexus.testing.command` (the command line).
"""

from plexus.testing.command import main
from plexus.testing.gateway import GatewayRun, check_rig, run_gateway
from plexus.testing.receiver import Receiver, RequestRecord
from plexus.testing.rules import (
    GATEWAY_RATE_LIMIT_INTERVAL,
    MAX_BODY_BYTES,
    MAX_JSON_VALUE_BYTES,
    MAX_METRIC_CHARS,
    MAX_POINTS,
    MAX_SOURCE_ID_CHARS,
    MAX_STRING_VALUE_BYTES,
    MAX_TAG_CHARS,
    MAX_TAGS,
)

__all__ = [
    "GATEWAY_RATE_LIMIT_INTERVAL",
    "MAX_BODY_BYTES",
    "MAX_JSON_VALUE_BYTES",
    "MAX_METRIC_CHARS",
    "MAX_POINTS",
    "MAX_SOURCE_ID_CHARS",
    "MAX_STRING_VALUE_BYTES",
    "MAX_TAGS",
    "MAX_TAG_CHARS",
    "GatewayRun",
    "Receiver",
    "RequestRecord",
    "check_rig",
    "main",
    "run_gateway",
]
