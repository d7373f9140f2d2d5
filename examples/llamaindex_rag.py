"""LlamaIndex with ragkv, in-process: ingest a few documents, then a query engine that retrieves from
the ragkv index and answers with the nodes fused as separate cached chunks.

Swap `backend=backend` for `url="http://127.0.0.1:8000", api_key=...` to use a running sidecar.
"""

from ragkv import Engine
from ragkv.adapters.llamaindex import RagkvLlamaRetriever, RagkvLLM, RagkvQueryEngine
from ragkv.adapters.ragkv_backend import LocalBackend

# a namespace of its own: the example's documents stay out of your corpus (the `default` namespace)
backend = LocalBackend(Engine.from_pretrained("smollm2"), namespace="example-llamaindex")
backend.add_documents(
    [
        {"id": "venus", "text": "Venus spins backwards, so the Sun rises in the west there."},
        {"id": "ada", "text": "Ada Lovelace wrote the first computer program for Babbage's engine."},
    ]
)
engine = RagkvQueryEngine(
    retriever=RagkvLlamaRetriever(backend=backend, k=2), llm=RagkvLLM(backend=backend, max_new_tokens=16)
)
response = engine.query("Which way does Venus spin?")
print(response, response.metadata["ragkv"]["hits"], [n.node.metadata["doc_id"] for n in response.source_nodes])
