"""The answer gate (eval/codec_gate.py) for `packed` format 1 against format 2 at the same bits per layer: does
format 2's per-channel widths change fewer greedy answers than format 1?

    python experiments/packed_formats_gate.py --data ../shared/data/phonecacheblend/wikimqa_s_clean.json \
        --format wikimqa --limit 6 --max-chunks 4 --out packed_formats_gate.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from codec_heldout import ISSUE12_25, unruns

from ragkv.compression.packed import PackedCodec, PackedConfig
from ragkv.engine.engine import Engine
from ragkv.eval.codec_gate import GatePrompt, gate_table, run_gate
from ragkv.eval.datasets import load_samples
from ragkv.storage.config import StorageConfig, TierConfig

CODECS = {
    "packed K3 V2, format 1 (the old default)": PackedCodec(PackedConfig(format=1)),
    "packed K3 V2, format 2 (the default)": PackedCodec(PackedConfig()),
    "packed calibrated @2.5 (issue 12's bits), format 1": PackedCodec(PackedConfig(*ISSUE12_25, format=1)),
    "packed calibrated @2.5 (issue 12's bits), format 2": PackedCodec(PackedConfig(*ISSUE12_25)),
    # issue 24's: format-2 probes on MuSiQue 1-3, quarter bits (docs/bench/codec_heldout_format2_calibrated.json)
    "packed calibrated @2.5, format 2 (its own calibration)": PackedCodec(
        PackedConfig(unruns("2,2.75,2.5x4,2x6,2.5x6,3x6,2x6"), unruns("2,4.5,3x10,2x18"))
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--format", required=True)
    ap.add_argument("--limit", type=int, default=6)
    ap.add_argument("--max-chunks", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=24, help="greedy answer tokens compared")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--codecs", default=";".join(CODECS), help="';'-separated names of CODECS (default: all)")
    ap.add_argument("--out", default="packed_formats_gate.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    engine = Engine.from_pretrained("smollm2", storage=StorageConfig(tiers=(TierConfig("cpu", 1 << 30),)))
    samples = load_samples(args.data, args.format, args.limit, args.max_chunks)
    prompts = [
        GatePrompt(s.id, s.question, tuple(tuple(c) for c in engine.tokenize_chunks(s.chunks)))
        for s in samples[: args.limit]
    ]
    codecs = {name: CODECS[name] for name in args.codecs.split(";") if name}
    verdicts = run_gate(engine, prompts, codecs, None, None, args.tokens, print)
    print(gate_table(verdicts, f"\n{Path(args.data).name} (n={len(prompts)})"), flush=True)
    Path(args.out).write_text(json.dumps([v.row() for v in verdicts], indent=1))


if __name__ == "__main__":
    main()
