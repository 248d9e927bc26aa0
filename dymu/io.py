"""Atomic file output: an interrupted run never leaves a half-written artifact.

Every writer goes through a temporary file in the destination's own directory (so the
final ``os.replace`` is a rename on one filesystem) and only then takes the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dymu.errors import UserError


def ensure_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and parents); fail with one line if that is impossible or files
    cannot be created in it. Tried for real: ``os.access`` says yes to root in ``/proc``."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create directory {p}: {exc.strerror or exc}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".dymu-probe.", dir=p)
    except OSError as exc:
        raise UserError(f"directory {p} is not writable: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)
    return p


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.tmp$")
"""A temporary file or folder of :func:`atomic_path` / :func:`atomic_dir`:
``.<final name>.<writer's pid>.<random>.tmp``."""


def _temp_prefix(dest: Path) -> str:
    return f".{dest.name}.{os.getpid()}."


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clean_stale(folder: str | os.PathLike, name: str | None = None, recursive: bool = False) -> int:
    """Remove the temporary files and folders that killed writers left in ``folder`` (those
    of ``name`` only, when given); return how many. A temporary whose writer (by the pid in
    its name) still runs on this machine is kept."""
    removed = 0
    root = Path(folder)
    if not root.is_dir():
        return 0
    entries = root.rglob(".*.tmp") if recursive else root.glob(".*.tmp")
    for entry in sorted(entries, reverse=True):  # children before their folders
        m = _TEMP.match(entry.name)
        if not m or (name is not None and m["name"] != name) or _alive(int(m["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed += 1
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    The caller writes the temporary file by any means (numpy, matplotlib, torch...). On
    an exception the temporary file is removed and ``path`` is left untouched.
    """
    dest = Path(path)
    ensure_dir(dest.parent)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(dest), suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual mode
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``path`` only when the block succeeds.

    Used for caches made of several files: readers either see the whole directory or
    nothing. If another process finished the same directory first, ours is discarded.
    """
    dest = Path(path)
    ensure_dir(dest.parent)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(dest), suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the usual mode
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():  # a real failure, not a lost race with another writer
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


PICTURE_FORMATS = (".png", ".pdf", ".svg", ".jpg")


def picture_path(path: str | os.PathLike) -> Path:
    """``path`` as a Path if it names a picture format matplotlib writes, in a folder that
    can be written; checked before slow work so a bad name fails at once."""
    out = Path(path)
    if out.suffix.lower() not in PICTURE_FORMATS:
        raise UserError(f"{out}: use one of {', '.join(PICTURE_FORMATS)}")
    ensure_dir(out.parent)
    return out


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save a matplotlib figure atomically, in the format its suffix names."""
    out = picture_path(path)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format=out.suffix.lstrip(".").lower().replace("jpg", "jpeg"), dpi=dpi)
    return out


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (manifests record it for every file)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
