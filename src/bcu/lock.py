"""An exclusive lock on a file next to an output, holding the PID of its owner.

One small portable wrapper (``fcntl.flock`` on POSIX, ``msvcrt.locking`` on Windows), used for every
bcu output (``<out>.lock``) and for bench's per-teacher locks, so no other module imports the
POSIX-only ``fcntl``.

* The lock file is opened with ``O_NOFOLLOW``: a planted symbolic link is refused, never followed.
* The holder writes its PID into the file; a second run reads it and names the process.
* The holder unlinks the file before unlocking, so no ``.lock`` file is left behind. A process
  that opened the old file meanwhile and then gets its lock notices that the path no longer
  names its file and starts again: two processes can never both believe they hold the lock.
* A process that dies (``kill -9``) loses its lock: the kernel releases it with the descriptor.
"""
from __future__ import annotations

import os
import stat
import time
from pathlib import Path
from typing import Optional, Union

from .errors import OutputError

if os.name == "nt":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

    _PID_OFFSET = 16  # Windows locks are mandatory: keep the PID outside the locked byte
else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)

    _PID_OFFSET = 0


class ExclusiveLock:
    """``with ExclusiveLock(path, what):`` -- held for the block, or an OutputError naming the holder.

    ``wait=True`` waits for the holder to finish instead (bench's worker processes).
    """

    def __init__(self, path: Union[str, Path], what: str, wait: bool = False, poll: float = 0.05) -> None:
        self.path = Path(path)
        self.what = what
        self.wait = wait
        self.poll = poll
        self.fd: Optional[int] = None

    def _open(self) -> int:
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.path, flags, 0o666)
        except OSError as e:
            if os.path.islink(self.path):
                raise OutputError(f"lock file {self.path} is a symbolic link: refusing to follow it "
                                  f"(remove it by hand)") from None
            raise OutputError(f"cannot create the lock file {self.path}: {e.strerror or e}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OutputError(f"lock file {self.path} is not a regular file (remove it by hand)")
        return fd

    def _holder(self, fd: int) -> str:
        try:
            os.lseek(fd, _PID_OFFSET, os.SEEK_SET)
            text = os.read(fd, 32).decode("ascii", "replace").strip()
        except OSError:
            text = ""
        return f"pid {text}" if text.isdigit() else "another process"

    def acquire(self) -> "ExclusiveLock":
        while True:
            fd = self._open()
            if not _try_lock(fd):
                holder = self._holder(fd)
                os.close(fd)
                if not self.wait:
                    raise OutputError(f"{self.what} is in use by another bcu run ({holder}, lock {self.path}); "
                                      f"wait for it to finish or choose another --out")
                time.sleep(self.poll)
                continue
            try:  # the path must still name the file we locked (the last holder unlinks it)
                same = os.path.samestat(os.fstat(fd), os.lstat(self.path))
            except OSError:
                same = False
            if not same:
                _unlock(fd)
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.lseek(fd, _PID_OFFSET, os.SEEK_SET)
            os.write(fd, f"{os.getpid()}\n".encode())
            self.fd = fd
            return self

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            if os.name != "nt":
                os.unlink(self.path)  # while still locked: see the module docstring
        except OSError:
            pass
        try:
            _unlock(fd)
        finally:
            os.close(fd)

    def __enter__(self) -> "ExclusiveLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
