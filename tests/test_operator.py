"""The operator's first hour (issue 12), through the installed ``plexus-gateway`` command.

Each test reproduces one rough edge a new user hit, and shows what they see now.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from plexus.exitcodes import ExitCode

REPO = Path(__file__).resolve().parent.parent
COMMAND = shutil.which("plexus-gateway", path=str(Path(sys.executable).parent)) \
    or str(Path(sys.executable).parent / "plexus-gateway")
DBC = REPO / "plexus" / "data" / "msxii_system_can.dbc"
CAPTURE = REPO / "plexus" / "data" / "msxii_battery_vt.log"
FUNCS = "tests.gateway_funcs"


def gw(*args: str, env: dict[str, str] | None = None, cwd: Path = REPO,
       timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([COMMAND, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def write(tmp_path: Path, text: str, name: str = "rig.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o600)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- 1. a CLI that explains itself ---------------------------------------------------------

SUBCOMMANDS = ["run", "plugins", "options", "schema", "send", "buffer", "receiver", "help"]


def test_bare_command_and_help_show_every_subcommand_and_examples():
    bare = gw()
    assert bare.returncode == ExitCode.USAGE  # a question, not a run
    assert "--config/-c" not in bare.stderr and "required" not in bare.stderr
    for result in (bare, gw("help"), gw("--help")):
        for name in SUBCOMMANDS:
            assert re.search(rf"^  {name} ", result.stdout, re.M), (name, result.stdout)
        assert result.stdout.count("plexus-gateway --config") + result.stdout.count(
            "plexus-gateway send") >= 3
        assert "examples:" in result.stdout
    assert gw("help").returncode == ExitCode.OK


def test_version_names_package_python_and_adapter_extras():
    from plexus import __version__

    result = gw("--version")
    assert result.returncode == 0
    assert f"plexus-gateway {__version__}" in result.stdout
    assert f"Python {sys.version_info.major}.{sys.version_info.minor}" in result.stdout
    for extra in ("can", "mqtt", "mavlink", "serial"):
        assert re.search(rf"^  {extra} +installed \(", result.stdout, re.M), result.stdout
    assert "python-can" in result.stdout and "paho-mqtt" in result.stdout


@pytest.mark.parametrize("command", ["receiver", "send", "options", "schema", "buffer",
                                     "plugins", "run"])
def test_each_subcommand_has_its_own_help(command):
    for args in ((command, "--help"), ("help", command)):
        result = gw(*args)
        assert result.returncode == 0, result.stderr
        prog = "plexus-gateway" if command == "run" else f"plexus-gateway {command}"
        assert result.stdout.startswith(f"usage: {prog}"), result.stdout[:200]
        assert "python -m" not in result.stdout


def test_unknown_names_are_errors_with_a_suggestion():
    result = gw("sned", "x", "1")
    assert result.returncode == ExitCode.USAGE
    assert "unknown command 'sned' (did you mean 'send'?)" in result.stderr
    result = gw("options", "mqt")
    assert result.returncode == ExitCode.USAGE
    assert "unknown adapter or sink type 'mqt' (did you mean 'mqtt'?)" in result.stderr
    assert result.stdout == ""
    result = gw("--config", "configs/demo.yaml", "--chek")
    assert result.returncode == ExitCode.USAGE
    assert "did you mean --check?" in result.stderr


def test_options_lists_only_keys_the_loader_accepts(tmp_path):
    from plexus.config import GatewaySettings, describe_options

    result = gw("options")
    assert result.returncode == 0
    top = result.stdout.split("## adapter", 1)[0]
    assert "| `path` |" not in top  # the old, rejected top-level key
    keys = {row[0].split(".")[0] for row in describe_options(GatewaySettings)}
    for key in keys:
        assert f"| `{key}" in top, key
    # Every documented top-level key loads (with its default value written out).
    rig = write(tmp_path, "".join(f"{key}: {{}}\n" if key in ("tags", "session_tags", "buffer",
                                                             "batch", "retry", "local_receiver")
                                  else f"{key}: null\n" if key in ("source_id", "api_key",
                                                                   "gateway_url", "session")
                                  else "" for key in sorted(keys)))
    assert "unknown key" not in gw("--config", str(rig), "--check").stderr


def test_type_descriptions_are_whole_sentences():
    result = gw("options")
    paragraphs = re.findall(r"^## (?:adapter|sink) `(\w+)`.*\n\n(.+)\n", result.stdout, re.M)
    assert {name for name, _ in paragraphs} >= {"can", "mqtt", "mavlink", "serial", "callable"}
    for name, text in paragraphs:
        assert text.rstrip().endswith("."), (name, text)
    assert "and emits" not in dict(paragraphs)["can"].rsplit(".", 1)[-1]


def test_exit_codes_are_documented_in_a_table():
    from plexus.exitcodes import ExitCode

    doc = (REPO / "docs" / "cli.md").read_text()
    for code in ExitCode:
        assert re.search(rf"^\| {code.value} \| `{code.name}` \|", doc, re.M), code


# --- 2. --check catches what will fail -------------------------------------------------------


def test_check_reports_every_startup_failure_at_once_with_lines_and_names(tmp_path):
    rig = write(tmp_path, f"""\
