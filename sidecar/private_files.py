"""Files and directories the sidecar creates for queued, buffered and exported data: private to its user.

Queued requests, the tail-sampling buffer and the file exporter's output hold whatever the
applications sent, PII included. Whatever the process umask, directories this module creates
are 0700 and files 0600. A directory the operator made (the storage root) keeps its mode; the
per-component directories inside it, which the sidecar owns, are tightened if an older version
left them group- or world-readable.
"""

from __future__ import annotations

import os
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def make_private_dir(path: str | os.PathLike, *, tighten: bool = True) -> Path:
    """Create ``path`` and any missing parents as 0700; with ``tighten``, make an existing leaf 0700 too."""
    path = Path(path)
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, DIR_MODE)
        except FileExistsError:
            continue
        os.chmod(d, DIR_MODE)  # mkdir's mode is filtered by the umask; the chmod is not
    if tighten and not missing and path.is_dir() and path.stat().st_mode & 0o077:
        os.chmod(path, DIR_MODE)
    return path


def open_private(path: str | os.PathLike, mode: str = "wb"):
    """``open(path, mode)`` for binary writing ("wb", "ab", "xb"), creating the file as 0600."""
    flags = {"wb": os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "ab": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
             "xb": os.O_WRONLY | os.O_CREAT | os.O_EXCL}[mode]
    fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), FILE_MODE)
    try:
        if os.fstat(fd).st_mode & 0o077:  # an existing file from an older version: tighten it
            os.fchmod(fd, FILE_MODE)
        return os.fdopen(fd, mode)
    except BaseException:
        os.close(fd)
        raise
