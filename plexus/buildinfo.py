"""When this package was built: the earliest time a trustworthy clock can show.

``BUILD_DATE`` is written by ``tools/stamp_build_date.py`` when a release is
built (from ``SOURCE_DATE_EPOCH`` when set, else the date of the commit being
built), so a wheel carries the day it was made. A system clock earlier than
this day cannot be right: the board booted without a real-time clock and
without network time (docs/time.md). ``plexus-gateway --version`` shows it;
the rig option ``clock.not_before`` moves the floor later.
"""

BUILD_DATE = "2026-12-01"
