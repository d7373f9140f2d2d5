"""Trace replay (`ragkv eval --trace`): parsing, the simulated tiered store, the `utility` policy, and each
strategy's hit and recompute accounting on a tiny hand-derived trace."""

from __future__ import annotations

import json

import pytest

from ragkv.cli.main import main
from ragkv.eval.sim_store import SimStore
from ragkv.eval.trace import load_trace
from ragkv.eval.trace_replay import ReplayConfig, TraceCosts, craft_recompute, parse_sim_strategies, replay
from ragkv.eval.trace_sample import choose_sample, craft_ratio
from ragkv.storage.policy import make_policy
from ragkv.storage.tier import EntryInfo

LENGTHS = {
    "1_sys_prompt.jsonl": ("sys_prompt_id", {1: 100, 2: 20, 3: 20}),
    "2_passages.jsonl": ("passage_id", {10: 100, 11: 200, 12: 100}),
    "3_history.jsonl": ("history_id", {30: 10}),
    "4_user_input.jsonl": ("user_input_id", {40: 5, 41: 5, 42: 5, 43: 5, 44: 5}),
    "5_web_search.jsonl": ("web_search_id", {50: 300}),
}
# (timestamp, session, sys prompt, passages, history, user input); written out of time order on purpose
REQUESTS = [
    (9, "A", [1, 2], [10, 11, 12], [30], [42]),
    (0, "A", [1, 2], [10, 11], [], [40]),
    (5, "B", [1, 3], [11, 10], [], [41]),
    (12, "C", [1, 2], [10, 11], [], [43]),
    (20, "C", [1, 2], [12, 10], [], [44]),
]
PROMPT_TOKENS = [425, 425, 535, 425, 325]  # in time order: sys + passages + history + user input
COSTS = TraceCosts(1.0, {"gpu": 0.01, "cpu": 0.02, "disk": 0.1}, full_layer_share=0.0)
BIG = ReplayConfig(10**6, "lru", {"gpu": 1.0}, craft_alpha=0.5, cci=1.0)


def write_trace(tmp_path):
    """The tiny trace above as RAGPulse files in `tmp_path` (blank line at the end, as the real files)."""
    for name, (field, lengths) in LENGTHS.items():
        rows = [json.dumps({field: i, "token_length": n}) for i, n in lengths.items()]
        (tmp_path / name).write_text("\n".join(rows) + "\n\n")
    lines = []
    for ts, session, sys_ids, passages, history, user in REQUESTS:
        ids = {"sys_prompt": sys_ids, "passages_ids": passages, "history": history, "web_search": [50]}
        ids["user_input"] = user
        row = {"timestamp": str(ts), "input_length": 0, "output_length": 7, "hash_ids": ids, "session_id": session}
        lines.append(json.dumps(row))
    (tmp_path / "0_trace.jsonl").write_text("\n".join(lines) + "\n\n")
    return tmp_path


@pytest.fixture()
def trace_dir(tmp_path):
    return write_trace(tmp_path)


def _run(trace_dir, strategy: str, config: ReplayConfig = BIG, keep=()):
    requests = load_trace(trace_dir)
    return replay(requests, parse_sim_strategies(strategy)[0], config, COSTS, keep)


def test_trace_is_parsed_in_time_order_without_web_search(trace_dir):
    requests = load_trace(trace_dir)
    assert [r.timestamp for r in requests] == [0, 5, 9, 12, 20]
    assert [r.index for r in requests] == [0, 1, 2, 3, 4]
    assert [r.prompt_tokens for r in requests] == PROMPT_TOKENS  # web search (300 tokens) is not in the prompt
    assert [s.part for s in requests[2].segments] == ["sys_prompt"] * 2 + ["passages"] * 3 + ["history", "user_input"]
    assert requests[2].web_search == (50,) and requests[2].output_length == 7


def test_prefix_reuses_only_the_longest_cached_prefix(trace_dir):
    summary, kept = _run(trace_dir, "prefix", keep=range(5))
    # r1 (sys 1,3 then passages 11,10): only block "1" is a cached prefix; its passages were cached by r0 in
    # another order, and prefix caching reuses none of them. r4 (12, 10 after sys 1,2): the same.
    assert [kept[i].recomputed_prompt for i in range(5)] == [425, 325, 115, 5, 205]
    assert [kept[i].recomputed_chunk for i in range(5)] == [300, 300, 100, 0, 200]
    assert [kept[i].chunk_hits for i in range(5)] == [0, 0, 2, 2, 0]
    assert summary["recomputed_prompt_tokens_per_request"] == pytest.approx(1075 / 5)
    assert summary["chunk_hit_rate"] == pytest.approx(4 / 11)
    assert summary["token_hit_rate"]["gpu"] == pytest.approx((100 + 420 + 420 + 120) / sum(PROMPT_TOKENS))


