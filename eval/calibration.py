"""Per-model calibration of the `packed` codec: how much a model's answers suffer when each band of
layers' K or V is quantized, and the bits per band that a bits/value budget buys the least harm with.

1. Sensitivity: for each prompt (cut to a token budget if asked), every chunk's KV (fp16, as a tier
   holds it) is quantized at `probe_bits` everywhere, on the grid geometry the codec will use; then
   one (band, K or V) at a time is replaced by its quantized copy and the prompt is answered with
   cacheblend@ratio against its full prefill (kl_mean teacher-forced over 16 answer tokens, as
   `ragkv eval`). The excess kl_mean over the uncompressed blend is that slot's
   sensitivity (averaged over prompts). Bands are equal, or start at given layers (layer 1 alone, say).
2. Allocation: a slot's excess at b bits is modelled as excess(probe) * 4**(probe - b) (the squared
   error of a uniform grid falls 4x per bit); bits go one at a time to the slot whose modelled excess
   drops most per bit spent (a band weighs by its layers), from `min_bits` until the budget (minus
   the grids' own bits) is spent. Unequal bands come out as bits per layer.
3. The result is a `CodecSchedule` under the data directory keyed by the model fingerprint; fidelity
   must then be measured on other prompts (`evaluate_codecs`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..blend import blend, make_strategy
from ..chunk_cache import ChunkKV
from ..compression import Codec
from ..compression.packed import PackedCodec, PackedConfig
from ..compression.packed_layout import format_for
from ..compression.schedule import CodecSchedule
from .metrics import TEACHER_TOKENS, kl_per_position, top1_agreement

GRID_BITS = 32  # per scale group: its fp16 (lo, step)


@dataclass
class CalibrationPrompt:
    """One sample ready to blend: its plan, fp16 chunk KV and the full prefill's reference logits."""

    engine: object
    sample_id: str
    plan: object
    kvs: list[ChunkKV]  # fp16, as a tier stores them
    forced: torch.Tensor  # [P] the full prefill's greedy answer
    reference: torch.Tensor  # [P, vocab] its logits along that answer

    uncompressed: dict[float, tuple[float, float]] = field(default_factory=dict)  # ratio -> (kl_mean, top-1)

    @classmethod
    def of(cls, engine, sample, max_tokens: int | None = None, chunk_tokens: int | None = None) -> CalibrationPrompt:
        """`sample` prepared: its chunks (each cut to `chunk_tokens`, kept while their total fits
        `max_tokens`), their fp16 KV, and the full prefill's answer and logits."""
        chunks = truncate_chunks(engine.tokenize_chunks(sample.chunks), max_tokens, chunk_tokens)
        plan = engine.plan(sample.question, chunks)
        kvs = [ChunkKV(kv.kv.half(), kv.pos0) for kv in engine.supply.compute(chunks)]
        full = blend(engine.model, plan, make_strategy("full"), [], reserve=TEACHER_TOKENS)
        answer = list(engine.answer_ids(full, TEACHER_TOKENS))
        forced = torch.tensor(answer or [int(full.logits.argmax())])
        return cls(engine, sample.id, plan, kvs, forced, engine.teacher_forced_logits(full, forced))

    def state(self) -> dict:
        """What `restore` needs to rebuild this prompt without the model's passes (for `torch.save`)."""
        return {
            "sample_id": self.sample_id,
            "plan": self.plan,
            "kv": [kv.kv for kv in self.kvs],
            "pos0": [kv.pos0 for kv in self.kvs],
            "forced": self.forced,
            "reference": self.reference,
            "uncompressed": dict(self.uncompressed),
        }

    @classmethod
    def restore(cls, engine, state: dict) -> CalibrationPrompt:
        kvs = [ChunkKV(kv, pos0) for kv, pos0 in zip(state["kv"], state["pos0"])]
        return cls(
            engine, state["sample_id"], state["plan"], kvs, state["forced"], state["reference"], state["uncompressed"]
        )

    @property
    def num_tokens(self) -> int:
        """Chunk tokens (the values a codec sees are 2 x layers x these x channels)."""
        return sum(kv.num_tokens for kv in self.kvs)

    def baseline(self, ratio: float = 0.15) -> tuple[float, float]:
        """(kl_mean, top-1) of the uncompressed chunk KV, computed once per ratio."""
        if ratio not in self.uncompressed:
            self.uncompressed[ratio] = self.fidelity(self.kvs, ratio)
        return self.uncompressed[ratio]

    def grid_bits(
        self, key_group: tuple[int, int] = (0, 1), value_group: tuple[int, int] = (0, 1), format: int | None = None
    ) -> float:
        """Bits/value the `packed` grids (one fp16 pair per scale group) cost on this prompt's chunks, with
        format 2's channel table (int16 per channel) and spare byte (format: the writer's for the geometry)."""
        format = format or format_for(key_group, value_group)
        bits = values = 0
        for kv in self.kvs:
            t, c = kv.num_tokens, kv.kv.shape[-2] * kv.kv.shape[-1]
            for gt, gc in (key_group, value_group):
                bits += GRID_BITS * -(-t // (gt or t)) * -(-c // gc) + (16 * (c + 1) + 8 if format == 2 else 0)
            values += 2 * t * c
        return bits / values

    def fidelity(self, kvs: Sequence[ChunkKV], ratio: float = 0.15) -> tuple[float, float]:
        """(kl_mean, top-1) of cacheblend@ratio over `kvs` (one per chunk) against the full prefill."""
        sources = [(start, kv) for (start, _), kv in zip(self.plan.chunk_spans, kvs)]
        result = blend(
            self.engine.model, self.plan, make_strategy("cacheblend", ratio), sources, reserve=TEACHER_TOKENS
        )
        logits = self.engine.teacher_forced_logits(result, self.forced)
        return float(kl_per_position(self.reference, logits).mean()), top1_agreement(self.reference, logits)


def truncate_chunks(
    chunks: Sequence[Sequence[int]], max_tokens: int | None = None, chunk_tokens: int | None = None
) -> list[list[int]]:
    """Each chunk cut to its first `chunk_tokens`, then chunks kept in order while their total fits
    `max_tokens` (the first is always kept, cut to `max_tokens` if need be)."""
    kept, total = [], 0
    for chunk in chunks:
        chunk = list(chunk[:chunk_tokens] if chunk_tokens else chunk)
        if max_tokens and total + len(chunk) > max_tokens:
            if not kept:
                kept.append(chunk[:max_tokens])
            break
        kept.append(chunk)
        total += len(chunk)
    return kept


Bands = int | Sequence[int]  # equal bands (as PackedConfig splits layers), or each band's first layer


def band_count(bands: Bands) -> int:
    return bands if isinstance(bands, int) else len(bands)


def band_layers(band: int, bands: Bands, num_layers: int) -> list[int]:
    """The layers of `band`: `bands` equal bands as `PackedConfig` splits them, or, given each band's
    first layer (0 first, increasing), from that layer to the next band's."""
    if isinstance(bands, int):
        return [i for i in range(num_layers) if min(i * bands // num_layers, bands - 1) == band]
    edges = [*bands, num_layers]
    if edges[0] != 0 or any(a >= b for a, b in zip(edges, edges[1:])):
        raise ValueError(f"band edges must start at 0 and increase below {num_layers} layers; got {list(bands)}")
    return list(range(edges[band], edges[band + 1]))


def per_layer_bits(bits: Sequence[int], bands: Bands, num_layers: int) -> tuple[int, ...]:
    """Bits per band as `PackedConfig` takes them: as they are for equal bands, else one entry per layer."""
    if isinstance(bands, int):
        return tuple(bits)
    return tuple(bits[b] for b in range(len(bands)) for _ in band_layers(b, bands, num_layers))


def measure_sensitivity(
    prompts: Sequence[CalibrationPrompt],
    bands: Bands = 6,
    probe_bits: int = 2,
    ratio: float = 0.15,
    progress: Callable[[str], None] | None = None,
    key_group: tuple[int, int] = (0, 1),
    value_group: tuple[int, int] = (0, 1),
) -> dict[str, list[float]]:
    """Mean excess kl_mean over uncompressed per band for K ("K") and V ("V") quantized alone at
    `probe_bits` (on the grids' geometry the codec will use), and the uncompressed kl_mean
    ("uncompressed": [mean])."""
    codec = PackedCodec(
        PackedConfig((probe_bits,), (probe_bits,), key_group, value_group, format_for(key_group, value_group))
    )
    count = band_count(bands)
    excess = {"K": [0.0] * count, "V": [0.0] * count}
    base_mean = 0.0
    for prompt in prompts:
        base, _ = prompt.baseline(ratio)
        base_mean += base / len(prompts)
        quantized = [codec.decode(codec.encode(kv)).kv for kv in prompt.kvs]  # [2, L, T, H, D] each
        num_layers = prompt.kvs[0].num_layers
        for part, index in (("K", 0), ("V", 1)):
            for band in range(count):
                layers = band_layers(band, bands, num_layers)
                mixed = []
                for kv, hat in zip(prompt.kvs, quantized):
                    x = kv.kv.clone()
                    x[index, layers] = hat[index, layers]
                    mixed.append(ChunkKV(x, kv.pos0))
                kl, _ = prompt.fidelity(mixed, ratio)
                excess[part][band] += (kl - base) / len(prompts)
                if progress:
                    progress(f"{prompt.sample_id} {part} band {band}: kl {kl:.4f} (uncompressed {base:.4f})")
    return {**excess, "uncompressed": [base_mean]}


def allocate_bits(
    sensitivity: dict[str, list[float]],
    code_bits: float,
    probe_bits: int = 2,
    min_bits: float = 1,
    max_bits: int = 8,
    weights: Sequence[float] | None = None,
    quantum: float = 1.0,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(key_bits, value_bits) per band with mean code bits <= `code_bits` (K and V weigh alike, a band
    by its `weights` entry, e.g. its number of layers; equal by default), bits given `quantum` at a time
    (1: whole bits, as ints; 0.25: packed format 2's fractional mean widths) where the modelled excess kl
    falls most per bit spent (negative measured excess counts as none)."""
    bands = len(sensitivity["K"])
    if len(sensitivity["V"]) != bands:
        raise ValueError("sensitivity needs as many V bands as K bands")
    if code_bits < min_bits:
        raise ValueError(f"a budget of {code_bits:.3f} code bits/value is below min_bits = {min_bits}")
    if not 0 < quantum <= 1:
        raise ValueError(f"quantum must be in (0, 1] bits, got {quantum}")
    weights = [1.0] * bands if weights is None else [float(w) for w in weights]
    if len(weights) != bands or min(weights) <= 0:
        raise ValueError(f"weights must be {bands} positive numbers, got {weights}")
    slots = [("K", b) for b in range(bands)] + [("V", b) for b in range(bands)]
    steps = {s: 0 for s in slots}  # quanta given above min_bits
    spare = code_bits * 2 * sum(weights) - min_bits * 2 * sum(weights) + 1e-9  # weighted bits left to give

    def modelled(slot, n: int) -> float:
        return max(sensitivity[slot[0]][slot[1]], 0.0) * 4.0 ** (probe_bits - min_bits - n * quantum)

    def gain(slot) -> tuple:
        drop = modelled(slot, steps[slot]) - modelled(slot, steps[slot] + 1)
        return drop / weights[slot[1]], slot[0] == "K", -slot[1]

    def fits(slot) -> bool:
        return min_bits + (steps[slot] + 1) * quantum <= max_bits + 1e-9 and weights[slot[1]] * quantum <= spare

    while True:
        open_slots = [s for s in slots if fits(s)]
        if not open_slots:
            break
        best = max(open_slots, key=gain)
        steps[best] += 1
        spare -= weights[best[1]] * quantum

    def bits(slot) -> float:
        value = min_bits + steps[slot] * quantum
        return int(round(value)) if quantum == 1 and float(min_bits).is_integer() else round(value, 6)

    return tuple(bits(("K", b)) for b in range(bands)), tuple(bits(("V", b)) for b in range(bands))


def grid_bits(
    prompts: Sequence[CalibrationPrompt],
    key_group: tuple[int, int] = (0, 1),
    value_group: tuple[int, int] = (0, 1),
    format: int | None = None,
) -> float:
    """Bits/value the grids cost on these prompts' chunks (one fp16 pair per scale group, K and V)."""
    return sum(p.grid_bits(key_group, value_group, format) for p in prompts) / len(prompts)


def calibrate(
    engine,
    prompts: Sequence[CalibrationPrompt],
    budget_bits: float,
    bands: Bands = 6,
    probe_bits: int = 2,
    min_bits: int = 2,  # harmless at 2 bits does not mean harmless at 1 (docs/BENCHMARKS.md)
    ratio: float = 0.15,
    progress: Callable[[str], None] | None = None,
    key_group: tuple[int, int] = (0, 1),
    value_group: tuple[int, int] = (0, 1),
    quantum: float = 1.0,
) -> CodecSchedule:
    """The `packed` schedule for `engine`'s model at <= `budget_bits` bits/value (codes + grids), for
    grids of the given geometry, bits per band in steps of `quantum` (fractional: packed format 2)."""
    if not prompts:
        raise ValueError("calibration needs at least one prompt")
    sensitivity = measure_sensitivity(prompts, bands, probe_bits, ratio, progress, key_group, value_group)
    measured = {
        "sensitivity_excess_kl": sensitivity,
        "probe_bits": probe_bits,
        "min_bits": min_bits,
        "ratio": ratio,
        "bands": bands if isinstance(bands, int) else list(bands),
        "num_layers": prompts[0].kvs[0].num_layers,
        "key_group": list(key_group),
        "value_group": list(value_group),
        "grid_bits": grid_bits(prompts, key_group, value_group, format_for(key_group, value_group)),
        "quantum": quantum,
        "prompts": [p.sample_id for p in prompts],
    }
    return schedule_for_budget(engine.model.fingerprint, measured, budget_bits)


def schedule_for_budget(fingerprint: str, measured: dict, budget_bits: float) -> CodecSchedule:
    """The schedule at another budget from the same measurement (`CodecSchedule.measured` of `calibrate`)."""
    code_bits = budget_bits - measured["grid_bits"]
    bands = measured.get("bands", len(measured["sensitivity_excess_kl"]["K"]))
    weights = None
    if not isinstance(bands, int):  # bands of unequal size: bits weigh by layers, and are stored per layer
        num_layers = measured["num_layers"]
        weights = [len(band_layers(b, bands, num_layers)) for b in range(len(bands))]
    key_bits, value_bits = allocate_bits(
        measured["sensitivity_excess_kl"],
        code_bits,
        measured["probe_bits"],
        measured["min_bits"],
        weights=weights,
        quantum=measured.get("quantum", 1.0),
    )
    if weights is not None:
        key_bits, value_bits = (per_layer_bits(b, bands, measured["num_layers"]) for b in (key_bits, value_bits))
    groups = (tuple(measured.get("key_group", (0, 1))), tuple(measured.get("value_group", (0, 1))))
    return CodecSchedule(fingerprint, key_bits, value_bits, budget_bits, measured, *groups)


def evaluate_codecs(
    prompts: Sequence[CalibrationPrompt], codecs: dict[str, Codec], ratio: float = 0.15
) -> list[dict[str, dict[str, float]]]:
    """Per prompt: bits/value (payload), kl_mean and top-1 of cacheblend@ratio through each codec, and
    uncompressed (16 bits) as the reference row."""
    rows = []
    for prompt in prompts:
        kl, top1 = prompt.baseline(ratio)
        row = {"id": prompt.sample_id, "uncompressed": {"bits": 16.0, "kl_mean": kl, "top1": top1}}
        values = sum(kv.kv.numel() for kv in prompt.kvs)
        for name, codec in codecs.items():
            encoded = [codec.encode(kv) for kv in prompt.kvs]
            kl, top1 = prompt.fidelity([codec.decode(e) for e in encoded], ratio)
            row[name] = {"bits": 8 * sum(e.nbytes for e in encoded) / values, "kl_mean": kl, "top1": top1}
        rows.append(row)
    return rows
