"""ragkv as a library: answer over documents; the second question reuses the chunks' cached KV."""

from ragkv import Engine

engine = Engine.from_pretrained("smollm2")
docs = [
    "The Rhine rises in the Swiss Alps and bends north at Basel.",
    "Ada Lovelace wrote the first computer program for Babbage's engine.",
]
for question in ("Where does the Rhine bend north?", "Who wrote the first computer program?"):
    answer = engine.generate(question, docs, strategy="cacheblend", recompute_ratio=0.15, max_new_tokens=16)
    print(repr(answer.text), f"TTFT {answer.ttft_ms:.0f} ms, hits {answer.hits}, misses {answer.misses}")
