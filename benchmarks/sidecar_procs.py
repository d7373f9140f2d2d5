"""Processes for `multi_sidecar.py`: a private redis-server on a free loopback port and `ragkv serve`
sidecars started from this checkout (RAM tier, + a shared cachegen Redis tier), stopped cleanly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A private redis-server (appendonly: a restart keeps what was committed) on a free loopback port."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", ""]
            + ["--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory", "1gb"]
            + ["--maxmemory-policy", "allkeys-lru"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
            self.proc = None


def start_sidecar(
    workdir: Path, name: str, redis_url: str | None, log_dir: Path, extra: dict[str, str] | None = None
) -> tuple[str, subprocess.Popen]:
    """`ragkv serve` from this checkout on a free port (RAM tier, + the Redis tier when `redis_url`);
    `extra` adds or replaces `RAGKV_*` settings."""
    py = workdir / "py"
    py.mkdir(exist_ok=True)
    if not (py / "ragkv").exists():
        (py / "ragkv").symlink_to(ROOT)
    data = workdir / f"data-{name}"
    data.mkdir(exist_ok=True)  # the converted model comes from the shared model cache
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(py),
        "RAGKV_DATA_DIR": str(data),
        "RAGKV_MAX_NEW_TOKENS": "1",
        "RAGKV_TORCH_THREADS": "1",
        "RAGKV_SERVER__QUEUE_SIZE": "256",
    }
    tiers = [{"kind": "cpu", "capacity": "2GiB"}]  # RAM only, + the shared Redis tier
    if redis_url:
        tiers.append({"kind": "redis", "capacity": "64GiB", "codec": "cachegen", "url": redis_url, "prefix": "bench"})
    env["RAGKV_STORAGE__TIERS"] = json.dumps(tiers)
    env.update(extra or {})
    log = open(log_dir / f"sidecar-{name}.log", "w")
    cmd = [sys.executable, "-m", "ragkv.cli.main", "serve", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd + ["--log-level", "warning"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"sidecar {name} exited: {Path(log.name).read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return url, proc
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"sidecar {name} did not become healthy in 300 s")
        time.sleep(0.5)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
