"""The scheduler (server/scheduler.py) over the tiny engine: requests waiting together decode in one
batch and each gets what it gets alone (through the HTTP API too); a client that leaves takes only
its own request out of the batch; a tight budget admits tenants fairly; an oversized request runs
alone. The model thread is held on a gate (a generic `call`) while the requests queue up, so that
what joins which batch does not depend on timing."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
from tiny_engine import PASSAGES, tiny_engine

import ragkv.server.scheduler as scheduler_module
from ragkv.engine.answer import Answer
from ragkv.engine.batch_budget import BatchBudget, estimate
from ragkv.server.scheduler import Scheduler

ROOMY = BatchBudget(tokens=10_000, kv_bytes=1 << 40)

QUESTIONS = ["Where does the river bend?", "What lines the quartz road?", "What is delta?", "Name a letter."]


@pytest.fixture(scope="module")
def engine():
    return tiny_engine(max_new_tokens=6)


@pytest.fixture
def batches(monkeypatch):
    """The questions of each fuse_many group and of each decode step, in order."""
    seen = {"fused": [], "stepped": []}
    fuse_many, step_many = scheduler_module.fuse_many, scheduler_module.step_many

    def fuse(engine, requests, **options):
        seen["fused"].append([r.question for r in requests])
        return fuse_many(engine, requests, **options)

    def step(engine, streams, *on_pick):
        seen["stepped"].append([s.request.question for s in streams])
        return step_many(engine, streams, *on_pick)

    monkeypatch.setattr(scheduler_module, "fuse_many", fuse)
    monkeypatch.setattr(scheduler_module, "step_many", step)
    return seen


def _request(engine, i: int, **options):
    docs = PASSAGES[: 1 + i % 3] if i % 2 else PASSAGES[::-1][: 1 + i % 3]  # different lengths and orders
    return engine.request(QUESTIONS[i % len(QUESTIONS)], chunks=engine.tokenize_chunks(docs), **options)


def _alone(engine, request) -> Answer:
    *_, answer = engine.answer_events(request)
    return answer


def _pieces_alone(engine, request) -> list[str]:
    return list(engine.answer_events(request))[:-1]


async def _collect(events) -> list:
    return [item async for item in events]


async def _gated(worker: Scheduler, submit):
    """Hold the model thread, let `submit()` queue its work (a list of futures), then open the gate;
    returns submit's result once the gate's one step is over (the queued work has not started)."""
    gate, holding = threading.Event(), threading.Event()

    def hold():  # one generic step that ends the task (a `call` would take a second step, after a decode step)
        holding.set()
        gate.wait(10)
        yield from ()

    held = asyncio.ensure_future(_collect(worker.steps(hold, "gate")))
    while not holding.is_set():  # the model thread is inside the gate's step: nothing else runs meanwhile
        await asyncio.sleep(0.01)
    result = submit()
    for _ in range(1000):  # until all of them wait (or 10 s)
        if worker.depth == 1 + len(result):
            break
        await asyncio.sleep(0.01)
    gate.set()
    await held
    return result


def test_a_batch_of_different_requests_gives_each_its_answer_alone(engine, batches):
    requests = [_request(engine, i) for i in range(4)]
    expected = [_alone(engine, r) for r in requests]

    async def main():
        w = Scheduler(engine, queue_size=8, budget=ROOMY)
        tasks = await _gated(
            w,
            lambda: [
                asyncio.ensure_future(_collect(w.generate(lambda r=r: r, f"t{i}"))) for i, r in enumerate(requests)
            ],
        )
        results = await asyncio.gather(*tasks)
        w.close()
        return results

    results = asyncio.run(main())
    assert batches["fused"] == [[r.question for r in requests]]  # one group, fused together
    assert max(len(s) for s in batches["stepped"]) == 4
    for items, want, want_request in zip(results, expected, requests):
        answer = items[-1]
        assert isinstance(answer, Answer) and answer.token_ids == want.token_ids and answer.text == want.text
        assert items[:-1] == _pieces_alone(engine, want_request)  # the same text pieces as alone
        assert answer.ttft_ms >= answer.parts_ms["batch"] >= 0


def test_a_client_that_leaves_takes_only_its_own_request_out_of_the_batch(engine, batches):
    requests = [_request(engine, i, max_new_tokens=6) for i in range(3)]
    expected = [_alone(engine, r) for r in requests]
    stepped, resume = threading.Event(), threading.Event()
    step_many = scheduler_module.step_many

    def held_step(eng, streams, *on_pick):  # after the first step, wait until the test has cancelled one client
        out = step_many(eng, streams, *on_pick)
        stepped.set()
        resume.wait(10)
        return out

    async def main():
        w = Scheduler(engine, queue_size=8, budget=ROOMY)
        scheduler_module.step_many = held_step
        try:
            tasks = await _gated(
                w, lambda: [asyncio.ensure_future(_collect(w.generate(lambda r=r: r, "a"))) for r in requests]
            )
            await asyncio.to_thread(stepped.wait, 10)
            tasks[1].cancel()  # its client is gone (as cancel_on_disconnect does)
            await asyncio.sleep(0.05)
            resume.set()
            done = await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            scheduler_module.step_many = step_many
        w.close()  # returns once every admitted request has left
        assert w.depth == 0
        return done

    done = asyncio.run(main())
    assert isinstance(done[1], asyncio.CancelledError)
    for i in (0, 2):
        assert done[i][-1].token_ids == expected[i].token_ids
    later = batches["stepped"][1:]
    assert later and all(requests[1].question not in s for s in later)  # it left after the first step
    assert any(requests[0].question in s for s in later) or len(expected[0].token_ids) <= 1


def test_a_tight_budget_admits_the_quiet_tenant_before_the_flooding_ones_backlog(engine, batches):
    flood = [_request(engine, 0, max_new_tokens=2) for _ in range(3)]
    quiet = engine.request("Quiet tenant asks?", chunks=engine.tokenize_chunks(PASSAGES[:1]), max_new_tokens=2)
    kv = max(estimate(engine, r).kv_bytes for r in [*flood, quiet])  # K/V room for one request at a time
    budget = BatchBudget(tokens=10_000, kv_bytes=kv)  # (the token budget would let all four join at once)

    async def main():
        w = Scheduler(engine, queue_size=8, budget=budget)

        def submit():
            tasks = [asyncio.ensure_future(_collect(w.generate(lambda r=r: r, "flood"))) for r in flood]
            return tasks + [asyncio.ensure_future(_collect(w.generate(lambda: quiet, "quiet")))]

        tasks = await _gated(w, submit)
        await asyncio.gather(*tasks)
        w.close()

    asyncio.run(main())
    order = [group[0] for group in batches["fused"]]
    assert all(len(group) == 1 for group in batches["fused"]) and len(order) == 4
    assert all(len(s) == 1 for s in batches["stepped"])  # the running stream's K/V buffers count: none joins it
    assert order.index(quiet.question) <= 1  # not behind the flood's whole backlog


def test_a_request_over_the_budget_runs_alone_and_is_not_overtaken(engine, batches):
    small = [_request(engine, 1, max_new_tokens=3), _request(engine, 3, max_new_tokens=3)]
    big = engine.request("A big one?", chunks=engine.tokenize_chunks(PASSAGES * 5), max_new_tokens=3)
    sizes = [estimate(engine, r) for r in small]
    budget = BatchBudget(sum(s.tokens for s in sizes), sum(s.kv_bytes for s in sizes))  # both small ones fit
    assert estimate(engine, big).tokens > budget.tokens  # the big one alone does not

    async def main():
        w = Scheduler(engine, queue_size=8, budget=budget)
        order = [small[0], big, small[1]]
        tasks = await _gated(w, lambda: [asyncio.ensure_future(_collect(w.generate(lambda r=r: r))) for r in order])
        results = await asyncio.gather(*tasks)
        w.close()
        return results

    results = asyncio.run(main())
    assert results[1][-1].token_ids == _alone(engine, big).token_ids
    assert batches["fused"] == [[small[0].question], [big.question], [small[1].question]]
    with_big = [s for s in batches["stepped"] if big.question in s]
    assert with_big and all(s == [big.question] for s in with_big)


def test_batched_answers_equal_one_at_a_time_answers_through_the_http_api(tmp_path, batches):
    from ragkv.server.app import create_app
    from ragkv.server.settings import load_settings

    bodies = [
        {"messages": [{"role": "user", "content": QUESTIONS[i]}], "documents": PASSAGES[: 1 + i % 3], "max_tokens": 5}
        for i in range(4)
    ]

    def answers(scheduler: str) -> list[dict]:
        settings = load_settings(data_dir=str(tmp_path / scheduler), max_new_tokens=5, scheduler=scheduler)
        app = create_app(settings, tiny_engine(max_new_tokens=5))

        async def main():
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
                post = lambda b: asyncio.ensure_future(c.post("/v1/chat/completions", json=b))  # noqa: E731
                replies = await _gated(app.state.worker, lambda: [post(b) for b in bodies])
                return [r.json() for r in await asyncio.gather(*replies)]

        try:
            return asyncio.run(main())
        finally:
            app.state.worker.close()

    one, batch = answers("one"), answers("batch")
    assert [b["choices"][0]["message"]["content"] for b in batch] == [
        o["choices"][0]["message"]["content"] for o in one
    ]
    assert [b["usage"] for b in batch] == [o["usage"] for o in one]
    # the batch run fused all four together (in the order they reached the queue: FastAPI resolves each
    # request's tenant in its threadpool, so not necessarily the order they were posted)
    assert [sorted(b) for b in batches["fused"]] == [sorted(QUESTIONS[i] for i in range(4))]
    assert all(b["ragkv"]["queue_ms"] >= 0 and "batch" in b["ragkv"]["parts_ms"] for b in batch)


def test_a_burst_joins_over_several_turns_within_join_tokens(engine, batches):
    requests = [_request(engine, i, max_new_tokens=4, answer_guard=0.0) for i in range(3)]  # no step sat out
    expected = [_alone(engine, r) for r in requests]

    async def main():
        join = max(estimate(engine, r).tokens for r in requests)  # one request joins per turn
        w = Scheduler(engine, queue_size=8, budget=ROOMY, join_tokens=join)
        tasks = await _gated(w, lambda: [asyncio.ensure_future(_collect(w.generate(lambda r=r: r))) for r in requests])
        results = await asyncio.gather(*tasks)
        w.close()
        return results

    results = asyncio.run(main())
    assert batches["fused"] == [[r.question] for r in requests]  # one per turn, between decode steps
    assert [len(s) for s in batches["stepped"][:3]] == [1, 2, 3]  # each joined the batch already decoding
    assert [r[-1].token_ids for r in results] == [e.token_ids for e in expected]


def test_a_first_token_reaches_its_client_before_the_batchs_next_token_pass(engine, monkeypatch):
    import ragkv.engine.batch as batch_module

    request = _request(engine, 1, max_new_tokens=3)
    pieces = _pieces_alone(engine, request)
    assert pieces
    passes, gate = [], threading.Event()
    extend_many = batch_module.extend_many

    def held(*args):  # the next-token pass waits until the client has its first piece
        passes.append(gate.wait(10))
        return extend_many(*args)

    monkeypatch.setattr(batch_module, "extend_many", held)

    async def main():
        w = Scheduler(engine, queue_size=4, budget=ROOMY)
        events = w.generate(lambda: request, "t")
        first = await asyncio.wait_for(events.__anext__(), 5)  # while the pass after it is held
        gate.set()
        rest = [item async for item in events]
        w.close()
        return [first, *rest]

    items = asyncio.run(main())
    assert items[:-1] == pieces and isinstance(items[-1], Answer)
    assert passes and all(passes)  # every pass ran after the gate opened


def test_a_stream_waiting_on_exact_kv_sits_out_the_step_and_switches_alone():
    """The answer guard's exact prefill (a near-tie) runs as a step of its own, one stream per turn, so
    the batch's other streams keep decoding; each answer is still the one it gets alone."""
    from ragkv.blend import BlendConfig

    engine = tiny_engine(blend=BlendConfig(answer_guard=1e9), max_new_tokens=4)  # every step a near-tie
    docs = [PASSAGES[:2], PASSAGES[1:], PASSAGES[::-1]]
    guards = [None, 0.0, None]  # the second request turns its guard off
    requests = [
        engine.request(q, chunks=engine.tokenize_chunks(d), answer_guard=g) for q, d, g in zip(QUESTIONS, docs, guards)
    ]
    expected = [_alone(engine, r) for r in requests]
    events = []
    go_exact, step_many = scheduler_module.go_exact, scheduler_module.step_many

    def switch(stream):
        events.append(("switch", stream.request.question))
        return go_exact(stream)

    def step(eng, streams, *on_pick):
        events.append(("step", [s.request.question for s in streams]))
        return step_many(eng, streams, *on_pick)

    async def main():
        w = Scheduler(engine, queue_size=8, budget=ROOMY)
        scheduler_module.go_exact, scheduler_module.step_many = switch, step
        try:
            tasks = await _gated(
                w,
                lambda: [
                    asyncio.ensure_future(_collect(w.generate(lambda r=r: r, f"t{i}"))) for i, r in enumerate(requests)
                ],
            )
            return await asyncio.gather(*tasks)
        finally:
            scheduler_module.go_exact, scheduler_module.step_many = go_exact, step_many
            w.close()

    results = asyncio.run(main())
    for items, want in zip(results, expected):
        assert items[-1].token_ids == want.token_ids and items[-1].exact_from == want.exact_from
    q0, q1, q2 = QUESTIONS[:3]
    assert expected[0].exact_from == 0 and expected[1].exact_from is None
    first = events[1][1]  # q0 or q2: the tenant that used less model time so far
    other = q2 if first == q0 else q0
    assert events[:5] == [
        ("step", [q1]),  # both guarded streams sit the first step out
        ("switch", first),
        ("step", [q for q in (q0, q1, q2) if q in (first, q1)]),
        ("switch", other),
        ("step", [q0, q1, q2]),
    ]


