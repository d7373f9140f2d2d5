"""`ragkv config [--config FILE] [--json]`: the effective settings and where each value came from.

One precedence for every command and the sidecar: flags > `RAGKV_*` environment (nested with `__`,
e.g. `RAGKV_STORAGE__POLICY=cost`) > the config file (`--config FILE`, else `$RAGKV_CONFIG`; TOML
or JSON, sections as below) > defaults. The values are checked as the Engine would build them; no
model is loaded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .options import add_settings_args, engine_config, overrides_of, settings_of


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="print the effective settings and their origins", description=__doc__)
    add_settings_args(p)
    p.add_argument("--json", action="store_true", help="print {settings, origins} as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..engine.settings import origins, unknown_env

    settings = settings_of(args)
    engine = engine_config(settings)  # the lower folders' own checks (tier order, codec names, ...)
    where = origins(settings, args.config, overrides_of(args))
    tree = settings.model_dump(mode="json")
    tree["data_dir"] = str(Path(settings.data_dir).expanduser())  # as every command uses it
    store = engine.storage_config()  # the embedded default store, where none is configured, as it will be built
    tree["storage"]["tiers"] = [dict(kind=t.kind, capacity=t.capacity_bytes, codec=t.codec) for t in store.tiers]
    tree["storage"]["disk_dir"] = store.disk_dir
    tree["server"]["api_keys"] = {key[:3] + "***": ns for key, ns in settings.server.api_keys.items()}  # no secrets
    ignored = unknown_env()
    if args.json:
        print(json.dumps({"settings": tree, "origins": where, "ignored_env": ignored}, indent=2))
        return 0
    print(render(tree, where))
    for name in ignored:
        print(f"# ignored: {name} names no setting")
    return 0


def render(tree: dict, where: dict[str, str]) -> str:
    """TOML-shaped lines, each with its origin as a comment (an unset value shows as a comment)."""
    top = [(k, v) for k, v in tree.items() if not isinstance(v, dict)]
    sections = [(k, v) for k, v in tree.items() if isinstance(v, dict)]
    lines = [_line(k, v, where[k]) for k, v in top]
    for name, values in sections:
        lines += ["", f"[{name}]"] + [_line(k, v, where[f"{name}.{k}"]) for k, v in values.items()]
    return "\n".join(lines)


def _line(key: str, value, origin: str) -> str:
    text = f"# {key} = (unset)" if value is None else f"{key} = {json.dumps(value)}"
    return f"{text:60s} # {origin}"
