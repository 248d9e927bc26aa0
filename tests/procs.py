"""Subprocesses that tests start, always reaped: each runs in a session of its own, and the
whole session (torchrun and its workers included) is killed when the test ends, however
it ends (failure, timeout or Ctrl-C), so that no orphan outlives the test."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL every process of ``proc``'s session and reap ``proc``."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextlib.contextmanager
def session(cmd: list[str], log_dir: Path, name: str, **kwargs) -> Iterator[subprocess.Popen]:
    """Start ``cmd`` in a new session with stdout/stderr in ``log_dir/name.{out,err}`` (files,
    not pipes: a full pipe cannot stall it); kill the session when the block exits."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **kwargs.pop("env", {})}
    with (
        (log_dir / f"{name}.out").open("w") as out,
        (log_dir / f"{name}.err").open("w") as err,
    ):
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=err, env=env, start_new_session=True, text=True, **kwargs
        )
        try:
            yield proc
        finally:
            kill_session(proc)


def run_session(cmd: list[str], log_dir: Path, name: str, timeout: float) -> tuple[int, str, str]:
    """Run ``cmd`` to its end in a session of its own (killed after ``timeout`` seconds);
    (exit code, stdout, stderr)."""
    with session(cmd, log_dir, name) as proc, contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)
    out, err = ((log_dir / f"{name}.{s}").read_text() for s in ("out", "err"))
    return proc.returncode, out, err


def dymu_cmd(*args: str) -> list[str]:
    """The ``dymu`` command line, run by this interpreter."""
    return [sys.executable, "-m", "dymu", *args]
