"""The sidecar under hostile input and unfair load, in process (ASGI) over a tiny random model: the
inputs that gave a 500 now get a 4xx, a seeded fuzz of every endpoint gets no response >= 500, the
model worker takes steps round-robin across tenants and cancels abandoned work, and a tenant's
`/v1/cache/stats` shows only its own entries."""

from __future__ import annotations

import asyncio
import json
import random
import threading

import httpx
import pytest
from asgi_helpers import A, B, get, post, tiny_app

from ragkv.server.worker import ModelWorker, QueueFull


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    app = tiny_app(tmp_path_factory.mktemp("hardening"))
    yield app
    app.state.worker.close()


Q = '"messages": [{"role": "user", "content": "q"}]'
FORMER_500S = [
    ("/v1/chat/completions", "{" + Q + ', "temperature": 1e-40}', "temperature"),
    ("/v1/chat/completions", "{" + Q + ', "documents": [{"chunk_id": 9223372036854775808}]}', "chunk_id"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "q \\ud800"}]}', "lone surrogate"),
    ("/v1/chat/completions", "{" + Q + ', "documents": ["a \\udfff b"]}', "lone surrogate"),
    ("/v1/chat/completions", "{" + Q + ', "retrieve": {"query": "\\ud800"}}', "lone surrogate"),
    ("/v1/completions", '{"prompt": "x\\ud800"}', "lone surrogate"),
    ("/v1/documents", '{"documents": [{"id": "d", "text": "x\\ud800"}]}', "string"),
    ("/v1/retrieve", '{"query": "\\udc00"}', "string"),
]


@pytest.mark.parametrize("path,body,needle", FORMER_500S, ids=[f"{p}:{n}" for p, _, n in FORMER_500S])
def test_inputs_that_gave_a_500_get_a_400(app, path, body, needle):
    r = post(app, path, body)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]


def test_a_tiny_temperature_samples_and_greedy_still_works(app):
    for t in (1e-6, 0):
        r = post(app, "/v1/chat/completions", "{" + Q + f', "temperature": {t}, "documents": ["hello there"]}}')
        assert r.status_code == 200, r.text


