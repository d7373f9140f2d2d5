"""The blend on CUDA equals the blend on CPU: every strategy and tiny model family (fp32, TF32 off),
sources from every tier, generate on the merged cache, the Engine end to end, the loader's order and
lookahead, and the CUDA-only fast paths (FlexAttention masks, variable-length prepacked precompute).

`pytest -m gpu` runs them on a CUDA machine; without CUDA every test here is skipped.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import TINY_FAMILIES, cache_kwarg, tiny_model

from ragkv.blend import blend, kv_tensor, make_plan, make_strategy, to_dynamic_cache
from ragkv.blend.loader import LayerLoader
from ragkv.chunk_cache import ChunkKey, ChunkKV, LayeredKV, precompute, precompute_many
from ragkv.models import adapter_for, attention

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

STRATEGIES = [("full", 0.0), ("prefix", 0.0), ("naive", 0.0), ("cacheblend", 0.15), ("cacheblend", 1.0), ("epic", 0.15)]
REL = 2e-5  # relative norm, fp32 CPU vs CUDA with TF32 off (measured 3.5e-7 on an H200)


@pytest.fixture(autouse=True)
def _no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _prompt(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    chunks = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (70, 95, 41, 130)]
    prefix = [1] + torch.randint(3, 256, (5,), generator=g).tolist()
    query = torch.randint(3, 256, (9,), generator=g).tolist()
    return make_plan(prefix, chunks, query, separator_ids=[5]), chunks


def _pair(family: str):
    """The same tiny model on CPU and on CUDA."""
    return adapter_for(tiny_model(family), sink_ids=(1,)), adapter_for(tiny_model(family).cuda(), sink_ids=(1,))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_strategy_on_cuda_equals_cpu(family):
    cpu, gpu = _pair(family)
    plan, chunks = _prompt()
    kvs = precompute_many(cpu, chunks)
    sources = [(start, kv) for (start, _), kv in zip(plan.chunk_spans, kvs)]  # unpinned host memory
    for name, ratio in STRATEGIES:
        strategy = make_strategy(name, ratio)
        want = blend(cpu, plan, strategy, sources)
        got = blend(gpu, plan, strategy, sources)
        assert got.logits.is_cuda and got.buffers[0][0].is_cuda
        assert _rel(got.logits, want.logits) < REL, (family, strategy.label)
        assert _rel(kv_tensor(got), kv_tensor(want)) < REL, (family, strategy.label)
        assert got.recompute_fraction == pytest.approx(want.recompute_fraction), (family, strategy.label)
    assert attention.FLEX_FAILURE is None  # `auto` ran FlexAttention, not its dense fallback


@pytest.mark.parametrize("attention", ["blocks", "dense", "flex"])
def test_every_attention_mask_on_cuda_equals_cpu(attention):
    cpu, gpu = _pair("llama")
    plan, chunks = _prompt(seed=1)
    sources = [(start, kv) for (start, _), kv in zip(plan.chunk_spans, precompute_many(cpu, chunks))]
    for name, ratio in (("cacheblend", 0.15), ("naive", 0.0), ("epic", 0.15)):
        want = blend(cpu, plan, make_strategy(name, ratio), sources)
        got = blend(gpu, plan, make_strategy(name, ratio), sources, attention=attention)
        assert _rel(got.logits, want.logits) < REL, (attention, name)


def _tiers(tmp_path):
    from ragkv.compression import codec_names
    from ragkv.storage import MemoryTier
    from ragkv.storage.disk import DiskTier

    yield "gpu", MemoryTier(1 << 30, device="cuda")
    yield "pinned-cpu", MemoryTier(1 << 30, device="cpu", pin=True)
    yield "cpu", MemoryTier(1 << 30, device="cpu", pin=False)
    for codec in codec_names():
        yield f"disk-{codec}", DiskTier(tmp_path / codec.replace("+", "_"), 1 << 30, codec)


def test_sources_from_every_tier_on_cuda_equal_cpu(tmp_path):
    from ragkv.storage import TieredStore

    cpu, gpu = _pair("llama")
    plan, chunks = _prompt(seed=2)
    kvs = precompute_many(cpu, chunks)
    keys = [ChunkKey.of("m", "t", [i]) for i in range(len(kvs))]
    strategy = make_strategy("cacheblend", 0.15)
    for name, tier in _tiers(tmp_path):
        store = TieredStore([tier], promote=False)
        for key, kv in zip(keys, kvs):
            store.put(key, kv)
        on_cpu = [(s, store.get_layered(k, "cpu")) for (s, _), k in zip(plan.chunk_spans, keys)]
        on_gpu = [(s, store.get_layered(k, "cuda")) for (s, _), k in zip(plan.chunk_spans, keys)]
        want = blend(cpu, plan, strategy, on_cpu)
        got = blend(gpu, plan, strategy, on_gpu)
        assert _rel(got.logits, want.logits) < REL, name
        assert got.recompute_fraction == pytest.approx(want.recompute_fraction), name
        store.close()


def test_dynamic_cache_feeds_generate_on_cuda():
    _, gpu = _pair("qwen2")
    plan, chunks = _prompt(seed=3)
    sources = [(start, precompute(gpu, c)) for (start, _), c in zip(plan.chunk_spans, chunks)]
    result = blend(gpu, plan, make_strategy("cacheblend", 1.0), sources)
    ids = plan.input_ids[None].cuda()
    with torch.inference_mode():
        ref = gpu.model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        out = gpu.model.generate(
            ids,
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
            **cache_kwarg(gpu.model, to_dynamic_cache(result, plan.num_tokens - 1)),
        )
    assert torch.equal(out, ref)
    assert int(out[0, plan.num_tokens]) == int(result.logits.argmax())


class _ByteTokenizer:
    """A tokenizer of the tiny models' 256-token vocabulary: one token per byte (3..255)."""

    bos_token, chat_template, eos_token_id = "", None, 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + b % 253 for b in text.encode()]}

    def get_vocab(self):
        return {str(i): i for i in range(256)}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(max(32, int(i))) for i in ids)


