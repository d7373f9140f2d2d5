"""`int8`'s one-launch decode of every entry of a layer (`compression/quant_triton.py`): the Triton kernel
(under TRITON_INTERPRET=1 on CPU) and its torch reference give the bits of decoding entry by entry."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from test_codecs import make_kv

from ragkv.compression import CodecError, get_codec

if not torch.cuda.is_available():  # before the kernel module is first imported: run Triton on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _layer(codec, encs, layer, dtype):
    """The layer's tasks, their sections in one buffer at 16-byte aligned offsets, and the rows they fill."""
    tasks = [codec.layer_task(enc, layer, dtype) for enc in encs]
    offsets, rows, at, row = [], [], 0, 0
    for task in tasks:
        offsets.append(at)
        rows.append(row)
        at += -(-len(task.section) // 16) * 16
        row += task.shape[0]
    src = torch.zeros(at, dtype=torch.uint8)
    for task, start in zip(tasks, offsets):
        src[start : start + len(task.section)] = torch.from_numpy(np.frombuffer(task.section, np.uint8).copy())
    return tasks, src, offsets, rows, row


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32), ids=str)
def test_one_launch_equals_decoding_entry_by_entry(dtype):
    pytest.importorskip("triton")
    from ragkv.compression.quant_triton import decode_int8_rows_torch, decode_int8_rows_triton

    codec = get_codec("int8")
    encs = [codec.encode(make_kv(shape=(2, 3, t, 2, 8), dtype=torch.float16, seed=t)) for t in (29, 7, 64, 1)]
    for layer in range(3):
        tasks, src, offsets, rows, n = _layer(codec, encs, layer, dtype)
        want = torch.cat([codec.decode_layer(enc, layer, dtype=dtype) for enc in encs], dim=1)  # host decoder
        meta = torch.from_numpy(codec.rows_meta(tasks, offsets, rows)).to(DEVICE)
        out = torch.full((2, n + 5, 2, 8), 7.0, dtype=dtype, device=DEVICE)
        decode_int8_rows_triton(src.to(DEVICE), meta, 64, 16, out)
        assert torch.equal(out[:, :n].cpu(), want), f"kernel, layer {layer}"
        assert (out[:, n:] == 7.0).all()  # rows past the entries are untouched
        ref = torch.full_like(out, 7.0)
        decode_int8_rows_torch(src.to(DEVICE), [t.shape[0] for t in tasks], offsets, rows, 16, ref)
        assert torch.equal(ref, out), f"torch reference, layer {layer}"
        codec.device_rows(tasks, src.to(DEVICE), offsets, ref, rows, meta)  # the loader's entry point
        assert torch.equal(ref[:, :n].cpu(), want)


def test_model_kv_and_a_short_section_is_refused():
    pytest.importorskip("triton")
    from tiny_models import tiny_model

    from ragkv.chunk_cache import precompute_many
    from ragkv.compression.quant_triton import decode_int8_rows_triton
    from ragkv.models import adapter_for

    model = adapter_for(tiny_model("llama"), sink_ids=(1,))
    kvs = precompute_many(model, [list(range(3, 40)), list(range(50, 67))])
    codec = get_codec("int8")
    encs = [codec.encode(kv.to(dtype=torch.bfloat16)) for kv in kvs]
    h, d = kvs[0].kv.shape[3:]
    for layer in range(kvs[0].num_layers):
        tasks, src, offsets, rows, n = _layer(codec, encs, layer, torch.bfloat16)
        meta = torch.from_numpy(codec.rows_meta(tasks, offsets, rows)).to(DEVICE)
        out = torch.empty((2, n, h, d), dtype=torch.bfloat16, device=DEVICE)
        decode_int8_rows_triton(src.to(DEVICE), meta, max(t.shape[0] for t in tasks), h * d, out)
        want = torch.cat([codec.decode_layer(enc, layer, dtype=torch.bfloat16) for enc in encs], dim=1)
        assert torch.equal(out.cpu(), want), f"layer {layer}"
    short = tasks[0].__class__(**{**tasks[0].__dict__, "section": tasks[0].section[:-1]})
    with pytest.raises(CodecError, match="int8 section"):
        codec.rows_meta([short], [0], [0])
