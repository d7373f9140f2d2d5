"""The disk tier's file helpers: writer locks that die with their process, sizes and times that
tolerate a file vanishing under another process, and durable renames (directory fsync)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


def file_size(path: Path | None) -> int | None:
    try:
        return None if path is None else path.stat().st_size
    except FileNotFoundError:
        return None


def file_mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None


def hold_lock(path: Path) -> int:
    """Create `path` and hold an exclusive flock on it until the descriptor is closed (or the process dies)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def lock_held(path: Path, release_if_free: bool) -> bool:
    """Whether a live process holds `path`'s flock; a free (dead writer's) lock file is removed if asked."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return True
    if release_if_free:
        unlink_if_present(path)
    os.close(fd)
    return False


def unlink_if_present(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
