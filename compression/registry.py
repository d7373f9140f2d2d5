"""The codec registry: `get_codec("int8")`, and lz4 composed over any other codec as `lz4+NAME`
(the names, and their parsing, are names.py's)."""

from __future__ import annotations

from .cachegen import CacheGenCodec
from .codec import Codec
from .identity import IdentityCodec
from .layered import LayeredCodec
from .lz4codec import Lz4Codec
from .names import parse_codec_name
from .packed import PackedCodec
from .quant import HAS_FP8, Fp8Codec, Int8Codec

CODECS: dict[str, type[LayeredCodec]] = {
    c.name: c for c in (IdentityCodec, Int8Codec, CacheGenCodec, PackedCodec, *((Fp8Codec,) if HAS_FP8 else ()))
}
CODECS["lz4"] = Lz4Codec


def get_codec(name: str) -> Codec:
    """The codec called `name` (e.g. "identity", "int8", "cachegen", "lz4", "lz4+cachegen")."""
    over_lz4, base = parse_codec_name(name)
    if base not in CODECS:
        raise ValueError(f"codec {base!r} needs a torch with float8 dtypes (torch.float8_e4m3fn); this one has none")
    return Lz4Codec(CODECS[base]()) if over_lz4 else CODECS[base]()
