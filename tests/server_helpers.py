"""Start the real sidecar (`ragkv serve`, uvicorn) in a subprocess on a free loopback port.

The subprocess imports `ragkv` from this checkout through a symlink in a temporary folder, uses a RAM
chunk store, and keeps its document catalogs in the test's temporary folder.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_path(name: str) -> str:
    from ragkv.engine.settings import nest

    path, node = [], nest({name: 0})
    while isinstance(node, dict):
        key = next(iter(node))
        path.append(key)
        node = node[key]
    return "__".join(path).upper()


@contextmanager
def running_server(tmp: Path, api_keys: dict[str, str] | None = None, startup_s: float = 180.0, **settings):
    """Yield (base URL, process) of a running server; SIGTERM it afterwards (bounded waits throughout)."""
    (tmp / "py").mkdir(parents=True, exist_ok=True)
    link = tmp / "py" / "ragkv"
    if not link.exists():
        link.symlink_to(ROOT)
    port = free_port()
    data = tmp / "data"  # catalogs and indexes here; the converted model comes from the shared model cache
    data.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(tmp / "py"),
        "RAGKV_STORAGE__TIERS": json.dumps([{"kind": "cpu", "capacity": "2GiB"}]),  # a RAM store
        "RAGKV_DATA_DIR": str(data),
        "RAGKV_SERVER__API_KEYS": json.dumps(api_keys or {}),
    }
    # settings by dotted path or top-level name: queue_size -> RAGKV_SERVER__QUEUE_SIZE
    env.update({"RAGKV_" + _env_path(k): str(v) for k, v in settings.items()})
    log = open(tmp / f"server-{port}.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ragkv.cli.main",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: {Path(log.name).read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become healthy in time")
            time.sleep(0.5)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        log.close()
