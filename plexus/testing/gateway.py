"""Run a whole gateway from a rig text inside a test: the stable way to test a plugin.

    from plexus.testing import Receiver, run_gateway

    def test_my_adapter(plexus_receiver, tmp_path):
        rig = '''
        adapters:
          - type: bme280
            interval: 0.05
        '''
        with run_gateway(rig, receiver=plexus_receiver, folder=tmp_path) as gw:
            assert gw.wait_until(lambda: plexus_receiver.count >= 10)
            assert gw.adapter("bme280")["state"] == "connected"
        assert "env.temperature" in plexus_receiver.metrics()

:func:`run_gateway` loads the rig text the way ``plexus-gateway --config``
loads a file (the same plugins, the same checks and messages), builds the
gateway, starts it, and stops it when the ``with`` block ends (delivering
what is buffered for up to ``grace`` seconds). :func:`check_rig` is
``--check`` for a rig text. Neither writes anything outside ``folder``
(the rig's memory buffer is the default; ``source_id`` is always set, so
``~/.plexus/config.json`` is neither read for it nor written).

The gateway object itself (``GatewayRun.gateway``) is the package's
internals and may change between releases; what this module offers does not
without a deprecation period.
"""

from __future__ import annotations

import textwrap
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from plexus.testing.receiver import Receiver

__all__ = ["GatewayRun", "check_rig", "run_gateway"]

#: ``source_id`` given to a rig text that names none.
TEST_SOURCE_ID = "test-rig"


class GatewayRun:
    """A started gateway built from a rig text (see :func:`run_gateway`).

    Attributes:
        config: the loaded rig (``RigConfig``): ``config.adapters[i].options``...
        gateway: the running ``plexus.gateway.Gateway`` (internals; may change).
    """

    def __init__(self, gateway: Any, grace: float) -> None:
        self.gateway = gateway
        self.config = gateway.config
        self._grace = grace
        self._stopped = False

    def status(self) -> dict[str, Any]:
        """What ``plexus-gateway`` shows and logs as status, as a dict:

        ``source_id``, ``uptime``, ``session``, ``adapters`` (each ``name``,
        ``type``, ``state``, ``points``, ``errors``, ``last_error``,
        ``last_point_age``, ``details``: the adapter's ``health_extra()``) and
        ``sinks`` (each ``name``, ``state`` ("open", or "opening" while its
        ``open()`` fails and is retried), ``delivered``, ``buffered``,
        ``dropped``, ``rejected``, ``since_last_upload``, ``last_error``).
        """
        return self.gateway.status()  # type: ignore[no-any-return]

    def adapter(self, name: str) -> dict[str, Any]:
        """One adapter's entry of :meth:`status`, by its name in the rig."""
        return _named(self.status()["adapters"], name, "adapter")

    def sink(self, name: str) -> dict[str, Any]:
        """One sink's entry of :meth:`status`, by its name in the rig."""
        return _named(self.status()["sinks"], name, "sink")

    def wait_until(self, condition: Callable[[], object], timeout: float = 10.0,
                   interval: float = 0.02) -> bool:
        """Poll ``condition`` until it is true; False if ``timeout`` seconds pass first."""
        deadline = time.monotonic() + timeout
        while True:
            if condition():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval)

    def flush(self, timeout: float = 10.0) -> None:
        """Deliver everything buffered now, to every sink (raises DeliveryError if it cannot)."""
        self.gateway.pipeline.flush(timeout)

    def stop(self, grace: float | None = None) -> None:
        """Stop the adapters, deliver for up to ``grace`` seconds, close everything.

        Called by the ``with`` block; calling it again does nothing.
        """
        if not self._stopped:
            self._stopped = True
            self.gateway.shutdown(self._grace if grace is None else grace)

    def __enter__(self) -> GatewayRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_gateway(
    rig: str,
    *,
    receiver: Receiver | None = None,
    folder: str | Path | None = None,
    plugins: Mapping[str, ModuleType] | None = None,
    environ: Mapping[str, str] | None = None,
    grace: float = 2.0,
) -> GatewayRun:
    """Load ``rig`` (YAML text), build the gateway and start it.

    Parameters:
        rig: the rig file's text; indentation common to every line is removed.
        receiver: a started :class:`~plexus.testing.Receiver`: a rig that names
            no ``gateway_url``, ``api_key`` or ``source_id`` gets the receiver's
            URL, a key it accepts and ``test-rig``, and a rig without a
            ``batch:`` section uploads every 0.05 s.
        folder: where the rig "is": relative paths in it are resolved against
            this folder (default: the current one).
        plugins: plugin modules to load besides the installed ones, by name
            (a plugin under test that is not pip-installed yet).
        environ: the variables for ``${...}`` in the rig (default: os.environ).
        grace: seconds :meth:`GatewayRun.stop` allows to deliver at the end.

    Raises:
        ConfigErrors: the rig is invalid (every problem, ``rig.yaml:LINE: ...``),
            or something in it cannot be built.
    """
    gateway = _build(rig, receiver, folder, plugins, environ, check_only=False)
    try:
        gateway.start()
    except BaseException:
        gateway.shutdown(0)
        raise
    return GatewayRun(gateway, grace)


