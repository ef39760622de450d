"""Faults on the device link, each with the outcome the protocol prescribes, while
telemetry keeps flowing over HTTP."""

from __future__ import annotations

import threading
import time

from plexus import Cancelled
from tests.commands.conftest import Gate, wait_until


def linked(px, rx):
    assert rx.device.wait_connected(px.source_id, 10)
    assert wait_until(lambda: px.link_state == "up")


class Sender:
    """Sends a point every 10 ms from a thread, counting them."""

    def __init__(self, px) -> None:
        self.px = px
        self.sent = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.px.send("load", float(self.sent))
            self.sent += 1
            time.sleep(0.01)

    def finish(self) -> int:
        self.stop.set()
        self.thread.join()
        self.px.flush_buffer(10)
        return self.sent


def test_receiver_restart_mid_run_loses_no_status_and_no_point(rx, make_client):
    px = make_client(rx)
    gate = Gate()
    px.command("slow")(gate)
    linked(px, rx)
    sender = Sender(px)
    rid = rx.device.send_run("slow")
    assert gate.entered.wait(5)
    rx.go_down()  # the whole receiver: HTTP and the WebSocket, no close frame
    gate.release.set()
    time.sleep(0.3)
    rx.come_up()
    assert rx.device.wait_connected("pod-07", 15)
    result = rx.device.wait_run(rid, 10)
    assert result.state == "succeeded"
    sent = sender.finish()
    assert rx.wait_for(sent, 15)
    assert sorted(rx.metrics()["load"]) == [float(i) for i in range(sent)]


def test_link_flapping_leaves_telemetry_alone(rx, make_client):
    px = make_client(rx)
    px.command("ping")(lambda run: "pong")
    linked(px, rx)
    sender = Sender(px)
    for i in range(3):
        rx.device.close(1012, "restart") if i % 2 else rx.device.drop()
        assert rx.device.wait_connected(connections=i + 2, timeout=10)
        assert rx.device.run("ping", timeout=10).state == "succeeded"
    sent = sender.finish()
    assert rx.wait_for(sent, 10)
    assert len(rx.metrics()["load"]) == sent


def test_an_expired_run_and_a_handler_that_hangs_past_its_expiry(rx, make_client):
    px = make_client(rx)
    done = threading.Event()

    def hang(run):
        while not run.cancel_requested:  # a polite handler notices the expiry
            run.wait(5)
        done.set()
        return "too late"

    stubborn = Gate()
    px.command("hang")(hang)
    px.command("stubborn", concurrency="reject")(stubborn)
    linked(px, rx)
    assert rx.device.run("hang", ttl_ms=0).error_code == "expired_on_arrival"
    started = time.monotonic()
    result = rx.device.run("hang", ttl_ms=300)
    assert result.states == ["acknowledged", "running", "failed"]
    assert result.error_code == "timeout"
    assert time.monotonic() - started < 5
    assert done.wait(5)
    time.sleep(0.1)
    assert rx.device.statuses(result.run_id)[-1]["state"] == "failed"  # late result discarded
    # A handler that ignores the expiry keeps its slot until it really returns.
    first = rx.device.run("stubborn", ttl_ms=200)
    assert first.error_code == "timeout"
    assert rx.device.run("stubborn").error_code == "busy"
    stubborn.release.set()
    assert wait_until(lambda: rx.device.run("stubborn", timeout=5).state == "succeeded", 5)


def test_a_handler_that_raises_and_one_that_cancels(rx, make_client):
    px = make_client(rx)

    def explode(run):
        raise OSError("relay stuck")

    def give_up(run):
        run.progress(30, "halfway")
        raise Cancelled("door open")

    px.command("explode")(explode)
    px.command("give_up")(give_up)
    linked(px, rx)
    assert wait_until(lambda: len(rx.device.auths[-1].get("commands", [])) == 2)
    assert rx.device.run("explode").error_message == "OSError: relay stuck"
    cancelled = rx.device.run("give_up")
    assert cancelled.states == ["acknowledged", "running", "progress", "failed"]
    assert (cancelled.error_code, cancelled.error_message) == ("cancelled", "door open")


