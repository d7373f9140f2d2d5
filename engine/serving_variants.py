"""Serving-path KV variants: a combination of chunks that recurs is answered from exact KV.

cachecraft loads, per chunk, its base entry or a stored variant (blend/variant_choice.py). The serving
path adds variants for the chunk sequences requests actually send, keyed by the prompt prefix and the
preceding chunks (`storage/variants.py`), bounded like every variant by `blend.craft_variants` per
chunk and the utility eviction.

What is stored must be exact, because an exact variant is reused with no recompute. A blend's own rows
are not: its reused rows are the base entry's (computed after the lead-in alone, without the chunks
before it), and even its recomputed rows attended, at every layer above 0, to those approximate rows.
So the blend's buffers are never stored. The rows stored are those of a prefill of the prompt by the model's own forward
(`full_prefill`): free when the request itself ran `full`, else a completion run after the request
has answered (off its TTFT), as `blend.craft_serve` says:

- `off`: none;
- `recurring` (default): when this prefix and chunk sequence was seen before (a bounded memory of
  recent sequences per store), so the completion is paid on a sequence's second occurrence and from
  the third on every chunk loads an exact variant;
- `always`: after every request whose chunks lack an exact variant.

Only chunks that did not load an exact variant are stored again.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence

from ..blend import BlendPlan, BlendResult
from ..blend.cachecraft import CacheCraft
from ..blend.variant_choice import SourceChoice
from ..chunk_cache import ChunkKey
from ..models import ModelAdapter
from .context_pass import store_in_context
from .full_prefill import full_prefill
from .fusion import Fusion

RECENT_SEQUENCES = 4096  # chunk sequences remembered per store for `recurring`


class RecentSequences:
    """The digests of the last `limit` chunk sequences seen (least recently seen forgotten first)."""

    def __init__(self, limit: int = RECENT_SEQUENCES) -> None:
        self.limit = limit
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def seen_before(self, prefix: ChunkKey, keys: Sequence[ChunkKey]) -> bool:
        """Whether this prefix and sequence was seen before; it counts as seen from now on."""
        h = hashlib.sha256(str(prefix).encode())
        for key in keys:
            h.update(b"\0" + str(key).encode())
        digest = h.hexdigest()
        with self._lock:
            before = digest in self._seen
            self._seen[digest] = None
            self._seen.move_to_end(digest)
            while len(self._seen) > self.limit:
                self._seen.popitem(last=False)
        return before


_BY_STORE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_BY_STORE_LOCK = threading.Lock()


def recent_sequences(store) -> RecentSequences:
    """The sequences seen by requests over `store` (one memory per store)."""
    with _BY_STORE_LOCK:
        return _BY_STORE.setdefault(store, RecentSequences())


def chunks_to_store(
    store, mode: str, prefix: ChunkKey, keys: Sequence[ChunkKey], choices: Sequence[SourceChoice], free: bool = False
) -> list[int]:
    """Indices of the chunks whose exact variant the serving path should store after this request:
    those that did not load one, if `mode` says so now (`free`: the request's rows are exact already,
    so storing costs no prefill and `recurring` need not wait for a second occurrence)."""
    seen = recent_sequences(store).seen_before(prefix, keys) if mode == "recurring" else False
    if mode == "off" or (mode == "recurring" and not seen and not free):
        return []
    return [i for i, choice in enumerate(choices) if not choice.exact]


def store_serving_variants(
    model: ModelAdapter,
    store,
    plan: BlendPlan,
    keys: Sequence[ChunkKey],
    prefix: ChunkKey,
    chunks: Sequence[int],
    limit: int,
    exact: BlendResult | None = None,
) -> list[ChunkKey]:
    """Store the exact in-context KV of `chunks` (indices into `keys`, the plan's chunk keys) as variants
    after `prefix`: the rows of `exact` (a full prefill of `plan`), or of one run now. Returns their keys."""
    if not chunks or limit < 1:
        return []
    return store_in_context(store, plan, keys, exact or full_prefill(model, plan), prefix, limit, chunks)


def store_after_answer(engine, fusion: Fusion) -> list[ChunkKey]:
    """After a cachecraft request (`fusion`, released) has answered: store its chunks' exact variants
    as `blend.craft_serve` says (the Engine calls this once the answer is out). Returns their keys."""
    strategy, cfg = fusion.strategy, engine.config.blend
    if not isinstance(strategy, CacheCraft) or not strategy.choices or fusion.prefix is None or cfg.craft_variants < 1:
        return []
    keys, prefix = fusion.lookup.keys, fusion.prefix
    todo = chunks_to_store(engine.store, cfg.craft_serve, prefix, keys, strategy.choices)
    return store_serving_variants(engine.model, engine.store, fusion.plan, keys, prefix, todo, cfg.craft_variants)
