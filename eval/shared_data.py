"""Where the shared data sets (MuSiQue, WikiMQA, the RAGPulse trace, ...) are: one setting for every
benchmark and experiment script. `$RAGKV_SHARED_DATA` when set, else `../shared/data` relative to the
repository root (the package's folder). Nothing under it is committed; tests never read it."""

from __future__ import annotations

import os
from pathlib import Path

SHARED_DATA_ENV = "RAGKV_SHARED_DATA"
REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_data(*parts: str) -> Path:
    """A path under the shared data folder (not checked to exist)."""
    base = os.environ.get(SHARED_DATA_ENV) or REPO_ROOT.parent / "shared" / "data"
    return Path(base).expanduser().joinpath(*parts)