def test_engine_end_to_end_on_cuda_equals_cpu(tmp_path):
    from ragkv.engine.config import EngineConfig
    from ragkv.engine.engine import Engine
    from ragkv.storage import MemoryTier, TieredStore

    answers, logits = [], []
    for device in ("cpu", "cuda"):
        model = tiny_model("llama").to(device)
        adapter = adapter_for(model, _ByteTokenizer(), sink_ids=(1,))
        store = TieredStore([MemoryTier(1 << 30, device=device)])
        engine = Engine(adapter, store, EngineConfig(data_dir=str(tmp_path / device), max_new_tokens=8))
        _, chunks = _prompt(seed=4)
        first = engine.run("what is it?", chunks=chunks, strategy="cacheblend")
        assert first.misses == len(chunks) and first.logits.device.type == device
        again = engine.run("what is it?", chunks=chunks, strategy="cacheblend")
        assert again.misses == 0 and sum(again.hits.values()) == len(chunks)
        answers.append(list(engine.answer_ids(again.blend, 8)))
        logits.append(again.logits)
    assert answers[0] == answers[1]
    assert _rel(logits[1], logits[0]) < REL


class _Recording(LayeredKV):
    """A LayeredKV that records which layers were read and when (the loader's lookahead shows here)."""

    def __init__(self, kv: ChunkKV, log: list) -> None:
        self.kv, self.log, self.pos0 = kv, log, kv.pos0
        self.num_tokens, self.num_layers = kv.num_tokens, kv.num_layers

    def layer(self, index):
        self.log.append(index)
        return self.kv.layer(index)


def test_layer_loader_on_cuda_keeps_order_and_reads_ahead():
    cpu, _ = _pair("llama")
    _, chunks = _prompt(seed=5)
    kvs = precompute_many(cpu, chunks)
    pinned = [ChunkKV(kv.kv.pin_memory(), kv.pos0) for kv in kvs[:2]]
    log: list[int] = []
    sources = [pinned[0], _Recording(kvs[2], log), pinned[1], ChunkKV(kvs[3].kv.cuda(), kvs[3].pos0)]
    loader = LayerLoader(sources, cpu.num_layers, torch.device("cuda"), torch.float32)
    expected_order = [kvs[0], kvs[2], kvs[1], kvs[3]]
    for layer, rows in enumerate(loader):
        # layer l + 1 is already on its way (side stream) while layer l is handed to the compute
        assert max(log) == min(layer + 1, cpu.num_layers - 1)
        assert rows.is_cuda and rows.shape[1] == sum(kv.num_tokens for kv in kvs)
        want = torch.cat([kv.layer(layer) for kv in expected_order], dim=1)
        assert torch.equal(rows.cpu(), want)
    assert log == list(range(cpu.num_layers))


