"""ServerSettings: the settings tree (engine/settings.py) as the sidecar reads it. One precedence for
every command and the sidecar: `ragkv serve` flags > `RAGKV_*` environment > config file > defaults.

The HTTP layer's own options live in the tree's `server` section (`RAGKV_SERVER__PORT`,
`[server] api_keys = {...}` in the TOML file); they are also readable flat (`settings.queue_size` is
`settings.server.queue_size`). Every tier, codec and policy of the chunk store is configurable
through the `storage` section, as for the library and the CLI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..engine.settings import ServerOptions, Settings
from ..engine.settings import load_settings as _load


class ServerSettings(Settings):
    """The settings tree of one server process, with the `server` section's fields readable flat."""

    def __getattr__(self, name: str) -> Any:
        if name in ServerOptions.model_fields:
            return getattr(self.server, name)
        return super().__getattr__(name)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.server.api_keys)


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> ServerSettings:
    """Settings from `overrides` (None = not given) > `RAGKV_*` env > `config_file` (else `$RAGKV_CONFIG`;
    .toml or .json) > defaults. Override names: top-level (`data_dir`), dotted (`storage.policy`), or a
    field name unique to one section (`queue_size`)."""
    return _load(config_file, overrides, cls=ServerSettings)
