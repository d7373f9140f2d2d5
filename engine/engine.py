"""Engine: the one facade. A request (`FusionRequest`, built once at the edge with every default
resolved) runs through named stages (engine/fusion.py: resolve chunks -> look up -> choose sources ->
load -> fuse) to its first-token logits, then decodes: `run(...)` returns the fused `RunResult`,
`prepare(...)` the merged cache for `model.generate`, `generate(...)` an `Answer` with TTFT and its parts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace

import torch

from ..blend import BlendPlan, BlendResult, extend, make_plan, to_dynamic_cache
from ..chunk_cache import ChunkKey
from ..compression.layered import DTYPES
from ..models import ModelAdapter, load_adapter
from ..retriever import CatalogLink, Document, RetrievedChunk, Retriever
from ..storage import TieredStore
from ..storage.build import build_store
from ..storage.health import degraded_warnings
from .answer import Answer
from .answer_guard import AnswerGuard, guard_for
from .chunk_supply import ChunkSupply
from .config import CHUNK_CONTEXTS, EngineConfig
from .context_pass import ContextPassReport, context_pass
from .decode import TakeBack, decode
from .fusion import STAGES, Fusion, begin
from .ingest import IngestConfig, Ingester, IngestReport
from .neighbour_variants import corpus_neighbours, store_neighbour_variants
from .prompt import PromptTemplate
from .request import FusionRequest
from .retrieval import open_retriever
from .run_result import RunResult
from .serving_variants import store_after_answer


class Engine:
    """RAG generation over cached chunk KV."""

    def __init__(
        self,
        model: ModelAdapter,
        store: TieredStore,
        config: EngineConfig = EngineConfig(),
        template: PromptTemplate = PromptTemplate(),
        embedder=None,
    ) -> None:
        if config.chunk_context not in CHUNK_CONTEXTS:
            raise ValueError(f"unknown chunk_context {config.chunk_context!r}; accepted: {', '.join(CHUNK_CONTEXTS)}")
        self.model = model
        self.store = store
        self.config = config
        self.embedder = embedder  # the retriever's Embedder; None: the configured HF encoder
        self.supply = ChunkSupply(model, store, config.prepack_tokens)  # lookups and precomputes
        self._retrievers: dict[str, Retriever] = {}
        self.catalog_links: dict[str, CatalogLink] = {}  # outage state per network catalog URL (PostgreSQL)
        self.template = template  # sets the lead-in chunk KV is computed after (`chunk_context`)

    @classmethod
    def from_pretrained(cls, model: str | None = None, config: EngineConfig | None = None, **overrides) -> Engine:
        """Load `model` (alias `smollm2`, a local path or a cached HF id) with the configured chunk store.
        Without `config`, the settings tree: `model` and `overrides` (None = not given) > `RAGKV_*` > file."""
        config = config or EngineConfig.load(model=model, **overrides)
        adapter = load_adapter(config.model, data_dir=config.data_dir, device=config.device, dtype=_dtype(config.dtype))
        return cls(adapter, build_store(config.storage_config(), adapter.fingerprint), config)  # calibrated codecs

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def template(self) -> PromptTemplate:
        """The prompt template; setting it moves the lead-in chunk KV is computed after (and keyed by)."""
        return self._template

    @template.setter
    def template(self, template: PromptTemplate) -> None:
        self._template = template
        self.supply.lead_in.ids = self.lead_in_for(template)  # the retrievers share this LeadIn
        if self.tokenizer is not None:
            self.supply.lead_in.separator = tuple(template.render(self.tokenizer, "")[2])

    def lead_in_for(self, template: PromptTemplate) -> tuple[int, ...] | None:
        """What chunk KV is computed after under `template`: its fixed prefix (chat template and
        instruction, the same for every question; `chunk_context = "prefix"`), or None: the sink."""
        if self.config.chunk_context == "sink" or self.tokenizer is None:
            return None
        return tuple(template.render(self.tokenizer, "")[0]) or None

    @property
    def lead_in(self) -> tuple[int, ...] | None:
        """The lead-in of this engine's chunk KV now (None: the model's sink)."""
        return self.supply.lead_in.ids

    @property
    def lead_in_separator(self) -> tuple[int, ...]:
        """The template's ids after each chunk (what neighbour variants place their neighbours with)."""
        return self.supply.lead_in.separator

    # -- documents and retrieval (the catalog + faiss index of a namespace, opened on first use) ---
    def retriever(self, namespace: str | None = None) -> Retriever:
        """The document catalog and index of `namespace` (each tenant has its own)."""
        ns = namespace or self.config.namespace
        if ns not in self._retrievers:  # CatalogUnavailable while a network catalog is unreachable: opened later
            self._retrievers[ns] = open_retriever(
                self.config, self.model, ns, self.embedder, self.catalog_links, lead_in=self.supply.lead_in
            )
        return self._retrievers[ns]

    def catalog_warnings(self, since: float | None = None) -> list[str]:
        """One sentence per network document catalog that is unreachable now (or failed a call after
        `since`, a `time.perf_counter()` value); empty when all answered."""
        return [w for link in self.catalog_links.values() if (w := link.warning(since))]

    def ingest(
        self,
        paths: Sequence[str] = (),
        documents: Sequence[Document] = (),
        namespace: str | None = None,
        config: IngestConfig = IngestConfig(progress=False),
    ) -> IngestReport:
        """Chunk, embed and index files (`paths`) or `Document`s, and store their chunk KV durably."""
        ingester = Ingester(self.model, self.store, self.retriever(namespace), config)
        return ingester.ingest(paths) if paths else ingester.ingest_documents(documents)

    def store_neighbour_variants(
        self,
        chunks: Sequence[Sequence[int]],
        corpus: Sequence[Sequence[int]] = (),
        k: int = IngestConfig.neighbour_variants,
        namespace: str | None = None,
    ) -> list[ChunkKey]:
        """Ingestion's neighbour variants (engine/neighbour_variants.py) for chunks given directly: each of
        `chunks` (token ids) computed after this engine's lead-in and its `k` nearest among `chunks` and
        `corpus` by the retriever's embedder, and stored (a variant already held is kept). Returns the
        variant keys stored now."""
        ns = namespace or self.config.namespace
        key_of = {c: self.supply.key(c, ns) for c in dict.fromkeys(tuple(c) for c in [*chunks, *corpus])}
        pool = [list(c) for c in key_of]
        vectors = self.retriever(ns).embedder.embed([self.tokenizer.decode(c, skip_special_tokens=True) for c in pool])
        wanted = {key_of[tuple(c)]: c for c in chunks}
        find = corpus_neighbours(list(key_of.values()), pool, vectors)
        limit = self.config.blend.craft_variants or IngestConfig.variant_limit
        return store_neighbour_variants(
            self.model, self.store, find, wanted, k, limit, ns, self.lead_in, self.lead_in_separator
        )

    def remove_documents(self, doc_ids: Sequence[str], namespace: str | None = None) -> tuple[ChunkKey, ...]:
        """Delete documents; their chunks leave the index and their KV leaves the store."""
        return Ingester(self.model, self.store, self.retriever(namespace)).remove(doc_ids)

    def retrieve(self, query: str, k: int = 5, namespace: str | None = None) -> list[RetrievedChunk]:
        """The `k` chunks most similar to `query`."""
        return self.retriever(namespace).search(query, k)

    def close(self) -> None:
        """Save indexes and flush the store."""
        for r in self._retrievers.values():
            r.close()
        self.store.close()

    # -- chunks ---------------------------------------------------------------------------------
    def tokenize_chunks(self, documents: Sequence[str]) -> list[list[int]]:
        """Each document's own token ids (one chunk per document)."""
        ids = [self.template.chunk_ids(self.tokenizer, d) for d in documents]
        for i, c in enumerate(ids):
            if not c:
                raise ValueError(f"document {i} is empty: every document needs at least one token")
        return ids

    def ensure_cached(
        self, chunks: Sequence[Sequence[int]], namespace: str | None = None
    ) -> tuple[list[ChunkKey], dict[str, int], int]:
        """Keys of `chunks`, precomputing and storing the misses; returns (keys, hits per tier, misses)."""
        found = self.supply.ensure(chunks, namespace or self.config.namespace)
        return found.keys, found.hits, found.misses

    # -- the query path: a FusionRequest through the stages ---------------------------------------
    def plan(self, question: str, chunks: Sequence[Sequence[int]]) -> BlendPlan:
        """The prompt's layout; when chunk KV is computed after exactly this prompt's prefix (the lead-in),
        the first chunk's KV (`supply.compute`, or its stored entry) is the full prefill's: marked exact."""
        prefix, query, sep = self.template.render(self.tokenizer, question)
        plan = make_plan(prefix, chunks, query, sep)
        return plan.with_exact([0]) if chunks and self.lead_in == plan.prefix_ids else plan

    def request(self, question: str | FusionRequest, documents: Sequence[str] | None = None, **options):
        """A `FusionRequest` with every default resolved from the configuration (options: `chunks`,
        `k`, `strategy`, `recompute_ratio`, `namespace`, `max_new_tokens`, `reserve`, `temperature`,
        `answer_guard`, `stream`);
        a request given as such is returned as it is."""
        if isinstance(question, FusionRequest):
            if documents is not None or options:
                raise TypeError("a FusionRequest carries its own documents and options")
            return question
        return FusionRequest.build(self.config, question, documents, **options)

    def fuse(self, request: FusionRequest) -> Fusion:
        """Run `request` through the stages up to its first-token logits (`fusion.run`); its entries
        stay pinned until `fusion.release()`, which the caller runs once the first token is out."""
        fusion = begin(self, request)
        try:
            for stage in STAGES:
                stage(self, fusion)
        except BaseException:
            fusion.release()
            raise
        return fusion

    def run(self, question: str | FusionRequest, documents: Sequence[str] | None = None, **options) -> RunResult:
        """Plan and fuse one prompt over `documents` (texts), `chunks=` (token ids) or, with neither,
        the `k` retrieved chunks (options: see `request`). The blend keeps `reserve` rows (default:
        max_new_tokens) to decode into. Store upkeep the request deferred runs after the TTFT is taken."""
        fusion = self.fuse(self.request(question, documents, **options))
        fusion.release()
        store_after_answer(self, fusion)  # cachecraft: exact KV variants of a recurring prompt, after its TTFT
        return fusion.run

    def record_context(
        self, question: str, documents: Sequence[str] | None = None, *, chunks=None, namespace: str | None = None
    ) -> ContextPassReport:
        """A context pass over `documents` (texts) or `chunks` (token ids) in this order: records their
        chunk metadata and, with `blend.craft_variants > 0`, their in-context KV variants for cachecraft."""
        chunk_ids = list(chunks) if chunks is not None else self.tokenize_chunks(documents or [])
        return context_pass(self, question, chunk_ids, namespace or self.config.namespace)

    @torch.inference_mode()
    def teacher_forced_logits(self, result: BlendResult, forced: torch.Tensor) -> torch.Tensor:
        """Logits [P, vocab] at each of the P positions of `forced` [P] fed after the blend's prompt."""
        if forced.numel() == 1:
            return result.logits[None]
        after = extend(self.model, result, forced[:-1].to(self.model.device), result.num_tokens)  # [P-1, vocab]
        return torch.cat([result.logits[None], after])  # [P, vocab]

    @property
    def eos_ids(self) -> set[int]:
        ids = (self.tokenizer.eos_token_id, getattr(self.model.config, "eos_token_id", None))
        return {i for i in ids if isinstance(i, int)}

    def answer_ids(
        self, result: BlendResult, max_new_tokens: int, temperature: float = 0.0, guard: AnswerGuard | None = None
    ) -> Iterator[int | TakeBack]:
        """The answer's token ids after the blend's prompt (greedy, or sampled), EOS excluded: the one
        decode loop of the engine. `guard` (see `answer_guard`): near-ties decided on exact KV; a guard
        that may take tokens back (a request read whole) yields a `TakeBack` when it does (`read_whole`
        applies it)."""
        eos = self.eos_ids
        steps = decode(self.model, result, eos, max_new_tokens=max_new_tokens, temperature=temperature, guard=guard)
        for token in steps:
            if token in eos:
                return
            yield token

    def answer_guard(self, run: RunResult) -> AnswerGuard | None:
        """The guard of `run`'s greedy answer (the request's `answer_guard`, a logit margin, by default
        `blend.answer_guard`; answer_guard.py), or None where there is nothing to guard (off, sampling,
        an exact strategy)."""
        request = run.request or FusionRequest.build(self.config, "")
        return guard_for(
            self.model,
            run.plan,
            run.blend,
            request.strategy,
            request.temperature,
            request.answer_guard,
            take_back=not request.stream,
        )

    def prepare(self, question: str | FusionRequest, documents: Sequence[str] | None = None, **options):
        """(DynamicCache of all but the last prompt token, input_ids [1, N]) for `model.generate`."""
        run = self.run(question, documents, **options)
        cache = to_dynamic_cache(run.blend, run.prompt_tokens - 1)
        return cache, run.plan.input_ids[None].to(self.model.device)

    def generate(
        self, question: str | FusionRequest, documents: Sequence[str] | None = None, *, stream: bool = False, **options
    ):
        """Answer `question` over `documents` (texts), `chunks=` (token ids) or the `k` retrieved chunks
        (options: see `request`): an `Answer`, or with `stream=True` an iterator of text pieces whose
        last item is the `Answer`."""
        if isinstance(question, FusionRequest):
            request = replace(self.request(question, documents, **options), stream=stream)
        else:
            request = self.request(question, documents, **{"stream": stream, **options})
        events = self.answer_events(request)
        if stream:
            return events
        *_, answer = events
        return answer

    def answer_events(self, request: FusionRequest) -> Iterator[str | Answer]:
        """Fuse `request` and decode it: text pieces as they form, then the `Answer`. The request's
        store upkeep runs as soon as the first token is out."""
        fusion = self.fuse(request)
        guard = self.answer_guard(fusion.run)
        tokens: list[int] = []
        text = ""
        try:
            for token in self.answer_ids(fusion.run.blend, request.max_new_tokens, request.temperature, guard):
                if isinstance(token, TakeBack):  # a request read whole: its pieces so far are not its answer
                    del tokens[token.keep :]
                    text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                    continue
                tokens.append(token)
                full = self.tokenizer.decode(tokens, skip_special_tokens=True)
                piece, text = full[len(text) :], full
                if piece:
                    yield piece
                fusion.release()  # after the first token: the store's deferred upkeep (once)
        finally:
            fusion.release()
        yield self.answer(fusion, tokens, text, guard)
        self.after_answer(fusion)

    def after_answer(self, fusion: Fusion) -> None:
        """What a request leaves for after its answer is out (cachecraft: the exact KV variants of a
        recurring prompt, `blend.craft_serve`); the sidecar's scheduler calls it too."""
        store_after_answer(self, fusion)

    def answer(self, fusion: Fusion, tokens: list[int], text: str, guard: AnswerGuard | None = None) -> Answer:
        """The `Answer` of a decoded fusion: its answer tokens (EOS excluded), their text, the timings
        (with the answer guard's exact prefill in the TTFT when the first step was a near-tie)."""
        run, watch = fusion.run, fusion.watch
        watch.lap("decode")
        guard_ms = guard.first_token_ms if guard is not None else 0.0
        return Answer(
            text=text.strip(),
            token_ids=tokens,
            strategy=run.request.strategy,
            recompute_ratio=run.request.recompute_ratio,
            ttft_ms=run.ttft_ms + guard_ms,
            parts_ms={**run.parts_ms, "guard": guard_ms},
            recompute_fraction=run.blend.recompute_fraction,
            prompt_tokens=run.prompt_tokens,
            hits=run.hits,
            misses=run.misses,
            decode_ms=watch.elapsed_ms() - run.ttft_ms - guard_ms,
            upkeep_ms=fusion.upkeep_ms,
            warnings=degraded_warnings(self.store, since=watch.started)
            + self.catalog_warnings(since=watch.started)
            + ([guard.warning] if guard is not None and guard.warning else []),
            first_logits=run.logits,
            exact_from=guard.switched_at if guard is not None else None,
            taken_back_from=guard.taken_back if guard is not None else None,
        )


def _dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; accepted: {', '.join(DTYPES)}") from None
