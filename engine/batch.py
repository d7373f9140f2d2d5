"""Several requests at once: their fusions, then their decoding one step at a time, so a scheduler can
let requests join and leave between steps (continuous batching).

`fuse_many(engine, requests)` gives each request the `Fusion` that `engine.fuse(request)` would give it;
`start_stream(fusion)` turns one into a `TokenStream`, and `step_many(engine, streams)` moves every
unfinished stream one token forward: it picks each stream's next token from its logits (greedy or
sampled, the stream's own temperature), then computes the next logits of the streams that go on.

This first version runs the requests one after another (the reference the batched version must equal).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..blend import extend
from .fusion import Fusion
from .request import FusionRequest


def fuse_many(engine, requests: Sequence[FusionRequest]) -> list[Fusion]:
    """Each request through the stages to its first-token logits; the caller releases each fusion."""
    fusions: list[Fusion] = []
    try:
        for request in requests:
            fusions.append(engine.fuse(request))
    except BaseException:
        for f in fusions:
            f.release()
        raise
    return fusions


@dataclass
class TokenStream:
    """One request being decoded."""

    fusion: Fusion
    logits: torch.Tensor  # [vocab] for the next token
    tokens: list[int] = field(default_factory=list)  # picked so far (EOS included if it came)
    done: bool = False

    @property
    def request(self) -> FusionRequest:
        return self.fusion.request

    @property
    def next_row(self) -> int:
        """The K/V row the last picked token is written to when the stream goes on."""
        return self.fusion.run.blend.num_tokens + len(self.tokens) - 1


def start_stream(fusion: Fusion) -> TokenStream:
    return TokenStream(fusion, fusion.run.logits, done=fusion.request.max_new_tokens == 0)


def pick(stream: TokenStream) -> int:
    """The next token from the stream's logits: greedy, or sampled at its temperature."""
    t = stream.request.temperature
    if t > 0.0:
        return int(torch.multinomial(torch.softmax(stream.logits.float() / t, dim=-1), 1))
    return int(stream.logits.argmax())


@torch.inference_mode()
def step_many(engine, streams: Sequence[TokenStream]) -> list[int | None]:
    """One token for every unfinished stream (None for finished ones); a stream is done after EOS or
    its `max_new_tokens`. The next logits are computed only for the streams that go on."""
    eos = engine.eos_ids
    picked: list[int | None] = []
    for s in streams:
        if s.done:
            picked.append(None)
            continue
        token = pick(s)
        s.tokens.append(token)
        s.done = token in eos or len(s.tokens) >= s.request.max_new_tokens
        picked.append(token)
    for s, token in zip(streams, picked):
        if token is not None and not s.done:
            ids = torch.tensor([token], device=engine.model.device)
            s.logits = extend(engine.model, s.fusion.run.blend, ids, s.next_row)[0]
    return picked
