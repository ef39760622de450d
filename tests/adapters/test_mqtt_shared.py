"""MQTT 5 shared subscriptions: gateway processes splitting one feed, one killed mid-stream.

Three ``plexus-gateway`` processes subscribe as ``$share/fleet/...`` with kept
sessions (clean start off, a session expiry, QoS 1) and persistent buffers,
and deliver to one local receiver. While a publisher streams numbered
readings, one gateway is killed with SIGKILL and started again with the same
config. Every reading must reach the receiver at least once; duplicates are
counted and must stay within the broker's in-flight window for the killed
client (the messages it had been sent but not yet acknowledged).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from plexus.adapters.mqtt import MqttAdapter, MqttOptions, TopicOption
from plexus.errors import ClientClosedError, ConfigError
from plexus.testing import Receiver
from tests.adapters.mosquitto import MosquittoBroker
from tests.adapters.test_mqtt import Publisher
from tests.support import CollectingContext, wait_until

GATEWAYS = 3
DEVICES = 10
PER_DEVICE = 300
# The broker sends at most this many unacknowledged QoS 1 messages to one client;
# it is the most a killed gateway can have received without acknowledging.
INFLIGHT = 20


def gateway_command() -> list[str]:
    script = Path(sys.executable).with_name("plexus-gateway")
    return [str(script)] if script.exists() else [sys.executable, "-m", "plexus.cli"]


def rig_text(n: int, receiver: Receiver, broker: MosquittoBroker, tmp: Path) -> str:
    return f"""\
source_id: depot-gw-{n}
api_key: plx_test
gateway_url: {receiver.url}
log_level: info
buffer: {{type: sqlite, path: {tmp}/gw-{n}.db}}
batch: {{size: 200, interval: 0.1}}
retry: {{base: 0.2, max_delay: 1}}
adapters:
  - type: mqtt
    host: 127.0.0.1
    port: {broker.port}
    protocol: "5"
    client_id: depot-gw-{n}
    clean_start: false
    session_expiry: 300
    share_group: depot
    topics:
      - {{topic: "fleet/+/seq", qos: 1}}
    tag_segments: {{device: 1}}
    metric_template: "fleet.seq"
"""


class GatewayProcess:
    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [*gateway_command(), "--config", str(self.config), "--no-status"],
                stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def terminate(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(5)


def subscribed_clients(broker: MosquittoBroker) -> Counter[str]:
    """How many times each client id has subscribed (from the broker's log)."""
    found = re.findall(r"^\d+: (depot-gw-\d) 1 \$share/depot/fleet/\+/seq$", broker.log_text(),
                       re.MULTILINE)
    return Counter(found)


def test_three_gateways_share_a_feed_and_a_killed_one_loses_nothing(tmp_path: Path) -> None:
    pytest.importorskip("paho.mqtt.client")
    import paho.mqtt.client as mqtt

    if shutil.which("plexus-gateway") is None and not Path(sys.executable).with_name(
            "plexus-gateway").exists():
        pytest.skip("plexus-gateway is not installed")
    broker = MosquittoBroker(tmp_path / "broker", extra_config=(
        "log_type subscribe",
        f"max_inflight_messages {INFLIGHT}",
        # Unlimited queue for a member that is away: mosquitto's default (1000)
        # would drop the killed gateway's share beyond that, which is the
        # broker's choice, not ours; docs/fleet.md says to size it.
        "max_queued_messages 0",
    ))
    receiver = Receiver(api_keys=None).start()
    gateways: list[GatewayProcess] = []
    publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="publisher",
                            protocol=mqtt.MQTTv5)
    try:
        broker.start()
        for n in range(1, GATEWAYS + 1):
            config = tmp_path / f"gw-{n}.yaml"
            config.write_text(rig_text(n, receiver, broker, tmp_path))
            gateway = GatewayProcess(config, tmp_path / f"gw-{n}.log")
            gateway.start()
            gateways.append(gateway)
        assert wait_until(lambda: len(subscribed_clients(broker)) == GATEWAYS, 30), \
            broker.log_text()[-3000:]

        publisher.max_inflight_messages_set(100)
        publisher.connect("127.0.0.1", broker.port)
        publisher.loop_start()
        victim = gateways[1]
        total = DEVICES * PER_DEVICE
        infos = []
        for i in range(total):
            device, seq = i % DEVICES, i // DEVICES
            infos.append(publisher.publish(f"fleet/dev{device}/seq", str(seq), qos=1))
            if i == total // 3 + 150:
                victim.kill()  # mid-burst: it holds buffered and in-flight readings
            if i == total * 2 // 3:
                victim.start()  # same client id, same buffer file
            if i % 300 == 299:
                time.sleep(0.1)  # bursts of 300 messages, ~2,000 messages/s over all
        for info in infos:
            info.wait_for_publish(30)  # the broker has every message
        assert all(info.is_published() for info in infos)

        def readings() -> Counter[tuple[str, int]]:
            return Counter((p["tags"]["device"], p["value"]) for p in receiver.points
                           if p["metric"] == "fleet.seq")

        expected = {(f"dev{d}", s) for d in range(DEVICES) for s in range(PER_DEVICE)}
        arrived = wait_until(lambda: set(readings()) >= expected, 60)
        for gateway in gateways:
            gateway.terminate()
        got = readings()
        missing = expected - set(got)
        duplicates = sum(got.values()) - len(got)
        per_gateway = Counter(p["source_id"] for p in receiver.points)
        print(f"\nshared subscription: {total} published, {len(got)} distinct delivered, "
              f"{len(missing)} missing, {duplicates} duplicates (bound {INFLIGHT}), "
              f"per gateway {dict(sorted(per_gateway.items()))}, "
              f"idempotent resends answered by the receiver: {receiver.duplicates}")
        assert arrived and not missing, f"{len(missing)} readings never arrived, e.g. " \
            f"{sorted(missing)[:5]}\n{(tmp_path / 'gw-2.log').read_text()[-3000:]}"
        assert set(got) == expected  # nothing that was never published
        assert duplicates <= INFLIGHT
        # The feed really was shared, and the restarted gateway took part again.
        assert all(per_gateway[f"depot-gw-{n}"] > 0 for n in range(1, GATEWAYS + 1))
        assert subscribed_clients(broker)["depot-gw-2"] == 2
    finally:
        publisher.loop_stop()
        for gateway in gateways:
            gateway.terminate()
        receiver.stop()
        broker.stop()


