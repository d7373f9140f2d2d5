"""RagkvClient: a small httpx client for a running `ragkv serve` (used by `ragkv query --server`,
`ragkv cache stats --server` and the LangChain / LlamaIndex plugins in sidecar mode). Any OpenAI client
works against the sidecar too; this one speaks the ragkv fields and endpoints directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import httpx


class RagkvError(RuntimeError):
    """The sidecar answered with an error; `status` and the server's message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"ragkv server error {status}: {message}")
        self.status = status


class RagkvClient:
    """Calls to one sidecar at `base_url` (e.g. `http://127.0.0.1:8000`) with an optional API key."""

    def __init__(
        self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 300.0
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def _call(self, method: str, path: str, **kwargs) -> dict:
        r = self._http.request(method, path, **kwargs)
        if r.status_code >= 400:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text
            raise RagkvError(r.status_code, message)
        return r.json()

    def generate(
        self,
        question: str,
        documents: Sequence[str | dict] | None = None,
        *,
        k: int | None = None,
        strategy: str | None = None,
        recompute_ratio: float | None = None,
        max_new_tokens: int | None = None,
    ) -> dict:
        """The answer over `documents` (texts or `{"chunk_id": N}`) and/or `k` retrieved chunks: a dict
        with `text` plus the server's `ragkv` accounting (ttft_ms, parts_ms, hits, misses, ...)."""
        body: dict = {"messages": [{"role": "user", "content": question}]}
        if documents:
            body["documents"] = list(documents)
        if k:
            body["retrieve"] = {"k": k}
        blend = {k_: v for k_, v in (("strategy", strategy), ("recompute_ratio", recompute_ratio)) if v is not None}
        if blend:
            body["blend"] = blend
        if max_new_tokens:
            body["max_tokens"] = max_new_tokens
        out = self._call("POST", "/v1/chat/completions", json=body)
        return {"text": out["choices"][0]["message"]["content"], "usage": out["usage"], **out["ragkv"]}

    def retrieve(self, query: str, k: int = 4) -> list[dict]:
        """The `k` best ingested chunks: dicts with chunk_id, doc_id, score, text, key."""
        return self._call("POST", "/v1/retrieve", json={"query": query, "k": k})["chunks"]

    def add_documents(self, documents: Sequence[dict]) -> dict:
        """Ingest `[{id, text, metadata?}]`; the ingestion report."""
        return self._call("POST", "/v1/documents", json={"documents": list(documents)})

    def get_document(self, doc_id: str) -> dict:
        return self._call("GET", f"/v1/documents/{doc_id}")

    def delete_document(self, doc_id: str) -> dict:
        return self._call("DELETE", f"/v1/documents/{doc_id}")

    def cache_stats(self) -> dict:
        return self._call("GET", "/v1/cache/stats")

    def health(self) -> dict:
        return self._call("GET", "/healthz")

    def close(self) -> None:
        self._http.close()
