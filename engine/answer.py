"""Answer: what `Engine.generate` returns: the text and where the time to first token went."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Answer:
    """A generated answer with its TTFT breakdown (milliseconds) and cache accounting."""

    text: str
    token_ids: list[int]
    strategy: str
    recompute_ratio: float
    ttft_ms: float
    parts_ms: dict[str, float]  # engine.run_result.PARTS: retrieve ... first_token, other; they sum to ttft_ms
    recompute_fraction: float
    prompt_tokens: int
    hits: dict[str, int] = field(default_factory=dict)  # per tier
    misses: int = 0
    decode_ms: float = 0.0  # from the first token to the end (includes upkeep_ms)
    upkeep_ms: float = 0.0  # store upkeep the request deferred (promotions), run after the first token
    warnings: list[str] = field(default_factory=list)  # e.g. a shared cache tier was unreachable (degraded)
    first_logits: object = None  # torch.Tensor [vocab]; kept out of to_dict()
    exact_from: int | None = None  # the answer guard's near-tie: the step from which exact KV decided (None: none)
    taken_back_from: int | None = None  # read whole: tokens from this step on were taken back, redone on exact KV

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("first_logits")
        return d
