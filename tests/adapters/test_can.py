"""The CAN adapter against real peers: python-can's virtual bus and real
capture files and databases (tests/data/README.md names their origins)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import can
import cantools
import pytest
import yaml

from plexus.adapters.can import CanAdapter, CanOptions
from plexus.errors import AdapterError, ConfigError
from tests.support import CollectingContext

DATA = Path(__file__).resolve().parent.parent / "data"
REPO = Path(__file__).resolve().parents[2]
SOCIALLEDGE = str(DATA / "socialledge.dbc")
MSXII = str(DATA / "msxii_system_can.dbc")


@pytest.fixture
def channel() -> str:
    return f"plexus-test-{uuid.uuid4().hex}"


@pytest.fixture
def sender(channel: str) -> Iterator[can.BusABC]:
    """The peer: a second virtual bus on the adapter's channel.

    preserve_timestamps lets a test choose the frame times the adapter sees.
    """
    bus = can.Bus(interface="virtual", channel=channel, preserve_timestamps=True)
    yield bus
    bus.shutdown()


@pytest.fixture
def run_adapter(collector: CollectingContext) -> Iterator[Callable[..., CanAdapter]]:
    started: list[CanAdapter] = []

    def run(**options: Any) -> CanAdapter:
        adapter = CanAdapter(CanOptions(**options), name="can-test")
        adapter.start(collector)
        started.append(adapter)
        if options.get("replay") is None:
            assert collector.wait_for(lambda _: adapter.state == "connected"), adapter.last_error
        return adapter

    yield run
    for adapter in started:
        adapter.stop()


def live(channel: str, **options: Any) -> dict[str, Any]:
    return {"interface": "virtual", "channel": channel, **options}


def frame(db: Any, name: str, values: dict[str, Any], timestamp: float | None = None) -> can.Message:
    message = db.get_message_by_name(name)
    return can.Message(
        arbitration_id=message.frame_id,
        is_extended_id=message.is_extended_frame,
        data=db.encode_message(name, values),
        timestamp=time.time() if timestamp is None else timestamp,
    )


def wait_for_metric(collector: CollectingContext, metric: str, count: int = 1) -> list[Any]:
    assert collector.wait_for(lambda c: len(c.metrics().get(metric, [])) >= count), (
        f"{metric} not seen {count} times; got {sorted(collector.metrics())}"
    )
    return collector.metrics()[metric]


def points_of(collector: CollectingContext, metric: str) -> list[tuple[Any, ...]]:
    return [p for p in collector.points if p[0] == metric]


# --- decoding live frames ------------------------------------------------------------------


def test_signals_decode_to_the_encoded_values(run_adapter, sender, channel, collector):
    db = cantools.database.load_file(SOCIALLEDGE)
    run_adapter(**live(channel, dbc=[SOCIALLEDGE]))
    sent_at = time.time() - 2.5
    sender.send(frame(db, "IO_DEBUG", {
        "IO_DEBUG_test_unsigned": 200, "IO_DEBUG_test_enum": 2,
        "IO_DEBUG_test_signed": -7, "IO_DEBUG_test_float": 3.5,
    }, timestamp=sent_at))
    sender.send(frame(db, "MOTOR_STATUS", {
        "MOTOR_STATUS_wheel_error": 1, "MOTOR_STATUS_speed_kph": 12.345,
    }))

    speed = wait_for_metric(collector, "can.MOTOR_STATUS.MOTOR_STATUS_speed_kph")
    metrics = collector.metrics()
    assert metrics["can.IO_DEBUG.IO_DEBUG_test_unsigned"] == [200]
    assert metrics["can.IO_DEBUG.IO_DEBUG_test_signed"] == [-7]
    assert metrics["can.IO_DEBUG.IO_DEBUG_test_float"] == [pytest.approx(3.5)]
    # A choice is sent as its name, a string.
    assert metrics["can.IO_DEBUG.IO_DEBUG_test_enum"] == ["IO_DEBUG_test2_enum_two"]
    assert metrics["can.MOTOR_STATUS.MOTOR_STATUS_wheel_error"] == [1]
    assert speed == [pytest.approx(12.345, abs=0.001)]  # the signal's scale is 0.001
    # The frame's own time is the point's time; units become a tag.
    (point,) = points_of(collector, "can.IO_DEBUG.IO_DEBUG_test_float")
    assert point[2] == int(sent_at * 1000)
    assert point[3] is None
    (point,) = points_of(collector, "can.MOTOR_STATUS.MOTOR_STATUS_speed_kph")
    assert point[3] == {"unit": "kph"}


def test_multiplexed_message_yields_only_the_selected_signals(run_adapter, sender, channel,
                                                               collector):
    db = cantools.database.load_file(MSXII)
    run_adapter(**live(channel, dbc=[MSXII]))
    sender.send(frame(db, "BATTERY_VT", {
        "BATTERY_VT_INDEX": 7, "MODULE_VOLTAGE_07": 39089, "MODULE_TEMP_07": 23034,
    }))
    wait_for_metric(collector, "can.BATTERY_VT.MODULE_TEMP_07")
    assert collector.metrics() == {
        "can.BATTERY_VT.BATTERY_VT_INDEX": [7],
        "can.BATTERY_VT.MODULE_VOLTAGE_07": [39089],
        "can.BATTERY_VT.MODULE_TEMP_07": [23034],
    }


def test_multiplexer_value_picks_the_signal_set(run_adapter, sender, channel, collector):
    db = cantools.database.load_file(SOCIALLEDGE)
    run_adapter(**live(channel, dbc=[SOCIALLEDGE, MSXII]))
    for mux, prefix in ((0, ""), (1, "no_filt_")):
        sender.send(frame(db, "SENSOR_SONARS", {
            "SENSOR_SONARS_mux": mux, "SENSOR_SONARS_err_count": 3,
            f"SENSOR_SONARS_{prefix}left": 1.5, f"SENSOR_SONARS_{prefix}middle": 2.5,
            f"SENSOR_SONARS_{prefix}right": 3.5, f"SENSOR_SONARS_{prefix}rear": 4.5,
        }))
    wait_for_metric(collector, "can.SENSOR_SONARS.SENSOR_SONARS_no_filt_rear")
    metrics = collector.metrics()
    assert metrics["can.SENSOR_SONARS.SENSOR_SONARS_mux"] == [0, 1]
    assert metrics["can.SENSOR_SONARS.SENSOR_SONARS_err_count"] == [3, 3]
    for name, value in (("left", 1.5), ("middle", 2.5), ("right", 3.5), ("rear", 4.5)):
        assert metrics[f"can.SENSOR_SONARS.SENSOR_SONARS_{name}"] == [pytest.approx(value)]
        assert metrics[f"can.SENSOR_SONARS.SENSOR_SONARS_no_filt_{name}"] == [
            pytest.approx(value)
        ]


def test_units_in_the_name_or_ignored(run_adapter, channel, collector):
    db = cantools.database.load_file(SOCIALLEDGE)
    for units, metric, tags in (
        ("name", "x.MOTOR_STATUS.MOTOR_STATUS_speed_kph_kph", None),
        ("none", "y.MOTOR_STATUS.MOTOR_STATUS_speed_kph", None),
    ):
        with can.Bus(interface="virtual", channel=channel) as bus:
            adapter = run_adapter(**live(channel, dbc=[SOCIALLEDGE], units=units,
                                         prefix=metric.split(".")[0]))
            bus.send(frame(db, "MOTOR_STATUS", {"MOTOR_STATUS_wheel_error": 0,
                                                "MOTOR_STATUS_speed_kph": 5.0}))
            wait_for_metric(collector, metric)
            adapter.stop()
        assert points_of(collector, metric)[0][3] == tags


def test_empty_prefix_and_kcd_database(run_adapter, sender, channel, collector):
    kcd = str(DATA / "tester.kcd")
    db = cantools.database.load_file(kcd)
    run_adapter(**live(channel, dbc=[kcd], prefix=""))
    sender.send(frame(db, "Message1", {"Signal1": 5, "Signal2": 77}))
    wait_for_metric(collector, "Message1.Signal2")
    # The KCD signal has an intercept of -10.
    assert collector.metrics() == {"Message1.Signal1": [5], "Message1.Signal2": [77]}


# --- frames no database knows, bad frames, error frames ------------------------------------


def test_unknown_ids_are_sent_as_raw_hex(run_adapter, sender, channel, collector):
    adapter = run_adapter(**live(channel, dbc=[SOCIALLEDGE]))
    sender.send(can.Message(arbitration_id=0x1F3, is_extended_id=False, data=b"\x01\x02\xab"))
    sender.send(can.Message(arbitration_id=0x18EBFF00, data=b"\x01\xa0\x0f\xa6"))
    sender.send(can.Message(arbitration_id=0x7, is_extended_id=False, data=b""))
    sender.send(can.Message(arbitration_id=0x1F3, is_extended_id=False, data=b"\xff"))
    wait_for_metric(collector, "can.raw.0x1F3", 2)
    assert collector.metrics() == {
        "can.raw.0x1F3": ["0102AB", "FF"],
        "can.raw.0x18EBFF00": ["01A00FA6"],
        "can.raw.0x007": [""],
    }
    extra = adapter.health_extra()
    assert extra["unknown_frames"] == 4
    assert extra["unknown_ids"] == 3


def test_raw_drop_ignores_unknown_ids(run_adapter, sender, channel, collector):
    db = cantools.database.load_file(SOCIALLEDGE)
    adapter = run_adapter(**live(channel, raw="drop", dbc=[SOCIALLEDGE]))
    sender.send(can.Message(arbitration_id=0x1F3, is_extended_id=False, data=b"\x01\x02"))
    sender.send(frame(db, "DRIVER_HEARTBEAT", {"DRIVER_HEARTBEAT_cmd": 1}))
    assert wait_for_metric(collector, "can.DRIVER_HEARTBEAT.DRIVER_HEARTBEAT_cmd") == ["DRIVER_HEARTBEAT_cmd_SYNC"]
    assert list(collector.metrics()) == ["can.DRIVER_HEARTBEAT.DRIVER_HEARTBEAT_cmd"]
    assert adapter.health_extra()["unknown_frames"] == 1


def test_without_a_database_every_frame_is_raw(run_adapter, sender, channel, collector):
    run_adapter(**live(channel, prefix="bus2"))
    sender.send(can.Message(arbitration_id=0x123, is_extended_id=False, data=b"\xde\xad"))
    assert wait_for_metric(collector, "bus2.raw.0x123") == ["DEAD"]


def test_bad_frames_are_counted_and_the_adapter_goes_on(run_adapter, sender, channel, collector):
    db = cantools.database.load_file(SOCIALLEDGE)
    adapter = run_adapter(**live(channel, dbc=[SOCIALLEDGE]))
    io_debug = db.get_message_by_name("IO_DEBUG").frame_id  # 4 bytes long
    sonars = db.get_message_by_name("SENSOR_SONARS").frame_id
    sender.send(can.Message(arbitration_id=io_debug, is_extended_id=False, data=b"\x01\x02"))
    sender.send(can.Message(arbitration_id=io_debug, is_extended_id=False, data=bytes(8)))
    # Multiplexer value 9 is not defined for SENSOR_SONARS.
    sender.send(can.Message(arbitration_id=sonars, is_extended_id=False,
                            data=bytes.fromhex("0908070605040302")))
    sender.send(frame(db, "IO_DEBUG", {
        "IO_DEBUG_test_unsigned": 9, "IO_DEBUG_test_enum": 1,
        "IO_DEBUG_test_signed": 0, "IO_DEBUG_test_float": 0.0,
    }))
    assert wait_for_metric(collector, "can.IO_DEBUG.IO_DEBUG_test_unsigned") == [9]
    extra = adapter.health_extra()
    assert extra["decode_errors"] == 3
    assert extra["decoded"] == 1
    assert adapter.errors == 3
    assert "IO_DEBUG" in (adapter.last_error or "") or "SENSOR_SONARS" in (adapter.last_error or "")
    assert adapter.state == "connected"


def test_padded_frames_decode_when_strict_dlc_is_off(run_adapter, sender, channel, collector):
    adapter = run_adapter(**live(channel, dbc=[SOCIALLEDGE], strict_dlc=False))
    # DRIVER_HEARTBEAT is 1 byte long; the ECU pads it to 8.
    sender.send(can.Message(arbitration_id=0x64, is_extended_id=False,
                            data=b"\x02" + bytes(7)))
    assert wait_for_metric(collector, "can.DRIVER_HEARTBEAT.DRIVER_HEARTBEAT_cmd") == ["DRIVER_HEARTBEAT_cmd_REBOOT"]
    assert adapter.health_extra()["decode_errors"] == 0


def test_error_frames_and_bus_off_are_counted(run_adapter, sender, channel, collector):
    adapter = run_adapter(**live(channel))
    sender.send(can.Message(is_error_frame=True, arbitration_id=0x04, data=bytes(8)))
    sender.send(can.Message(is_error_frame=True, arbitration_id=0x40, data=bytes(8)))
    sender.send(can.Message(arbitration_id=0x10, is_extended_id=False, data=b"\x01"))
    sender.send(can.Message(arbitration_id=0x11, is_extended_id=False, is_remote_frame=True,
                            dlc=2))
    sender.send(can.Message(arbitration_id=0x12, is_extended_id=False, data=b"\x02"))
    wait_for_metric(collector, "can.raw.0x012")
    assert collector.metrics() == {"can.raw.0x010": ["01"], "can.raw.0x012": ["02"]}
    extra = adapter.health_extra()
    assert (extra["error_frames"], extra["bus_off"], extra["remote_frames"]) == (2, 1, 1)
    assert extra["frames"] == 5


def test_a_lost_bus_is_reopened(run_adapter, sender, channel, collector):
    adapter = run_adapter(**live(channel))
    # Closing the adapter's bus under it is what a vanished USB adapter looks like.
    adapter._bus.shutdown()
    assert collector.wait_for(lambda _: adapter.reconnects >= 1 and adapter.state == "connected")
    assert adapter.health_extra()["bus_errors"] == 1
    sender.send(can.Message(arbitration_id=0x10, is_extended_id=False, data=b"\x01"))
    assert wait_for_metric(collector, "can.raw.0x010") == ["01"]


def test_stop_shuts_the_bus_down(channel, sender, collector):
    adapter = CanAdapter(CanOptions(**live(channel)))
    adapter.start(collector)
    assert collector.wait_for(lambda _: adapter.state == "connected")
    assert len(can.interfaces.virtual.channels[channel]) == 2
    adapter.stop()
    assert adapter.state == "stopped"
    assert len(can.interfaces.virtual.channels[channel]) == 1  # only the sender's


# --- choosing and thinning -----------------------------------------------------------------


def test_filters_pass_only_matching_ids(run_adapter, sender, channel, collector):
    adapter = run_adapter(**live(channel, filters=[
        {"can_id": 0x100, "can_mask": 0x7F0, "extended": False},
        {"can_id": 0x18EBFF00},
    ]))
    for can_id, extended in ((0x101, False), (0x200, False), (0x10F, True), (0x18EBFF01, True),
                             (0x18EBFF00, True), (0x10F, False)):
        sender.send(can.Message(arbitration_id=can_id, is_extended_id=extended, data=b"\x01"))
    wait_for_metric(collector, "can.raw.0x10F")
    assert sorted(collector.metrics()) == ["can.raw.0x101", "can.raw.0x10F", "can.raw.0x18EBFF00"]
    assert adapter.health_extra()["frames"] == 3


def test_signals_allow_list(run_adapter, sender, channel, collector):
    db = cantools.database.load_file(SOCIALLEDGE)
    adapter = run_adapter(**live(channel, dbc=[SOCIALLEDGE], signals=[
        "IO_DEBUG.IO_DEBUG_test_enum",     # Message.Signal
        "MOTOR_STATUS_speed_*",            # a bare signal name, with a wildcard
    ]))
    sender.send(frame(db, "SENSOR_SONARS", {  # nothing allowed: not even decoded
        "SENSOR_SONARS_mux": 0, "SENSOR_SONARS_err_count": 1, "SENSOR_SONARS_left": 1,
        "SENSOR_SONARS_middle": 1, "SENSOR_SONARS_right": 1, "SENSOR_SONARS_rear": 1,
    }))
    sender.send(frame(db, "IO_DEBUG", {
        "IO_DEBUG_test_unsigned": 9, "IO_DEBUG_test_enum": 1,
        "IO_DEBUG_test_signed": 0, "IO_DEBUG_test_float": 0.0,
    }))
    sender.send(frame(db, "MOTOR_STATUS", {"MOTOR_STATUS_wheel_error": 0,
                                           "MOTOR_STATUS_speed_kph": 7.0}))
    wait_for_metric(collector, "can.MOTOR_STATUS.MOTOR_STATUS_speed_kph")
    assert collector.metrics() == {
        "can.IO_DEBUG.IO_DEBUG_test_enum": ["IO_DEBUG_test2_enum_one"],
        "can.MOTOR_STATUS.MOTOR_STATUS_speed_kph": [pytest.approx(7.0)],
    }
    assert adapter.health_extra()["decoded"] == 2


def test_min_interval_thins_a_fast_signal(run_adapter, sender, channel, collector):
    db = cantools.database.load_file(MSXII)
    adapter = run_adapter(**live(channel, dbc=[MSXII], min_interval=0.1))
    start = time.time() - 10
    for i in range(100):  # 100 Hz for one second, by the frames' own clock
        sender.send(frame(db, "BATTERY_VT", {
            "BATTERY_VT_INDEX": 0, "MODULE_VOLTAGE_00": 39000 + i, "MODULE_TEMP_00": 20,
        }, timestamp=start + i * 0.01))
    sender.send(can.Message(arbitration_id=0x7FF, is_extended_id=False, data=b""))
    wait_for_metric(collector, "can.raw.0x7FF")
    voltages = collector.metrics()["can.BATTERY_VT.MODULE_VOLTAGE_00"]
    assert voltages == [39000 + i for i in range(0, 100, 10)]
    assert adapter.health_extra()["thinned"] == 3 * 90


def test_on_change_with_keepalive_and_per_signal_options(run_adapter, sender, channel, collector):
    db = cantools.database.load_file(MSXII)
    run_adapter(**live(
        channel, dbc=[MSXII], on_change=True, keepalive=1.0,
        signal_options={"BATTERY_VT.MODULE_TEMP_*": {"on_change": False, "min_interval": 0.5},
                        "BATTERY_VT_INDEX": {"on_change": False}},
    ))
    start = time.time() - 10
    voltages = [1, 1, 1, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3]  # one frame every 0.1 s
    for i, volts in enumerate(voltages):
        sender.send(frame(db, "BATTERY_VT", {
            "BATTERY_VT_INDEX": 0, "MODULE_VOLTAGE_00": volts, "MODULE_TEMP_00": 20,
        }, timestamp=start + i * 0.1))
    sender.send(can.Message(arbitration_id=0x7FF, is_extended_id=False, data=b""))
    wait_for_metric(collector, "can.raw.0x7FF")
    metrics = collector.metrics()
    # Changes only, plus the unchanged 3 again once a second has passed (t=0.5 -> 1.5).
    assert metrics["can.BATTERY_VT.MODULE_VOLTAGE_00"] == [1, 2, 3, 3]
    assert metrics["can.BATTERY_VT.MODULE_TEMP_00"] == [20, 20, 20, 20]  # t=0, 0.5, 1.0, 1.5
    assert len(metrics["can.BATTERY_VT.BATTERY_VT_INDEX"]) == len(voltages)


# --- replay --------------------------------------------------------------------------------


def test_replay_candump_log_through_its_database(run_adapter, collector):
    before = time.time()
    adapter = run_adapter(dbc=[SOCIALLEDGE], replay=str(DATA / "socialledge_candump.log"))
    assert collector.wait_for(lambda _: adapter.state == "finished")
    metrics = collector.metrics()
    # 3 SENSOR_SONARS frames (mux 0: 6 signals), 1 IO_DEBUG (4 signals), 1 unknown id
    # 0x1F3 and 1 DRIVER_HEARTBEAT with 10 bytes instead of 1 (a decode error).
    assert len(collector.points) == 3 * 6 + 4 + 1
    assert metrics["can.SENSOR_SONARS.SENSOR_SONARS_err_count"] == [15, 15, 15]
    assert metrics["can.IO_DEBUG.IO_DEBUG_test_enum"] == ["IO_DEBUG_test2_enum_two"]
    assert metrics["can.IO_DEBUG.IO_DEBUG_test_float"] == [pytest.approx(2.0)]
    assert metrics["can.raw.0x1F3"] == ["010203"]
    extra = adapter.health_extra()
    assert (extra["frames"], extra["decoded"], extra["decode_errors"]) == (6, 4, 1)
    assert extra["replay_passes"] == 1
    # Stamped with the wall clock by default.
    assert all(p[2] >= int(before * 1000) for p in collector.points)


def test_replay_with_recorded_timestamps(run_adapter, collector):
    adapter = run_adapter(dbc=[SOCIALLEDGE], replay=str(DATA / "socialledge_candump.log"),
                          replay_timestamps="recorded")
    assert collector.wait_for(lambda _: adapter.state == "finished")
    (point,) = points_of(collector, "can.raw.0x1F3")
    assert point[2] == 1594172462688


def test_replay_of_a_multiplexed_capture(run_adapter, collector):
    adapter = run_adapter(dbc=[MSXII], replay=str(DATA / "msxii_battery_vt.log"))
    assert collector.wait_for(lambda _: adapter.state == "finished")
    metrics = collector.metrics()
    assert len(collector.points) == 36 * 3
    assert metrics["can.BATTERY_VT.BATTERY_VT_INDEX"] == list(range(36))
    # Values as cantools' own test of this capture expects them.
    assert metrics["can.BATTERY_VT.MODULE_VOLTAGE_00"] == [39064]
    assert metrics["can.BATTERY_VT.MODULE_TEMP_00"] == [11]
    assert metrics["can.BATTERY_VT.MODULE_VOLTAGE_06"] == [39477]
    assert metrics["can.BATTERY_VT.MODULE_TEMP_06"] == [23018]
    assert metrics["can.BATTERY_VT.MODULE_VOLTAGE_35"] == [39257]
    assert metrics["can.BATTERY_VT.MODULE_TEMP_35"] == [23132]


def test_replay_at_recorded_speed_keeps_order(run_adapter, collector):
    adapter = run_adapter(dbc=[MSXII], replay=str(DATA / "msxii_battery_vt.log"),
                          replay_speed=4.0, signals=["BATTERY_VT_INDEX"])
    assert collector.wait_for(lambda _: adapter.state == "finished")
    assert collector.metrics()["can.BATTERY_VT.BATTERY_VT_INDEX"] == list(range(36))


def test_replay_blf(run_adapter, collector):
    adapter = run_adapter(replay=str(DATA / "issue_1905.blf"))
    assert collector.wait_for(lambda _: adapter.state == "finished")
    values = collector.metrics()["can.raw.0x6A9"]
    assert len(values) == 22
    assert values[0] == "FF" * 48 + "00" * 16  # a 64-byte CAN FD frame


def test_replay_trc_with_a_bad_multiplexer(run_adapter, collector):
    adapter = run_adapter(dbc=[SOCIALLEDGE], replay=str(DATA / "test_CanMessage.trc"))
    assert collector.wait_for(lambda _: adapter.state == "finished")
    assert collector.metrics() == {"can.raw.0x6F9": ["050C000000000000"]}
    assert adapter.health_extra()["decode_errors"] == 1  # 0x0C8 with multiplexer 9


def test_replay_asc_with_error_and_remote_frames_and_filters(run_adapter, collector):
    adapter = run_adapter(replay=str(DATA / "logfile_errorframes.asc"),
                          filters=[{"can_id": 0x18EBFF00, "extended": True}])
    assert collector.wait_for(lambda _: adapter.state == "finished")
    assert collector.metrics() == {"can.raw.0x18EBFF00": [
        "01A00FA6603BD140", "03E1004BFFFF3C0F", "01A00FA6603BD140", "021FDE8025DFC02B",
        "03E1004BFFFF3C0F", "04004BFFFFFFFFFF",
    ]}
    # The error frames have id 0 (29-bit) and do not pass the filter either.
    unfiltered = CanAdapter(CanOptions(replay=str(DATA / "logfile_errorframes.asc")))
    other = CollectingContext()
    unfiltered.start(other)
    try:
        assert other.wait_for(lambda _: unfiltered.state == "finished")
    finally:
        unfiltered.stop()
    extra = unfiltered.health_extra()
    assert (extra["frames"], extra["error_frames"], extra["remote_frames"]) == (12, 3, 2)
    assert len(other.points) == 7


def test_replay_loop_goes_on_until_stopped(run_adapter, collector):
    adapter = run_adapter(dbc=[SOCIALLEDGE], replay=str(DATA / "socialledge_candump.log"),
                          replay_loop=True)
    assert collector.wait_for(lambda _: adapter.replay_passes >= 3)
    assert adapter.state == "connected"
    adapter.stop()
    assert adapter.state == "stopped"


def test_replay_of_a_corrupt_capture_counts_it(run_adapter, collector, tmp_path):
    capture = tmp_path / "cut.log"
    capture.write_text("(1594172462.356874) vcan0 1F4#01020304\n(1594172462.3 vcan0 ERROR\n")
    adapter = run_adapter(dbc=[SOCIALLEDGE], replay=str(capture))
    assert collector.wait_for(lambda _: adapter.state == "finished")
    assert len(collector.points) == 4
    assert adapter.errors == 1
    assert "unreadable after 1 frames" in (adapter.last_error or "")


# --- start-up errors and options -----------------------------------------------------------


def test_import_does_not_import_the_drivers():
    code = ("import sys, plexus.adapters.can; "
            "print(sorted({'can', 'cantools'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("module", ["can", "cantools"])
def test_a_missing_driver_names_the_extra(monkeypatch, collector, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import <module>` fail
    adapter = CanAdapter(CanOptions(interface="virtual", channel="x"))
    with pytest.raises(AdapterError, match=re.escape("pip install 'plexus-gateway[can]'")):
        adapter.start(collector)


@pytest.mark.parametrize(("options", "message"), [
    ({"dbc": ["no/such/file.dbc"]}, "not found"),
    ({"dbc": [str(DATA / "socialledge_candump.log")]}, "cannot load CAN database"),
    ({"interface": "no-such-interface"}, "unknown python-can interface"),
    ({"replay": "no/such/capture.asc"}, "replay file not found: no/such/capture.asc"),
    ({"replay": str(DATA / "README.md")}, "cannot replay"),
])
def test_start_errors(collector, options, message):
    adapter = CanAdapter(CanOptions(**options))
    with pytest.raises(AdapterError, match=re.escape(message)):
        adapter.start(collector)


@pytest.mark.parametrize(("options", "message"), [
    ({"units": "suffix"}, "units"),
    ({"replay_speed": -1.0}, "replay_speed"),
    ({"filters": [{"id": 1}]}, "filters[0]"),
    ({"filters": [{"can_id": 1 << 30}]}, "can_id"),
    ({"signal_options": {"X": {"rate": 1}}}, "signal_options['X']"),
    ({"min_interval": -1.0}, "min_interval"),
])
def test_bad_options(options, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        CanOptions(**options)


def test_sample_config_documents_every_option():
    text = (REPO / "configs" / "can.yaml").read_text()
    config = yaml.safe_load(text)
    assert [a["type"] for a in config["adapters"]] == ["can"] * len(config["adapters"])
    for f in fields(CanOptions):
        assert re.search(rf"^\s*#\s*{f.name}:", text, re.M), f"{f.name} is not documented"


def test_bundled_demo_capture_decodes():
    from importlib import resources

    data = resources.files("plexus") / "data"
    db = cantools.database.load_file(str(data / "msxii_system_can.dbc"))
    frames = list(can.LogReader(str(data / "msxii_battery_vt.log")))
    assert len(frames) == 36
    assert all(db.decode_message(f.arbitration_id, f.data) for f in frames)
