"""plexus.logging.PlexusHandler and the rig's log_events: log records as events."""

from __future__ import annotations

import logging
from typing import Any

import orjson
import pytest

from plexus.logging import PlexusHandler
from plexus.point import MAX_JSON_VALUE_BYTES, go_json_size
from tests.reliability.support import make_client
from tests.service.support import FUNCS, GatewayProcess, wait_until
from tests.support import FakeClock


def events(receiver: Any) -> list[dict[str, Any]]:
    return [p for p in receiver.points if p["metric"] == "log"]


@pytest.fixture
def logger():
    log = logging.getLogger("test.bridge")
    log.propagate = False
    log.setLevel(logging.DEBUG)
    yield log
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()


def test_records_at_or_above_the_level_become_events(plexus_receiver, logger):
    with make_client(plexus_receiver) as px:
        handler = PlexusHandler(px, "warning")
        logger.addHandler(handler)
        logger.info("not this one")
        logger.warning("pump %d overheating", 3)
        try:
            raise ValueError("bad reading")
        except ValueError:
            logger.exception("sensor failed")
        handler.flush()
        px.flush_buffer(timeout=10)
    first, second = events(plexus_receiver)
    assert first["value"] == {"level": "warning", "logger": "test.bridge",
                              "message": "pump 3 overheating"}
    assert first["tags"] == {"level": "warning", "logger": "test.bridge"}
    assert second["value"]["exception"] == "ValueError: bad reading"
    assert second["tags"]["level"] == "error"
    assert handler.sent == 2 and handler.suppressed == 0


def test_rate_limited_with_the_count_held_back_on_the_next_event(logger):
    sent: list[tuple[str, Any, dict[str, str]]] = []
    clock = FakeClock(1000.0)
    handler = PlexusHandler(lambda *event: sent.append(event), per_minute=6, clock=clock)
    logger.addHandler(handler)
    for i in range(50):
        logger.warning("flood %d", i)
    handler.flush()
    assert len(sent) == 12  # a burst of twice the rate
    assert handler.suppressed == 38
    clock.now += 10  # one token a 10 s at 6 a minute
    logger.error("after the flood")
    handler.flush()
    assert len(sent) == 13
    name, data, tags = sent[-1]
    assert (name, data["message"], data["suppressed"], tags["level"]) == \
        ("log", "after the flood", 38, "error")


def test_the_key_never_reaches_an_event(logger):
    sent: list[Any] = []
    handler = PlexusHandler(lambda *event: sent.append(event), secret="s3cret-value-42")
    logger.addHandler(handler)
    logger.warning("key plx_LIVE_abcdef123456 and s3cret-value-42 in a message")
    try:
        raise RuntimeError("auth with plx_OTHER_998877 failed")
    except RuntimeError:
        logger.exception("boom")
    handler.flush()
    text = orjson.dumps([data for _, data, _ in sent]).decode()
    for leaked in ("plx_LIVE", "abcdef123456", "s3cret-value-42", "plx_OTHER", "998877"):
        assert leaked not in text
    assert text.count("plx_***") == 3


def test_a_long_message_is_cut_to_the_event_limit(logger):
    sent: list[Any] = []
    handler = PlexusHandler(lambda *event: sent.append(event))
    logger.addHandler(handler)
    logger.warning("<%s>", "x&" * 5000)  # Go escapes < > & as 6 bytes each
    handler.flush()
    (_, data, _), = sent
    assert go_json_size(orjson.dumps(data)) <= MAX_JSON_VALUE_BYTES
    assert data["message"].startswith("<x&x&") and data["message"].endswith("...")


def test_what_sending_logs_is_not_sent_again(logger):
    sent: list[Any] = []

    def noisy(*event: Any) -> None:
        sent.append(event)
        logger.warning("sending logged this")  # would loop forever if it were sent

    handler = PlexusHandler(noisy)
    logger.addHandler(handler)
    logger.warning("once")
    handler.flush()
    assert len(sent) == 1


def test_a_target_that_fails_never_breaks_logging(logger):
    def closed(*_event: Any) -> None:
        raise RuntimeError("client closed")

    handler = PlexusHandler(closed)
    logger.addHandler(handler)
    logger.warning("still logged")
    handler.flush()
    assert handler.failed == 1


def test_rig_log_events_ship_the_gateways_warnings(tmp_path, plexus_receiver):
    rig = tmp_path / "rig.yaml"
    rig.write_text(f"source_id: rig-01\napi_key: plx_test\ngateway_url: {plexus_receiver.url}\n"
                   "log_events: warning\nbatch: {interval: 0.05}\n"
                   f"adapters:\n  - type: callable\n    name: hot\n    function: {FUNCS}:broken\n"
                   "    interval: 0.05\n")
    gw = GatewayProcess(rig)
    try:
        assert wait_until(lambda: events(plexus_receiver), 20), gw.log
    finally:
        assert gw.stop() == 0, gw.log
    event = events(plexus_receiver)[0]
    assert event["value"]["level"] == "warning"
    assert "sensor on fire" in event["value"]["message"]
    assert event["tags"]["logger"].startswith("plexus.adapters")
    # the adapter's warnings are rate-limited at the source too: a handful, not one per call
    assert len(events(plexus_receiver)) <= 20