HOSTILE = [
    None,
    True,
    -1,
    0,
    1,
    2**31,
    2**63,
    -(2**63) - 1,
    10**30,
    1e-40,
    1e308,
    -0.0,
    "",
    " ",
    "\ud800",
    "a\x00b",
    "x" * 5000,
    "☃",
    [],
    [1, "a"],
    {},
    {"text": "\udfff"},
    {"chunk_id": 2**64},
    {"chunk_id": -5},
    [{"role": "user", "content": "\ud800"}],
    [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    [{"role": "user", "content": [{"type": "image_url"}]}],
]
TEMPLATES = {
    "/v1/chat/completions": {
        "messages": [{"role": "user", "content": "q"}],
        "documents": ["some text"],
        "retrieve": {"query": "q", "k": 2},
        "blend": {"strategy": "cacheblend", "recompute_ratio": 0.2},
        "max_tokens": 2,
        "temperature": 0.5,
        "stream": False,
    },
    "/v1/completions": {"prompt": "q", "documents": [{"text": "t"}, {"chunk_id": 1}], "max_tokens": 1, "n": 1},
    "/v1/documents": {"documents": [{"id": "d1", "text": "some words here", "metadata": {"k": "v"}}]},
    "/v1/retrieve": {"query": "words", "k": 3},
}


def _mutate(value, rng: random.Random, depth: int = 0):
    """`value` with one random field (at any depth) replaced, removed or added."""
    if isinstance(value, dict) and value and depth < 3 and rng.random() < 0.6:
        out = dict(value)
        k = rng.choice(list(out))
        roll = rng.random()
        if roll < 0.15:
            del out[k]
        elif roll < 0.25:
            out[rng.choice(["extra", "\ud800", "n", "top_p"])] = rng.choice(HOSTILE)
        else:
            out[k] = _mutate(out[k], rng, depth + 1)
        return out
    if isinstance(value, list) and value and depth < 3 and rng.random() < 0.6:
        out = list(value)
        i = rng.randrange(len(out))
        out[i] = _mutate(out[i], rng, depth + 1)
        return out
    return rng.choice(HOSTILE)


def test_seeded_fuzz_of_every_endpoint_gets_no_5xx(app):
    """120 mutated bodies (plus raw junk) over the OpenAPI schema's POST endpoints: every answer < 500."""
    paths = [p for p, ops in app.openapi()["paths"].items() if "post" in ops]
    assert set(TEMPLATES) <= set(paths)
    rng = random.Random(15)
    bodies = [(p, json.dumps(_mutate(TEMPLATES[p], rng))) for p in TEMPLATES for _ in range(30)]
    bodies += [(p, junk) for p in paths for junk in ("", "[]", "null", '{"a":', "\x00", '{"documents": 5}')]
    statuses = []

    async def go():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
            for path, body in bodies:
                r = await c.post(path, content=body.encode("utf-8", "surrogatepass"), headers=A)
                statuses.append((r.status_code, path, body[:200], r.text[:200]))
            assert (await c.get("/healthz")).json()["status"] == "ok"

    asyncio.run(go())
    server_errors = [s for s in statuses if s[0] >= 500]
    assert server_errors == [], server_errors[:5]
    assert {s[0] for s in statuses} & {200} and {s[0] for s in statuses} & {400, 422}


def test_cache_stats_show_only_the_tenants_own_entries(app):
    r = post(app, "/v1/documents", json.dumps({"documents": [{"id": "a1", "text": "alpha " * 60}]}), A)
    assert r.status_code == 200, r.text
    assert post(app, "/v1/chat/completions", "{" + Q + ', "documents": ["beta beta"]}', B).status_code == 200
    a, b = get(app, "/v1/cache/stats", A).json(), get(app, "/v1/cache/stats", B).json()
    entries = {name: sum(t["entries"] for t in s["store"]["tiers"]) for name, s in (("a", a), ("b", b))}
    total = len(app.state.engine.store.tiers[0])
    assert entries["a"] >= 1 and entries["b"] >= 1 and entries["a"] + entries["b"] == total
    assert b["store"]["requests"] == 1 and b["namespace"] == "tenant-b" and b["store"]["scope"] == "tenant"


# -- the worker: round-robin across tenants, per-tenant limits, cancellation -----------------------------
def test_a_newly_active_tenant_is_stepped_before_a_flooding_one():
    order: list[str] = []
    gate = threading.Event()

    def work(name: str, steps: int):
        def gen():
            for _ in range(steps):
                gate.wait(5)
                order.append(name)
                yield None
            yield name

        return gen

    async def main():
        w = ModelWorker(queue_size=8)
        flood = [asyncio.ensure_future(_collect(w.steps(work(f"a{i}", 5), "a"))) for i in range(3)]
        await asyncio.sleep(0.05)
        short = asyncio.ensure_future(_collect(w.steps(work("b", 2), "b")))
        await asyncio.sleep(0.05)
        gate.set()
        assert await short == ["b"]
        await asyncio.gather(*flood)
        w.close()

    asyncio.run(main())
    first_b = order.index("b")
    assert first_b <= 1 and order[first_b + 1] == "b"  # at most the step already running, not 15 steps of tenant a
    assert len(order) == 17


async def _collect(agen) -> list:
    return [x async for x in agen]


def test_per_tenant_limit_and_cancelled_requests_free_their_slot():
    gate = threading.Event()
    ran: list[str] = []

    def slow(name):
        def gen():
            for _ in range(50):
                ran.append(name)
                gate.wait(0.02)
                yield None
            yield name

        return gen

    async def main():
        w = ModelWorker(queue_size=4, per_tenant=2)
        running = asyncio.ensure_future(_collect(w.steps(slow("first"), "a")))
        waiting = asyncio.ensure_future(_collect(w.steps(slow("queued"), "a")))
        await asyncio.sleep(0.1)
        with pytest.raises(QueueFull, match="limit per tenant is 2"):
            await w.call(lambda: 1, tenant="a")
        assert await w.call(lambda: "b ok", tenant="b") == "b ok"  # another tenant still gets in
        waiting.cancel()  # the client went away between two steps: its slot is free at once
        await asyncio.sleep(0.05)
        assert w.in_flight("a") == 1
        stopped_at = ran.count("queued")
        running.cancel()  # and while running: stopped before its next step
        await asyncio.sleep(0.3)
        assert w.depth == 0 and ran.count("queued") == stopped_at and ran.count("first") < 20
        w.close()

    asyncio.run(main())
