"""Retrieval: token-aware chunking, embeddings, the faiss index and the document / chunk catalog.

`Retriever` is the facade; the other names are its parts, usable alone (e.g. the chunker by the
eval harness, the embedder and `VectorIndex` by the retrieval benchmark).
"""

from .catalog import Catalog
from .catalog_link import CatalogLink, CatalogUnavailable, GuardedCatalog
from .chunker import Chunk, Chunker
from .config import RetrieverConfig
from .embedder import Embedder, HFEmbedder
from .index import VectorIndex
from .loaders import Document, LoadError, find_files, load_file
from .retriever import DocumentUpdate, RetrievedChunk, Retriever

__all__ = [
    "Catalog",
    "CatalogLink",
    "CatalogUnavailable",
    "GuardedCatalog",
    "Chunk",
    "Chunker",
    "RetrieverConfig",
    "Embedder",
    "HFEmbedder",
    "VectorIndex",
    "Document",
    "LoadError",
    "find_files",
    "load_file",
    "DocumentUpdate",
    "RetrievedChunk",
    "Retriever",
]