def test_garbage_and_a_frame_over_1_mib_from_the_server(rx, make_client):
    px = make_client(rx)
    px.command("ping")(lambda run: "pong")
    linked(px, rx)
    rx.device.send_raw("{" * 1000)
    rx.device.send_raw(b"\xff" * 100)
    assert rx.device.run("ping").state == "succeeded"
    rx.device.send_raw("x" * (1024 * 1024 + 10))  # the client refuses it (close 1009)
    assert rx.device.wait_connected(connections=2, timeout=10)
    assert rx.device.run("ping", timeout=10).state == "succeeded"


def test_a_result_over_1_mib_is_never_sent(oss_rx, rx, make_client):
    px = make_client(oss_rx)
    px.on_command("dump", lambda c, p: {"blob": "x" * (2 * 1024 * 1024)})
    linked(px, oss_rx)
    legacy = oss_rx.device.call("dump")
    assert legacy.events == ["ack", "error"] and "result too large" in legacy.error
    assert all(len(f.raw) < 1024 * 1024 for f in oss_rx.device.frames)
    px2 = make_client(rx, source_id="pod-08")
    px2.command("dump")(lambda run: {"blob": "x" * (2 * 1024 * 1024)})
    linked(px2, rx)
    declared = rx.device.run("dump")
    assert declared.state == "succeeded" and "result" not in declared.final


def test_a_flood_of_legacy_commands_stays_within_the_servers_rate_limit(oss_rx, make_client):
    px = make_client(oss_rx)
    px.on_command("tick", lambda c, p: {"n": p["n"]})
    linked(px, oss_rx)
    sender = Sender(px)
    ids = [oss_rx.device.send_command("tick", {"n": i}) for i in range(60)]
    results = [oss_rx.device.wait_legacy(cid, 20) for cid in ids]
    assert [r.result for r in results] == [{"n": i} for i in range(60)]
    assert oss_rx.device.rate_limited == 0  # paced under the 60-burst, 20/s bucket
    sent = sender.finish()
    assert oss_rx.wait_for(sent, 10)


def test_a_flood_of_declared_runs_each_gets_one_final_status(rx, make_client):
    px = make_client(rx)
    px.command("tick", params={"n": {"type": "integer"}})(lambda run, n: n)
    linked(px, rx)
    ids = [rx.device.send_run("tick", {"n": i}) for i in range(300)]
    finals = rx.device.wait_frame(
        lambda f: f.frame is not None and f.frame.get("state") in ("succeeded", "failed"),
        count=300, timeout=30)
    assert len(finals) == 300
    by_run = {f.frame["run_id"]: f.frame for f in finals}
    assert set(by_run) == set(ids)
    succeeded = [by_run[i] for i in ids if by_run[i]["state"] == "succeeded"]
    assert all(by_run[i]["error_code"] == "busy" for i in ids if by_run[i]["state"] == "failed")
    assert len(succeeded) >= 64
    assert rx.device.rate_limited == 0


def test_another_process_with_the_same_source_id_is_reported_once(rx, make_client, caplog):
    import logging

    caplog.set_level(logging.WARNING, logger="plexus.link")
    one = make_client(rx)
    two = make_client(rx)
    one.command("a")(lambda run: None)
    two.command("b")(lambda run: None)
    assert wait_until(lambda: "another process is probably connected" in caplog.text, 30)
    connections = rx.device.connections
    assert wait_until(lambda: rx.device.connections >= connections + 4, 30)  # still evicting
    one.close(timeout=0)
    two.close(timeout=0)
    assert caplog.text.count("another process is probably connected with source_id 'pod-07'") \
        <= 2  # at most once per process
    assert "another process is probably connected" in caplog.text