# In-process: what is acknowledged, and when ------------------------------------------------


class FailingContext(CollectingContext):
    """A pipeline that cannot buffer (closed, disk full) until ``working`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.working = False

    def emit(self, metric, value, timestamp=None, tags=None) -> None:
        if not self.working:
            raise ClientClosedError("closed")
        super().emit(metric, value, timestamp, tags)


def persistent_options(port: int, **extra: Any) -> MqttOptions:
    return MqttOptions(topics=[TopicOption("plant/#", 1)], host="127.0.0.1", port=port,
                       protocol="5", client_id="keeper", clean_start=False, session_expiry=60,
                       **extra)


def test_a_message_that_could_not_be_buffered_is_not_acknowledged_and_comes_back(
        tmp_path: Path) -> None:
    with MosquittoBroker(tmp_path / "broker") as broker:
        ctx = FailingContext()
        adapter = MqttAdapter(persistent_options(broker.port), name="keeper")
        adapter.start(ctx)
        try:
            assert wait_until(lambda: adapter.subscriptions == 1, 15)
            publisher = Publisher(broker.port, protocol="5")
            publisher.publish("plant/temp", "21.5", qos=1)
            assert wait_until(lambda: adapter.unacked == 1, 10), adapter.health()
        finally:
            adapter.stop(5)
        assert ctx.points == []
        # The same session comes back (a restart); the broker sends the unacknowledged
        # message again, and this time it is buffered and acknowledged.
        ctx.working = True
        again = MqttAdapter(persistent_options(broker.port), name="keeper")
        again.start(ctx)
        try:
            assert ctx.wait_for(lambda c: len(c.points) == 1, 10), again.health()
            assert ctx.points[0][:2] == ("plant.temp", 21.5)
            assert again.unacked == 0
        finally:
            again.stop(5)
        # Acknowledged: a third start of the session receives nothing more.
        third = MqttAdapter(persistent_options(broker.port), name="keeper")
        third.start(ctx)
        try:
            assert wait_until(lambda: third.subscriptions == 1, 15)
            publisher.publish("plant/marker", "1", qos=1)
            assert ctx.wait_for(lambda c: len(c.points) == 2, 10)
            assert [p[0] for p in ctx.points] == ["plant.temp", "plant.marker"]
        finally:
            third.stop(5)
            publisher.close()


def test_a_kept_session_queues_what_arrives_while_the_gateway_is_away(tmp_path: Path) -> None:
    with MosquittoBroker(tmp_path / "broker") as broker:
        ctx = CollectingContext()
        adapter = MqttAdapter(persistent_options(broker.port, share_group="g"), name="keeper")
        adapter.start(ctx)
        assert wait_until(lambda: adapter.subscriptions == 1, 15)
        adapter.stop(5)
        publisher = Publisher(broker.port, protocol="5")
        try:
            for i in range(5):
                publisher.publish(f"plant/line{i}", str(i), qos=1)
            back = MqttAdapter(persistent_options(broker.port, share_group="g"), name="keeper")
            back.start(ctx)
            try:
                assert ctx.wait_for(lambda c: len(c.points) == 5, 10), back.health()
            finally:
                back.stop(5)
        finally:
            publisher.close()
        assert sorted(p[1] for p in ctx.points) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(("options", "message"), [
    ({"share_group": "g"}, "share_group: needs protocol: '5'"),
    ({"share_group": "a/b", "protocol": "5"}, "share_group: must be a non-empty name"),
    ({"share_group": "", "protocol": "5"}, "share_group: must be a non-empty name"),
    ({"clean_start": False}, "clean_start: false needs a fixed client_id"),
    ({"session_expiry": -1}, "session_expiry: must be between 0 and 4294967295, got -1"),
])
def test_shared_and_persistent_options_are_checked(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        MqttOptions(topics=["a/b"], **options)


def test_share_group_subscribes_through_the_share_prefix() -> None:
    adapter = MqttAdapter(MqttOptions(topics=["a/#", {"topic": "b", "qos": 1}],  # type: ignore[list-item]
                                      protocol="5", share_group="depot"))
    assert adapter._topics == [("$share/depot/a/#", 0), ("$share/depot/b", 1)]
