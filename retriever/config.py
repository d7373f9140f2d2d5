"""RetrieverConfig: how documents are chunked, embedded and indexed, and what input is accepted.

One frozen dataclass for the whole folder; `server/` composes it with the other folders' configs.
Chunk lengths are in the model's tokens (the KV cache is per model token), not in characters.
"""

from __future__ import annotations

from dataclasses import dataclass

INDEX_KINDS = ("flat", "ivf", "hnsw")


@dataclass(frozen=True)
class RetrieverConfig:
    """Chunking, embedding, index and input limits."""

    chunk_min_tokens: int = 256  # a chunk ends at the best boundary between min and max tokens
    chunk_max_tokens: int = 512
    overlap_tokens: int = 0  # tokens of the previous chunk repeated at the start of the next
    embedder_path: str | None = None  # a local HF encoder folder; None = bundled all-MiniLM-L6-v2
    embed_batch_size: int = 32
    embed_max_length: int = 256  # encoder tokens; longer chunk texts are truncated for the embedding only
    index_kind: str = "flat"  # flat (exact inner product) | ivf | hnsw
    ivf_nlist: int = 0  # 0 = about 4 * sqrt(number of vectors)
    ivf_nprobe: int = 8
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 64
    max_document_bytes: int = 20 << 20  # larger files / documents are refused with an error
    namespace: str = "default"  # tenant of the chunk keys

    def __post_init__(self) -> None:
        if not 0 < self.chunk_min_tokens <= self.chunk_max_tokens:
            raise ValueError(
                f"chunk lengths: need 0 < chunk_min_tokens <= chunk_max_tokens, got "
                f"{self.chunk_min_tokens} and {self.chunk_max_tokens}"
            )
        if not 0 <= self.overlap_tokens < self.chunk_min_tokens:
            raise ValueError(
                f"overlap_tokens must be in [0, chunk_min_tokens={self.chunk_min_tokens}), got {self.overlap_tokens}"
            )
        if self.index_kind not in INDEX_KINDS:
            raise ValueError(f"unknown index_kind {self.index_kind!r}; accepted: {', '.join(INDEX_KINDS)}")
        for name in (
            "embed_batch_size",
            "embed_max_length",
            "ivf_nprobe",
            "hnsw_m",
            "hnsw_ef_construction",
            "hnsw_ef_search",
            "max_document_bytes",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.ivf_nlist < 0:
            raise ValueError(f"ivf_nlist must be >= 0 (0 = automatic), got {self.ivf_nlist}")
