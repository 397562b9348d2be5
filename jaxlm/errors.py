"""What a user can get wrong, and the guards that keep a mistake from costing a run.

``JaxlmError`` is the root of every error caused by input: a config, a corpus, a prepared
dataset, a checkpoint, an intervention file, a generation request. Each layer defines its
own subclass (``ConfigError``, ``DataError``, ``CheckpointError``, ``InterventionError``,
``GenerationError``, ...) whose message names the file or field and what was expected.
The ``jaxlm`` command turns any of them, and any ``OSError`` (a missing file, a full disk),
into one line ``jaxlm SUBCOMMAND: error: ...`` and exit code 2; ``--debug`` or
``JAXLM_DEBUG=1`` shows the traceback instead.

``DirectoryLock`` is the exclusive lock a writer takes on its output directory (a training
run, a prepared dataset), so two processes never interleave their writes.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path


class JaxlmError(Exception):
    """An error in the user's input or artefacts: the message says where and what was expected."""


class LockedError(JaxlmError):
    """Another process holds the lock on a directory."""


LOCK_FILE = ".lock"


class DirectoryLock:
    """An exclusive, non-blocking ``fcntl`` lock on ``directory/.lock`` holding the owner's pid.

    The lock is released when the holder exits, however it exits (the kernel drops it with the
    file descriptor), so a killed process never leaves a directory locked.
    """

    def __init__(self, directory: str | os.PathLike, purpose: str):
        self.directory = Path(directory)
        self.purpose = purpose
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        return self.directory / LOCK_FILE

    def acquire(self) -> "DirectoryLock":
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _read_holder(fd)
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LockedError(
                    f"{self.directory}: in use by another {self.purpose} (pid {holder or 'unknown'}); "
                    "wait for it to finish or stop it first"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""


def describe_os_error(err: OSError) -> str:
    """``'<file>: <reason>'`` for an ``OSError``, naming the file when the error carries one."""
    reason = err.strerror or str(err)
    if err.errno == errno.ENOSPC:
        reason = "no space left on device (free some disk space and run the same command again)"
    name = err.filename if err.filename is not None else None
    return f"{name}: {reason}" if name is not None else reason
