"""FusedRecord: the small description of one published fused prompt, and which hand-off path it took.

ragkv (the producer) publishes the fused KV of a prompt's first N - 1 tokens; an inference server's KV
connector (the consumer) finds it by the exact prompt token ids. The KV itself travels one of three
ways, tried in this order (`candidate_paths`):

- `cuda_ipc`: the KV stays on the GPU where ragkv fused it; the record carries CUDA IPC handles
  (`fused_ipc`), the consumer maps them and copies device to device into its paged cache;
- `shm`: raw bytes in a shared-memory file (/dev/shm), which both sides map (and pin, on CUDA);
- `file`: a safetensors file in the fused folder (any device, any filesystem the two share).

The record is one JSON file `<sha256 of the ids>.json` (`token_ids`, the KV shape and dtype, the model
name, the path taken and why earlier paths were not, the path's `locator`). Every KV layout is
[layers, N - 1, H_kv, D_k + D_v] (keys then values on the last dim), the cell layout of vLLM's cache.
Only torch-free standard library here, so it is cheap to read on vLLM's scheduler.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

FORMAT = "ragkv-fused-kv/2"
PATHS = ("cuda_ipc", "shm", "file")
DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class KVShape:
    """What a reader's model caches per token and layer; an entry of another shape is stale."""

    num_layers: int
    num_kv_heads: int
    head_dim: int  # of keys and of values (D_k = D_v)

    def row_elements(self) -> int:
        """Elements of one token's row in one layer (H_kv * 2 D)."""
        return self.num_kv_heads * 2 * self.head_dim


@dataclass(frozen=True)
class FusedRecord:
    """One published prompt: which ids, what shape, and where its KV is."""

    token_ids: tuple[int, ...]
    shape: KVShape
    dtype: str
    model: str
    path: str  # one of PATHS
    locator: dict = field(default_factory=dict)  # path-specific: {"file": name} or the IPC handle fields
    fallback: tuple[str, ...] = ()  # "<path>: <why it was not taken>" for each path tried before
    created: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if self.path not in PATHS:
            raise ValueError(f"hand-off path {self.path!r} is unknown; accepted: {', '.join(PATHS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not accepted; accepted: {', '.join(DTYPES)}")
        if len(self.token_ids) < 2:
            raise ValueError(f"a fused entry needs a prompt of at least 2 tokens, got {len(self.token_ids)}")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_rows(self) -> int:
        """Prompt rows the entry holds: all tokens but the last (the consumer computes that one)."""
        return len(self.token_ids) - 1

    @property
    def nbytes(self) -> int:
        return self.shape.num_layers * self.num_rows * self.shape.row_elements() * dtype_size(self.dtype)

    def to_json(self) -> str:
        body = asdict(self)
        body["token_ids"] = list(self.token_ids)
        body["fallback"] = list(self.fallback)
        return json.dumps({"format": FORMAT, **body}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> FusedRecord:
        """Parse a record; anything malformed or of another format raises ValueError."""
        try:
            body = json.loads(text)
            if not isinstance(body, dict) or body.pop("format", None) != FORMAT:
                raise ValueError(f"not a {FORMAT} record")
            shape = KVShape(**{k: int(v) for k, v in body.pop("shape").items()})
            ids = tuple(int(t) for t in body.pop("token_ids"))
            locator = body.pop("locator")
            if not isinstance(locator, dict):
                raise ValueError("locator must be an object")
            return cls(
                token_ids=ids,
                shape=shape,
                dtype=str(body.pop("dtype")),
                model=str(body.pop("model")),
                path=str(body.pop("path")),
                locator=locator,
                fallback=tuple(str(f) for f in body.pop("fallback")),
                created=float(body.pop("created")),
            )
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"malformed fused record: {type(err).__name__}: {err}") from None


def dtype_size(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def candidate_paths(device_type: str, wanted: str = "auto", shm_available: bool = True) -> list[str]:
    """Hand-off paths to try, best first, for KV fused on `device_type` ("cuda" or "cpu").

    `wanted`: "auto" (CUDA IPC for GPU tensors, then pinned shared memory, then a file), or one path
    name to use that path only, falling back to "file" (which always works). `shm_available`: whether
    a shared-memory folder exists (Linux /dev/shm)."""
    if wanted != "auto" and wanted not in PATHS:
        raise ValueError(f"hand-off path {wanted!r} is unknown; accepted: auto, {', '.join(PATHS)}")
    if wanted == "auto":
        paths = ["cuda_ipc", "shm", "file"] if device_type == "cuda" else ["shm", "file"]
    else:
        paths = [wanted] if wanted == "file" else [wanted, "file"]
    if wanted == "cuda_ipc" and device_type != "cuda":
        paths.remove("cuda_ipc")
    if not shm_available and "shm" in paths:
        paths.remove("shm")
    return paths


def same_ids(record: FusedRecord, token_ids: Sequence[int]) -> bool:
    return len(record.token_ids) == len(token_ids) and all(a == int(b) for a, b in zip(record.token_ids, token_ids))
