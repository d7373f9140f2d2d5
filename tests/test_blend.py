"""Correctness anchors of the blend on tiny random-init models of every supported family."""

import pytest
import torch
from tiny_models import cache_kwarg, returned_cache
from transformers import DynamicCache

from ragkv.blend import BlendConfig, blend, kv_tensor, make_plan, make_strategy, rerotate, rotation, to_dynamic_cache
from ragkv.chunk_cache import LayeredKV, precompute, precompute_many

TOL = dict(atol=2e-5, rtol=2e-5)


def _prompt(seed: int = 0, repeat: bool = False):
    g = torch.Generator().manual_seed(seed)
    chunks = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (23, 31, 17)]
    if repeat:
        chunks.append(chunks[0])
    prefix = [1] + torch.randint(3, 256, (5,), generator=g).tolist()
    query = torch.randint(3, 256, (7,), generator=g).tolist()
    return prefix, chunks, query


def _sources(adapter, plan, chunks):
    return [(start, precompute(adapter, c)) for (start, _), c in zip(plan.chunk_spans, chunks)]


def _reference(adapter, plan):
    with torch.inference_mode():
        out = adapter.model(plan.input_ids[None], use_cache=True)
    ref_kv = torch.stack(
        [
            torch.stack([lay.keys[0].transpose(0, 1), lay.values[0].transpose(0, 1)])
            for lay in returned_cache(out).layers
        ],
        dim=1,
    )  # [2, L, N, H, D]
    return ref_kv, out.logits[0, -1].float()


@pytest.mark.parametrize("repeat", [False, True])
def test_ratio_one_equals_full_prefill(tiny_adapter, repeat):
    prefix, chunks, query = _prompt(repeat=repeat)
    plan = make_plan(prefix, chunks, query, separator_ids=[5])
    ref_kv, ref_logits = _reference(tiny_adapter, plan)
    for strategy in (make_strategy("cacheblend", 1.0), make_strategy("epic", 1.0), make_strategy("full")):
        result = blend(tiny_adapter, plan, strategy, _sources(tiny_adapter, plan, chunks))
        torch.testing.assert_close(kv_tensor(result), ref_kv, **TOL)
        torch.testing.assert_close(result.logits, ref_logits, **TOL)
        assert result.recompute_fraction == 1.0


def test_gradual_filtering_at_ratio_one_equals_full(tiny_adapter):
    prefix, chunks, query = _prompt(seed=3)
    plan = make_plan(prefix, chunks, query)
    ref_kv, ref_logits = _reference(tiny_adapter, plan)
    strategy = make_strategy("cacheblend", 1.0, BlendConfig(check_layers=(1, 2)))
    result = blend(tiny_adapter, plan, strategy, _sources(tiny_adapter, plan, chunks))
    torch.testing.assert_close(kv_tensor(result), ref_kv, **TOL)
    torch.testing.assert_close(result.logits, ref_logits, **TOL)


@pytest.mark.parametrize("name", ["naive", "cacheblend"])
def test_ratio_zero_keeps_rerotated_chunk_rows(tiny_adapter, name):
    prefix, chunks, query = _prompt(seed=1, repeat=True)
    plan = make_plan(prefix, chunks, query)
    sources = _sources(tiny_adapter, plan, chunks)
    result = blend(tiny_adapter, plan, make_strategy(name, 0.0), sources)
    merged = kv_tensor(result)  # [2, L, N, H, D]
    for start, kv in sources:
        rows = slice(start, start + kv.num_tokens)
        delta = torch.full((kv.num_tokens,), start - kv.pos0)
        cos, sin = rotation(delta, tiny_adapter.inv_freq)
        for layer in range(tiny_adapter.num_layers):
            torch.testing.assert_close(merged[0, layer, rows], rerotate(kv.kv[0, layer], cos, sin), **TOL)
            assert torch.equal(merged[1, layer, rows], kv.kv[1, layer])
    assert result.recompute_fraction == 0.0
    # The prefix is computed fresh and sees only itself: it must match a full prefill exactly.
    ref_kv, _ = _reference(tiny_adapter, plan)
    torch.testing.assert_close(merged[:, :, : plan.prefix_len], ref_kv[:, :, : plan.prefix_len], **TOL)
    # Query rows are fresh: transformers' own forward of the query over the merged prefix + chunk rows
    # (as a cache, at the query's positions) gives the same K/V and first-token logits.
    q0 = plan.chunk_spans[-1][1]  # the query starts after the last chunk (no separators here)
    cache = DynamicCache(
        ddp_cache_data=[
            (merged[0, i, :q0].transpose(0, 1)[None], merged[1, i, :q0].transpose(0, 1)[None])
            for i in range(tiny_adapter.num_layers)
        ]
    )
    with torch.inference_mode():
        out = tiny_adapter.model(
            plan.input_ids[None, q0:],
            position_ids=plan.positions[None, q0:],
            use_cache=True,
            **cache_kwarg(tiny_adapter.model, cache),
        )
    for layer in range(tiny_adapter.num_layers):
        fresh = returned_cache(out).layers[layer]
        torch.testing.assert_close(merged[0, layer, q0:], fresh.keys[0, :, q0:].transpose(0, 1), **TOL)
        torch.testing.assert_close(merged[1, layer, q0:], fresh.values[0, :, q0:].transpose(0, 1), **TOL)
    torch.testing.assert_close(result.logits, out.logits[0, -1].float(), **TOL)


