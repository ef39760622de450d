"""The exit codes of ``plexus-gateway``, for scripts and systemd units to act on.

The numbers follow BSD ``sysexits.h`` where one fits, so they mean the same
as in other daemons (``RestartPreventExitStatus=78 77`` in a systemd unit
stops restarting a gateway whose config or key is wrong). docs/cli.md has
the table.
"""

from __future__ import annotations

import enum

__all__ = ["ExitCode"]


class ExitCode(enum.IntEnum):
    """What a ``plexus-gateway`` run ended with."""

    #: Success; also a run stopped by SIGINT/SIGTERM or ``--duration``.
    OK = 0
    #: A failure that has no code of its own (a buffer file that cannot be read...).
    FAILURE = 1
    #: Bad command line: an unknown command or option, a missing argument.
    USAGE = 2
    #: ``send``: the reading breaks a rule of the ingest protocol; nothing was sent.
    DATA = 65
    #: Nothing could start, or every adapter failed for good.
    UNAVAILABLE = 69
    #: Could not deliver now (network, platform down, timeout); trying again later may work.
    TEMPFAIL = 75
    #: No API key was found, or the platform refused it (HTTP 401/403).
    AUTH = 77
    #: The rig file is invalid, or ``--check`` found something that would fail.
    CONFIG = 78
