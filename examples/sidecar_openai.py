"""Talk to a running sidecar (`ragkv serve --port 8000`) with the official OpenAI client.

ragkv's own fields go in `extra_body`: `documents` (each fused as its own cached chunk), `blend`
(strategy, recompute ratio) and, with ingested documents, `retrieve` ({query, k}). The reply's
`ragkv` object says where the time to first token went and which chunks hit the cache.
"""

from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused-without-auth")
docs = [
    "The Rhine rises in the Swiss Alps and bends north at Basel.",
    "Lake Constance lies on the Rhine between Germany, Austria and Switzerland.",
]
for attempt in ("first (chunks precomputed)", "second (chunks reused)"):
    r = client.chat.completions.create(
        model="smollm2",
        max_tokens=16,
        messages=[{"role": "user", "content": "Where does the Rhine bend north?"}],
        extra_body={"documents": docs, "blend": {"strategy": "cacheblend", "recompute_ratio": 0.15}},
    )
    info = r.model_extra["ragkv"]
    print(
        f"{attempt}: {r.choices[0].message.content!r}  TTFT {info['ttft_ms']:.0f} ms, "
        f"hits {info['hits']}, misses {info['misses']}"
    )

stream = client.chat.completions.create(
    model="smollm2",
    max_tokens=16,
    stream=True,
    messages=[{"role": "user", "content": "Where does the Rhine bend north?"}],
    extra_body={"documents": docs},
)
print("".join(c.choices[0].delta.content or "" for c in stream))
