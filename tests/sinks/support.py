"""Helpers for the sink tests: a gateway built from YAML, a sink driven through a pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from plexus.buffer import MemoryBuffer
from plexus.config import load_config_text
from plexus.gateway import Gateway
from plexus.pipeline import Pipeline
from plexus.plugins import load_plugins
from plexus.sinks.base import Sink
from plexus.uploader import RetryPolicy
from tests.support import wait_until as wait_until  # re-exported for the tests here


def build_gateway(text: str, tmp_path: Path) -> Gateway:
    """A gateway from rig-file text, as ``plexus-gateway --config`` builds it."""
    registry = load_plugins()
    config = load_config_text(text, str(tmp_path / "rig.yaml"), adapter_types=registry.adapters,
                              sink_types=registry.sinks)
    return Gateway(config, registry)


def pipeline_for(sink: Sink, source_id: str = "rig-01", **uploader: Any) -> Pipeline:
    """A pipeline with one lane (memory buffer, fast retries) feeding ``sink``; started."""
    uploader.setdefault("interval", 0.05)
    uploader.setdefault("retry", RetryPolicy(retries=2, base=0.05, max_delay=0.3))
    pipeline = Pipeline(source_id)
    pipeline.add_lane(sink, MemoryBuffer(100_000), **uploader)
    pipeline.start()
    return pipeline

