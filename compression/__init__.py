"""Stateless codecs for chunk KV: identity, lz4, int8/fp8, and a CacheGen-style entropy codec."""

from .codec import Codec, EncodedKV
from .identity import IdentityCodec

CODECS: dict[str, type[Codec]] = {IdentityCodec.name: IdentityCodec}


def get_codec(name: str) -> Codec:
    """The codec called `name`; unknown names fail listing the known ones."""
    try:
        return CODECS[name]()
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; known codecs: {', '.join(sorted(CODECS))}") from None


__all__ = ["Codec", "EncodedKV", "IdentityCodec", "CODECS", "get_codec"]
