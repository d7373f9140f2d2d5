"""Put this checkout first on sys.path as `ragkv`, for spawned processes (they import from sys.path,
not from the module conftest.py loaded), e.g. the hand-off benchmark's consumer."""

from __future__ import annotations

from pathlib import Path


def checkout_first_on_sys_path(tmp_path: Path, monkeypatch) -> None:
    link = tmp_path / "checkout-pkg"
    link.mkdir()
    (link / "ragkv").symlink_to(Path(__file__).resolve().parent.parent)
    monkeypatch.syspath_prepend(str(link))
