"""Atomic file writes: never leave a partial file behind (write a temp file in the same folder, fsync, rename).

Every module that writes results, checkpoints, corpora or caches goes through :func:`atomic_write`, so a crash or
an exception mid-write leaves either the old file or no file, and no ``.tmp`` litter. Imports no torch (the report
uses it too).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` to fill a temp file beside ``path``, fsync it, then ``os.replace`` it onto ``path``.

    On any failure (in ``write``, the fsync or the rename) the temp file is removed, an existing file at ``path``
    is left untouched, and the exception propagates. The parent folder is created if needed.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return p


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` as UTF-8 (``\\n`` newlines) with :func:`atomic_write`."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)

    return atomic_write(path, write)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (ours included; one we may not signal counts as alive)."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


_TEMP_NAME = re.compile(r"\.(?:tmp|old|copy|train)-(\d+)(?:-[^/\\]*)?$")
"""Temporary folders and files this package names ``<name>.tmp-PID`` (or ``.tmp-PID-<random>``, ``.old-PID``,
``.copy-PID-<random>``, ``.train-PID-<random>``)."""


def remove_dead_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary folders and files in ``folder`` (named as in :data:`_TEMP_NAME`) whose process
    is no longer alive: what a killed run (SIGTERM, SIGKILL, a power cut) left behind. A live process's are kept.

    Returns:
        the paths removed.
    """
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:  # no such folder (nothing to clean) or unreadable
        return removed
    for p in entries:
        m = _TEMP_NAME.search(p.name)
        if m is None or pid_alive(int(m.group(1))):
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        except OSError:
            continue  # another run removed it first, or it cannot be removed: leave it
        removed.append(p)
    return removed
