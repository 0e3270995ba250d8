"""One writer per run directory: an exclusive lock held for as long as a job writes there.

Two jobs writing checkpoints into one directory mix their runs without a word (a folder whose
checkpoints come from two seeds under one `config.json`, metrics written twice). [`RunLock`][]
makes the second writer stop at once with [`RunLockedError`][], naming the directory and the
holder (pid, host, start time, command line).

The lock is `fcntl.flock` on `<directory>/.lock`: the operating system drops it when its holder
exits, however it exits (SIGKILL and power loss included), so a lock can never outlive its
process, and the pid written in the file serves only the message. Where `flock` is missing
(Windows) or refused (some network file systems), the file itself is the lock: created
exclusively, and a file left by a process that is no longer running on this host (pid check)
is taken over with a warning. The `.lock` file is left in place when released (removing a
locked file would let two processes lock two different files of the same name).
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import sys
import time
import warnings

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_NAME = ".lock"


class RunLockedError(RuntimeError):
    """Another live process holds the run directory's lock."""


def _holder_text(info: dict) -> str:
    if not info:
        return "a process that left no details"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"pid {info.get('pid')} on {info.get('host')}, since {when}: {' '.join(info.get('argv', []))[:200]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """An exclusive lock on `directory` (created if missing); a context manager.

    `acquire()` raises [`RunLockedError`][] at once (it never waits) when another process, or
    another `RunLock` in this process, holds it. `what` names the job in the message.
    """

    def __init__(self, directory, what: str = "run"):
        self.directory = pathlib.Path(directory).absolute()
        self.path = self.directory / LOCK_NAME
        self.what = what
        self._fd = None
        self._file_lock = False

    def _info(self) -> dict:
        return dict(what=self.what, pid=os.getpid(), host=socket.gethostname(), started=time.time(), argv=sys.argv)

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def _refuse(self, info: dict):
        raise RunLockedError(f"{self.directory} is in use by another {info.get('what', 'job')} ({_holder_text(info)}). Two writers would "
                             f"mix their checkpoints: wait for it to finish, stop it, or write somewhere else.")

    def acquire(self) -> RunLock:
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this RunLock.")
        self.directory.mkdir(parents=True, exist_ok=True)
        if fcntl is not None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self._refuse(self._read())
            except OSError:  # flock not supported here: the file is the lock
                os.close(fd)
                return self._acquire_by_file()
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(self._info()).encode())
            os.fsync(fd)
            self._fd = fd
            return self
        return self._acquire_by_file()

    def _acquire_by_file(self) -> RunLock:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                info = self._read()
                same_host = info.get("host") == socket.gethostname()
                if not (same_host and isinstance(info.get("pid"), int) and not _alive(info["pid"])):
                    self._refuse(info)  # alive, or on another host where the pid cannot be checked
                warnings.warn(f"taking over the stale lock {self.path} of {_holder_text(info)}, which is no longer running.",
                              RuntimeWarning, stacklevel=3)
                self.path.unlink(missing_ok=True)
                continue
            os.write(fd, json.dumps(self._info()).encode())
            os.fsync(fd)
            self._fd, self._file_lock = fd, True
            return self
        self._refuse(self._read())

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        if self._file_lock:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            return
        os.ftruncate(fd, 0)  # the file stays (see the module docstring); closing it drops the flock
        os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
