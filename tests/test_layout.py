"""The installed package exposes `ragkv` and nothing generic: the design card's folders are sub-packages
of `ragkv`, never top-level modules of their own (`import storage` must fail after install)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = [
    "chunk_cache",
    "models",
    "compression",
    "storage",
    "blend",
    "retriever",
    "engine",
    "server",
    "eval",
    "cli",
    "adapters",
]


def test_every_folder_is_a_subpackage_named_in_the_layers_contract():
    """Each package folder of the root is in the import-linter layers contract, and vice versa."""
    import tomllib

    contract = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    layered = {name.strip().removeprefix("ragkv.") for layer in contract["layers"] for name in layer.split("|")}
    on_disk = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert layered == on_disk == set(FOLDERS)


def test_no_generic_top_level_package_is_importable():
    """From a neutral directory, `ragkv.storage` imports but `storage` (and every other folder) does not."""
    probe = (
        "import importlib.util, json, sys\n"
        f"names = {FOLDERS!r}\n"
        "print(json.dumps({'ragkv': importlib.util.find_spec('ragkv') is not None,"
        " 'leaked': [n for n in names if importlib.util.find_spec(n) is not None]}))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd="/", capture_output=True, text=True, check=True)
    found = __import__("json").loads(out.stdout)
    if not found["ragkv"]:
        pytest.skip("ragkv is not installed in this interpreter (pip install -e .)")
    assert found["leaked"] == []
