"""What lets code written for the official SDK (plexus-python 0.16) run here.

Thin adapters only: each maps an SDK name onto what this package already
does (the pipeline, the buffer, the uploader's :class:`RetryPolicy`). The
side-by-side table is docs/migrating.md.

- :class:`RetryConfig`: the SDK's retry settings, turned into our policy.
- :func:`positional_arguments`: ``Plexus(...)``'s positional arguments in
  either this package's order or the SDK's (see the function).
- :func:`note_ignored_endpoint`: the SDK's ``endpoint`` (its web app's URL,
  used for test runs) has no meaning here; said once per process.
- :func:`unsupported`: the error for the SDK features that need the hosted
  platform's video or test-run APIs.
"""

from __future__ import annotations

import logging
import random
import threading
from dataclasses import dataclass
from typing import Any

from plexus.errors import ConfigError, UnsupportedError
from plexus.uploader import RetryPolicy

log = logging.getLogger("plexus.client")

#: ``Plexus()``'s positional parameters after ``api_key``, in this package's order.
OUR_ORDER = ("source_id", "gateway_url")
#: ... and in the official SDK's order (plexus-python 0.16).
SDK_ORDER = ("endpoint", "source_id", "timeout", "retry_config", "max_buffer_size",
             "persistent_buffer", "buffer_path", "ws_url")


def _looks_like_url(value: object) -> bool:
    # A source id may only hold [a-z0-9._-], so anything with "://" is never one.
    return isinstance(value, str) and "://" in value


def positional_arguments(args: tuple[Any, ...], given: dict[str, Any],
                         defaults: dict[str, Any]) -> dict[str, Any]:
    """Name ``Plexus()``'s positional arguments after ``api_key``.

    The second positional argument is ``source_id`` here and ``endpoint`` (a
    URL) in the official SDK, whose third is ``source_id``. A source id can
    never contain ``://``, so the order is told apart by the values, never
    guessed: a URL in second place, or None there followed by something that
    is not a URL, means the SDK's order; anything else is ours, where a URL
    or an invalid id in the wrong place fails loudly at construction. No
    reading of either order can put data under another source id than the
    one written.

    Parameters:
        args: the positional arguments after ``api_key``.
        given: the keyword arguments' values, by name.
        defaults: their defaults; a keyword that differs from its default was
            passed, and passing it positionally too is an error.

    Returns:
        ``given`` with the positional arguments filled in.

    Raises:
        TypeError: more positional arguments than the order has, or a value
            given both by position and by name.
    """
    if not args:
        return given
    sdk = _looks_like_url(args[0]) or (
        args[0] is None and len(args) > 1 and args[1] is not None
        and not _looks_like_url(args[1])
    )
    order = SDK_ORDER if sdk else OUR_ORDER
    if len(args) > len(order):
        raise TypeError(
            f"Plexus() takes at most {len(order) + 1} positional arguments here "
            f"(api_key, {', '.join(order)}), got {len(args) + 1}; pass the others by name"
        )
    merged = dict(given)
    for name, value in zip(order, args, strict=False):  # args may be shorter
        if given[name] != defaults[name]:
            raise TypeError(f"Plexus() got multiple values for argument {name!r}")
        merged[name] = value
    return merged


_endpoint_noted = threading.Event()


def note_ignored_endpoint(endpoint: str) -> None:
    """Say once per process that ``endpoint=`` changes nothing here."""
    if _endpoint_noted.is_set():
        return
    _endpoint_noted.set()
    log.info("endpoint=%r is ignored: in the official SDK it is the web app's URL, used "
             "for test runs, which this package does not offer; telemetry goes to "
             "gateway_url (PLEXUS_GATEWAY_URL) as it does in the SDK", endpoint)


def unsupported(feature: str, instead: str) -> UnsupportedError:
    """The error raised by an SDK method this package does not offer."""
    return UnsupportedError(
        f"{feature} needs the hosted Plexus platform's own API, which this package does "
        f"not speak (it delivers telemetry over POST /ingest and commands over the device "
        f"link); {instead}. See docs/migrating.md."
    )


@dataclass
class RetryConfig:
    """The official SDK's retry settings; pass it as ``Plexus(retry_config=...)``.

    It becomes this package's :class:`~plexus.RetryPolicy` (see
    :meth:`to_policy`): ``max_retries`` retries after a failed upload, waiting
    ``base_delay * exponential_base**n`` seconds before retry ``n`` (from 0),
    never more than ``max_delay``.

    Parameters:
        max_retries: retries after the first attempt of a delivery cycle.
        base_delay: seconds before the first retry.
        max_delay: no pause is longer than this.
        exponential_base: each pause is this many times the previous one.
        jitter: move each pause randomly, so devices that failed together do
            not retry in step.
    """

    max_retries: int = 3
    base_delay: float = 1.0
    max_delay: float = 30.0
    exponential_base: float = 2.0
    jitter: bool = True

    def get_delay(self, attempt: int) -> float:
        """The SDK's pause before retry ``attempt`` (from 0): the exponential
        delay capped at ``max_delay``, and with ``jitter`` a random 50-100% of
        it. Kept for code that calls it; the uploader's own pauses are
        :meth:`to_policy`'s (centred on the same delays, +-25%)."""
        delay = min(self.base_delay * self.exponential_base ** attempt, self.max_delay)
        if self.jitter:
            delay *= random.uniform(0.5, 1.0)
        return delay

    def to_policy(self) -> RetryPolicy:
        """This configuration as the uploader's policy.

        Raises:
            ConfigError: a negative count or delay, or a base below 1 (pauses
                that shrink).
        """
        if self.max_retries < 0 or self.base_delay < 0 or self.max_delay < 0:
            raise ConfigError(f"RetryConfig values must not be negative: {self}")
        if self.exponential_base < 1:
            raise ConfigError(f"RetryConfig.exponential_base must be at least 1, got "
                              f"{self.exponential_base}")
        return ScaledRetryPolicy(retries=int(self.max_retries), base=float(self.base_delay),
                                 max_delay=float(self.max_delay),
                                 jitter=0.25 if self.jitter else 0.0,
                                 factor=float(self.exponential_base))


@dataclass(frozen=True)
class ScaledRetryPolicy(RetryPolicy):
    """A :class:`RetryPolicy` whose pauses grow by ``factor`` instead of 2."""

    factor: float = 2.0

    def delay(self, retry: int, rng: random.Random | None = None) -> float:
        nominal = self.base * (self.factor ** retry)
        spread = (rng or random).uniform(1 - self.jitter, 1 + self.jitter)
        return min(self.max_delay, nominal * spread)
