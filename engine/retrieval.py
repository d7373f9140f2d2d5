"""open_retriever: a namespace's document catalog and index, where an EngineConfig puts them.

The Engine opens one per namespace with its model (`Engine.retriever`); `ragkv retrieve` opens one with
no model, to search only (retriever/retriever.py): this module imports no torch, so neither does that
command.
"""

from __future__ import annotations

from dataclasses import replace

from ..chunk_cache import LeadIn
from ..retriever import CatalogLink, Retriever
from ..retriever.embedder import Embedder
from ..retriever.retriever import TokenizedModel
from .config import EngineConfig


def open_retriever(
    config: EngineConfig,
    model: TokenizedModel | None,
    namespace: str | None = None,
    embedder: Embedder | None = None,
    links: dict[str, CatalogLink] | None = None,
    lead_in: LeadIn | None = None,
) -> Retriever:
    """`namespace`'s Retriever (default: the config's), its folder created if missing; a network catalog's
    calls go through its CatalogLink in `links` (one per URL, added when missing). `embedder` None: the
    configured HF encoder; `lead_in`: what its chunks' KV is computed after (their keys depend on it; the
    engine passes its chunk supply's, so both move together; None: the sink). CatalogUnavailable while a
    network catalog is unreachable."""
    ns = namespace or config.namespace
    path = config.data_path(ns)
    path.mkdir(parents=True, exist_ok=True)
    url = config.catalog(ns)
    link = None if url.startswith("sqlite") else (links if links is not None else {}).setdefault(url, CatalogLink(url))
    cfg = replace(config.retriever, namespace=ns)
    return Retriever.open(path, model, cfg, embedder=embedder, catalog_url=url, link=link, lead_in=lead_in)
