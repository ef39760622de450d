"""Can a file be written here? For ``--check`` (preflight) of buffers and sinks."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["cannot_write"]


def cannot_write(path: str | os.PathLike[str]) -> str | None:
    """Why a file at ``path`` could not be created or appended to; None if it can.

    Missing folders count as creatable when the nearest existing one takes a
    new file. That is tried for real (a nameless temporary file, removed at
    once), because permission bits do not tell: root passes every ``access()``
    check, yet nothing can be created under ``/proc`` or on a read-only mount.
    Nothing is left behind.
    """
    path = Path(path).expanduser()
    if _exists(path):
        if path.is_dir():
            return f"{path} is a folder, not a file"
        return None if os.access(path, os.W_OK) else f"cannot write {path} (permission denied)"
    folder = path.parent
    while not _exists(folder) and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"cannot create {path}: {folder} is not a folder"
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return f"cannot create {path}: {folder} does not take new files ({exc.strerror})"
    return None


def _exists(path: Path) -> bool:
    """Like ``Path.exists``, but a folder on the way that may not be searched
    means "not there" (Python 3.11's ``exists`` raises PermissionError): the
    walk up then finds that folder, and creating a file in it fails with why."""
    try:
        return path.exists()
    except PermissionError:
        return False
