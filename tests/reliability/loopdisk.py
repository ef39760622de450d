"""A small ext4 disk on a loop device whose power can be cut (for the power-cut trials).

The disk's backing file lives on tmpfs. What the loop device has received is
in that file; what the mounted file system still holds only in its page cache
is not. So a copy of the backing file, taken while the writer is stopped and
the loop device idle, is exactly what a disk holds after the power goes: the
next boot sees it after ``e2fsck`` (journal recovery) and a mount.

Needs root, ``losetup``, ``mount``, ``mkfs.ext4`` and ``e2fsck``; :func:`unavailable`
says why not when they are missing or refused.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

_TOOLS = ("losetup", "mount", "umount", "mkfs.ext4", "e2fsck")
_SHM = Path("/dev/shm")


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def unavailable() -> str | None:
    """Why loop-device disks cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (losetup and mount)"
    missing = [t for t in _TOOLS if shutil.which(t) is None]
    if missing:
        return f"missing tools: {', '.join(missing)} (Debian: util-linux, mount, e2fsprogs)"
    try:
        with LoopDisk(size_mib=8):
            pass
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return f"a loop device cannot be set up here: {exc}"
    return None


def _scratch_dir() -> Path:
    base = _SHM if _SHM.is_dir() and os.access(_SHM, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="plexus-powercut-", dir=base))


class _Attached:
    """An image file attached to a loop device and mounted."""

    def __init__(self, image: Path, mountpoint: Path) -> None:
        out = _run("losetup", "--direct-io=off", "-f", "--show", str(image))
        if out.returncode != 0:
            raise RuntimeError(f"losetup: {out.stderr.strip()}")
        self.device = out.stdout.strip()
        mountpoint.mkdir(parents=True, exist_ok=True)
        out = _run("mount", "-t", "ext4", self.device, str(mountpoint))
        if out.returncode != 0:
            _run("losetup", "-d", self.device)
            raise RuntimeError(f"mount: {out.stderr.strip()}")
        self.mountpoint = mountpoint

    def idle(self, timeout: float = 5.0) -> None:
        """Wait until the loop device has no request in progress."""
        inflight = Path(f"/sys/block/{Path(self.device).name}/inflight")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if all(v == "0" for v in inflight.read_text().split()):
                    return
            except OSError:
                return  # no such counter here: the copy is still taken
            time.sleep(0.001)

    def detach(self) -> None:
        for _ in range(50):
            if _run("umount", str(self.mountpoint)).returncode == 0:
                break
            time.sleep(0.1)  # a child that just died may still hold a file open
        _run("losetup", "-d", self.device)


class LoopDisk:
    """A fresh ext4 file system of ``size_mib`` MiB, mounted at :attr:`path`."""

    def __init__(self, size_mib: int = 64) -> None:
        self.dir = _scratch_dir()
        self.image = self.dir / "disk.img"
        with open(self.image, "wb") as f:
            f.truncate(size_mib << 20)
        out = _run("mkfs.ext4", "-q", "-F", str(self.image))
        if out.returncode != 0:
            shutil.rmtree(self.dir)
            raise RuntimeError(f"mkfs.ext4: {out.stderr.strip()}")
        try:
            self._live = _Attached(self.image, self.dir / "live")
        except BaseException:
            shutil.rmtree(self.dir)
            raise
        self.path = self._live.mountpoint
        self._cuts = 0

    def __enter__(self) -> LoopDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._live.detach()
        shutil.rmtree(self.dir, ignore_errors=True)

    def flush_page_cache(self) -> None:
        """Write back everything the file system holds (``syncfs``): a disk that
        received every write made so far, committed or not."""
        os.sync()  # Python has no syncfs(); sync() writes back this file system too

    def cut(self) -> Path:
        """The disk as the power left it: the backing file, copied in one read.

        Stop every writer first (SIGSTOP): the copy waits for the loop device to
        be idle, so it is one instant, not a mixture of several.
        """
        self._live.idle()
        self._cuts += 1
        copy = self.dir / f"cut-{self._cuts}.img"
        fd = os.open(self.image, os.O_RDONLY)
        try:
            data = os.read(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        copy.write_bytes(data)
        return copy


class Recovered:
    """A cut image after the next boot: ``e2fsck -fy``, then mounted at :attr:`path`."""

    def __init__(self, image: Path) -> None:
        self.image = image
        out = _run("e2fsck", "-fy", str(image))
        # 0: clean, 1: errors fixed, 2: fixed, reboot wanted; 4 and up: not fixed.
        if out.returncode >= 4:
            raise RuntimeError(f"e2fsck could not repair the image ({out.returncode}): "
                               f"{out.stdout[-500:]}")
        self.fsck_fixed = out.returncode != 0
        self._attached = _Attached(image, image.with_suffix(".mnt"))
        self.path = self._attached.mountpoint

    def __enter__(self) -> Recovered:
        return self

    def __exit__(self, *exc: object) -> None:
        self._attached.detach()
        self.image.unlink(missing_ok=True)
        shutil.rmtree(self.path, ignore_errors=True)
