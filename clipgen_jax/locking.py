"""Exclusive locks on output directories (training workdirs, precompute outputs): a second process that would write the
same directory is refused at once, instead of interleaving its checkpoints or shards with the first one's.

A lock is `fcntl.flock` on a lock file. The kernel releases it when the holding process exits, however it exits (kill -9
included), so a lock is never stale and there is nothing to clean up; the file itself stays, holding the last holder's
pid and host for the refusal message (a holder may remove it while it still holds the lock, as a training run that fails
on a fresh workdir does: whoever then gets the lock of the removed file tries again). Linux NFS clients map flock to
POSIX locks, which NFS shares between hosts. Each process of a multi-host run takes its own lock file (`lock_path`), so
the processes of one run do not refuse each other, while a second run's do.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import socket
import time
from collections.abc import Iterator


class LockedError(RuntimeError):
    """Another process holds the lock; the message says which and what to do."""


def lock_path(lock_file: str | os.PathLike, process_index: int = 0) -> pathlib.Path:
    """`lock_file` for process 0 (and single-process runs), `lock_file.process<i>` for process i of a multi-host run."""
    lock_file = pathlib.Path(lock_file)
    return lock_file if process_index == 0 else lock_file.with_name(f"{lock_file.name}.process{process_index}")


@contextlib.contextmanager
def exclusive(lock_file: str | os.PathLike, what: str, hint: str) -> Iterator[None]:
    """Holds an exclusive lock on `lock_file` (created if missing) for the `with` block; raises `LockedError`
    ("{what} is in use by another process (...): {hint}") at once when another process holds it."""
    path = pathlib.Path(lock_file).absolute()
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "pid unknown"
            os.close(fd)
            raise LockedError(f"{what} is in use by another process ({holder}; lock file {path}): {hint}") from None
        # The holder may have removed the file (a training run that wrote nothing else) between our open and flock:
        # that lock is on a file nobody else sees, so take the one now at the path instead.
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  .encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
