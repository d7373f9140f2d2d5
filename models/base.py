"""ModelAdapter: one decoder model seen layer by layer, so the blend can compute chosen tokens only.

Tensors are unbatched and token-major: hidden states [T, hidden], q [T, H_q, D], k/v [T, H_kv, D].
Attention takes the layer's whole key/value buffer in transformers' layout [1, H_kv, N, D] plus the
query tokens' positions, so selected tokens attend over cached and fresh keys alike.
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Sequence

import torch

from .attention import QueryMask, Segments, query_mask, sdpa
from .fingerprint import model_fingerprint, tokenizer_fingerprint
from .rope import check_rope, inv_freq, rotate_half


class ModelAdapter(ABC):
    """Base adapter for transformers decoders with the Llama layer structure."""

    model_types: tuple[str, ...] = ()

    def __init__(self, model, tokenizer=None, sink_ids: tuple[int, ...] | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        check_rope(cfg)
        self.config = cfg
        self.layers = model.model.layers
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.inv_freq = inv_freq(model)  # [D/2] fp32
        window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
        limits = [x for x in (window, getattr(cfg, "max_position_embeddings", None)) if x]
        self.max_context: int | None = min(limits) if limits else None  # longest prompt we handle exactly
        if sink_ids is None:
            bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
            bos = bos if bos is not None else getattr(cfg, "bos_token_id", None)
            sink_ids = (int(bos),) if bos is not None else ()
        self.sink_ids = tuple(sink_ids)
        self.fingerprint = model_fingerprint(self)  # architecture, sampled weights, sinks, recipe: no paths
        self.tokenizer_fingerprint = tokenizer_fingerprint(tokenizer)

    # -- device -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.model.embed_tokens.weight.dtype

    # -- per-layer pieces -----------------------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """[T] -> hidden states [T, hidden]."""
        return self.model.model.embed_tokens(ids.to(self.device))

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, D] for `positions` [T], exactly as the model's own forward computes them."""
        pos = positions.to(self.device)[None]  # [1, T]
        cos, sin = self.model.model.rotary_emb(self.model.model.embed_tokens.weight[:1], pos)
        return cos[0], sin[0]

    def qkv(
        self, layer: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer `layer`'s q [T, H_q, D], k, v [T, H_kv, D] for hidden states h [T, hidden]; q, k rotated."""
        block = self.layers[layer]
        attn = block.self_attn
        x = block.input_layernorm(h)
        t = x.shape[0]
        q = attn.q_proj(x).view(t, -1, self.head_dim)  # [T, H_q, D]
        k = attn.k_proj(x).view(t, -1, self.head_dim)  # [T, H_kv, D]
        v = attn.v_proj(x).view(t, -1, self.head_dim)  # [T, H_kv, D]
        q, k = self.norm_qk(attn, q, k)
        c, s = cos[:, None, :], sin[:, None, :]  # [T, 1, D]
        return q * c + rotate_half(q) * s, k * c + rotate_half(k) * s, v

    def norm_qk(self, attn, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hook for per-head q/k norms (Qwen3); identity for the Llama family."""
        return q, k

    def attend(
        self,
        layer: int,
        h: torch.Tensor,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        query_positions: torch.Tensor | QueryMask | None = None,
        segments: Sequence[tuple[int, int]] | Segments | None = None,
    ) -> torch.Tensor:
        """Attention of q [T, H_q, D] over keys/values [1, H_kv, N, D] (key j at position j), then MLP:
        `attention` then `after_attention`. Returns the new hidden states [T, hidden]."""
        return self.after_attention(layer, h, self.attention(q, keys, values, query_positions, segments))

    def attention(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        query_positions: torch.Tensor | QueryMask | None = None,
        segments: Sequence[tuple[int, int]] | Segments | None = None,
    ) -> torch.Tensor:
        """The heads' attention output [T, H_q * D] of q [T, H_q, D] over keys/values [1, H_kv, N, D]
        (before the output projection). Masks: plain causal when T == N and nothing else is given;
        `query_positions` for a subset of queries attending causally by position: a `QueryMask` built
        once per request (see `models.attention`), or the sorted positions [T] (a mask is built for this
        call); `segments` for independent causal sequences packed side by side (block-diagonal)."""
        qh = q.transpose(0, 1)[None]  # [1, H_q, T, D]
        if segments is not None:
            packed = segments if isinstance(segments, Segments) else Segments(segments, q.device)
            o = packed.attend(qh, keys, values, self.scaling)
        elif query_positions is not None:
            mask = query_positions
            if not isinstance(mask, QueryMask):
                mask = query_mask(mask, keys.shape[2], q.device, "dense" if q.is_cuda else "blocks")
            o = mask.attend(qh, keys, values, self.scaling)
        else:
            o = sdpa(qh, keys, values, self.scaling)
        return o[0].transpose(0, 1).reshape(q.shape[0], -1)  # [T, H_q * D]

    def after_attention(self, layer: int, h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """The rest of layer `layer` for hidden states h [T, hidden] and their attention output o
        [T, H_q * D]: output projection, residual, MLP. Row-wise, so rows of several prompts may be
        packed into one call."""
        block = self.layers[layer]
        h = h + block.self_attn.o_proj(o)
        return h + block.mlp(block.post_attention_layernorm(h))

    def _sdpa(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[1, H_q, T, D] over [1, H_kv, N, D]; causal when no mask is given."""
        return sdpa(q, k, v, self.scaling, mask)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states [T, hidden] after the last layer -> logits [T, vocab] (fp32)."""
        return self.model.lm_head(self.model.model.norm(h)).float()

    # -- whole passes ---------------------------------------------------------------------------
    @torch.inference_mode()
    def forward_kv(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        segments: torch.Tensor | None = None,
        past: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Every layer's K/V of `ids` [T]: [2, L, T, H_kv, D]. `segments` [T] (contiguous ids) packs
        independent sequences: each attends only within itself. `past` [2, L, P, H_kv, D] (this model's
        `forward_kv` of a lead-in) is a shared prefix every sequence also attends to in full, as if each
        were computed after it (`positions` then continue from P); only the new tokens' K/V come back."""
        t = ids.shape[0]
        p = 0 if past is None else past.shape[2]
        past = None if past is None else past.to(device=self.device, dtype=self.dtype)  # no copy when already so
        spans = None  # built once for all layers
        if segments is not None:
            spans = Segments.from_ids(segments.cpu(), self.device, past=p)
        elif p:
            spans = Segments([(0, t)], self.device, past=p)
        kv = torch.empty(2, self.num_layers, t, self.num_kv_heads, self.head_dim, dtype=self.dtype, device=self.device)
        h = self.embed(ids)  # [T, hidden]
        cos, sin = self.rope(positions)
        for layer in range(self.num_layers):
            q, k, v = self.qkv(layer, h, cos, sin)
            kv[0, layer], kv[1, layer] = k, v
            if p:  # the past's rows first: [P + T, H_kv, D]
                k, v = torch.cat([past[0, layer], k]), torch.cat([past[1, layer], v])
            h = self.attend(layer, h, q, k.transpose(0, 1)[None], v.transpose(0, 1)[None], segments=spans)
        return kv
