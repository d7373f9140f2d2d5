"""Where answers turn: at the first token where a blended greedy answer leaves the full prefill's, which
prompt tokens does the full prefill's attention rely on, and which did each selector recompute?

Per sample: the full prefill (the model's own forward), its greedy answer (`--new-tokens`, 24), its logits
teacher-forced along that answer, and the full prefill's attention from every answer position over the
prompt (heads and layers averaged; one scout pass over the full KV). Per variant (`strategy@ratio;key=v`
as experiments/selection_sweep.py; `oracle@r` recomputes the top r chunk tokens by the full prefill's
attention from the answer positions, known only after the fact): same_answer, agree_prefix, kl_mean /
top-1 teacher-forced, and at the first differing token t the share of the full prefill's chunk attention
that sits on recomputed rows (`covered`), on the last chunk, on chunk heads / tails (first / last 8
tokens), and the share the best `ratio` of chunk tokens could cover (`best`). References are cached in
`--cache` (a rerun costs only the variants).

    python experiments/answer_turns.py --data ../shared/data/cacheblend/musique_s.json --format musique \
        --limit 6 --variants "naive,cacheblend@0.15,cacheblend+query@0.15,focus@0.15,oracle@0.15"
    python experiments/answer_turns.py --demo --variants "naive,cacheblend@0.15,focus@0.15"
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
from pathlib import Path

import torch
from selection_sweep import parse_variant

from ragkv.blend import blend, make_strategy
from ragkv.blend.plan import BlendPlan
from ragkv.blend.query_select import top_rows
from ragkv.blend.scout import attention_rows, scout
from ragkv.blend.select import budget
from ragkv.blend.strategies import Strategy
from ragkv.chunk_cache import ChunkKV
from ragkv.cli.demo import shipped_demo
from ragkv.engine.engine import Engine
from ragkv.engine.full_prefill import full_prefill
from ragkv.engine.prompt import template_for
from ragkv.eval.datasets import Sample, load_samples
from ragkv.eval.metrics import agree_prefix, f1, kl_per_position, top1_agreement
from ragkv.eval.runner import sample_chunks

EDGE = 8  # tokens counted as a chunk's head / tail


class OracleRows(Strategy):
    """Recompute given chunk rows from layer 0 (an after-the-fact oracle)."""

    name = "naive"

    def __init__(self, ratio: float, score: torch.Tensor) -> None:
        super().__init__(0.0)
        self.oracle_ratio, self.score = ratio, score

    def initial_tokens(self, plan, cached):
        return ~cached | top_rows(self.score, cached, budget(self.oracle_ratio, int(cached.sum())))


def recorded(strategy: Strategy, box: dict) -> Strategy:
    """Wrap `strategy` so that `box["rows"]` ends as the rows computed in its last layer."""
    initial, narrow = strategy.initial_tokens, strategy.narrow

    def initial_tokens(plan, cached):
        out = initial(plan, cached)
        box["rows"] = out.nonzero().flatten()
        return out

    def narrowed(step, plan, rows, is_cached, deviation, num_cached):
        keep = narrow(step, plan, rows, is_cached, deviation, num_cached)
        box["rows"] = rows[keep].cpu()
        return keep

    strategy.initial_tokens, strategy.narrow = initial_tokens, narrowed
    return strategy


@torch.inference_mode()
def answer_attention(engine: Engine, plan: BlendPlan, full, answer: list[int]) -> torch.Tensor:
    """[T, N] fp32: the full prefill's attention (mean over heads and layers) from the position that
    predicts answer token t over the N prompt rows."""
    model, n = engine.model, plan.num_tokens
    kv = torch.stack(
        [
            torch.stack([k[0, :, : n - 1].transpose(0, 1), v[0, :, : n - 1].transpose(0, 1)])
            for k, v in full.prompt_kv()
        ],
        dim=1,
    )  # [2, L, N-1, H, D]
    ids = torch.cat([plan.input_ids, torch.tensor(answer[:-1], dtype=torch.long)])
    ext = BlendPlan(ids, ((0, n - 1),))
    active = torch.zeros(ext.num_tokens, dtype=torch.bool)
    active[n - 1 :] = True
    out = torch.zeros(len(answer), n)

    def observe(layer, rows, q, keys):
        att = attention_rows(q, keys, rows, model.scaling).mean(0)  # [T, N+T-1]
        out.add_(att[:, :n].float().cpu())

    layers = list(range(model.num_layers))
    scout(model, ext, [(0, ChunkKV(kv, pos0=0))], active, layers, observe)
    return out / len(layers)


def reference(engine: Engine, plan: BlendPlan, new_tokens: int, cache: Path | None, key: str | None = None) -> dict:
    """The full prefill's greedy answer, its teacher-forced logits and attention; kept in `cache` under
    `key` (by default a hash of the prompt's ids and `new_tokens`)."""
    if key is None:
        key = hashlib.sha1(json.dumps([plan.input_ids.tolist(), new_tokens]).encode()).hexdigest()[:16]
    path = cache / f"{key}.pt" if cache else None
    if path and path.exists():
        return torch.load(path)
    full = full_prefill(engine.model, plan, reserve=new_tokens + 1)
    answer = list(engine.answer_ids(full, new_tokens)) or [int(full.logits.argmax())]
    forced = torch.tensor(answer)
    ref = {
        "answer": answer,
        "logits": engine.teacher_forced_logits(full, forced),
        "attention": answer_attention(engine, plan, full, answer).half(),
    }
    if path:
        torch.save(ref, path)
    return ref


def turn_shares(att: torch.Tensor, plan: BlendPlan, rows: torch.Tensor, ratio: float) -> dict:
    """At one answer position: where the chunk attention `att` [N] sits, and how much `rows` covers."""
    chunk = plan.chunk_mask()
    mass = att.float() * chunk
    total = float(mass.sum()) or 1.0
    recomputed = torch.zeros_like(chunk)
    recomputed[rows] = True
    heads, tails = torch.zeros_like(chunk), torch.zeros_like(chunk)
    for start, end in plan.chunk_spans:
        heads[start : start + EDGE] = True
        tails[max(start, end - EDGE) : end] = True
    last = torch.zeros_like(chunk)
    last[plan.chunk_spans[-1][0] : plan.chunk_spans[-1][1]] = True
    k = budget(ratio, int(chunk.sum())) if ratio > 0 else 0
    best = float(mass.topk(k).values.sum()) / total if k else 0.0
    return {
        "chunk_share": total / float(att.float().sum()),
        "covered": float(mass[recomputed & chunk].sum()) / total,
        "best": best,
        "last_chunk": float(mass[last].sum()) / total,
        "heads": float(mass[heads].sum()) / total,
        "tails": float(mass[tails].sum()) / total,
        "top1pct": float(mass.topk(max(1, int(chunk.sum()) // 100)).values.sum()) / total,
    }


def evaluate(engine: Engine, sample: Sample, variants, args) -> dict:
    chunks = sample_chunks(engine, sample)
    plan = engine.plan(sample.question, chunks)
    ref = reference(engine, plan, args.new_tokens, args.cache)
    keys, _, _ = engine.ensure_cached(chunks)
    sources = [(s, kv) for (s, _), kv in zip(plan.chunk_spans, engine.store.get_layered_many(keys))]
    forced = torch.tensor(ref["answer"])
    att = ref["attention"].float()  # [T, N]
    full_text = engine.tokenizer.decode(ref["answer"], skip_special_tokens=True).strip()
    row = {"id": sample.id, "prompt_tokens": plan.num_tokens, "full": full_text, "variants": {}}
    for label, name, ratio, config in variants:
        box: dict = {}
        if name == "oracle":
            strategy = recorded(OracleRows(ratio, att.mean(0)), box)
        else:
            strategy = recorded(make_strategy(name, ratio, config), box)
        result = blend(engine.model, plan, strategy, sources, reserve=args.new_tokens + 1)
        answer = list(engine.answer_ids(result, args.new_tokens))
        logits = engine.teacher_forced_logits(result, forced)
        text = engine.tokenizer.decode(answer, skip_special_tokens=True).strip()
        agree = agree_prefix(ref["answer"], answer)
        turn = next((i for i, (a, b) in enumerate(zip(ref["answer"], answer)) if a != b), None)
        if turn is None and len(answer) != len(ref["answer"]):
            turn = min(len(answer), len(ref["answer"]))
        out = {
            "same_answer": answer == ref["answer"],
            "agree_prefix": agree,
            "f1_vs_full": f1(text, [full_text]),
            "f1": f1(text, sample.answers),
            "kl_mean": float(kl_per_position(ref["logits"], logits).mean()),
            "top1": top1_agreement(ref["logits"], logits),
            "recompute_fraction": result.recompute_fraction,
            "turn": turn,
            "answer": text,
        }
        rows = box.get("rows", torch.zeros(0, dtype=torch.long))
        if turn is not None and turn < att.shape[0]:
            out.update(turn_shares(att[turn], plan, rows, max(ratio, result.recompute_fraction)))
        row["variants"][label] = out
    return row


def demo_samples(engine: Engine, k: int) -> list[Sample]:
    """The shipped demo questions over their `k` retrieved chunks (namespace `demo`, as `ragkv demo`)."""
    paths, questions = shipped_demo()
    engine.ingest(paths, namespace="demo")
    out = []
    for q in questions:
        hits = engine.retrieve(q["question"], k, namespace="demo")
        out.append(
            Sample(
                q["id"],
                q["question"],
                tuple(h.text for h in hits),
                tuple(q["answers"]),
                tuple(tuple(h.token_ids) for h in hits),
            )
        )
    return out


def summarize(rows: list[dict]) -> dict:
    labels = list(rows[0]["variants"])
    keys = ("same_answer", "agree_prefix", "f1_vs_full", "f1", "kl_mean", "top1", "recompute_fraction")
    turn_keys = ("chunk_share", "covered", "best", "last_chunk", "heads", "tails", "top1pct")
    summary = {}
    for label in labels:
        vs = [r["variants"][label] for r in rows]
        s = {k: statistics.fmean(float(v[k]) for v in vs) for k in keys}
        turned = [v for v in vs if "covered" in v]
        s["turned"] = len(turned)
        for k in turn_keys:
            s[k] = statistics.fmean(v[k] for v in turned) if turned else float("nan")
        summary[label] = s
    return summary


def add_sample_args(ap: argparse.ArgumentParser, limit: int) -> None:
    """The options that pick the samples and their references (shared with shared_prefix.py)."""
    ap.add_argument("--data", default="../shared/data/cacheblend/musique_s.json")
    ap.add_argument("--format", default="musique")
    ap.add_argument("--demo", action="store_true", help="the shipped demo questions (3 retrieved chunks)")
    ap.add_argument("--limit", type=int, default=limit)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--max-chunks", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", type=Path, default=None, help="folder for the full-prefill references")


def engine_and_samples(args) -> tuple[Engine, list[Sample]]:
    """SmolLM2 with the dataset's template, and the samples `add_sample_args` picked."""
    torch.set_num_threads(args.threads)
    if args.cache:
        args.cache.mkdir(parents=True, exist_ok=True)
    engine = Engine.from_pretrained("smollm2")
    if args.demo:
        return engine, demo_samples(engine, 3)[args.offset : args.offset + args.limit]
    engine.template = template_for(args.format)
    return engine, load_samples(args.data, args.format, args.limit + args.offset, args.max_chunks)[args.offset :]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_sample_args(ap, limit=6)
    ap.add_argument("--variants", default="naive,cacheblend@0.15,cacheblend+query@0.15,oracle@0.15")
    ap.add_argument("--out", default="answer_turns.json")
    ap.add_argument("--plot", default=None, help="PNG: where the full prefill's attention sits at the turn")
    args = ap.parse_args()
    engine, samples = engine_and_samples(args)
    variants = [parse_variant(v) for v in args.variants.split(",") if v.strip()]
    rows = []
    for sample in samples:
        rows.append(evaluate(engine, sample, variants, args))
        print(json.dumps(rows[-1]), flush=True)  # per sample, so a run cut short still reports
    summary = summarize(rows)
    cols = (
        "same_answer",
        "agree_prefix",
        "kl_mean",
        "top1",
        "recompute_fraction",
        "turned",
        "covered",
        "best",
        "last_chunk",
        "heads",
        "tails",
        "top1pct",
    )
    print(f"\n{'demo' if args.demo else args.data} n={len(rows)}\n| variant | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for label, s in summary.items():
        print(
            f"| {label} | " + " | ".join(f"{s[c]:.3f}" if isinstance(s[c], float) else str(s[c]) for c in cols) + " |"
        )
    if args.plot:
        plot(
            summary, args.plot, f"where the full prefill's attention sits at the first differing token ({len(rows)} q)"
        )
    Path(args.out).write_text(
        json.dumps(
            {"data": "demo" if args.demo else args.data, "n": len(rows), "summary": summary, "rows": rows}, indent=1
        )
    )


def plot(summary: dict, path: str, title: str) -> None:
    """Per variant: the share of the turn's chunk attention on recomputed rows, what the best rows of
    the same count would cover, and the share on the last chunk, chunk heads / tails and the top 1%."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [k for k, v in summary.items() if v["turned"] and k != "naive"]
    cols = ("covered", "best", "last_chunk", "heads", "tails", "top1pct")
    fig, ax = plt.subplots(figsize=(9.6, 4.2))
    width = 0.8 / len(cols)
    for i, col in enumerate(cols):
        ax.bar([x + i * width for x in range(len(labels))], [summary[k][col] for k in labels], width, label=col)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], [k.replace(";", "\n") for k in labels], fontsize=7)
    ax.set_ylabel("share of the chunk attention at the turn")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=3)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
