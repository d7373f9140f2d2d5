"""What a command can check before the model loads (which takes tens of seconds): the data dir is
writable, the port is free. Each failure is a ValueError whose one line says what to do (`ragkv`
prints it without a traceback)."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path


def check_data_dir(data_dir: str) -> Path:
    """`data_dir` (expanded), created if missing; ValueError when it cannot be created or written."""
    path = Path(data_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".ragkv-write-check-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(
            f"data dir {path} is not writable ({err.strerror or err}): models, catalog and cache live there; "
            "choose another with --data-dir or RAGKV_DATA_DIR"
        ) from None
    return path


def check_port(host: str, port: int) -> None:
    """ValueError when `host:port` cannot be bound now (in use, or not an address of this machine)."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a TIME_WAIT is not "in use"
        try:
            s.bind((host, port))
        except OSError as err:
            raise ValueError(
                f"cannot listen on {host}:{port}: {err.strerror or err} (in use by another process?); "
                "stop it or choose another --port"
            ) from None
