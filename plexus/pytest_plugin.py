"""pytest fixtures around :class:`plexus.testing.Receiver`.

Fixtures:

``plexus_receiver``
    A started receiver that accepts the key ``plx_test``; stopped after the
    test. Point a client at ``plexus_receiver.url``.

``plexus_device``
    The started receiver's device WebSocket (``plexus_receiver.device``):
    inject commands, read back every frame a device sent.

``plexus_run_command``
    One call runs a command on the connected device and returns its final
    status: ``plexus_run_command("power_off", {"outlet": 3}).state``. It
    waits for a device to connect first; ``legacy=True`` sends a
    ``typed_command`` instead and returns the ``command_result`` frames.

``plexus_gateway``
    Call it with a rig text to get a started gateway
    (:class:`~plexus.testing.GatewayRun`) delivering to ``plexus_receiver``,
    with relative paths under the test's ``tmp_path``; stopped at teardown::

        def test_sensor(plexus_gateway, plexus_receiver):
            gw = plexus_gateway("adapters: [{type: bme280, interval: 0.05}]")
            assert gw.wait_until(lambda: plexus_receiver.count >= 10)

    Keyword arguments go to :func:`plexus.testing.run_gateway` (``plugins=``,
    ``environ=``, ``grace=``...).

``plexus_receiver_factory``
    Call it with :class:`~plexus.testing.Receiver` keyword arguments to get
    more (started) receivers; all are stopped at teardown::

        def test_splits_on_413(plexus_receiver_factory):
            rx = plexus_receiver_factory(max_body_bytes=64 * 1024)

The plugin is loaded through the ``pytest11`` entry point (or
``pytest_plugins = ["plexus.pytest_plugin"]`` in a conftest). plexus.testing
is imported inside the fixtures so that merely loading the plugin costs every
pytest run nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from pathlib import Path

    from plexus.testing import GatewayRun, Receiver

__all__ = ["plexus_device", "plexus_gateway", "plexus_receiver", "plexus_receiver_factory",
           "plexus_run_command"]


@pytest.fixture
def plexus_receiver() -> Iterator[Receiver]:
    """A started Plexus-compatible receiver accepting the key ``plx_test``."""
    from plexus.testing import Receiver

    with Receiver(api_keys=("plx_test",)) as receiver:
        yield receiver


@pytest.fixture
def plexus_receiver_factory() -> Iterator[Callable[..., Receiver]]:
    """Make started receivers from Receiver keyword arguments; all stopped at teardown."""
    from plexus.testing import Receiver

    made: list[Receiver] = []

    def make(**kwargs: Any) -> Receiver:
        receiver = Receiver(**kwargs)
        made.append(receiver)  # before start(), so a half-started one is stopped too
        return receiver.start()

    yield make
    for receiver in made:
        receiver.stop()


@pytest.fixture
def plexus_gateway(plexus_receiver: Receiver, tmp_path: Path,
                   ) -> Iterator[Callable[..., GatewayRun]]:
    """``start(rig_text, **run_gateway_options)``: a started gateway delivering to
    ``plexus_receiver``; every one is stopped at teardown."""
    from plexus.testing import run_gateway

    started: list[GatewayRun] = []

    def start(rig: str, **options: Any) -> GatewayRun:
        options.setdefault("receiver", plexus_receiver)
        options.setdefault("folder", tmp_path)
        run = run_gateway(rig, **options)
        started.append(run)
        return run

    yield start
    for run in started:
        run.stop()


@pytest.fixture
def plexus_device(plexus_receiver: Receiver) -> Any:
    """The device WebSocket of ``plexus_receiver`` (a DeviceServer)."""
    return plexus_receiver.device


@pytest.fixture
def plexus_run_command(plexus_receiver: Receiver) -> Callable[..., Any]:
    """``run(command, params=None, *, source_id=None, legacy=False, timeout=10, **run_options)``:
    wait for the device, run the command, return its final status (a RunResult,
    or a LegacyResult with ``legacy=True``)."""
    device = plexus_receiver.device

    def run(command: str, params: dict[str, Any] | None = None, *,
            source_id: str | None = None, legacy: bool = False, timeout: float = 10.0,
            **options: Any) -> Any:
        if not device.wait_connected(source_id, timeout):
            raise AssertionError(f"no device connected to {plexus_receiver.ws_url} within "
                                 f"{timeout:g} s")
        if legacy:
            return device.call(command, params, source_id, timeout)
        return device.run(command, params, source_id=source_id, timeout=timeout, **options)

    return run