def check_rig(
    rig: str,
    *,
    receiver: Receiver | None = None,
    folder: str | Path | None = None,
    plugins: Mapping[str, ModuleType] | None = None,
    environ: Mapping[str, str] | None = None,
    online: bool = False,
) -> list[str]:
    """``plexus-gateway --check`` for a rig text: every problem as the command prints it.

    An empty list means the rig would start. Invalid rig text is reported
    here too (one string per problem) rather than raised.
    """
    from plexus.config import ConfigErrors
    from plexus.preflight import check_gateway

    try:
        gateway = _build(rig, receiver, folder, plugins, environ, check_only=True)
    except ConfigErrors as exc:
        return [str(problem) for problem in exc.errors]
    try:
        return [str(problem) for problem in check_gateway(gateway, online=online)]
    finally:
        gateway.pipeline.close(0)


def _build(rig: str, receiver: Receiver | None, folder: str | Path | None,
           plugins: Mapping[str, ModuleType] | None, environ: Mapping[str, str] | None,
           *, check_only: bool) -> Any:
    import yaml

    from plexus.config import load_config_text
    from plexus.gateway import Gateway
    from plexus.plugins import load_plugins

    text = textwrap.dedent(rig).strip("\n") + "\n"
    try:
        given = yaml.safe_load(text)
    except yaml.YAMLError:
        given = None  # the loader reports it, with its line
    keys = set(given) if isinstance(given, dict) else set()
    # Added after the rig's own lines, so the line numbers in messages stay the test's.
    extra = [] if "source_id" in keys else [f"source_id: {TEST_SOURCE_ID}"]
    if receiver is not None:
        if "gateway_url" not in keys:
            extra.append(f"gateway_url: {receiver.url}")
        if "api_key" not in keys:
            extra.append(f"api_key: {receiver.api_key}")
        if "batch" not in keys:
            extra.append("batch: {interval: 0.05}")
    if keys or not given:
        text += "".join(f"{line}\n" for line in extra)
    registry = load_plugins(extra=dict(plugins or {}))
    base = Path(folder) if folder is not None else Path.cwd()
    config = load_config_text(text, str(base / "rig.yaml"), adapter_types=registry.adapters,
                              sink_types=registry.sinks, environ=environ)
    return Gateway(config, registry, check_only=check_only)


def _named(entries: list[dict[str, Any]], name: str, kind: str) -> dict[str, Any]:
    for entry in entries:
        if entry["name"] == name:
            return entry
    known = ", ".join(e["name"] for e in entries) or "none"
    raise KeyError(f"no {kind} named {name!r} (the rig has: {known})")
