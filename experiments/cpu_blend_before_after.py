"""CPU TTFT of the blend before vs after a change, side by side in one process (interleaved runs).

The old code is another checkout of the repository (e.g. `git archive <commit> | tar -x -C /tmp/old`),
imported as the package `ragkv_old`; both blend the same plan with the same chunk KV on the same
model. Also times the new code's attention mask kinds (SDPA blocks, one dense mask, FlexAttention's
eager reference) on the same prompt, and checks that old and new logits agree.
`python experiments/cpu_blend_before_after.py --old /tmp/old --chunks 8 --chunk-tokens 256 --repeats 7`
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from ragkv.blend import blend, make_plan, make_strategy
from ragkv.chunk_cache import precompute_many
from ragkv.models import load_adapter


def import_tree(path: Path, name: str):
    """Import the repository checkout at `path` as the package `name`."""
    spec = importlib.util.spec_from_file_location(name, path / "__init__.py", submodule_search_locations=[str(path)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old", required=True, help="folder of the old checkout (its root is the package)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--chunk-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--strategies", default="cacheblend@0.15,naive,epic@0.15")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument(
        "--kinds", default="dense,flex", help="the new code's other mask kinds to time (blocks is its default)"
    )
    p.add_argument("--out", default="results-cpu-blend-before-after.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    old = import_tree(Path(args.old).resolve(), "ragkv_old")
    import ragkv_old.blend as old_blend
    import ragkv_old.models as old_models

    new_model = load_adapter(args.model)
    old_model = old_models.adapter_for(new_model.model, new_model.tokenizer)
    assert old.__file__ != sys.modules["ragkv"].__file__, "the old tree must be another checkout"
    vocab = new_model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randint(100, vocab, (args.chunk_tokens,), generator=g).tolist() for _ in range(args.chunks)]
    query = torch.randint(100, vocab, (24,), generator=g).tolist()
    plan = make_plan([1], chunks, query)
    old_plan = old_blend.make_plan([1], chunks, query)
    kvs = precompute_many(new_model, chunks)
    sources = [(start, kv) for (start, _), kv in zip(plan.chunk_spans, kvs)]
    print(f"{args.model}, {plan.num_tokens} prompt tokens, {torch.get_num_threads()} threads, median of {args.repeats}")
    rows = []
    for label in args.strategies.split(","):
        name, _, ratio = label.partition("@")
        ratio = float(ratio or 0.0)
        variants = {
            "before": lambda: old_blend.blend(old_model, old_plan, old_blend.make_strategy(name, ratio), sources),
            "after": lambda: blend(new_model, plan, make_strategy(name, ratio), sources),
        }
        if name != "naive":
            for kind in filter(None, args.kinds.split(",")):
                variants[f"after, {kind}"] = lambda kind=kind: blend(
                    new_model, plan, make_strategy(name, ratio), sources, attention=kind
                )
        logits = {key: fn().logits for key, fn in variants.items()}  # warm-up + agreement
        times: dict[str, list[float]] = {key: [] for key in variants}
        for _ in range(args.repeats):
            for key, fn in variants.items():  # interleaved: load bursts on the shared machine hit every variant
                t0 = time.perf_counter()
                fn()
                times[key].append((time.perf_counter() - t0) * 1e3)
        before = statistics.median(times["before"])
        for key in variants:
            ms = statistics.median(times[key])
            diff = float((logits[key] - logits["before"]).abs().max())
            rows.append(
                dict(
                    strategy=label,
                    variant=key,
                    ms=round(ms, 1),
                    x_before=round(before / ms, 3),
                    max_logit_diff_vs_before=diff,
                    times_ms=[round(t, 1) for t in times[key]],
                )
            )  # noqa: E501
            print(f"{label:<16} {key:<14} {ms:8.1f} ms  {before / ms:5.2f}x before  max |logit diff| {diff:.2e}")
    Path(args.out).write_text(
        json.dumps(dict(tokens=plan.num_tokens, threads=torch.get_num_threads(), rows=rows), indent=1)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
