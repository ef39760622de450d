"""docs/plugins.md, followed as written: a second plugin built from the page alone.

Every file the tutorial writes is taken from the page (the code block after a
``<!-- file: path -->`` or ``<!-- append: path -->`` comment), the package is
installed with pip into this environment (no network: the build uses the
setuptools already here), listed and documented by ``plexus-gateway``, run
through ``plexus-gateway --config`` against a local receiver, and its own tests
(the tutorial's) are run with pytest.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGE = REPO / "docs" / "plugins.md"
_BLOCK = re.compile(r"<!-- (file|append|output): ([^>]+?) -->\n```[a-z]*\n(.*?)```\n", re.DOTALL)


def tutorial_blocks() -> list[tuple[str, str, str]]:
    return _BLOCK.findall(PAGE.read_text())


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None,
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "plexus.cli", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def tutorial_plugin(tmp_path_factory):
    root = tmp_path_factory.mktemp("tutorial")
    for action, path, text in tutorial_blocks():
        if action == "output":
            continue
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("a" if action == "append" else "w") as out:
            out.write(text)
    folder = root / "plexus-bme280sim"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", str(folder)], check=True, timeout=300)
    yield folder
    subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", "plexus-bme280sim"],
                   check=True, timeout=120)


def test_the_page_writes_a_whole_package():
    written = {(action, path) for action, path, _ in tutorial_blocks()}
    assert {("file", "plexus-bme280sim/pyproject.toml"),
            ("file", "plexus-bme280sim/plexus_bme280sim.py"),
            ("append", "plexus-bme280sim/plexus_bme280sim.py"),
            ("file", "plexus-bme280sim/rig.yaml"),
            ("file", "plexus-bme280sim/tests/test_bme280sim.py")} <= written


def test_the_plugin_is_listed_with_its_package(tutorial_plugin):
    result = cli("plugins", cwd=tutorial_plugin)
    assert result.returncode == 0, result.stderr
    rows = {tuple(line.split()) for line in result.stdout.splitlines()}
    assert ("adapter", "bme280", "plexus-bme280sim", "0.1.0") in rows
    assert ("sink", "csvfile", "plexus-bme280sim", "0.1.0") in rows


def test_the_options_table_on_the_page_is_what_the_command_prints(tutorial_plugin):
    shown = {command: text for action, command, text in tutorial_blocks() if action == "output"}
    for command, text in shown.items():
        args = command.split()[1:]  # "plexus-gateway options bme280"
        result = cli(*args, cwd=tutorial_plugin)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == text.strip(), command


def test_the_tutorial_rig_checks_and_runs_through_plexus_gateway(tutorial_plugin,
                                                                 plexus_receiver):
    check = cli("--config", "rig.yaml", "--check", cwd=tutorial_plugin)
    assert check.returncode == 0, check.stderr
    assert "adapter bme280 (type bme280)" in check.stdout
    # The page's rig, with the platform added as the page says.
    rig = (tutorial_plugin / "rig.yaml").read_text()
    platform = tutorial_plugin / "platform.yaml"
    platform.write_text(rig.replace("sinks:\n", "sinks:\n  - type: plexus\n")
                        + "batch: {interval: 0.1}\n")
    run = cli("--config", "platform.yaml", "--duration", "2", "--no-status", cwd=tutorial_plugin,
              env={"PLEXUS_API_KEY": "plx_test", "PLEXUS_GATEWAY_URL": plexus_receiver.url})
    assert run.returncode == 0, run.stderr
    assert "env.temperature=" in run.stdout  # the stdout sink
    metrics = plexus_receiver.metrics()
    assert {"env.temperature", "env.humidity", "env.pressure"} <= set(metrics)
    rows = (tutorial_plugin / "readings.csv").read_text().splitlines()
    assert rows[0] == "timestamp_ms,metric,value,tags"
    assert len(rows) - 1 == plexus_receiver.count
    assert all(point["source_id"] == "bench-1" for point in plexus_receiver.points)


def test_a_bad_address_is_refused_with_its_line(tutorial_plugin):
    rig = tutorial_plugin / "bad.yaml"
    rig.write_text((tutorial_plugin / "rig.yaml").read_text().replace("0x77", "0x78"))
    result = cli("--config", "bad.yaml", "--check", cwd=tutorial_plugin)
    assert result.returncode == 78
    assert ("bad.yaml:4: adapters[0].address: must be between 0x76 and 0x77, got 120"
            in result.stderr)


def test_the_tutorials_own_tests_pass(tutorial_plugin):
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "tests"], capture_output=True, text=True, timeout=300,
                            cwd=tutorial_plugin)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 passed" in result.stdout
