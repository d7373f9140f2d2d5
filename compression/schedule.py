"""A per-model codec schedule: the bits per band of layers for K and for V that `ragkv calibrate` picked
for one model, stored as JSON under the data directory, keyed by the model fingerprint.

`schedule_path(directory, fingerprint)` is where a model's schedule lives; `CodecSchedule.load` reads
one (refusing a file that is not a schedule, naming what is missing); `codec_with_schedule(name,
schedule)` builds the named codec with the schedule's bits when the codec is `packed` (or
`lz4+packed`), and the plain codec otherwise. Entries keep their own bits in their metadata, so a new
schedule never breaks old entries.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .codec import Codec
from .lz4codec import Lz4Codec
from .packed import PackedCodec, PackedConfig
from .packed_layout import format_for
from .registry import get_codec

SCHEDULE_VERSION = 1
SCHEDULED_CODECS = ("packed",)  # codecs whose bits a schedule sets


@dataclass(frozen=True)
class CodecSchedule:
    """Bits per equal band of layers, early first, for K and V, and the grids' geometry (tokens x channels
    per scale group, as `PackedConfig`) they were calibrated with; with what it was measured on."""

    model_fingerprint: str
    key_bits: tuple[float, ...]  # whole bits, or fractional mean widths (packed format 2)
    value_bits: tuple[float, ...]
    budget_bits: float  # the bits/value budget it was picked for (codes + grids)
    measured: dict[str, Any] = field(default_factory=dict)  # sensitivity, prompts, ... (informational)
    key_group: tuple[int, int] = (0, 1)  # schedules saved before the geometry was stored: per channel
    value_group: tuple[int, int] = (0, 1)

    def __post_init__(self) -> None:
        self.packed_config()  # validates the bits and the geometry

    def packed_config(self) -> PackedConfig:
        groups = (tuple(self.key_group), tuple(self.value_group))
        return PackedConfig(tuple(self.key_bits), tuple(self.value_bits), *groups, format_for(*groups))

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": SCHEDULE_VERSION,
                **asdict(self),
                "key_bits": list(self.key_bits),
                "value_bits": list(self.value_bits),
                "key_group": list(self.key_group),
                "value_group": list(self.value_group),
            },
            indent=1,
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> CodecSchedule:
        """The schedule in `path`; a missing file raises FileNotFoundError, a malformed one ValueError."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"codec schedule not found: {path}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not a codec schedule (invalid JSON: {err.msg})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: not a codec schedule (expected a JSON object)")
        if raw.get("version") != SCHEDULE_VERSION:
            raise ValueError(
                f"{path}: codec schedule version {raw.get('version')!r}; this reader knows {SCHEDULE_VERSION}"
            )
        missing = [k for k in ("model_fingerprint", "key_bits", "value_bits", "budget_bits") if k not in raw]
        if missing:
            raise ValueError(f"{path}: codec schedule lacks {', '.join(missing)}")
        return cls(
            str(raw["model_fingerprint"]),
            tuple(_width(b) for b in raw["key_bits"]),
            tuple(_width(b) for b in raw["value_bits"]),
            float(raw["budget_bits"]),
            dict(raw.get("measured", {})),
            tuple(int(g) for g in raw.get("key_group", (0, 1))),
            tuple(int(g) for g in raw.get("value_group", (0, 1))),
        )


def _width(b: Any) -> float:
    """A band's bits as stored: whole bits stay ints (format 1 takes only those), fractions floats."""
    return int(b) if float(b).is_integer() else float(b)


def schedule_path(directory: str | Path, fingerprint: str) -> Path:
    """Where the schedule of the model with `fingerprint` lives under `directory`."""
    return Path(directory).expanduser() / f"{hashlib.sha256(fingerprint.encode()).hexdigest()[:20]}.json"


def find_schedule(location: str | Path | None, fingerprint: str | None) -> CodecSchedule | None:
    """The schedule for `fingerprint` at `location` (a schedule file, or a directory of them), or None
    (defaults) when there is none, or when the file was calibrated for another model."""
    if location is None:
        return None
    location = Path(location).expanduser()
    if location.is_dir():
        if fingerprint is None:
            return None
        location = schedule_path(location, fingerprint)
        if not location.is_file():
            return None
    schedule = CodecSchedule.load(location)
    if fingerprint is not None and schedule.model_fingerprint != fingerprint:
        return None  # calibrated for another model: its bits say nothing about this one
    return schedule


def codec_with_schedule(name: str, schedule: CodecSchedule | None) -> Codec:
    """The codec called `name`, with `schedule`'s bits when it is a scheduled codec (else as `get_codec`)."""
    codec = get_codec(name)
    if schedule is None:
        return codec
    core = codec.inner if isinstance(codec, Lz4Codec) else codec
    if not isinstance(core, PackedCodec):
        return codec
    scheduled = PackedCodec(schedule.packed_config())
    return Lz4Codec(scheduled) if isinstance(codec, Lz4Codec) else scheduled