def test_cacheblend_recomputes_the_requested_fraction(tiny_adapter):
    prefix, chunks, query = _prompt(seed=2)
    plan = make_plan(prefix, chunks, query)
    result = blend(tiny_adapter, plan, make_strategy("cacheblend", 0.25), _sources(tiny_adapter, plan, chunks))
    layers = tiny_adapter.num_layers
    # 71 chunk rows: layer 0 recomputes all of them, check layer 1 keeps ceil(0.25 * 71) = 18 from there on
    assert result.recompute_fraction == pytest.approx((71 + 18 * (layers - 1)) / (71 * layers))


def test_rerotation_by_d_equals_computing_at_d(tiny_adapter):
    ids = torch.randint(3, 256, (29,), generator=torch.Generator().manual_seed(4))
    d = 1000
    at0 = tiny_adapter.forward_kv(ids, torch.arange(29))
    atd = tiny_adapter.forward_kv(ids, torch.arange(29) + d)
    cos, sin = rotation(torch.full((29,), d), tiny_adapter.inv_freq)
    for layer in range(tiny_adapter.num_layers):
        torch.testing.assert_close(rerotate(at0[0, layer], cos, sin), atd[0, layer], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(at0[1, layer], atd[1, layer], atol=1e-4, rtol=1e-4)


def test_prepacked_precompute_equals_one_by_one(tiny_adapter):
    _, chunks, _ = _prompt(seed=5, repeat=True)
    packed = precompute_many(tiny_adapter, chunks, max_tokens_per_pass=80)
    for c, p in zip(chunks, packed):
        single = precompute(tiny_adapter, c)
        assert p.pos0 == single.pos0 == len(tiny_adapter.sink_ids)
        torch.testing.assert_close(p.kv, single.kv, **TOL)


def test_no_future_warning_from_generate_with_a_cache(tiny_adapter):
    import warnings

    prefix, chunks, query = _prompt(seed=6)
    plan = make_plan(prefix, chunks, query)
    result = blend(tiny_adapter, plan, make_strategy("naive", 0.0), _sources(tiny_adapter, plan, chunks))
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("error", FutureWarning)
        dynamic = to_dynamic_cache(result, plan.num_tokens - 1)
        assert dynamic.get_seq_length() == plan.num_tokens - 1  # every prompt row but the last, from the blend
        out = tiny_adapter.model.generate(
            plan.input_ids[None],
            **cache_kwarg(tiny_adapter.model, dynamic),
            max_new_tokens=1,
            do_sample=False,
            pad_token_id=0,
        )
    # generate computed the last prompt token over the reused (naive) rows: the blend's own first token
    assert int(out[0, plan.num_tokens]) == int(result.logits.argmax())


def test_dynamic_cache_feeds_generate(tiny_adapter):
    prefix, chunks, query = _prompt(seed=6)
    plan = make_plan(prefix, chunks, query)
    result = blend(tiny_adapter, plan, make_strategy("cacheblend", 1.0), _sources(tiny_adapter, plan, chunks))
    ids = plan.input_ids[None]
    with torch.inference_mode():
        ref = tiny_adapter.model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        out = tiny_adapter.model.generate(
            ids,
            **cache_kwarg(tiny_adapter.model, to_dynamic_cache(result, plan.num_tokens - 1)),
            max_new_tokens=5,
            do_sample=False,
            pad_token_id=0,
        )
    assert torch.equal(out, ref)
    assert int(out[0, plan.num_tokens]) == int(result.logits.argmax())


def test_bad_strategy_and_ratio_are_refused():
    with pytest.raises(ValueError, match="unknown strategy 'blend'; accepted: full, prefix, naive, cacheblend, epic"):
        make_strategy("blend", 0.1)
    with pytest.raises(ValueError, match=r"within \[0, 1\], got 1.5"):
        make_strategy("cacheblend", 1.5)
    with pytest.raises(ValueError, match="check layers start at 1"):
        BlendConfig(check_layers=(0,))


def test_extend_decodes_like_transformers(tiny_adapter):
    from ragkv.blend import extend

    prefix, chunks, query = _prompt(seed=7)
    plan = make_plan(prefix, chunks, query)
    result = blend(tiny_adapter, plan, make_strategy("full"), reserve=6)
    forced = torch.randint(3, 256, (5,), generator=torch.Generator().manual_seed(8))
    logits = extend(tiny_adapter, result, forced, plan.num_tokens)  # [5, vocab]
    with torch.inference_mode():
        ref = tiny_adapter.model(torch.cat([plan.input_ids, forced])[None]).logits[0, plan.num_tokens :].float()
    torch.testing.assert_close(logits, ref, **TOL)
    with pytest.raises(ValueError, match="exceed the .* rows reserved"):
        extend(tiny_adapter, result, forced, plan.num_tokens + 2)


def test_prompt_longer_than_a_sliding_window_is_refused():
    from tiny_models import tiny_model

    from ragkv.models import adapter_for

    model = tiny_model("mistral")
    model.config.sliding_window = 32
    adapter = adapter_for(model, sink_ids=(1,))
    plan = make_plan([1, 5], [list(range(3, 40))], [7, 8])
    with pytest.raises(ValueError, match="prompt of 41 tokens exceeds the model's exact attention span of 32"):
        blend(adapter, plan, make_strategy("full"))


def test_query_attention_scores_are_attention_mass():
    from ragkv.blend.select import query_attention

    g = torch.Generator().manual_seed(9)
    q, k = torch.randn(10, 4, 8, generator=g), torch.randn(10, 2, 8, generator=g)
    rows = torch.tensor([0, 2, 3, 5, 8, 9, 11, 12, 13, 14])
    mass = query_attention(q, k, rows, query_start=12, scale=8**-0.5)  # 3 query tokens x 4 heads
    assert mass.shape == (10,) and float(mass.sum()) == pytest.approx(12.0, rel=1e-5)
    assert float(mass[-1]) > 0 and bool((mass >= 0).all())


@pytest.mark.parametrize("score", ["attention", "deviation*attention"])
def test_every_selection_score_at_ratio_one_equals_full(tiny_adapter, score):
    prefix, chunks, query = _prompt(seed=10)
    plan = make_plan(prefix, chunks, query)
    ref_kv, ref_logits = _reference(tiny_adapter, plan)
    strategy = make_strategy("cacheblend", 1.0, BlendConfig(score=score))
    result = blend(tiny_adapter, plan, strategy, _sources(tiny_adapter, plan, chunks))
    torch.testing.assert_close(result.logits, ref_logits, **TOL)
    narrowed = blend(
        tiny_adapter,
        plan,
        make_strategy("cacheblend", 0.2, BlendConfig(score=score)),
        _sources(tiny_adapter, plan, chunks),
    )
    assert 0.2 < narrowed.recompute_fraction < 1.0


class _FailingKV(LayeredKV):
    """A LayeredKV whose read of one layer fails (a damaged entry found while loading)."""

    def __init__(self, kv, bad_layer):
        self.kv, self.bad_layer, self.pos0 = kv, bad_layer, kv.pos0
        self.num_tokens, self.num_layers = kv.num_tokens, kv.num_layers
        self.reads = []

    def layer(self, index):
        self.reads.append(index)
        if index == self.bad_layer:
            raise ValueError(f"layer {index} fails its checksum")
        return self.kv.layer(index)


def test_layer_loader_yields_every_layer_in_order_and_surfaces_errors(tiny_adapter):
    from ragkv.blend.loader import LayerLoader

    _, chunks, _ = _prompt(seed=4)
    kvs = precompute_many(tiny_adapter, chunks)
    loader = LayerLoader(kvs, tiny_adapter.num_layers, torch.device("cpu"), torch.float32)
    rows = list(loader)
    assert len(rows) == tiny_adapter.num_layers
    for layer, got in enumerate(rows):
        assert torch.equal(got, torch.cat([kv.layer(layer) for kv in kvs], dim=1))
    failing = _FailingKV(kvs[1], bad_layer=1)
    it = iter(LayerLoader([kvs[0], failing, kvs[2]], tiny_adapter.num_layers, torch.device("cpu"), torch.float32))
    assert torch.equal(next(it)[:, kvs[0].num_tokens :][:, : failing.num_tokens], kvs[1].layer(0))
    with pytest.raises(ValueError, match="layer 1 fails"):
        next(it)
    assert max(failing.reads) <= 1  # nothing read past the failing layer


@pytest.mark.parametrize("attention", ["dense", "flex"])
def test_every_attention_mask_equals_sdpa_blocks(attention):
    from tiny_models import tiny_model

    from ragkv.models import adapter_for

    adapter = adapter_for(tiny_model("qwen3"), sink_ids=(1,))
    prefix, chunks, query = _prompt(seed=11, repeat=True)
    plan = make_plan(prefix, chunks, query)
    sources = _sources(adapter, plan, chunks)
    for name, ratio in (("cacheblend", 0.15), ("naive", 0.0), ("epic", 0.3)):
        want = blend(adapter, plan, make_strategy(name, ratio), sources, attention="blocks")
        got = blend(adapter, plan, make_strategy(name, ratio), sources, attention=attention)
        torch.testing.assert_close(got.logits, want.logits, **TOL)
        torch.testing.assert_close(kv_tensor(got), kv_tensor(want), **TOL)
        assert got.recompute_fraction == want.recompute_fraction


def test_query_masks_equal_a_dense_reference_with_many_blocks():
    from ragkv.models.attention import query_mask

    g = torch.Generator().manual_seed(12)
    n = 700
    pos = torch.cat([torch.randperm(n - 20, generator=g)[:300].sort().values, torch.arange(n - 20, n)])  # [320]
    q = torch.randn(1, 4, pos.shape[0], 16, generator=g)
    k, v = torch.randn(1, 2, n, 16, generator=g), torch.randn(1, 2, n, 16, generator=g)
    scores = q @ k.repeat_interleave(2, dim=1).transpose(2, 3) * 0.25  # [1, 4, T, N]
    scores = scores.masked_fill(torch.arange(n)[None, :] > pos[:, None], float("-inf"))
    ref = scores.softmax(-1) @ v.repeat_interleave(2, dim=1)
    for kind in ("blocks", "dense", "flex"):
        mask = query_mask(pos, n, torch.device("cpu"), kind)
        torch.testing.assert_close(mask.attend(q, k, v, 0.25), ref, atol=1e-5, rtol=1e-5)
    assert len(query_mask(pos, n, torch.device("cpu"), "blocks").blocks) == 5  # 320 queries // 64
    with pytest.raises(ValueError, match="unknown attention mask kind 'sparse'; accepted: auto, blocks, dense, flex"):
        query_mask(pos, n, torch.device("cpu"), "sparse")


def test_keep_top_keeps_every_fresh_token_and_the_most_deviating_cached_ones():
    from ragkv.blend.select import keep_top

    is_cached = torch.tensor([False, True, True, True, False, True])
    deviation = torch.tensor([9.0, 0.5, 3.0, 1.0, 0.0, 2.0])
    assert keep_top(is_cached, deviation, 2).tolist() == [True, False, True, False, True, True]
    assert keep_top(is_cached, deviation, 10).tolist() == [True] * 6  # a budget over the cached count keeps all
    assert keep_top(is_cached, deviation, 0).tolist() == [True, False, False, False, True, False]


def test_blend_result_prompt_kv_views_the_buffers(tiny_adapter):
    prefix, chunks, query = _prompt(seed=13)
    plan = make_plan(prefix, chunks, query)
    result = blend(tiny_adapter, plan, make_strategy("naive"), _sources(tiny_adapter, plan, chunks), reserve=4)
    layers = result.prompt_kv()
    assert len(layers) == tiny_adapter.num_layers and result.num_tokens == plan.num_tokens
    k, v = layers[0]
    assert k.shape[2] == plan.num_tokens and result.buffers[0][0].shape[2] == plan.num_tokens + 4
    assert k.data_ptr() == result.buffers[0][0].data_ptr()  # a view, not a copy
    assert result.prompt_kv(5)[1][1].shape[2] == 5
    parts = {k: v for k, v in result.seconds.items() if k != "total"}
    assert set(parts) == {"load", "rerotate", "recompute", "first_token"}
    assert sum(parts.values()) <= result.seconds["total"]  # the parts are laps of one clock inside the total


def test_layer_loader_reads_k_and_v_of_stored_and_decoded_sources(tiny_adapter):
    from ragkv.blend.loader import LayerLoader
    from ragkv.compression import get_codec
    from ragkv.storage.layered import EncodedLayers, ResidentKV

    _, chunks, _ = _prompt(seed=14)
    kvs = precompute_many(tiny_adapter, chunks)
    resident = ResidentKV(kvs[0], torch.device("cpu"))
    codec = get_codec("lz4")
    encoded = EncodedLayers(codec.encode(kvs[1]), codec, kvs[1].pos0, kvs[1].num_tokens, kvs[1].num_layers, "cpu")
    assert resident.stored() is kvs[0] and kvs[2].stored() is kvs[2] and encoded.stored() is None
    loader = LayerLoader([resident, encoded, kvs[2]], tiny_adapter.num_layers, torch.device("cpu"), torch.float32)
    for layer, rows in enumerate(loader):
        assert torch.equal(rows, torch.cat([kv.layer(layer) for kv in kvs], dim=1))


@pytest.mark.parametrize("device_decode", (False, True), ids=("host", "device"))
def test_layer_loader_decodes_device_codecs_from_their_bytes(tiny_adapter, device_decode):
    """int8 and packed entries cross as encoded bytes and decode where the rows go (`device_decode`, the
    CUDA default, run here on CPU tensors), bit-identical to the host decode; lz4 (host-only) and resident
    sources in between keep their rows."""
    from ragkv.blend.loader import LayerLoader
    from ragkv.compression import get_codec
    from ragkv.storage.layered import EncodedLayers, ResidentKV

    _, chunks, _ = _prompt(seed=16)
    kvs = precompute_many(tiny_adapter, chunks + chunks[:1])
    names = ("packed", "lz4", "int8")
    sources = [ResidentKV(kvs[0], torch.device("cpu"))]
    for kv, name in zip(kvs[1:], names):
        codec = get_codec(name)
        sources.append(EncodedLayers(codec.encode(kv), codec, kv.pos0, kv.num_tokens, kv.num_layers, "cpu"))
    cpu = torch.device("cpu")
    loader = LayerLoader(sources, tiny_adapter.num_layers, cpu, torch.float32, device_decode=device_decode)
    for layer, rows in enumerate(loader):
        assert torch.equal(rows, torch.cat([s.layer(layer).float() for s in sources], dim=1)), layer
    sections = sum(
        -(-len(s.device_task(layer, torch.float32).section) // 16) * 16
        for s in sources[1:]
        if s.codec.device_decode
        for layer in range(tiny_adapter.num_layers)
    )
    tables = (16 * 7 + 32) * tiny_adapter.num_layers  # per layer: packed's table (14 int64), int8's (3, aligned)
    assert loader.device_bytes == (sections + tables if device_decode else 0) and sections > 0


def test_flex_failure_under_auto_falls_back_to_a_dense_mask_once(monkeypatch):
    from ragkv.models import attention

    monkeypatch.setattr(attention, "FLEX_FAILURE", None)
    g = torch.Generator().manual_seed(15)
    pos = torch.tensor([3, 7, 8, 20, 29])
    q, k, v = torch.randn(1, 4, 5, 16, generator=g), torch.randn(1, 2, 30, 16, generator=g), torch.randn(1, 2, 30, 16)
    mask = attention.FlexMask(pos, 30, torch.device("cpu"), fallback=True)

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this card")

    mask._flex = broken
    with pytest.warns(UserWarning, match="FlexAttention failed \\(RuntimeError: no kernel for this card\\)"):
        out = mask.attend(q, k, v, 0.25)
    want = attention.DenseMask(pos, 30, torch.device("cpu")).attend(q, k, v, 0.25)
    torch.testing.assert_close(out, want)
    assert attention.FLEX_FAILURE == "RuntimeError: no kernel for this card"
    strict = attention.FlexMask(pos, 30, torch.device("cpu"))
    strict._flex = broken
    with pytest.raises(RuntimeError, match="no kernel"):  # an explicit `flex` never hides a failure
        strict.attend(q, k, v, 0.25)
