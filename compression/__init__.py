"""Stateless codecs for chunk KV: identity, lz4 (over any codec), int8/fp8, and a CacheGen-style
entropy codec. Every payload is laid out per layer with a CRC32 each, so decoding can be lazy and
a corrupted entry raises `CodecError` instead of decoding to garbage. `DecodePool` decodes layers of
CPU-bound codecs (cachegen) in worker processes, on the cores the GIL would leave idle.

Names are exported lazily (lazy_exports.py): names.py (the accepted codec and dtype names) imports
no torch, so checking a configuration does not load the codecs."""

from ..lazy_exports import lazy_exports

lazy_exports(
    __name__,
    {
        "Codec": "codec",
        "EncodedKV": "codec",
        "CodecError": "layered",
        "LayeredCodec": "layered",
        "LayerTask": "layered",
        "IdentityCodec": "identity",
        "Lz4Codec": "lz4codec",
        "Int8Codec": "quant",
        "Fp8Codec": "quant",
        "CacheGenCodec": "cachegen",
        "CacheGenConfig": "cachegen",
        "CODECS": "registry",
        "codec_names": "names",
        "get_codec": "registry",
        "DecodePool": "pool",
        "DecodePoolError": "pool",
    },
)
