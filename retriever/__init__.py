"""Retrieval: token-aware chunking, embeddings, the faiss index and the document / chunk catalog.

`Retriever` is the facade; the other names are its parts, usable alone (e.g. the chunker by the
eval harness, the embedder and `VectorIndex` by the retrieval benchmark). Names are exported lazily
(lazy_exports.py): `RetrieverConfig` loads config.py alone, and nothing here imports torch until an
`HFEmbedder` is built (a search opened with `NumpyBertEmbedder` needs neither torch nor transformers).
"""

from ..lazy_exports import lazy_exports

lazy_exports(
    __name__,
    {
        "Catalog": "catalog",
        "CatalogLink": "catalog_link",
        "CatalogUnavailable": "catalog_link",
        "GuardedCatalog": "catalog_link",
        "Chunk": "chunker",
        "Chunker": "chunker",
        "RetrieverConfig": "config",
        "Embedder": "embedder",
        "HFEmbedder": "embedder",
        "NumpyBertEmbedder": "numpy_bert",
        "search_embedder": "embedder",
        "VectorIndex": "index",
        "Document": "loaders",
        "LoadError": "loaders",
        "find_files": "loaders",
        "load_file": "loaders",
        "DocumentUpdate": "retriever",
        "RetrievedChunk": "retriever",
        "Retriever": "retriever",
    },
)