@pytest.mark.parametrize("name", ("packed", "int8"))
def test_layer_loader_on_cuda_decodes_encoded_bytes_on_the_gpu(name, tmp_path):
    """A disk entry of a device codec reaches the blend as bytes decoded on the GPU, equal to the host
    decode; a GPU-side encode (packed: grid search and packing on CUDA) decodes within the codec's error."""
    from ragkv.compression import get_codec
    from ragkv.storage.disk import DiskTier

    cpu, _ = _pair("llama")
    _, chunks = _prompt(seed=6)
    kvs = precompute_many(cpu, chunks)
    codec = get_codec(name)
    tier = DiskTier(tmp_path / name, 1 << 30, name)
    keys = [ChunkKey.of("gpu-loader", name, [i]) for i in range(len(kvs))]
    for key, kv in zip(keys, kvs):
        tier.put(key, ChunkKV(kv.kv.cuda(), kv.pos0))  # encoded on the device where the codec can
    sources = [tier.get(key, "cuda") for key in keys]
    loader = LayerLoader(sources, cpu.num_layers, torch.device("cuda"), torch.float32)
    for layer, rows in enumerate(loader):
        host = torch.cat([s.layer(layer).float().cpu() for s in sources], dim=1)
        assert torch.equal(rows.cpu(), host), layer
        exact = torch.cat([kv.layer(layer) for kv in kvs], dim=1)
        err = (rows.cpu() - exact).norm() / exact.norm()
        assert err < codec.rel_error, (layer, float(err))
    assert loader.device_bytes > 0
    tier.close()


def test_prepacked_varlen_precompute_on_cuda_equals_one_by_one():
    from ragkv.models.attention import varlen_available

    model = tiny_model("llama").to("cuda", torch.bfloat16)
    adapter = adapter_for(model, sink_ids=(1,))
    g = torch.Generator().manual_seed(6)
    chunks = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (5, 64, 1, 200, 33)]
    single = precompute_many(adapter, chunks, max_tokens_per_pass=0)
    packed = precompute_many(adapter, chunks, max_tokens_per_pass=256)
    q = torch.zeros(1, 4, 8, 16, device="cuda", dtype=torch.bfloat16)
    assert varlen_available(q) or pytest.skip("varlen attention is not in this torch build")
    assert attention.VARLEN_FAILURE is None  # the packed passes ran the variable-length kernel
    for a, b in zip(single, packed):
        assert _rel(b.kv, a.kv) < 2e-2  # bf16: a different kernel, not a different result


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_precompute_after_a_shared_lead_in_on_cuda_equals_one_sequence(dtype):
    """The lead-in computed once and attended to as a shared past (varlen in bf16: flash's causal window
    aligned bottom-right; per-span SDPA with a mask in fp32) equals `[lead-in + chunk]` in one pass."""
    adapter = adapter_for(tiny_model("llama").to("cuda", dtype), sink_ids=(1,))
    g = torch.Generator().manual_seed(8)
    lead = [1] + torch.randint(3, 256, (70,), generator=g).tolist()
    chunks = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (5, 64, 1, 200, 33)]
    for budget in (0, 256):
        for chunk, kv in zip(chunks, precompute_many(adapter, chunks, budget, lead_in=lead)):
            ids = torch.tensor(lead + chunk)
            whole = adapter.forward_kv(ids, torch.arange(len(ids)))[:, :, len(lead) :]
            assert _rel(kv.kv, whole) < (2e-2 if dtype == torch.bfloat16 else REL), (budget, len(chunk))
    assert attention.VARLEN_FAILURE is None


def test_flex_mask_equals_dense_mask_at_8b_head_shapes():
    from ragkv.models.attention import query_mask

    g = torch.Generator(device="cuda").manual_seed(7)
    n, heads, kv_heads, d = 3000, 32, 8, 128
    pos = torch.randperm(n - 32, device="cuda", generator=g)[: int(0.15 * n)].sort().values
    pos = torch.cat([pos, torch.arange(n - 32, n, device="cuda")])  # selected rows + the query
    q = torch.randn(1, heads, pos.shape[0], d, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(1, kv_heads, n, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    ref = query_mask(pos, n, torch.device("cuda"), "dense").attend(q.float(), k.float(), v.float(), d**-0.5)
    for kind in ("blocks", "dense", "flex"):
        out = query_mask(pos, n, torch.device("cuda"), kind).attend(q, k, v, d**-0.5)
        assert _rel(out, ref) < 1e-2, kind
