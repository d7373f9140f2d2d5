"""Stateless codecs for chunk KV: identity, lz4 (over any codec), int8/fp8, and a CacheGen-style
entropy codec. Every payload is laid out per layer with a CRC32 each, so decoding can be lazy and
a corrupted entry raises `CodecError` instead of decoding to garbage. `DecodePool` decodes layers of
CPU-bound codecs (cachegen) in worker processes, on the cores the GIL would leave idle."""

from .cachegen import CacheGenCodec, CacheGenConfig
from .codec import Codec, EncodedKV
from .identity import IdentityCodec
from .layered import CodecError, LayeredCodec, LayerTask
from .lz4codec import Lz4Codec
from .pool import DecodePool, DecodePoolError
from .quant import Fp8Codec, Int8Codec
from .registry import CODECS, codec_names, get_codec

__all__ = [
    "Codec",
    "EncodedKV",
    "CodecError",
    "LayeredCodec",
    "LayerTask",
    "IdentityCodec",
    "Lz4Codec",
    "Int8Codec",
    "Fp8Codec",
    "CacheGenCodec",
    "CacheGenConfig",
    "CODECS",
    "codec_names",
    "get_codec",
    "DecodePool",
    "DecodePoolError",
]
