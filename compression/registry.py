"""The codec registry: `get_codec("int8")`, and lz4 composed over any other codec as `lz4+NAME`."""

from __future__ import annotations

from .cachegen import CacheGenCodec
from .codec import Codec
from .identity import IdentityCodec
from .layered import LayeredCodec
from .lz4codec import Lz4Codec
from .packed import PackedCodec
from .quant import HAS_FP8, Fp8Codec, Int8Codec

CODECS: dict[str, type[LayeredCodec]] = {
    c.name: c for c in (IdentityCodec, Int8Codec, CacheGenCodec, PackedCodec, *((Fp8Codec,) if HAS_FP8 else ()))
}
CODECS["lz4"] = Lz4Codec


def codec_names() -> list[str]:
    """Every name `get_codec` accepts, composed ones included."""
    base = [n for n in CODECS if n != "lz4"]
    return [*base, "lz4", *(f"lz4+{n}" for n in base if n != "identity")]


def get_codec(name: str) -> Codec:
    """The codec called `name` (e.g. "identity", "int8", "cachegen", "lz4", "lz4+cachegen")."""
    parts = name.split("+")
    if len(parts) == 2 and parts[0] == "lz4":
        inner = parts[1]
        if inner == "lz4":
            raise ValueError(
                f"lz4+lz4 is not a codec: lz4 composes once, over one of {', '.join(n for n in CODECS if n != 'lz4')}"
            )
        if inner not in CODECS:
            raise ValueError(
                f"unknown codec {inner!r} in {name!r}; lz4 composes over: {', '.join(n for n in CODECS if n != 'lz4')}"
            )
        return Lz4Codec(CODECS[inner]())
    if len(parts) == 1 and name in CODECS:
        return CODECS[name]()
    if len(parts) > 1:
        raise ValueError(
            f"cannot compose {name!r}: only 'lz4+NAME' is a composition; known codecs: {', '.join(codec_names())}"
        )
    raise ValueError(f"unknown codec {name!r}; known codecs: {', '.join(codec_names())}")
