"""Per-model calibration of the `packed` codec: how much a model's answers suffer when each band of
layers' K or V is quantized, and the bits per band that a bits/value budget buys the least harm with.

1. Sensitivity: for each prompt, every chunk's KV (fp16, as a tier holds it) is quantized at
   `probe_bits` everywhere; then one (band, K or V) at a time is replaced by its quantized copy and the
   prompt is answered with cacheblend@ratio against its full prefill (kl_mean teacher-forced over 16
   answer tokens, as `ragkv eval`). The excess kl_mean over the uncompressed blend is that slot's
   sensitivity (averaged over prompts).
2. Allocation: a slot's excess at b bits is modelled as excess(probe) * 4**(probe - b) (the squared
   error of a uniform grid falls 4x per bit); bits go one at a time to the slot whose modelled excess
   drops most, from `min_bits` until the budget (minus the grids' own bits) is spent.
3. The result is a `CodecSchedule` under the data directory keyed by the model fingerprint; fidelity
   must then be measured on other prompts (`evaluate_codecs`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..blend import blend, make_strategy
from ..chunk_cache import ChunkKV, precompute_many
from ..compression import Codec
from ..compression.packed import PackedCodec, PackedConfig
from ..compression.schedule import CodecSchedule
from .metrics import kl_per_position, top1_agreement

TEACHER_TOKENS = 16
GRID_BITS = 64  # per channel of a chunk: K's and V's fp16 (lo, step)


@dataclass
class CalibrationPrompt:
    """One sample ready to blend: its plan, fp16 chunk KV and the full prefill's reference logits."""

    engine: object
    sample_id: str
    plan: object
    kvs: list[ChunkKV]  # fp16, as a tier stores them
    forced: torch.Tensor  # [P] the full prefill's greedy answer
    reference: torch.Tensor  # [P, vocab] its logits along that answer

    @classmethod
    def of(cls, engine, sample) -> CalibrationPrompt:
        chunks = engine.tokenize_chunks(sample.chunks)
        plan = engine.plan(sample.question, chunks)
        kvs = [ChunkKV(kv.kv.half(), kv.pos0) for kv in precompute_many(engine.model, chunks)]
        full = blend(engine.model, plan, make_strategy("full"), [], reserve=TEACHER_TOKENS)
        answer = list(engine.answer_ids(full, TEACHER_TOKENS))
        forced = torch.tensor(answer or [int(full.logits.argmax())])
        return cls(engine, sample.id, plan, kvs, forced, engine.teacher_forced_logits(full, forced))

    def fidelity(self, kvs: Sequence[ChunkKV], ratio: float = 0.15) -> tuple[float, float]:
        """(kl_mean, top-1) of cacheblend@ratio over `kvs` (one per chunk) against the full prefill."""
        sources = [(start, kv) for (start, _), kv in zip(self.plan.chunk_spans, kvs)]
        result = blend(
            self.engine.model, self.plan, make_strategy("cacheblend", ratio), sources, reserve=TEACHER_TOKENS
        )
        logits = self.engine.teacher_forced_logits(result, self.forced)
        return float(kl_per_position(self.reference, logits).mean()), top1_agreement(self.reference, logits)


