"""Write the build date into plexus/buildinfo.py (run when a release is built).

    python tools/stamp_build_date.py            # SOURCE_DATE_EPOCH, else the commit date of HEAD
    python tools/stamp_build_date.py 2027-03-01 # a given day (UTC)

The date is the floor below which the gateway does not trust the system clock
(docs/time.md), so it must never be later than the day the package is built:
the commit date (or SOURCE_DATE_EPOCH, which reproducible builds set to it) is
at or before that day.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import date, datetime, timezone
from pathlib import Path

BUILDINFO = Path(__file__).resolve().parent.parent / "plexus" / "buildinfo.py"
_LINE = re.compile(r'^BUILD_DATE = "\d{4}-\d{2}-\d{2}"$', re.MULTILINE)


def build_day(argv: list[str]) -> date:
    if argv:
        return date.fromisoformat(argv[0])
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if not epoch:
        epoch = subprocess.run(["git", "log", "-1", "--format=%ct"], check=True,
                               capture_output=True, text=True,
                               cwd=BUILDINFO.parent).stdout.strip()
    return datetime.fromtimestamp(int(epoch), timezone.utc).date()


def stamp(day: date, path: Path = BUILDINFO) -> None:
    text = path.read_text()
    if not _LINE.search(text):
        raise SystemExit(f"{path}: no BUILD_DATE line to rewrite")
    path.write_text(_LINE.sub(f'BUILD_DATE = "{day.isoformat()}"', text))


def main() -> None:
    day = build_day(sys.argv[1:])
    stamp(day)
    print(f"{BUILDINFO}: BUILD_DATE = {day.isoformat()}")


if __name__ == "__main__":
    main()
