"""The run-directory lock: one writer at a time, and no reader while it writes.

Two ``dymu search`` runs into one folder would interleave their artifacts (one config
beside another's weights), so every command that writes into a run directory takes an
exclusive lock on ``RUN/.dymu.lock`` first, and every command that only reads it (sample,
export, bench) takes a shared one. The lock is an advisory ``flock`` held by an open file:
the kernel drops it when the process ends, however it ends, so a lock left by a killed
process is simply taken over by the next command. The file itself stays (deleting a lock
file races with the next locker) and holds the pid and command of its last holder, which
a refused command names.

Holds are counted per process: :func:`lock_run` adds one and :func:`unlock_run` gives one
back (:func:`run_lock` does both around a block), so a library function that locks inside
a caller's lock does not release the caller's; a shared lock is upgraded in place when the
same process asks to write. :func:`release_all` (the command line calls it when a command
ends) and the end of the process release everything. Under ``torchrun`` only rank 0 (by
its ``RANK``) locks: the other ranks are the same job, and read what rank 0 writes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from dymu.errors import UserError

LOCK_NAME = ".dymu.lock"

_held: dict[Path, list] = {}
"""Resolved run directory -> [open file descriptor, exclusive?, how many holds]."""


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 400).decode("utf-8", "replace").strip()
    return text or "another process"


def _command() -> str:
    """``dymu search`` (the program and its subcommand), as far as ``sys.argv`` tells."""
    if not sys.argv or not sys.argv[0]:
        return "python"
    program = Path(sys.argv[0]).name
    program = "dymu" if program == "__main__.py" else program  # python -m dymu
    return " ".join([program, *sys.argv[1:2]])


def lock_run(run_dir: str | os.PathLike, *, write: bool) -> None:
    """Take the lock of ``run_dir`` (which must exist): exclusive when ``write``, else shared.
    Each call is one hold, given back by :func:`unlock_run`.

    Raises:
        UserError: another process holds it (exclusively, or at all when ``write``); the
            message names that process.
    """
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 locks for the whole job
        return
    run = Path(run_dir).resolve()
    held = _held.get(run)
    if held is not None and (held[1] or not write):
        held[2] += 1
        return
    if held is None:
        try:
            fd = os.open(run / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            if not write:  # a read-only run directory: nobody can write into it either
                return
            raise UserError(f"cannot lock {run_dir}: {exc.strerror or exc}") from None
    else:
        fd = held[0]
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if write else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        if held is None:
            os.close(fd)
        doing = "writing into" if write else "reading"
        raise UserError(
            f"{run_dir} is in use by {holder}; wait for it to finish before {doing} it, "
            "or use another --run"
        ) from None
    os.ftruncate(fd, 0)  # the holder's name, for whoever is refused next
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, f"process {os.getpid()} ({_command()})\n".encode())
    if held is None:
        _held[run] = [fd, write, 1]
    else:  # a shared hold upgraded to exclusive
        held[1], held[2] = True, held[2] + 1


def unlock_run(run_dir: str | os.PathLike) -> None:
    """Give back one hold of ``run_dir``'s lock; the last one releases it (a no-op when
    this process holds none, as on the other ranks of ``torchrun``)."""
    run = Path(run_dir).resolve()
    held = _held.get(run)
    if held is None:
        return
    held[2] -= 1
    if held[2] <= 0:
        del _held[run]
        _release(held[0])


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike, *, write: bool) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the block."""
    lock_run(run_dir, write=write)
    try:
        yield
    finally:
        unlock_run(run_dir)


def _release(fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def release_all() -> None:
    """Release every lock this process holds, whatever the number of holds."""
    for fd, _, _ in _held.values():
        _release(fd)
    _held.clear()