def test_cacheblend_and_epic_reuse_chunks_anywhere_and_fix_a_share(trace_dir):
    for name in ("cacheblend@0.15", "epic@0.15"):
        summary, kept = _run(trace_dir, name, keep=range(5))
        # hits recompute ceil(0.15 x hit chunk tokens): 45 for 300 tokens, 30 for 200; misses are whole
        assert [kept[i].recomputed_chunk for i in range(5)] == [300, 45, 145, 45, 30], name
        assert [kept[i].fixed_chunk for i in range(5)] == [0, 45, 45, 45, 30], name
        # + system prompt blocks not cached (120, then 20 for "1,3") + history and user input
        assert [kept[i].recomputed_prompt for i in range(5)] == [425, 70, 160, 50, 35], name
        assert summary["chunk_hit_rate"] == pytest.approx(8 / 11)
        assert summary["token_hit_rate_total"] == pytest.approx((400 + 420 + 420 + 320) / sum(PROMPT_TOKENS))


def test_replay_config_rejects_what_cannot_run():
    for bad in (dict(capacity=0), dict(capacity=10, max_variants=0), dict(capacity=10, craft_alpha=-1.0)):
        with pytest.raises(ValueError):
            ReplayConfig(**bad)
    with pytest.raises(ValueError, match="needs a recompute ratio"):
        parse_sim_strategies("prefix,cacheblend")
    with pytest.raises(ValueError, match="unknown trace strategy"):
        parse_sim_strategies("naive")


def test_epic_rounds_per_chunk_and_cacheblend_over_the_request(trace_dir):
    config = ReplayConfig(10**6, "lru", {"gpu": 1.0})
    _, blend = _run(trace_dir, "cacheblend@0.01", config, keep=[1])
    _, epic = _run(trace_dir, "epic@0.01", config, keep=[1])
    assert blend[1].fixed_chunk == 3  # ceil(0.01 x 300)
    assert epic[1].fixed_chunk == 2 + 1  # ceil(0.01 x 200) + ceil(0.01 x 100)


def test_cachecraft_uses_the_best_variant_and_its_budget_rule(trace_dir):
    summary, kept = _run(trace_dir, "cachecraft", keep=range(5))
    # alpha 0.5, CCI 1: a hit recomputes ceil(0.5 x (1 - overlap) x length). A miss stores the chunk's KV as
    # computed in its context (a variant keyed by the passages before it). Overlap counts what was before the
    # variant and is not now against it (blend/variant_choice.py). r1: 11 first, but its only variant was
    # computed after 10 (overlap 0: 100) and 10 after 11 has only its first-position variant (0: 50), both
    # contexts stored as new variants; r2, r3: variants match exactly (0), 12 misses in r2 (100); r4: 12 first
    # after being computed after 10, 11 (0: 50), 10 after 12 matches neither variant (0: 50).
    assert [kept[i].recomputed_chunk for i in range(5)] == [300, 150, 100, 0, 100]
    assert [kept[i].recomputed_prompt for i in range(5)] == [425, 175, 115, 5, 105]
    assert [kept[i].chunk_overlaps for i in range(5)] == [
        [None, None],
        [0.0, 0.0],
        [1.0, 1.0, None],
        [1.0, 1.0],
        [0.0, 0.0],
    ]
    assert summary["variant_hits"] == {"1": 3, "2": 5}
    assert summary["exact_variant_share"] == pytest.approx(4 / 8)


def test_cachecraft_keeps_at_most_max_variants_per_chunk(trace_dir):
    from ragkv.eval.trace_replay import StrategyReplay

    state = StrategyReplay(parse_sim_strategies("cachecraft")[0], BIG, COSTS)
    for req in load_trace(trace_dir):
        state.run(req)
    # chunk 10 was seen after nothing, after 11 and after 12. In r4 (10 after 12) both held variants overlap
    # 0 and the tie goes to the one used longest ago (after 11), which so became the most recent: the least
    # recently used one (first position, last used in r3) left for the new variant after 12
    assert sorted(state.variants[10]) == [("variant", 10, (11,)), ("variant", 10, (12,))]
    assert ("variant", 10, ()) not in state.store
    assert all(k in state.store for k in state.variants[10])


