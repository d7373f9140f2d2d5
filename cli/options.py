"""The options every command shares and how a command's flags become settings.

A flag that sets a setting stores it under the setting's own name (`--ratio` -> `recompute_ratio`,
a name unique to one section of the tree), so the settings tree itself (engine/settings.py `nest`)
finds its path: no flag -> path table is kept by hand. A command reads the tree
through `settings_of(args)`: flags > `RAGKV_*` environment > `--config FILE` (else `$RAGKV_CONFIG`)
> defaults. Flags default to None ("not given"), so an absent flag never hides the environment.
This module imports no torch: `ragkv --help` and the commands that need no model stay fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence

from .preflight import check_data_dir

COMMON = ("model", "data_dir", "device", "namespace")  # the settings every command's flags set


def add_settings_args(p: argparse.ArgumentParser, settings: Sequence[str] = (), namespace: bool = True) -> None:
    """--config, --model, --data-dir, --device and (with `namespace`) --namespace; `settings` are the
    dests of the command's other options that set a setting, each the setting's name in the tree
    (recorded for `settings_of`)."""
    p.add_argument("--config", default=None, metavar="FILE", help="settings file, .toml or .json (or $RAGKV_CONFIG)")
    p.add_argument("--model", default=None, help="model alias, local path or cached HF id (default smollm2)")
    p.add_argument("--data-dir", default=None, help="models, catalog, index and disk cache (default ~/.cache/ragkv)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default cpu)")
    if namespace:
        p.add_argument("--namespace", default=None, help="tenant of documents and chunk keys (default 'default')")
    common = COMMON if namespace else tuple(n for n in COMMON if n != "namespace")
    p.set_defaults(settings_flags=(*common, *settings))


def overrides_of(args: argparse.Namespace) -> dict:
    """The settings the command line gives: setting name -> value (None: flag not given)."""
    return {name: getattr(args, name, None) for name in getattr(args, "settings_flags", COMMON)}


def settings_of(args: argparse.Namespace, cls=None, overrides: Mapping | None = None):
    """The settings tree this command runs with (flags, then the command's own `overrides`, > `RAGKV_*`
    env > config file > defaults)."""
    from ..engine.settings import Settings, load_settings

    given = {**(overrides or {}), **{k: v for k, v in overrides_of(args).items() if v is not None}}
    return load_settings(getattr(args, "config", None), given, cls=cls or Settings)


def engine_config(settings):
    """The EngineConfig the settings tree describes (`EngineConfig.from_settings`; imports the lower
    folders, so only inside a command's `run`)."""
    from ..engine.config import EngineConfig

    return EngineConfig.from_settings(settings)


def load_engine(settings, quiet: bool = False):
    """The Engine of `settings`, with one progress line per model load on stderr (transformers' own
    per-load bars are silenced: the LLM and the embedder would each draw one)."""
    import sys
    import time

    from transformers.utils import logging as hf_logging

    from ..engine.engine import Engine

    check_data_dir(settings.data_dir)  # before the model load, not after it
    hf_logging.disable_progress_bar()
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    if not quiet:
        print(f"loading {settings.model} on {settings.device} ...", end="", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    engine = Engine.from_pretrained(config=engine_config(settings))
    if not quiet:
        print(f" {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return engine
