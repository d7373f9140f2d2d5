"""`ragkv serve`: the REST sidecar (OpenAI-compatible completions over cached chunk KV) under uvicorn.

Settings come from `--config FILE` (JSON or TOML), `RAGKV_*` environment variables and the flags
below (flags win). SIGINT/SIGTERM stop accepting, finish in-flight requests, then exit.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the REST sidecar (OpenAI-compatible API)", description=__doc__)
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 8000)")
    p.add_argument("--config", default=None, metavar="FILE", help="settings file, .json or .toml")
    p.add_argument("--model", default=None, help="model alias, local path or cached HF id (default smollm2)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N]")
    p.add_argument(
        "--store",
        choices=("default", "memory"),
        default=None,
        help="chunk store: default (CPU + disk under the data dir) or memory (RAM only)",
    )
    p.add_argument("--queue-size", type=int, default=None, help="requests that may wait for the model (default 64)")
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ..server.app import create_app
    from ..server.settings import load_settings

    flags = {
        "host": args.host,
        "port": args.port,
        "model": args.model,
        "device": args.device,
        "store": args.store,
        "queue_size": args.queue_size,
    }
    settings = load_settings(args.config, **{k: v for k, v in flags.items() if v is not None})
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    print(f"loading {settings.model} ...", flush=True)
    upstream = None
    if args.upstream:
        from ..server.fused_store import FusedKVStore
        from ..server.upstream import Upstream, fused_dir_default

        fused_dir = args.fused_dir or fused_dir_default()
        upstream = Upstream(args.upstream, FusedKVStore(fused_dir, max_entries=16), model=args.upstream_model)
        print(f"proxy mode: generating on {upstream.url}, fused KV published to {fused_dir}", flush=True)
    app = create_app(settings, upstream=upstream)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
    )
    return 0
