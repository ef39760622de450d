"""The exceptions plexus raises.

Every exception derives from :class:`PlexusError`, so ``except PlexusError``
catches anything this package raises on purpose. Validation errors are also
``ValueError`` (or ``TypeError`` for a value of the wrong type) so code that
already handles those built-ins keeps working::

    PlexusError
    ├── ConfigError            (also ValueError) bad rig file or constructor option
    │   └── InvalidOptions     several problems of one entry's options, each at its key
    ├── ValidationError        (also ValueError) a point the platform would reject
    │   └── PointTypeError     (also TypeError)  a value/tag/timestamp of the wrong type
    ├── AuthenticationError    missing API key, or the platform answered 401/403
    ├── DeliveryError          the network or the platform failed after retries
    │   └── RateLimitedError   (never raised here; kept for code written for the official SDK)
    ├── BufferingError         a point could not be buffered
    │   └── ClientClosedError  send() after close()
    ├── PluginError            a plugin failed to load or registered a bad name
    ├── CommandDeclarationError (also ValueError) a remote command declared wrongly
    ├── UnsupportedError       an official-SDK feature that needs the hosted platform's API
    ├── AdapterError           a source failed (missing driver, bad option...)
    └── SinkError              a sink failed to send a batch
        └── RetryableSinkError the failure is temporary: retry the same batch

No exception message ever contains the API key.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


class PlexusError(Exception):
    """Root of every error raised by plexus."""


class ConfigError(PlexusError, ValueError):
    """A configuration value is wrong; the message names where and what was expected."""


class InvalidOptions(ConfigError):
    """Several problems in one adapter's or sink's options, each at its key.

    Raise it from an options class's ``__post_init__`` (or a pydantic model
    validator) to report every cross-field problem at once; the rig loader
    shows each at its own key and line
    (``rig.yaml:9: adapters[1].pattern: only used with format: regex``)::

        problems = []
        if self.format == "regex" and self.pattern is None:
            problems.append(("pattern", "format: regex needs a pattern"))
        if problems:
            raise InvalidOptions(problems)

    Parameters:
        problems: ``(key, message)`` pairs, or a mapping of key to message;
            the key ``""`` means the entry as a whole.
    """

    def __init__(self, problems: Iterable[tuple[str, str]] | Mapping[str, str]) -> None:
        pairs = problems.items() if isinstance(problems, Mapping) else problems
        self.problems: list[tuple[str, str]] = [(str(k), str(m)) for k, m in pairs]
        super().__init__("; ".join(f"{key}: {message}" if key else message
                                   for key, message in self.problems))


class ValidationError(PlexusError, ValueError):
    """A point breaks a rule of the ingest protocol; nothing was buffered."""


class PointTypeError(ValidationError, TypeError):
    """A point's value, tag or timestamp has a type the protocol cannot carry."""


class AuthenticationError(PlexusError):
    """No API key was found, or the platform rejected it (HTTP 401/403)."""


class DeliveryError(PlexusError):
    """Delivery failed after every retry; the data is still buffered."""


class RateLimitedError(DeliveryError):
    """The official SDK's "the platform dropped data at its rate ceiling".

    Never raised by this package: points the platform turns away at its
    per-source ceiling are sent again until stored, so nothing is lost there.
    The name exists so code written for the SDK (``except RateLimitedError``)
    keeps working; see docs/migrating.md.
    """


class BufferingError(PlexusError):
    """A point could not be put in the buffer."""


class ClientClosedError(BufferingError):
    """The client or pipeline was closed; it accepts no more points."""


class PluginError(PlexusError):
    """A plugin could not be loaded or registered something invalid."""


class CommandDeclarationError(PlexusError, ValueError):
    """A remote command's declaration breaks a rule (name, params, danger, expiry...)."""


class UnsupportedError(PlexusError):
    """An official-SDK method this package does not offer (video, test runs):
    it needs the hosted platform's own API. The message says what to use instead."""


class AdapterError(PlexusError):
    """An adapter (source) could not be built or started."""


class SinkError(PlexusError):
    """A sink could not deliver a batch."""


class RetryableSinkError(SinkError):
    """A temporary failure: the same batch should be sent again later.

    ``retry_after`` (seconds), when set, overrides the exponential backoff;
    the HTTP sink uses it for the platform's per-source rate ceiling.
    """

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
