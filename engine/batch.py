"""Several requests at once: their fusions, then their decoding one step at a time, so a scheduler can
let requests join and leave between steps (continuous batching).

`fuse_many(engine, requests)` gives each request the `Fusion` that `engine.fuse(request)` would give it
(the same first-token logits up to the rounding of packed matrix products): every request's chunks are
resolved and looked up, the chunk-KV misses of all of them precomputed together (packed passes, a chunk
two requests miss computed once), then, batch by batch within the `BatchBudget`, each request's
entries are loaded and the requests fused in one pass per layer (`blend.blend_many`: their active rows
packed for the projections and MLP, each with its own masks, positions, check layers and K/V buffers).
`full` requests run the model's own forward, each alone (what `engine.fuse` runs); every other
strategy (prefix, naive, epic, cacheblend, cachecraft, +query) is packed. Before the packed pass, the
scout passes of the requests whose strategy ranks tokens by the question's attention (focus, the
default, and cacheblend+query) are packed the same way (`scout_together`). A request over the budget
on its own is fused alone.

`start_stream(fusion)` turns a fusion into a `TokenStream`, and `step_many(engine, streams)` moves every
unfinished stream one token forward: it picks each stream's next token from its logits (greedy or
sampled, the stream's own temperature), then computes the next logits of the streams that go on in one
pass per layer (`blend.extend_many`). A greedy stream with an answer guard (answer_guard.py) that meets
a near-tie goes on from exact KV, computed for it alone before its token is picked (`go_exact`: a
server runs it as a step of its own, so that the others' steps do not wait for that prefill). A server
hands each token to its client as soon as it is picked (`on_pick`), before the next-token pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..blend import BlendResult, LayerBuffers, PromptState, blend_many, extend_many
from ..blend.query_select import question_attention_many
from .answer_guard import AnswerGuard
from .batch_budget import BatchBudget, size_of, split
from .fusion import Fusion, begin, choose_sources, fuse, load, record, resolve_chunks
from .request import FusionRequest

ERRORS = ("raise", "return")


def fuse_many(
    engine, requests: Sequence[FusionRequest], *, budget: BatchBudget | None = None, errors: str = "raise"
) -> list[Fusion | Exception]:
    """Each request through the stages to its first-token logits, fused together within `budget` (the
    engine's by default); the caller releases each fusion. A failure releases every fusion and is
    raised (`errors="raise"`), or (`errors="return"`) takes the failed request's place in the list
    (released) while the others go on; a failure of a shared step (the precompute, a packed pass)
    fails every request in it."""
    if errors not in ERRORS:
        raise ValueError(f"unknown errors {errors!r}; accepted: {', '.join(ERRORS)}")
    budget = budget or BatchBudget.of(engine)
    batch = _Batch([begin(engine, r) for r in requests], errors == "raise")
    try:
        batch.each(range(len(requests)), lambda f: resolve_chunks(engine, f))
        batch.together(batch.live(), lambda fs: look_up_many(engine, fs))
        live = batch.live()
        sizes = [size_of(engine, batch.fusions[i].plan.num_tokens, batch.fusions[i].request.reserve) for i in live]
        for group in split(sizes, budget):
            _fuse_group(engine, batch, [live[j] for j in group])
    except BaseException:
        for f in batch.fusions:
            f.release()
        raise
    for i in batch.failed:
        batch.fusions[i].release()
    return [batch.failed.get(i, f) for i, f in enumerate(batch.fusions)]


def look_up_many(engine, fusions: Sequence[Fusion]) -> None:
    """The look-up stage of several requests: one store lookup, then the misses of all of them
    computed together (each once across sidecars); every request's watch charges both laps."""
    chunked = [f for f in fusions if f.strategy.reuse == "chunks" and f.chunks]
    for f, found in zip(chunked, engine.supply.lookup_many([(f.chunks, f.request.namespace) for f in chunked])):
        f.lookup = found
    for f in fusions:
        f.watch.lap("lookup")
    if any(f.lookup.missing for f in chunked):
        engine.supply.ensure_many([f.lookup for f in chunked])
        for f in fusions:
            f.watch.lap("precompute")


def _fuse_group(engine, batch: _Batch, group: list[int]) -> None:
    """One batch within the budget: each request's entries loaded, `full` ones fused alone, the others
    in one packed pass."""
    batch.each(group, lambda f: (choose_sources(engine, f), load(engine, f)))
    alone = [i for i in batch.live(group) if batch.fusions[i].strategy.reuse == "none"]
    batch.each(alone, lambda f: fuse(engine, f))
    rest = [i for i in batch.live(group) if i not in alone]
    batch.each(rest, lambda f: _buffers(engine, f))
    scouting = [i for i in batch.live(rest) if _wants_scout(batch.fusions[i])]
    batch.together(scouting, lambda fs: scout_together(engine.model, fs))
    states = batch.each(rest, lambda f: _state(engine, f))
    packed = batch.live(states)
    batch.together(packed, lambda fs: _record_all(fs, blend_many(engine.model, [states[i] for i in packed])))


def scout_together(model, fusions: Sequence[Fusion]) -> None:
    """The question's attention for each request whose strategy ranks tokens by it (focus,
    cacheblend+query), their scout passes packed (`question_attention_many`, one pass per layer for
    those with the same scout layers) over each request's `LayerBuffers`, which its blend then reads
    back; each strategy reads its `scouted` in `prepare`."""
    by_layers: dict[tuple[int, ...], list[Fusion]] = {}
    for f in fusions:
        by_layers.setdefault(tuple(f.strategy.config.scout_layers), []).append(f)
    for layers, group in by_layers.items():
        scores = question_attention_many(model, [f.layers for f in group], layers)
        for f, score in zip(group, scores):
            f.strategy.scouted = score


def _buffers(engine, f: Fusion) -> None:
    """The request's per-layer K/V buffers (its cached rows), shared by its scout pass and its blend."""
    f.layers = LayerBuffers(engine.model, f.plan, f.sources, reserve=f.request.reserve)


def _wants_scout(f: Fusion) -> bool:
    return f.strategy.wants_scout(f.plan, f.layers.sources)


def _state(engine, f: Fusion) -> PromptState:
    return PromptState(engine.model, f.plan, f.strategy, reserve=f.request.reserve, layers=f.layers)


def _record_all(fusions: Sequence[Fusion], results) -> None:
    for f, result in zip(fusions, results):
        record(f, result)


class _Batch:
    """The fusions of one `fuse_many` call and which of them failed (index -> exception)."""

    def __init__(self, fusions: list[Fusion], strict: bool) -> None:
        self.fusions = fusions
        self.strict = strict  # re-raise the first failure
        self.failed: dict[int, Exception] = {}

    def live(self, indices=None) -> list[int]:
        return [i for i in (range(len(self.fusions)) if indices is None else indices) if i not in self.failed]

    def each(self, indices, step: Callable[[Fusion], object]) -> dict[int, object]:
        """`step` on each live fusion of `indices`, a failure failing that request only; their results."""
        out = {}
        for i in self.live(indices):
            try:
                out[i] = step(self.fusions[i])
            except Exception as exc:
                if self.strict:
                    raise
                self.failed[i] = exc
        return out

    def together(self, indices, step: Callable[[list[Fusion]], object]) -> None:
        """`step` on the live fusions of `indices` at once, a failure failing all of them."""
        live = self.live(indices)
        if not live:
            return
        try:
            step([self.fusions[i] for i in live])
        except Exception as exc:
            if self.strict:
                raise
            self.failed.update(dict.fromkeys(live, exc))


@dataclass
class TokenStream:
    """One request being decoded."""

    fusion: Fusion
    logits: torch.Tensor  # [vocab] for the next token
    tokens: list[int] = field(default_factory=list)  # picked so far (EOS included if it came)
    done: bool = False
    guard: AnswerGuard | None = None  # greedy near-ties decided on exact KV (None: unguarded)
    exact: BlendResult | None = None  # the exact KV the guard moved the stream onto (None: still fused)

    @property
    def request(self) -> FusionRequest:
        return self.fusion.request

    @property
    def result(self) -> BlendResult:
        """The KV the stream decodes from: the fused prompt's, or the guard's exact KV once it switched."""
        return self.exact if self.exact is not None else self.fusion.run.blend

    @property
    def guarded(self) -> bool:
        """Greedy under an answer guard: near-ties may move it onto exact KV (`go_exact`)."""
        return self.guard is not None and self.request.temperature <= 0.0

    @property
    def costly_pick(self) -> bool:
        """Its next pick runs an exact prefill first (a guarded greedy near-tie)."""
        return self.guarded and not self.done and self.guard.due(self.logits)

    @property
    def next_row(self) -> int:
        """The K/V row the last picked token is written to when the stream goes on."""
        return self.fusion.run.blend.num_tokens + len(self.tokens) - 1

    @property
    def kv_bytes(self) -> int:
        """Bytes of the stream's K/V buffers (held until the stream is dropped; the fused and the exact
        ones once the guard switched)."""
        held = [self.fusion.run.blend] + ([self.exact] if self.exact is not None else [])
        return sum(k.nbytes + v.nbytes for result in held for k, v in result.buffers)


def start_stream(fusion: Fusion, guard: AnswerGuard | None = None) -> TokenStream:
    return TokenStream(fusion, fusion.run.logits, done=fusion.request.max_new_tokens == 0, guard=guard)


def go_exact(stream: TokenStream) -> None:
    """When the stream's next greedy step is a guarded near-tie (`costly_pick`), move it onto exact KV
    now (the guard's exact prefill, engine/answer_guard.py; a request read whole may have tokens taken
    back, `stream.tokens` shortened), so that its pick is cheap: a scheduler runs this as a step of its
    own instead of inside a batch's step. A no-op otherwise."""
    if not stream.guarded:
        return
    if (switch := stream.guard.check(stream.logits, stream.tokens)) is not None:
        stream.exact, stream.logits = switch.result, switch.result.logits
        del stream.tokens[switch.keep :]  # a request read whole: tokens off the exact path are taken back


def pick(stream: TokenStream) -> int:
    """The next token from the stream's logits: greedy (on exact KV from a guarded near-tie on,
    `go_exact`), or sampled at its temperature."""
    t = stream.request.temperature
    if t > 0.0:
        return int(torch.multinomial(torch.softmax(stream.logits.float() / t, dim=-1), 1))
    go_exact(stream)
    return int(stream.logits.argmax())


@torch.inference_mode()
def step_many(
    engine, streams: Sequence[TokenStream], on_pick: Callable[[int, int], None] | None = None
) -> list[int | None]:
    """One token for every unfinished stream (None for finished ones); a stream is done after EOS or
    its `max_new_tokens`. `on_pick(i, token)` as soon as stream `i` has its token; then the next logits
    of the streams that go on, computed together."""
    eos = engine.eos_ids
    picked: list[int | None] = [None] * len(streams)
    for i, s in enumerate(streams):
        if s.done:
            continue
        token = pick(s)
        s.tokens.append(token)
        s.done = token in eos or len(s.tokens) >= s.request.max_new_tokens
        picked[i] = token
        if on_pick is not None:
            on_pick(i, token)
    going = [s for s, token in zip(streams, picked) if token is not None and not s.done]
    if going:
        dev = engine.model.device
        ids = [torch.tensor([s.tokens[-1]], device=dev) for s in going]
        logits = extend_many(engine.model, [s.result for s in going], ids, [s.next_row for s in going])
        for s, out in zip(going, logits):
            s.logits = out[0]
    return picked
