"""The names this folder accepts, known without loading a codec (or torch): the dtypes chunk KV is
stored in, and the codec names (`lz4+NAME` is lz4 over another codec). StorageConfig checks a
configuration with them (`ragkv config` stays light); registry.py builds the codecs they name."""

from __future__ import annotations

DTYPE_NAMES = ("float16", "bfloat16", "float32")
CODEC_NAMES = ("identity", "int8", "cachegen", "packed", "fp8", "lz4")  # fp8 needs a torch with float8 dtypes


def codec_names() -> list[str]:
    """Every name `get_codec` accepts, composed ones included."""
    base = [n for n in CODEC_NAMES if n != "lz4"]
    return [*base, "lz4", *(f"lz4+{n}" for n in base if n != "identity")]


def parse_codec_name(name: str) -> tuple[bool, str]:
    """(lz4 over it, the codec under it) of a codec name: "lz4+int8" -> (True, "int8"), "lz4" -> (False,
    "lz4"); a name that is none of `codec_names()` fails saying what is accepted."""
    parts = name.split("+")
    inner = [n for n in CODEC_NAMES if n != "lz4"]
    if len(parts) == 2 and parts[0] == "lz4":
        if parts[1] == "lz4":
            raise ValueError(f"lz4+lz4 is not a codec: lz4 composes once, over one of {', '.join(inner)}")
        if parts[1] not in inner:
            raise ValueError(f"unknown codec {parts[1]!r} in {name!r}; lz4 composes over: {', '.join(inner)}")
        return True, parts[1]
    if len(parts) == 1 and name in CODEC_NAMES:
        return False, name
    if len(parts) > 1:
        raise ValueError(
            f"cannot compose {name!r}: only 'lz4+NAME' is a composition; known codecs: {', '.join(codec_names())}"
        )
    raise ValueError(f"unknown codec {name!r}; known codecs: {', '.join(codec_names())}")
