"""One writer per directory: every command that writes an output or run directory holds its lock.

The lock is ``DIR/.sppd-lock``, locked with ``flock`` for as long as the command runs and holding
``{"pid", "host", "command", "since"}``. A second command on the same directory refuses with one
line naming the holder. The kernel drops an flock when its process dies, however it dies, so a
lock left by a killed process is simply taken over (with a note on stderr). Where the filesystem
has no flock (some network mounts answer ENOLCK) the recorded pid decides instead: a holder on this
host that no longer runs is taken over, one on another host is refused (delete the file if that run
is gone). A lock is released by deleting the file, so finished directories hold no lock file;
:func:`~sppd_megatron.pipeline.manifest.fingerprint` ignores it anyway.

Locks are re-entrant within a process (the demo locks its directory, and the run it starts there
locks its run directory).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sppd_megatron.config import RunStopped

LOCK_FILE = ".sppd-lock"

_held: dict[Path, list] = {}  # directory -> [fd, depth, whether acquire created it]


class LockHeld(RunStopped):
    """Another live command holds the directory."""


def _describe(holder: dict) -> str:
    since = holder.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
            f"({str(holder.get('command', '?'))[:120]}, since {when})")


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 65536).decode("utf-8", "replace") or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _lock_fd(path: Path) -> tuple[int, dict]:
    """An fd of ``path`` locked by this process, and what the file said before (the last holder)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise LockHeld(f"{path.parent}: another command is writing this directory: {_describe(holder)}; "
                           "wait for it to finish or stop it (two commands never write one directory)") from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            holder = _read_holder(fd)  # no flock here: the recorded holder decides
            if holder.get("pid") not in (None, os.getpid()) and (
                    holder.get("host") != socket.gethostname() or _pid_alive(holder.get("pid"))):
                os.close(fd)
                raise LockHeld(f"{path.parent}: another command is writing this directory: {_describe(holder)} "
                               f"(this filesystem has no flock: if that run is gone, delete {path})") from None
            return fd, holder
        try:  # a holder that released between our open and our flock deleted the file we locked
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd, _read_holder(fd)
        os.close(fd)


def acquire(directory: str | os.PathLike) -> Path:
    """Lock ``directory`` (created if missing) for this process; :class:`LockHeld` if another has it."""
    directory = Path(directory).resolve()
    if directory in _held:
        _held[directory][1] += 1
        return directory
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    fd, previous = _lock_fd(path)
    if previous.get("pid") not in (None, os.getpid()):
        print(f"note: {path}: took over the lock of {_describe(previous)}, which is no longer running",
              file=sys.stderr, flush=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:500],
          "since": time.time()}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(me).encode())
    os.fsync(fd)
    _held[directory] = [fd, 1, created]
    return directory


def release(directory: str | os.PathLike) -> None:
    """Give the lock back (the outermost release deletes the lock file, and the directory if acquiring
    made it and the command wrote nothing there: a command refused early leaves no trace)."""
    directory = Path(directory).resolve()
    entry = _held.get(directory)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] > 0:
        return
    del _held[directory]
    try:
        (directory / LOCK_FILE).unlink()
    except FileNotFoundError:
        pass
    os.close(entry[0])
    if entry[2]:
        try:
            directory.rmdir()
        except OSError:  # not empty: the command wrote its outputs
            pass


@contextmanager
def locked(directory: str | os.PathLike) -> Iterator[Path]:
    """``with locked(DIR):`` hold DIR's lock for the block."""
    held = acquire(directory)
    try:
        yield held
    finally:
        release(held)