def test_a_switch_to_exact_kv_waits_for_the_requests_joining_the_batch():
    """A request that arrives while a guarded stream waits on its exact prefill joins first: its first
    token does not wait for that prefill."""
    from ragkv.blend import BlendConfig

    engine = tiny_engine(blend=BlendConfig(answer_guard=1e9), max_new_tokens=3)
    first = engine.request(QUESTIONS[0], chunks=engine.tokenize_chunks(PASSAGES[:2]))
    later = engine.request(QUESTIONS[1], chunks=engine.tokenize_chunks(PASSAGES[1:]), answer_guard=0.0)
    expected = [_alone(engine, r) for r in (first, later)]
    events, fused, resume = [], threading.Event(), threading.Event()
    go_exact, fuse_many = scheduler_module.go_exact, scheduler_module.fuse_many

    def switch(stream):
        events.append(("switch", stream.request.question))
        return go_exact(stream)

    def fuse(eng, requests, **options):
        events.append(("fuse", [r.question for r in requests]))
        out = fuse_many(eng, requests, **options)
        fused.set()
        resume.wait(10)  # the later request arrives while the first one is being fused
        return out

    async def main():
        w = Scheduler(engine, queue_size=8, budget=ROOMY)
        scheduler_module.go_exact, scheduler_module.fuse_many = switch, fuse
        try:
            a = asyncio.ensure_future(_collect(w.generate(lambda: first, "a")))
            await asyncio.to_thread(fused.wait, 10)
            b = asyncio.ensure_future(_collect(w.generate(lambda: later, "b")))
            while w.depth < 2:
                await asyncio.sleep(0.01)
            resume.set()
            return await asyncio.gather(a, b)
        finally:
            scheduler_module.go_exact, scheduler_module.fuse_many = go_exact, fuse_many
            w.close()

    results = asyncio.run(main())
    assert [r[-1].token_ids for r in results] == [e.token_ids for e in expected]
    assert events[:3] == [("fuse", [QUESTIONS[0]]), ("fuse", [QUESTIONS[1]]), ("switch", QUESTIONS[0])]