def test_sim_store_demotes_promotes_and_respects_pins():
    dropped = []
    store = SimStore([("gpu", 100), ("cpu", 200)], "lru", on_drop=dropped.append)
    for k in "abcd":
        store.put(k, 100, 1.0)
    assert dropped == ["a"] and [store.where(k) for k in "abcd"] == [None, "cpu", "cpu", "gpu"]
    assert store.hit("b") == "cpu"  # read from cpu, promoted: d goes down to cpu
    assert [store.where(k) for k in "bcd"] == ["gpu", "cpu", "cpu"]
    store.pinned = {"c"}  # c is the least recent in cpu but pinned: d is dropped instead
    store.put("e", 100, 1.0)
    assert dropped == ["a", "d"] and [store.where(k) for k in "bce"] == ["cpu", "cpu", "gpu"]
    assert store.put("x", 300, 1.0) is None and dropped[-1] == "x"  # larger than every tier


def test_tier_hit_rates_follow_the_split(trace_dir):
    # 300 tokens of gpu only. r0 stores sys blocks "1" (100), "1,2" (20) and chunk 10 (100); chunk 11 (200)
    # does not fit, and everything held is pinned by r0 itself, so 11 is dropped. r1 reads "1" and 10.
    config = ReplayConfig(300, "lru", {"gpu": 1.0})
    _, kept = _run(trace_dir, "cacheblend@0.15", config, keep=[1])
    assert kept[1].tier_tokens == {"gpu": 200, "cpu": 0, "disk": 0}
    assert kept[1].chunk_hits == 1 and kept[1].recomputed_chunk == 200 + 15
    # gpu 300 + cpu 700: r0's chunk 11 goes down to cpu instead; r1 reads it there (its promotion finds
    # only r1's own pinned entries and "1,2" to evict, not enough, so it stays in cpu)
    config = ReplayConfig(1000, "lru", {"gpu": 0.3, "cpu": 0.7})
    _, kept = _run(trace_dir, "cacheblend@0.15", config, keep=[1, 2])
    assert kept[1].tier_tokens == {"gpu": 200, "cpu": 200, "disk": 0}
    # r2 ("1", "1,2", 10, 11, 12): "1,2" was demoted to cpu by that promotion, 11 is still there
    assert kept[2].tier_tokens == {"gpu": 200, "cpu": 220, "disk": 0}


def test_utility_policy_weighs_recent_reuse_and_saved_compute():
    def entry(name, cost=100.0):
        return EntryInfo(name, 100, 100, cost)

    for half_life, victim in ((1.0, "old"), (1000.0, "new")):
        policy = make_policy("utility")
        policy.half_life = half_life
        old, new = entry("old"), entry("new")
        policy.on_insert(old, 1)
        policy.on_hit(old, 2)
        policy.on_hit(old, 3)
        policy.on_insert(new, 10)
        assert policy.victim([old, new], set()).key == victim, half_life
    policy = make_policy("utility")
    cheap, dear = entry("cheap", cost=10.0), entry("dear", cost=100.0)
    policy.on_insert(dear, 1)
    policy.on_insert(cheap, 2)
    assert policy.victim([cheap, dear], set()).key == "cheap"  # same reuse: less compute saved goes first


def test_craft_ratio_and_sample_choice(trace_dir):
    requests = load_trace(trace_dir)
    _, kept = _run(trace_dir, "cachecraft", keep=[4])
    # r4: 12 first but computed after 10, 11 (overlap 0: 50 of 100), 10 with overlap 0 (50): 100 of 200
    assert craft_ratio(requests[4], kept[4], 0.5, 1.0) == pytest.approx(100 / 200)
    assert craft_ratio(requests[4], None, 0.5, 1.0) == pytest.approx(50 / 200)  # a miss: context-free entry
    assert craft_recompute(100, 0.25, 0.5, 1.0) == 38 and craft_recompute(100, 0.0, 4.0, 1.0) == 100
    assert choose_sample(requests, 4, 1000) == [2, 3, 4]  # second half, >= 2 passages, small enough
    assert choose_sample(requests, 4, 300) == [4]  # r2: 415 and r3: 305 tokens of passages, history, input
    assert choose_sample(requests, 0, 1000) == []


def test_cli_trace_replay_with_given_costs(trace_dir, tmp_path, capsys):
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps(COSTS.to_dict()))
    out = tmp_path / "trace.json"
    argv = ["eval", "--trace", str(trace_dir), "--costs", str(costs), "--sample", "0", "--out", str(out)]
    assert main([*argv, "--capacity", "300,1k", "--policies", "lru,utility"]) == 0
    report = json.loads(out.read_text())
    assert report["requests"] == 5 and "sample" not in report
    assert len(report["grid"]) == 2 * 2 * 4
    row = next(r for r in report["grid"] if r["strategy"] == "prefix" and r["capacity_tokens"] == 1000)
    assert row["recomputed_prompt_tokens_per_request"] == pytest.approx(1075 / 5)
    assert "| lru | 1,000 | cachecraft |" in capsys.readouterr().out
    assert main(["eval", "--trace", str(trace_dir), "--data", "x.jsonl"]) == 2  # one input, not both