def band_layers(band: int, bands: int, num_layers: int) -> list[int]:
    """The layers of `band` when `num_layers` are split as `PackedConfig` splits them."""
    return [i for i in range(num_layers) if min(i * bands // num_layers, bands - 1) == band]


def measure_sensitivity(
    prompts: Sequence[CalibrationPrompt],
    bands: int = 6,
    probe_bits: int = 2,
    ratio: float = 0.15,
    progress: Callable[[str], None] | None = None,
) -> dict[str, list[float]]:
    """Mean excess kl_mean over uncompressed per band for K ("K") and V ("V") quantized alone at
    `probe_bits`, and the uncompressed kl_mean ("uncompressed": [mean])."""
    codec = PackedCodec(PackedConfig(key_bits=(probe_bits,), value_bits=(probe_bits,)))
    excess = {"K": [0.0] * bands, "V": [0.0] * bands}
    base_mean = 0.0
    for prompt in prompts:
        base, _ = prompt.fidelity(prompt.kvs, ratio)
        base_mean += base / len(prompts)
        quantized = [codec.decode(codec.encode(kv)).kv for kv in prompt.kvs]  # [2, L, T, H, D] each
        num_layers = prompt.kvs[0].num_layers
        for part, index in (("K", 0), ("V", 1)):
            for band in range(bands):
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
    min_bits: int = 1,
    max_bits: int = 8,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(key_bits, value_bits) per band with mean code bits <= `code_bits` (K and V weigh alike), bits
    given greedily where the modelled excess kl falls most (negative measured excess counts as none)."""
    bands = len(sensitivity["K"])
    if len(sensitivity["V"]) != bands:
        raise ValueError("sensitivity needs as many V bands as K bands")
    if code_bits < min_bits:
        raise ValueError(f"a budget of {code_bits:.3f} code bits/value is below min_bits = {min_bits}")
    slots = [("K", b) for b in range(bands)] + [("V", b) for b in range(bands)]
    bits = {s: min_bits for s in slots}
    spare = int(code_bits * len(slots) + 1e-9) - min_bits * len(slots)  # whole bits left to give

    def modelled(slot, b: int) -> float:
        return max(sensitivity[slot[0]][slot[1]], 0.0) * 4.0 ** (probe_bits - b)

    for _ in range(max(spare, 0)):
        open_slots = [s for s in slots if bits[s] < max_bits]
        if not open_slots:
            break
        best = max(open_slots, key=lambda s: (modelled(s, bits[s]) - modelled(s, bits[s] + 1), s[0] == "K", -s[1]))
        bits[best] += 1
    return tuple(bits[("K", b)] for b in range(bands)), tuple(bits[("V", b)] for b in range(bands))


def grid_bits(prompts: Sequence[CalibrationPrompt]) -> float:
    """Bits/value the grids cost on these prompts' chunks (one fp16 pair per channel per chunk, K and V)."""
    tokens = sum(kv.num_tokens for p in prompts for kv in p.kvs)
    chunks = sum(len(p.kvs) for p in prompts)
    return GRID_BITS / 2 / (tokens / chunks)  # per value: 32 bits per channel-part over T tokens


def calibrate(
    engine,
    prompts: Sequence[CalibrationPrompt],
    budget_bits: float,
    bands: int = 6,
    probe_bits: int = 2,
    min_bits: int = 1,
    ratio: float = 0.15,
    progress: Callable[[str], None] | None = None,
) -> CodecSchedule:
    """The `packed` schedule for `engine`'s model at <= `budget_bits` bits/value (codes + grids)."""
    if not prompts:
        raise ValueError("calibration needs at least one prompt")
    sensitivity = measure_sensitivity(prompts, bands, probe_bits, ratio, progress)
    measured = {
        "sensitivity_excess_kl": sensitivity,
        "probe_bits": probe_bits,
        "min_bits": min_bits,
        "ratio": ratio,
        "grid_bits": grid_bits(prompts),
        "prompts": [p.sample_id for p in prompts],
    }
    return schedule_for_budget(engine.model.fingerprint, measured, budget_bits)


def schedule_for_budget(fingerprint: str, measured: dict, budget_bits: float) -> CodecSchedule:
    """The schedule at another budget from the same measurement (`CodecSchedule.measured` of `calibrate`)."""
    code_bits = budget_bits - measured["grid_bits"]
    key_bits, value_bits = allocate_bits(
        measured["sensitivity_excess_kl"], code_bits, measured["probe_bits"], measured["min_bits"]
    )
    return CodecSchedule(fingerprint, key_bits, value_bits, budget_bits, measured)


def evaluate_codecs(
    prompts: Sequence[CalibrationPrompt], codecs: dict[str, Codec], ratio: float = 0.15
) -> list[dict[str, dict[str, float]]]:
    """Per prompt: bits/value (payload), kl_mean and top-1 of cacheblend@ratio through each codec, and
    uncompressed (16 bits) as the reference row."""
    rows = []
    for prompt in prompts:
        kl, top1 = prompt.fidelity(prompt.kvs, ratio)
        row = {"id": prompt.sample_id, "uncompressed": {"bits": 16.0, "kl_mean": kl, "top1": top1}}
        values = sum(kv.kv.numel() for kv in prompt.kvs)
        for name, codec in codecs.items():
            encoded = [codec.encode(kv) for kv in prompt.kvs]
            kl, top1 = prompt.fidelity([codec.decode(e) for e in encoded], ratio)
            row[name] = {"bits": 8 * sum(e.nbytes for e in encoded) / values, "kl_mean": kl, "top1": top1}
        rows.append(row)
    return rows
