"""Bad input: a bad point among good ones end to end, and hostile config files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from plexus import PlexusError
from tests.reliability.support import REPO, child_env, make_client, values

GATEWAY = [sys.executable, "-m", "plexus.cli"]

BAD_VALUES = [float("nan"), float("inf"), None, b"bytes", object(), "x" * 300,
              {"deep": "y" * 5000}, 2**70]


def test_bad_points_among_good_ones_lose_nothing_else(plexus_receiver):
    """Each bad point raises at send()/send_batch() and buffers nothing; every good point
    sent before and after it arrives, once."""
    good = []
    with make_client(plexus_receiver) as px:
        n = 0
        for bad in BAD_VALUES:
            for _ in range(50):
                px.send("seq", n)
                good.append(n)
                n += 1
            with pytest.raises(PlexusError):
                px.send("seq", bad)
            with pytest.raises(PlexusError):
                px.send("", 1.0)  # empty metric
            with pytest.raises(PlexusError):
                px.send("seq", 1.0, tags={"k": [5]})  # type: ignore[dict-item]
            with pytest.raises(PlexusError):
                px.send("seq", 1.0, timestamp=float("nan"))
            batch = [("seq", n + i) for i in range(20)]
            with pytest.raises(PlexusError, match=r"points\[7\]"):
                px.send_batch(batch[:7] + [("seq", bad)] + batch[7:])  # all or nothing
            px.send_batch(batch)
            good += [n + i for i in range(20)]
            n += 20
        px.flush_buffer(timeout=30)
        assert px.stats.rejected == 0
    stored = values(plexus_receiver)
    assert sorted(stored) == sorted(good)


# --- hostile config files through `python -m plexus.cli --config X --check` --------------------


def run_check(path: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GATEWAY, "--config", str(path), "--check"], capture_output=True,
                          text=True, timeout=timeout, env=child_env(), cwd=REPO)


def _nested(depth: int) -> str:
    return "tags: " + "[" * depth + "]" * depth + "\n"


def _nested_maps(depth: int) -> str:
    text = "x"
    for _ in range(depth):
        text = "{k: " + text + "}"
    return "session_tags: " + text + "\n"


NASTY = {
    "binary garbage": (os.urandom(4096) + b"\xff\xfe", ["not UTF-8"]),
    "empty file": (b"", ["empty"]),
    "only a comment": (b"# nothing here\n", ["empty"]),
    "NUL bytes": (b"source_id: a\x00b\n", ["invalid YAML"]),
    "a list at the top": (b"- a\n- b\n", ["top level must be a mapping"]),
    "a scalar at the top": (b"just words\n", ["top level must be a mapping"]),
    "python tag": (b'x: !!python/object/apply:os.system ["echo pwned"]\n',
                   ["unsupported YAML tag"]),
    "self-referencing alias": (b"tags: &a [*a]\n", ["alias"]),
    "wrong types everywhere": (
        b"source_id: [1]\nbuffer: 5\nbatch: {size: -1, interval: fast}\nadapters: {}\n"
        b"tags: [1, 2]\nretry: {retries: 1.5}\nverify_tls: maybe\n",
        ["source_id", "buffer", "batch.size", "batch.interval", "adapters", "tags",
         "retry.retries", "verify_tls"]),
    "unknown keys": (b"sauce_id: a\nbuffer: {tipe: sqlite}\n", ["sauce_id", "buffer.tipe"]),
    "tab indentation": (b"buffer:\n\ttype: sqlite\n", ["invalid YAML"]),
    "very long line": (b"source_id: " + b"a" * 2_000_000 + b"\n", ["source_id"]),
    "nested 100 deep": (_nested(100).encode(), ["tags"]),
}


@pytest.mark.parametrize("name", list(NASTY))
def test_hostile_config_gives_messages_not_tracebacks(tmp_path, name):
    content, words = NASTY[name]
    path = tmp_path / "rig.yaml"
    path.write_bytes(content)
    result = run_check(path)
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.returncode == 78  # ExitCode.CONFIG, (result.returncode, result.stderr[-2000:])
    for word in words:
        assert word in result.stderr, (word, result.stderr[-2000:])
    assert not (tmp_path / "pwned").exists()


def test_config_path_that_is_a_directory(tmp_path):
    result = run_check(tmp_path)
    assert "Traceback" not in result.stderr
    assert result.returncode == 78  # ExitCode.CONFIG and "Is a directory" in result.stderr, result.stderr


def test_config_path_that_does_not_exist(tmp_path):
    result = run_check(tmp_path / "nope.yaml")
    assert "Traceback" not in result.stderr
    assert result.returncode == 78  # ExitCode.CONFIG and "No such file" in result.stderr, result.stderr


@pytest.mark.parametrize("text", [_nested(5000), _nested_maps(2000)],
                         ids=["lists-5000-deep", "mappings-2000-deep"])
def test_deeply_nested_junk_is_a_message(tmp_path, text):
    path = tmp_path / "rig.yaml"
    path.write_text(text)
    result = run_check(path)
    assert "Traceback" not in result.stderr, result.stderr[-600:]
    assert result.returncode == 78  # ExitCode.CONFIG


BOMB = (
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    'b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n'
    'c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n'
    'd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n'
    'e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n'
    'f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n'
    'g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\n'
    'h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]\n'
    'tags: [*h,*h,*h,*h,*h,*h,*h,*h,*h]\n'
)


def test_alias_bomb_is_rejected_quickly(tmp_path):
    path = tmp_path / "rig.yaml"
    path.write_text(BOMB)
    try:
        result = subprocess.run([*GATEWAY, "--config", str(path), "--check"],
                                capture_output=True, text=True, timeout=5, env=child_env(),
                                cwd=REPO, preexec_fn=_limit_memory)
    except subprocess.TimeoutExpired:
        pytest.fail("--check was still expanding aliases after 5 s")
    assert "Traceback" not in result.stderr, result.stderr[-600:]
    assert result.returncode == 78  # ExitCode.CONFIG


def _limit_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
