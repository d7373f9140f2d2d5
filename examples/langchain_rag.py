"""LangChain with ragkv, in-process: ingest a few documents, then an LCEL chain
(question -> RagkvRetriever -> RagkvChatModel) whose retrieved chunks are fused from their cached KV.

Swap `engine=backend` for `url="http://127.0.0.1:8000", api_key=...` to use a running sidecar.
"""

from ragkv import Engine
from ragkv.adapters.langchain import RagkvChatModel, RagkvRetriever, rag_chain
from ragkv.adapters.ragkv_backend import LocalBackend

# a namespace of its own: the example's documents stay out of your corpus (the `default` namespace)
backend = LocalBackend(Engine.from_pretrained("smollm2"), namespace="example-langchain")
backend.add_documents(
    [
        {"id": "rhine", "text": "The Rhine rises in the Swiss Alps and bends north at Basel."},
        {"id": "ada", "text": "Ada Lovelace wrote the first computer program for Babbage's engine."},
    ]
)
chain = rag_chain(RagkvRetriever(engine=backend, k=2), RagkvChatModel(engine=backend, max_new_tokens=16), parse=False)
for _ in range(2):
    message = chain.invoke("Where does the Rhine bend north?")
    info = message.response_metadata["ragkv"]
    print(repr(message.content), f"TTFT {info['ttft_ms']:.0f} ms, hits {info['hits']}, misses {info['misses']}")
