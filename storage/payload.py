"""The on-disk payload format: a self-describing, checksummed file per entry.

Layout: MAGIC (8 bytes) | header length (u32 LE) | header JSON | SHA-256 (32 bytes) | payload.
The header names the chunk key (its fingerprint), codec, codec metadata, pos0, token and layer
counts and the payload length. For a layered codec (per-layer offsets and CRC32s in its metadata) the
header says `"digest": "header"`: the SHA-256 covers the header JSON, whose CRC32s cover each layer of the
payload, so one pass over the payload (CRC32) verifies it instead of two (SHA-256 too: on an H200 host the
look-up of a 20K-token prompt's entries spent most of its time there). Other payloads, and files
written before this, have the SHA-256 over header JSON + payload. Either way a truncated, bit-flipped or
foreign file is detected on read (`CorruptPayload`) and never served.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from dataclasses import dataclass
from typing import BinaryIO

from ..chunk_cache import ChunkKey
from ..compression import EncodedKV

MAGIC = b"RAGKVKV1"
_LEN = struct.Struct("<I")
_DIGEST = 32


class CorruptPayload(ValueError):
    """A payload file that does not match its key, its checksum or its own header."""


@dataclass(frozen=True)
class Payload:
    """A verified entry read back from a file."""

    enc: EncodedKV
    pos0: int
    num_tokens: int
    num_layers: int
    checksum: str


def pack_header(key: ChunkKey, enc: EncodedKV, pos0: int, num_tokens: int, num_layers: int) -> tuple[bytes, str]:
    """The bytes to write before `enc.payload`, and the entry's checksum (hex)."""
    head = {
        "key": str(key),
        "codec": enc.codec,
        "meta": enc.meta,
        "pos0": pos0,
        "num_tokens": num_tokens,
        "num_layers": num_layers,
        "payload_len": len(enc.payload),
    }
    layered = isinstance(enc.meta.get("crc"), list) and isinstance(enc.meta.get("offsets"), list)
    if layered:
        head["digest"] = "header"  # the payload is covered by the per-layer CRC32s in the header
    head_json = json.dumps(head, sort_keys=True, separators=(",", ":")).encode()
    digest = _checksum(head_json, b"" if layered else enc.payload)
    return MAGIC + _LEN.pack(len(head_json)) + head_json + digest, digest.hex()


def read_payload(f: BinaryIO, key: ChunkKey, checksum: str | None = None) -> Payload:
    """Read and verify one entry from `f`; raises CorruptPayload naming what did not match."""
    owner, payload = read_any_payload(f)
    if owner != str(key):
        raise CorruptPayload(f"payload belongs to {owner!r}, not {key}")
    if checksum is not None and payload.checksum != checksum:
        raise CorruptPayload("checksum differs from the catalog's")
    return payload


@dataclass(frozen=True)
class Header:
    """A payload file's verified header: what `read_any_payload` checks before the payload bytes."""

    key: str  # the chunk key string it names
    codec: str
    meta: dict
    pos0: int
    num_tokens: int
    num_layers: int
    payload_offset: int  # where the payload starts in the file
    payload_len: int
    checksum: str  # hex SHA-256
    by_header: bool  # the SHA-256 covers the header only (the per-layer CRC32s cover the payload)
    head_json: bytes


def read_header(f: BinaryIO) -> Header:
    """Read the header of the entry in `f` (positioned at its start) and, when the digest covers the header
    only, verify it and the layer framing (not the layers' CRCs: `LazyLayers` checks each as it is read).
    Leaves `f` at the payload. Raises CorruptPayload when the header is not whole."""
    start = f.read(len(MAGIC) + _LEN.size)
    if len(start) < len(MAGIC) + _LEN.size or start[: len(MAGIC)] != MAGIC:
        raise CorruptPayload("not a ragkv payload (bad magic or truncated header)")
    (head_len,) = _LEN.unpack(start[len(MAGIC) :])
    head_json = f.read(head_len)
    digest = f.read(_DIGEST)
    if len(head_json) != head_len or len(digest) != _DIGEST:
        raise CorruptPayload("truncated header")
    try:
        head = json.loads(head_json)
        by_header = isinstance(head, dict) and head.get("digest") == "header"
        header = Header(
            str(head["key"]),
            head["codec"],
            head["meta"],
            int(head["pos0"]),
            int(head["num_tokens"]),
            int(head["num_layers"]),
            len(start) + head_len + _DIGEST,
            int(head["payload_len"]),
            digest.hex(),
            by_header,
            head_json,
        )
    except (ValueError, KeyError, TypeError) as err:
        raise CorruptPayload(f"unreadable header: {err}") from None
    if by_header:
        if _checksum(head_json, b"") != digest:
            raise CorruptPayload("checksum mismatch")
        check_framing(header.meta, header.payload_len, required=True)
    return header


