"""`ragkv serve`: the REST sidecar (OpenAI-compatible completions over cached chunk KV) under uvicorn.

Settings: the flags below > `RAGKV_*` environment variables (nested with `__`, e.g.
`RAGKV_SERVER__API_KEYS='{"key": "tenant"}'`, `RAGKV_STORAGE__TIERS='[{"kind": "cpu", "capacity": "4GiB"}]'`)
> `--config FILE` (TOML or JSON; else `$RAGKV_CONFIG`) > defaults; `ragkv config` prints them.
SIGINT/SIGTERM stop accepting, finish in-flight requests, then exit.
"""

from __future__ import annotations

import argparse

from .options import add_settings_args, settings_of
from .preflight import check_data_dir, check_port

SETTINGS = ("host", "port", "queue_size")  # the flags that set settings (by name)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the REST sidecar (OpenAI-compatible API)", description=__doc__)
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 8000)")
    p.add_argument("--queue-size", type=int, default=None, help="requests that may wait for the model (default 64)")
    add_settings_args(p, SETTINGS)
    p.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    p.add_argument(
        "--upstream",
        default=None,
        metavar="URL",
        help="proxy mode: fuse here, generate on this vLLM server (started with ragkv's connector, see docs/VLLM.md)",
    )
    p.add_argument(
        "--fused-dir",
        default=None,
        metavar="DIR",
        help="proxy mode: where fused KV is published for vLLM's connector (default /dev/shm/ragkv-fused)",
    )
    p.add_argument("--upstream-model", default=None, help="proxy mode: the upstream's model name (default: ask it)")
    p.add_argument(
        "--handoff",
        default="auto",
        choices=["auto", "cuda_ipc", "shm", "file"],
        help="proxy mode: how fused KV reaches vLLM (auto: CUDA IPC on a GPU, else shared memory, else a file)",
    )
    p.add_argument("--fused-budget", default="8GiB", metavar="SIZE", help="proxy mode: fused KV held at once (8GiB)")
    p.add_argument(
        "--fused-mode",
        default="600",
        metavar="OCTAL",
        help="proxy mode: entry file permissions (600; 640/644 for vLLM as another user)",
    )
    p.set_defaults(func=run)


def server_settings(args: argparse.Namespace):
    """The ServerSettings this command line runs with."""
    from ..server.settings import ServerSettings

    return settings_of(args, cls=ServerSettings)


def run(args: argparse.Namespace) -> int:
    settings = server_settings(args)
    check_data_dir(settings.data_dir)  # what can fail is checked before the model loads
    check_port(settings.server.host, settings.server.port)
    import uvicorn

    from ..server.app import create_app

    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    print(f"loading {settings.model} ...", flush=True)
    upstream = None
    if args.upstream:
        from ..server.upstream import Upstream, fused_dir_default, fused_store_of

        fused_dir = args.fused_dir or fused_dir_default()
        store = fused_store_of(fused_dir, args.handoff, args.fused_budget, args.fused_mode)
        upstream = Upstream(args.upstream, store, model=args.upstream_model)
        print(f"proxy mode: generating on {upstream.url}, fused KV published to {fused_dir}", flush=True)
    app = create_app(settings, upstream=upstream)
    uvicorn.run(
        app,
        host=settings.server.host,
        port=settings.server.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=int(settings.server.shutdown_timeout_s),
    )
    return 0
