"""Chunk precompute computes the lead-in (the prompt template's prefix, or the model's sink) once per call,
and every chunk attends to its KV as a shared past: the chunk KV equals the rows of `[lead-in + chunk]`
computed as one sequence (what precompute did before), one chunk per pass and packed, in every tiny
model family (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model

from ragkv.chunk_cache import precompute, precompute_many
from ragkv.models import adapter_for, attention

LEAD_INS = {"sink": None, "template": [1, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40]}


def _chunks(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in (5, 17, 1, 33, 8)]


def _one_sequence(model, lead: list[int], chunk: list[int]) -> torch.Tensor:
    """The chunk's rows of `[lead + chunk]` computed in one causal pass (the old precompute)."""
    ids = torch.tensor(lead + chunk)
    return model.forward_kv(ids, torch.arange(len(ids)))[:, :, len(lead) :]


@pytest.mark.parametrize("lead_in", LEAD_INS.values(), ids=LEAD_INS.keys())
@pytest.mark.parametrize("budget", [0, 40, 4096], ids=["one-per-pass", "packed", "one-pass"])
def test_chunk_kv_after_a_shared_lead_in_equals_one_sequence(tiny_adapter, lead_in, budget):
    lead = list(tiny_adapter.sink_ids if lead_in is None else lead_in)
    chunks = _chunks()
    for chunk, kv in zip(chunks, precompute_many(tiny_adapter, chunks, budget, lead_in=lead_in)):
        assert kv.pos0 == len(lead) and kv.num_tokens == len(chunk)
        torch.testing.assert_close(kv.kv, _one_sequence(tiny_adapter, lead, chunk), atol=1e-5, rtol=1e-5)


def test_forward_kv_with_a_past_equals_the_rows_of_one_sequence(tiny_adapter):
    lead, chunk = LEAD_INS["template"], _chunks(1)[3]
    past = tiny_adapter.forward_kv(torch.tensor(lead), torch.arange(len(lead)))
    kv = tiny_adapter.forward_kv(torch.tensor(chunk), torch.arange(len(lead), len(lead) + len(chunk)), past=past)
    torch.testing.assert_close(kv, _one_sequence(tiny_adapter, lead, chunk), atol=1e-5, rtol=1e-5)


class CountingModel:
    """Forwards to a model and records how many tokens each `forward_kv` pass computes."""

    def __init__(self, model) -> None:
        self.model = model
        self.fingerprint, self.tokenizer_fingerprint = model.fingerprint, model.tokenizer_fingerprint
        self.sink_ids = model.sink_ids
        self.passes: list[int] = []

    def forward_kv(self, ids, positions, segments=None, past=None):
        self.passes.append(ids.shape[0])
        return self.model.forward_kv(ids, positions, segments, past)


@pytest.mark.parametrize("budget", [0, 4096])
def test_the_lead_in_is_computed_once_per_call(budget):
    model = CountingModel(adapter_for(tiny_model("llama"), sink_ids=(1,)))
    lead, chunks = LEAD_INS["template"], _chunks()
    precompute_many(model, chunks, budget, lead_in=lead)
    assert sum(model.passes) == len(lead) + sum(map(len, chunks))  # before: len(lead) once per chunk
    assert model.passes[0] == len(lead)
    assert len(model.passes) == 1 + (len(chunks) if budget == 0 else 1)
    model.passes.clear()
    precompute(model, chunks[0])  # the sink is a lead-in of one token, computed once too
    assert model.passes == [1, len(chunks[0])]


def _flash_varlen_reference(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, scale, window_size):
    """What flash's variable-length kernel computes with window (-1, 0): per sequence, causal aligned
    bottom-right (query i of Lq sees keys 0 .. i + Lk - Lq), q [Tq, H, D] over k, v [Tk, H, D]."""
    assert window_size == (-1, 0)
    out = []
    for i in range(cu_seq_q.shape[0] - 1):
        qs, qe, ks, ke = int(cu_seq_q[i]), int(cu_seq_q[i + 1]), int(cu_seq_k[i]), int(cu_seq_k[i + 1])
        assert qe - qs <= max_q and ke - ks <= max_k
        mask = torch.arange(ke - ks)[None, :] <= torch.arange(qe - qs)[:, None] + (ke - ks) - (qe - qs)
        qi, ki, vi = (x.transpose(0, 1)[None] for x in (q[qs:qe], k[ks:ke], v[ks:ke]))
        o = torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale)
        out.append(o[0].transpose(0, 1))
    return torch.cat(out)


def test_the_varlen_path_lays_out_each_span_after_the_past(monkeypatch):
    """The CUDA path (variable-length flash attention), run on CPU against flash's documented semantics:
    the keys each span gets (the past, then its own rows) and their offsets are right."""
    varlen = pytest.importorskip("torch.nn.attention.varlen")
    monkeypatch.setattr(attention, "varlen_available", lambda q: True)
    monkeypatch.setattr(varlen, "varlen_attn", _flash_varlen_reference)
    monkeypatch.setattr(attention, "VARLEN_FAILURE", None)
    model = adapter_for(tiny_model("qwen3"), sink_ids=(1,))
    lead, chunks = LEAD_INS["template"], _chunks(2)
    for chunk, kv in zip(chunks, precompute_many(model, chunks, 40, lead_in=lead)):
        torch.testing.assert_close(kv.kv, _one_sequence(model, lead, chunk), atol=1e-5, rtol=1e-5)
    assert attention.VARLEN_FAILURE is None