def read_any_payload(f: BinaryIO) -> tuple[str, Payload]:
    """Read and verify the entry in `f` whatever its key: (the key string its header names, the payload).
    What rebuilds catalog rows from files; raises CorruptPayload when the file is not a whole entry."""
    head = read_header(f)
    payload = f.read(head.payload_len)
    if len(payload) != head.payload_len or f.read(1):
        raise CorruptPayload(f"payload length {len(payload)}(+) does not match the header's {head.payload_len}")
    if not head.by_header and _checksum(head.head_json, payload) != bytes.fromhex(head.checksum):
        raise CorruptPayload("checksum mismatch")
    try:
        enc = EncodedKV(head.codec, payload, head.meta)
    except (ValueError, TypeError) as err:
        raise CorruptPayload(f"unreadable header: {err}") from None
    verify_layers(enc, required=head.by_header)
    return head.key, Payload(enc, head.pos0, head.num_tokens, head.num_layers, head.checksum)


def check_framing(meta: dict, payload_len: int, required: bool = False) -> tuple[list[int], list[int]] | None:
    """(offsets, CRC32s) of a layered payload of `payload_len` bytes, checked for shape (not the CRCs);
    None for a codec without per-layer framing (an error when `required`). Raises CorruptPayload."""
    meta = meta if isinstance(meta, dict) else {}
    offsets, crcs = meta.get("offsets"), meta.get("crc")
    if offsets is None or crcs is None:
        if required:
            raise CorruptPayload("header-only digest without per-layer CRC32s")
        return None
    if not isinstance(offsets, list) or not isinstance(crcs, list) or len(offsets) != len(crcs) + 1:
        raise CorruptPayload("unreadable layer framing")
    try:
        if offsets[0] != 0 or offsets[-1] != payload_len or any(a > b for a, b in zip(offsets, offsets[1:])):
            raise CorruptPayload(f"layer framing does not match the payload ({len(crcs)} CRCs, {len(offsets)} offsets)")
    except TypeError as err:
        raise CorruptPayload(f"unreadable layer framing: {err}") from None
    return offsets, crcs


def verify_layers(enc: EncodedKV, required: bool = False) -> None:
    """Check the per-layer framing and CRC32s of a layered payload, so a layer that would fail its CRC
    on decode is caught at read time (the entry is dropped and recomputed, never half-served).
    `required`: the payload has no other check (a header-only digest), so missing framing is corrupt."""
    framing = check_framing(enc.meta, len(enc.payload), required)
    if framing is None:
        return  # a codec without per-layer framing: the SHA-256 is all there is
    offsets, crcs = framing
    view = memoryview(enc.payload)
    try:
        for i, crc in enumerate(crcs):
            if zlib.crc32(view[offsets[i] : offsets[i + 1]]) != crc:
                raise CorruptPayload(f"layer {i} fails its CRC32 check")
    except (TypeError, ValueError, IndexError) as err:
        if isinstance(err, CorruptPayload):
            raise
        raise CorruptPayload(f"unreadable layer framing: {err}") from None


def _checksum(head_json: bytes, payload: bytes) -> bytes:
    h = hashlib.sha256(head_json)  # SHA-256: ~0.8 GB/s here with SHA-NI, 2x blake2b
    h.update(payload)
    return h.digest()
