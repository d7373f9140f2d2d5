"""Lazy package exports (PEP 562): a package's `__init__` names what it exports and the submodule that
defines each name; the submodule is imported when the name is first used.

Importing any submodule runs its package's `__init__` first, so an `__init__` that imported every
submodule would load torch for `ragkv.blend.config` (a dataclass the settings tree reads) or for
`ragkv.storage.config`. With lazy exports `from ragkv.blend import BlendConfig` loads blend/config.py
only, and `from ragkv.blend import blend` loads blend/loop.py (and torch) when it is asked for.

An exported name that is also the name of the submodule defining it (`chunk_cache.precompute`,
`blend.extend`, `blend.rerotate`) keeps naming the export after that submodule is imported (the
import system binds a loaded submodule on its package; an eager `__init__` rebinds the name after it).
The submodule imports are string-based, so import-linter and tests/import_graph.py do not see them;
they are a package's own submodules, which both leave out anyway.
"""

from __future__ import annotations

import importlib
import sys
import types


class LazyPackage(types.ModuleType):
    """A package module whose exported names are imported from their submodules on first use."""

    _exports: dict[str, str]  # exported name -> the submodule (relative to the package) that defines it

    def __getattr__(self, name: str):
        submodule = self.__dict__.get("_exports", {}).get(name)
        if submodule is None:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{self.__name__}.{submodule}"), name)
        super().__setattr__(name, value)  # found directly from now on
        return value

    def __setattr__(self, name: str, value) -> None:
        exports = self.__dict__.get("_exports", {})
        if exports.get(name) == name and getattr(value, "__name__", None) == f"{self.__name__}.{name}":
            value = getattr(value, name)  # the submodule `name` was imported: `name` stays its export
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *self.__dict__.get("_exports", {})})


def lazy_exports(package: str, exports: dict[str, str]) -> None:
    """Make `package` (an `__init__` calls this with `__name__`) a LazyPackage exporting `exports`
    ({name: submodule}); `__all__` lists them."""
    module = sys.modules[package]
    module.__dict__["_exports"] = dict(exports)
    module.__dict__["__all__"] = list(exports)
    module.__class__ = LazyPackage