source_id: Bad Id!
api_key: plx_k
adapters:
  - type: can
    name: vehicle-can
    replay: missing.log
    dbc: [powertrain.dbc]
  - type: callable
    name: sensor
    function: no_such_module:read
  - type: callable
    name: slow
    function: {FUNCS}:number
    metric: m
    interval: -5
  - type: mqtt
    name: telemetry
    topics: [a/#]
    tls: true
    ca_certs: certs/ca.pem
""")
    result = gw("--config", str(rig), "--check")
    assert result.returncode == ExitCode.CONFIG, result.stderr
    err = result.stderr
    # The file's own rules first, all of them...
    assert f"{rig}:1: source_id: source_id 'Bad Id!' is invalid" in err
    assert f"{rig}:15: adapters[2].interval: must be greater than 0, got -5.0" in err
    assert "2 problems:" in err
    # ...then, once the file is valid, everything that would fail at start, together.
    rig.write_text(rig.read_text().replace("interval: -5", "interval: 5")
                   .replace("Bad Id!", "rig-01"))
    result = gw("--config", str(rig), "--check")
    err = result.stderr
    assert result.returncode == ExitCode.CONFIG, err
    assert "Traceback" not in err
    assert f"{rig}:8: adapters[1] (sensor): cannot load function 'no_such_module:read'" in err
    assert f"{rig}:4: adapters[0] (vehicle-can): CAN database not found: " \
           f"{tmp_path / 'powertrain.dbc'}" in err
    assert f"{rig}:4: adapters[0] (vehicle-can): replay file not found: " \
           f"{tmp_path / 'missing.log'}" in err
    assert f"{rig}:16: adapters[3] (telemetry): ca_certs: file not found: " \
           f"{tmp_path / 'certs' / 'ca.pem'}" in err
    assert "4 problems found" in err


def test_the_shipped_rig_fails_check_until_its_dbc_exists(tmp_path):
    result = gw("--config", "configs/rig.yaml", "--check", env={"PLEXUS_API_KEY": "plx_k"})
    assert result.returncode == ExitCode.CONFIG
    assert "adapters[0] (vehicle-can): CAN database not found" in result.stderr
    assert "powertrain.dbc" in result.stderr


def test_check_without_any_api_key_fails_and_says_what_to_set(tmp_path):
    rig = write(tmp_path, f"adapters:\n  - type: callable\n    function: {FUNCS}:number\n"
                          "    metric: m\n")
    result = gw("--config", str(rig), "--check")
    assert result.returncode == ExitCode.AUTH
    assert "PLEXUS_API_KEY" in result.stderr and "api_key:" in result.stderr
    assert "Plexus(api_key" not in result.stderr


def test_check_online_asks_the_platform_about_the_key(tmp_path, plexus_receiver_factory):
    rx = plexus_receiver_factory(api_keys=["plx_good"])
    body = (f"source_id: rig-01\ngateway_url: {rx.url}\nadapters:\n  - type: callable\n"
            f"    function: {FUNCS}:number\n    metric: m\n")
    good = gw("--config", str(write(tmp_path, "api_key: plx_good\n" + body)), "--check",
              "--online")
    assert good.returncode == 0, good.stderr
    assert "online checks passed" in good.stdout
    bad = gw("--config", str(write(tmp_path, "api_key: plx_bad\n" + body, "bad.yaml")),
             "--check", "--online")
    assert bad.returncode == ExitCode.AUTH
    assert "refused the API key (401" in bad.stderr
    assert "plx_bad" not in bad.stderr
    assert rx.count == 0  # an empty points list stores nothing
    assert {r.status for r in rx.requests} == {200, 401}


def test_check_online_touches_brokers_ports_and_interfaces(tmp_path):
    broker_port = free_port()  # nobody listens there
    rig = write(tmp_path, f"""\
api_key: plx_k
gateway_url: http://127.0.0.1:{free_port()}
adapters:
  - type: mqtt
    topics: [a/#]
    port: {broker_port}
  - type: serial
    port: /dev/ttyNOSUCH9
  - type: can
    interface: socketcan
    channel: nosuchcan9
""")
    result = gw("--config", str(rig), "--check", "--online", timeout=120)
    err = result.stderr
    assert result.returncode == ExitCode.CONFIG, err
    assert f"{rig}:2: gateway_url: cannot reach the platform" in err
    assert f"{rig}:4: adapters[0] (mqtt): cannot connect to the broker at " \
           f"localhost:{broker_port}" in err
    assert f"{rig}:7: adapters[1] (serial): cannot open /dev/ttyNOSUCH9" in err
    assert f"{rig}:9: adapters[2] (can): cannot open CAN interface 'socketcan' channel " \
           "'nosuchcan9'" in err
    assert "plx_k" not in err
    # Offline, the same file is fine: nothing there is known to fail before it is tried.
    assert gw("--config", str(rig), "--check").returncode == 0


@pytest.mark.skipif(shutil.which("mosquitto") is None, reason="needs mosquitto")
def test_check_online_connects_to_a_real_broker(tmp_path):
    from tests.adapters.mosquitto import MosquittoBroker

    with MosquittoBroker(tmp_path / "broker") as broker:
        rig = write(tmp_path, f"api_key: plx_k\nlocal_receiver: {{enabled: true}}\n"
                              f"adapters:\n  - type: mqtt\n    topics: [a/#]\n"
                              f"    port: {broker.port}\n")
        result = gw("--config", str(rig), "--check", "--online")
    assert result.returncode == 0, result.stderr


def test_a_missing_rig_file_has_no_line_number(tmp_path):
    result = gw("--config", str(tmp_path / "nosuch.yaml"), "--check")
    assert result.returncode == ExitCode.CONFIG
    assert result.stderr.strip() == (f"plexus-gateway: {tmp_path / 'nosuch.yaml'}: cannot read "
                                     "the rig file: No such file or directory")


# --- 3. start-up and failure -----------------------------------------------------------------


def test_when_no_adapter_can_start_the_gateway_exits_non_zero_saying_why_once(tmp_path):
    rig = write(tmp_path, f"api_key: plx_k\nlocal_receiver: {{enabled: true}}\nadapters:\n"
                          f"  - type: can\n    replay: {CAPTURE}\n    dbc: [powertrain.dbc]\n")
    result = gw("--config", str(rig), "--duration", "5", "--no-status")
    assert result.returncode == ExitCode.UNAVAILABLE, result.stderr
    missing = tmp_path / "powertrain.dbc"
    assert "no adapter could start" in result.stderr
    assert f"{rig}:4: adapter can: CAN database not found: {missing}" in result.stderr
    assert "AdapterError" not in result.stderr and "can: can:" not in result.stderr
    assert result.stderr.count(str(missing)) == 2  # the log line, and the summary


def test_when_every_adapter_finishes_the_gateway_stops(tmp_path):
    rig = write(tmp_path, f"api_key: plx_k\nlocal_receiver: {{enabled: true}}\nadapters:\n"
                          f"  - type: can\n    replay: {CAPTURE}\n    dbc: [{DBC}]\n")
    started = time.monotonic()
    result = gw("--config", str(rig), "--no-status")  # no --duration: it must end by itself
    assert result.returncode == 0, result.stderr
    assert "every adapter has finished" in result.stderr
    assert time.monotonic() - started < 55


def test_run_without_a_key_refuses_to_start_and_names_what_to_set(tmp_path):
    rig = write(tmp_path, f"source_id: rig-01\nadapters:\n  - type: callable\n"
                          f"    function: {FUNCS}:number\n    metric: m\n")
    result = gw("--config", str(rig), "--duration", "5", "--no-status")
    assert result.returncode == ExitCode.AUTH
    assert "PLEXUS_API_KEY" in result.stderr and "Plexus(api_key" not in result.stderr
    assert "lost" not in result.stderr


def test_dry_run_starts_no_local_receiver():
    result = gw("--config", "configs/demo.yaml", "--dry-run", "--duration", "2", "--no-status")
    assert result.returncode == 0, result.stderr
    assert "local receiver" not in result.stdout + result.stderr
    assert "engine.rpm=" in result.stdout or "engine." in result.stdout


# --- send ---------------------------------------------------------------------------------


def test_send_without_a_key_says_one_clear_thing():
    result = gw("send", "engine.rpm", "3450", env={"PLEXUS_API_KEY": ""})
    assert result.returncode == ExitCode.AUTH
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--api-key" in lines[0] and "PLEXUS_API_KEY" in lines[0]
    assert "nothing was sent" in lines[0]
    assert "buffered" not in result.stderr and "lost" not in result.stderr


def test_send_takes_key_source_and_url_from_flags(plexus_receiver):
    result = gw("send", "engine.rpm", "3450", "--api-key", "plx_test", "--source-id", "shell-7",
                "--gateway-url", plexus_receiver.url, "--tag", "rig=A")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    (point,) = plexus_receiver.points
    assert (point["metric"], point["value"], point["source_id"], point["tags"]) == (
        "engine.rpm", 3450, "shell-7", {"rig": "A"})


def test_send_with_a_refused_key_or_no_platform_says_one_thing(plexus_receiver_factory):
    rx = plexus_receiver_factory(api_keys=["plx_good"])
    refused = gw("send", "m", "1", "--api-key", "plx_bad", "--gateway-url", rx.url,
                 "--timeout", "5")
    assert refused.returncode == ExitCode.AUTH
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "refused the API key" in refused.stderr and "plx_bad" not in refused.stderr
    down = gw("send", "m", "1", "--api-key", "plx_k", "--gateway-url",
              f"http://127.0.0.1:{free_port()}", "--timeout", "1")
    assert down.returncode == ExitCode.TEMPFAIL
    assert len(down.stderr.strip().splitlines()) == 1, down.stderr
    assert "could not deliver within 1 s" in down.stderr
    assert "the reading was not sent" in down.stderr


def test_send_a_bad_reading_is_a_data_error(plexus_receiver):
    result = gw("send", "m" * 300, "1", "--api-key", "k", "--gateway-url", plexus_receiver.url)
    assert result.returncode == ExitCode.DATA
    assert "metric must be 1..256 characters" in result.stderr
    assert plexus_receiver.count == 0


# --- 4. rig files on a schema ----------------------------------------------------------------


def test_schema_is_a_valid_json_schema_that_every_example_config_meets():
    jsonschema = pytest.importorskip("jsonschema")
    result = gw("schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for path in sorted((REPO / "configs").glob("*.yaml")):
        text = path.read_text()
        assert text.startswith("# yaml-language-server: $schema=rig.schema.json\n"), path
        errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(yaml.safe_load(text))]
        assert errors == [], (path, errors)
    # and it catches what the loader catches
    bad = {"batch": {"size": 0}, "adapters": [{"type": "mqtt", "topics": ["a"], "prot": 1}]}
    assert len(list(validator.iter_errors(bad))) >= 2


def test_shipped_schema_file_matches_the_code():
    sys.path.insert(0, str(REPO / "tools"))
    try:
        from gen_config_docs import schema_text
    finally:
        sys.path.pop(0)
    assert (REPO / "configs" / "rig.schema.json").read_text() == schema_text(), \
        "run: python tools/gen_config_docs.py"


def test_import_plexus_loads_neither_pydantic_nor_rich():
    code = ("import sys, plexus; print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'pydantic', 'pydantic_core', 'rich', 'annotated_types', 'yaml'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip() == "[]"


# --- 5. status that does not fight the logs ---------------------------------------------------


def _rig_with_receiver(tmp_path: Path) -> Path:
    return write(tmp_path, f"api_key: plx_k\nstatus_interval: 0.5\nlocal_receiver: "
                           f"{{enabled: true}}\nadapters:\n  - type: callable\n    name: seq\n"
                           f"    function: {FUNCS}:number\n    metric: m\n    interval: 0.05\n")


def test_status_lines_off_a_tty_show_points_per_second(tmp_path):
    result = gw("--config", str(_rig_with_receiver(tmp_path)), "--duration", "2")
    assert result.returncode == 0, result.stderr
    status = [line for line in result.stderr.splitlines() if "plexus.cli: status:" in line]
    assert status, result.stderr
    assert re.search(r"seq connected \d+\.\d pts/s \(\d+ points, 0 errors", status[-1])
    assert re.search(r"sink plexus \d+\.\d pts/s \(delivered \d+", status[-1])
    assert "\x1b[" not in result.stdout + result.stderr  # no terminal codes in a pipe


def test_json_logs_for_journald(tmp_path):
    result = gw("--config", str(_rig_with_receiver(tmp_path)), "--duration", "2",
                "--log-format", "json")
    assert result.returncode == 0, result.stderr
    entries = [json.loads(line) for line in result.stderr.splitlines()]
    assert {"time", "level", "logger", "message"} <= set(entries[0])
    statuses = [e["status"] for e in entries if "status" in e]
    assert statuses and statuses[-1]["adapters"][0]["name"] == "seq"
    assert statuses[-1]["sinks"][0]["delivered"] > 0


def test_live_table_on_a_tty_with_a_log_pane(tmp_path):
    leader, follower = pty.openpty()
    proc = subprocess.Popen([COMMAND, "--config", str(_rig_with_receiver(tmp_path)),
                             "--duration", "3"], stdin=follower, stdout=follower,
                            stderr=follower, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "120",
                                 "TERM": "xterm"})
    os.close(follower)
    out = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    proc.wait(timeout=30)
    os.close(leader)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.decode(errors="replace"))
    assert proc.returncode == 0, text[-2000:]
    assert "pts/s" in text and "delivered" in text and "seq" in text
    assert "log" in text and "local receiver listening" in text  # the log, inside its pane


# --- 6. docs that match the code ------------------------------------------------------------


def test_no_reference_to_an_unshipped_protocol_file():
    assert (REPO / "docs" / "protocol.md").is_file()
    files = [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "plexus").rglob("*.py")]
    offenders = [str(f.relative_to(REPO)) for f in files if "PROTOCOL" + ".md" in f.read_text()]
    assert offenders == []


def test_readme_says_it_replaces_the_official_sdk_and_installs_from_a_clone():
    readme = (REPO / "README.md").read_text()
    assert "plexus-python" in readme and "pip uninstall plexus-python" in readme
    assert "pip install 'plexus-gateway[all]'" not in readme


def test_readme_embed_snippet_runs_as_pasted_against_the_local_receiver(plexus_receiver):
    readme = (REPO / "README.md").read_text()
    snippet = readme.split("## Embed it", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    env = {**os.environ, "PLEXUS_API_KEY": "plx_test", "PLEXUS_GATEWAY_URL": plexus_receiver.url,
           "PLEXUS_SOURCE_ID": "readme-1"}
    result = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True,
                            timeout=60, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert plexus_receiver.count > 5
    assert "temperature" in {p["metric"] for p in plexus_receiver.points}
