"""`ragkv serve`: the REST sidecar (OpenAI-compatible completions over cached chunk KV) under uvicorn.

Settings: the flags below > `RAGKV_*` environment variables (nested with `__`, e.g.
`RAGKV_SERVER__API_KEYS='{"key": "tenant"}'`, `RAGKV_STORAGE__TIERS='[{"kind": "cpu", "capacity": "4GiB"}]'`)
> `--config FILE` (TOML or JSON; else `$RAGKV_CONFIG`) > defaults; `ragkv config` prints them.
SIGINT/SIGTERM stop accepting, finish in-flight requests, then exit.
"""

from __future__ import annotations

import argparse

from .options import add_settings_args, settings_of

FLAGS = {"host": "server.host", "port": "server.port", "queue_size": "server.queue_size"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the REST sidecar (OpenAI-compatible API)", description=__doc__)
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 8000)")
    p.add_argument("--queue-size", type=int, default=None, help="requests that may wait for the model (default 64)")
    add_settings_args(p, FLAGS)
    p.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    p.set_defaults(func=run)


def server_settings(args: argparse.Namespace):
    """The ServerSettings this command line runs with."""
    from ..server.settings import ServerSettings

    return settings_of(args, cls=ServerSettings)


def run(args: argparse.Namespace) -> int:
    settings = server_settings(args)
    import uvicorn

    from ..server.app import create_app

    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    print(f"loading {settings.model} ...", flush=True)
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.server.host,
        port=settings.server.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=int(settings.server.shutdown_timeout_s),
    )
    return 0
