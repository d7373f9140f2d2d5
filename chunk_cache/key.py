"""ChunkKey: the stable, position-independent identity of a cached chunk.

A key is a SHA-256 over (model fingerprint, tokenizer fingerprint, token ids) plus a namespace (the
tenant). It never uses Python's `hash()`, which changes per process, so keys survive restarts and
are shared between machines. `key.variant(preceding)` names the same chunk's KV as computed after
other chunks (a KV variant, stored beside the base entry).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

_KEY_VERSION = b"ragkv-chunk-v1"
_VARIANT_VERSION = b"ragkv-chunk-variant-v1"
_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True, order=True)
class ChunkKey:
    """Identity of one chunk's KV: `namespace/digest`."""

    namespace: str
    digest: str

    def __post_init__(self) -> None:
        if not _NAMESPACE_RE.match(self.namespace):
            raise ValueError(f"invalid namespace {self.namespace!r}: use 1-64 characters from A-Z a-z 0-9 _ . -")
        if not _DIGEST_RE.match(self.digest):
            raise ValueError(f"invalid digest {self.digest!r}: expected 64 lowercase hex characters")

    @classmethod
    def of(
        cls,
        model_fingerprint: str,
        tokenizer_fingerprint: str,
        token_ids: Sequence[int],
        namespace: str = "default",
    ) -> ChunkKey:
        """Key of `token_ids` as computed by the model and tokenizer with these fingerprints."""
        if len(token_ids) == 0:
            raise ValueError("a chunk needs at least one token")
        h = hashlib.sha256(_KEY_VERSION)
        for part in (model_fingerprint, tokenizer_fingerprint):
            h.update(b"\0" + part.encode())
        h.update(b"\0" + np.asarray(token_ids, dtype=np.int64).tobytes())
        return cls(namespace=namespace, digest=h.hexdigest())

    def variant(self, preceding: Sequence[ChunkKey]) -> ChunkKey:
        """Key of this chunk's KV as computed in context, after the chunks `preceding` (in prompt order):
        a SHA-256 of this key and the ordered preceding keys, in this key's namespace. With nothing
        before it the KV is the isolated precompute, so the key is this key itself."""
        if not preceding:
            return self
        h = hashlib.sha256(_VARIANT_VERSION)
        h.update(b"\0" + str(self).encode())
        for key in preceding:
            h.update(b"\0" + str(key).encode())
        return ChunkKey(namespace=self.namespace, digest=h.hexdigest())

    @classmethod
    def parse(cls, text: str) -> ChunkKey:
        """Inverse of `str(key)`: `"namespace/digest"`."""
        namespace, sep, digest = text.partition("/")
        if not sep:
            raise ValueError(f"invalid chunk key {text!r}: expected 'namespace/<64 hex digits>'")
        return cls(namespace=namespace, digest=digest)

    def __str__(self) -> str:
        return f"{self.namespace}/{self.digest}"


class Fingerprinted(Protocol):
    """What a chunk key is made of besides the ids: the model's and its tokenizer's fingerprints, and the
    model's sink (the default lead-in)."""

    fingerprint: str
    tokenizer_fingerprint: str
    sink_ids: tuple[int, ...]


def chunk_key(
    model: Fingerprinted, token_ids: Sequence[int], namespace: str = "default", lead_in: Sequence[int] | None = None
) -> ChunkKey:
    """The key `precompute` stores `token_ids` under for this model, computed after `lead_in` (None:
    the model's sink; the sink's keys are those of every earlier version)."""
    return ChunkKey.of(lead_in_fingerprint(model, lead_in), model.tokenizer_fingerprint, token_ids, namespace)


@dataclass
class LeadIn:
    """What chunk KV is computed after, and so keyed by: `ids`, the prompt template's fixed prefix, or
    None (the model's sink). One object is shared by everything that keys or computes chunks (the
    engine's chunk supply and its retrievers), so moving it (a new template) moves them all at once."""

    ids: tuple[int, ...] | None = None
    separator: tuple[int, ...] = ()  # the template's ids after each chunk: what a neighbour variant places them with

    def key(self, model: Fingerprinted, token_ids: Sequence[int], namespace: str = "default") -> ChunkKey:
        """The store key of `token_ids` computed after this lead-in."""
        return chunk_key(model, token_ids, namespace, self.ids)


def lead_in_fingerprint(model: Fingerprinted, lead_in: Sequence[int] | None) -> str:
    """The model fingerprint a chunk key hashes: the model's own after its sink, else extended by a
    digest of the lead-in's token ids (chunk KV computed after another prefix is another entry)."""
    if lead_in is None or tuple(int(t) for t in lead_in) == tuple(model.sink_ids):
        return model.fingerprint
    digest = hashlib.sha256(np.asarray(list(lead_in), dtype=np.int64).tobytes()).hexdigest()[:32]
    return f"{model.fingerprint}:after:{digest}"
