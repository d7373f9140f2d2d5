"""Proxy mode: the sidecar fuses, publishes the fused KV, and forwards the prompt as token ids to an
upstream `/v1/completions` (a tiny local HTTP server standing in for vLLM, which looks the entry up as
ragkv's connector would). Checks: the exact ids, the entry present when the upstream asks and gone
afterwards, the answer and ragkv fields streamed back, and the fallback when no entry was published."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from retriever_fakes import tiny_byte_adapter

from ragkv.engine.config import EngineConfig
from ragkv.engine.engine import Engine
from ragkv.server.app import create_app
from ragkv.server.fused_store import FusedKVStore
from ragkv.server.settings import load_settings
from ragkv.server.upstream import Upstream, fused_store_of
from ragkv.storage import MemoryTier, TieredStore

DOCS = ["The Rhine bends north at Basel.", "Lake Constance feeds the Rhine."]
QUESTION = "Where does the Rhine bend north?"


class FakeVLLM:
    """`/v1/models` and a streaming `/v1/completions` taking token-id prompts. Like vLLM with ragkv's
    connector, it answers "loaded" when the fused entry for the exact ids is there, else "prefilled"."""

    def __init__(self, fused_dir) -> None:
        self.requests: list[dict] = []
        self.entry_rows: list[int | None] = []
        self.records: list = []
        store = FusedKVStore(fused_dir, shm_dir=fused_dir.parent / "shm")
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                body = json.dumps({"object": "list", "data": [{"id": "fake-model", "object": "model"}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(req)
                entry = store.find(req["prompt"])
                fake.entry_rows.append(None if entry is None else entry.num_rows)
                fake.records.append(entry)
                words = ["load", "ed"] if entry is not None else ["pre", "filled"]
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for i, w in enumerate(words):
                    choice = {"index": 0, "text": w, "token_ids": [40 + i], "finish_reason": None}
                    self.wfile.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
                    self.wfile.flush()
                usage = {"prompt_tokens": len(req["prompt"]), "completion_tokens": 2, "total_tokens": 0}
                self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _store(tmp_path, **kw):
    return FusedKVStore(tmp_path / "fused", shm_dir=tmp_path / "shm", **kw)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("engine")
    return Engine(tiny_byte_adapter(), TieredStore([MemoryTier()]), EngineConfig(data_dir=str(tmp), max_new_tokens=4))


@pytest.fixture
def fake(tmp_path):
    f = FakeVLLM(tmp_path / "fused")
    yield f
    f.close()


def _post(engine, tmp_path, upstream, body, path="/v1/chat/completions"):
    app = create_app(load_settings(data_dir=str(tmp_path)), engine, upstream=upstream)

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as c:
            return await c.post(path, json=body)

    try:
        return asyncio.run(main())
    finally:
        app.state.worker.close()


def _chat(stream=False):
    return {
        "messages": [{"role": "user", "content": QUESTION}],
        "documents": DOCS,
        "max_tokens": 4,
        "stream": stream,
    }


def test_forwards_the_exact_fused_token_ids_and_returns_the_upstream_answer(engine, tmp_path, fake):
    store = _store(tmp_path)
    r = _post(engine, tmp_path, Upstream(fake.url, store), _chat())
    assert r.status_code == 200, r.text
    want = engine.plan(QUESTION, engine.tokenize_chunks(DOCS)).input_ids.tolist()
    [req] = fake.requests
    assert req["prompt"] == want and req["model"] == "fake-model" and req["max_tokens"] == 4
    assert req["stream"] is True and req["return_token_ids"] is True
    assert fake.entry_rows == [len(want) - 1]  # the entry was there when the upstream looked
    assert store.find(want) is None  # and is removed once the upstream has answered
    body = r.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"] == "loaded"
    assert body["usage"] == {"prompt_tokens": len(want), "completion_tokens": 2, "total_tokens": len(want) + 2}
    info = body["ragkv"]
    up = info["upstream"]
    assert up["published"] is True and up["fused_tokens"] == len(want) - 1 and up["url"] == fake.url
    assert up["usage"]["prompt_tokens"] == len(want) and up["upstream_first_token"] == 40
    assert isinstance(up["ragkv_first_token"], int)
    assert up["handoff"] == "shm" and up["handoff_fallback"] == []  # KV fused on CPU: shared memory
    [record] = fake.records
    assert record.model == "fake-model" and record.path == "shm"  # named for the connector's model check
    assert not list((tmp_path / "shm").iterdir())  # unpinned and gone once answered
    assert info["misses"] == 2 and info["strategy"] == "cacheblend"
    assert {"publish", "upstream_first_token", "recompute"} <= set(info["parts_ms"])


def test_streams_the_upstream_pieces_and_ends_with_ragkv_fields(engine, tmp_path, fake):
    r = _post(engine, tmp_path, Upstream(fake.url, _store(tmp_path), model="m"), _chat(stream=True))
    assert r.status_code == 200
    events = [json.loads(line[5:]) for line in r.text.splitlines() if line.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert text == "loaded" and r.text.rstrip().endswith("data: [DONE]")
    assert events[-1]["ragkv"]["upstream"]["published"] is True and fake.requests[0]["model"] == "m"


def test_completions_endpoint_forwards_too(engine, tmp_path, fake):
    body = {"prompt": QUESTION, "documents": DOCS, "max_tokens": 4}
    r = _post(engine, tmp_path, Upstream(fake.url, _store(tmp_path)), body, "/v1/completions")
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "loaded"
    assert fake.requests[0]["prompt"] == engine.plan(QUESTION, engine.tokenize_chunks(DOCS)).input_ids.tolist()


def test_without_a_published_entry_the_upstream_prefills_the_same_ids(engine, tmp_path, fake):
    blocker = tmp_path / "fused"
    blocker.write_text("a file where the fused folder should be")  # publishing fails
    r = _post(engine, tmp_path, Upstream(fake.url, FusedKVStore(blocker, shm_dir=blocker)), _chat())
    assert r.status_code == 200
    want = engine.plan(QUESTION, engine.tokenize_chunks(DOCS)).input_ids.tolist()
    assert fake.requests[0]["prompt"] == want and fake.entry_rows == [None]
    assert r.json()["choices"][0]["message"]["content"] == "prefilled"
    up = r.json()["ragkv"]["upstream"]
    assert up["published"] is False and up["fused_tokens"] == 0 and "Error" in up["publish_error"]


def test_a_full_handoff_budget_falls_back_to_a_full_prefill_naming_why(engine, tmp_path, fake):
    r = _post(engine, tmp_path, Upstream(fake.url, _store(tmp_path, budget_bytes=64)), _chat())
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "prefilled"
    up = r.json()["ragkv"]["upstream"]
    assert up["published"] is False and "budget full" in up["publish_error"] and up["handoff"] is None


def test_fused_store_words_from_the_command_line(tmp_path):
    store = fused_store_of(str(tmp_path), "file", "1MiB", "640")
    assert store.ledger.budget_bytes == 1 << 20 and store.entry_mode == 0o640 and store.handoff == "file"
    with pytest.raises(ValueError, match="not a size"):
        fused_store_of(str(tmp_path), budget="lots")
    with pytest.raises(ValueError, match="not octal"):
        fused_store_of(str(tmp_path), mode="rw-r--r--")


def test_an_unreachable_upstream_is_a_502_naming_it(engine, tmp_path):
    down = "http://127.0.0.1:9"  # discard port: nothing listens
    r = _post(engine, tmp_path, Upstream(down, _store(tmp_path), model="m"), _chat())
    assert r.status_code == 502 and down in r.json()["error"]["message"]
    with pytest.raises(ValueError, match="http:// or https://"):
        Upstream("localhost:8000", FusedKVStore(tmp_path))


def test_serve_upstream_flags_build_the_proxy(tmp_path, monkeypatch):
    import uvicorn

    import ragkv.server.app as app_module
    from ragkv.cli.main import build_parser

    seen = {}
    monkeypatch.setattr(app_module, "create_app", lambda settings, upstream=None: seen.setdefault("up", upstream))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: None)
    args = build_parser().parse_args(
        ["serve", "--upstream", "http://127.0.0.1:8000/", "--fused-dir", str(tmp_path / "f"), "--upstream-model", "m"]
    )
    assert args.func(args) == 0
    up = seen["up"]
    assert up.url == "http://127.0.0.1:8000" and up.model == "m" and up.store.root == tmp_path / "f"
    args = build_parser().parse_args(["serve"])
    seen.clear()
    args.func(args)
    assert seen["up"] is None  # no --upstream: ragkv generates itself
