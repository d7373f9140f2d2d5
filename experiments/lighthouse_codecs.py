"""Issue 21's lighthouse example: does a tier's codec change what the model answers?

Three documents ("Fact 6: the lighthouse of port Gull was built in 1778 and its keeper was named Sile.
Entry 2." and the same for Holm / 1791 / Tam and Iona / 1804 / Una), every order of them, and the
question "Who kept the lighthouse of port Holm?": 8 greedy tokens (temperature 0) answered from chunk
KV stored with each codec against the same answer from uncompressed (resident) fp16 KV, with the
configured strategy; the Redis tier's codec is all that differs between two sidecars sharing it (one
computed the chunks and holds them resident, the other reads them from Redis).

    python experiments/lighthouse_codecs.py --codecs cachegen,int8,lz4
"""

from __future__ import annotations

import argparse
import itertools

import torch

from ragkv.engine.engine import Engine
from ragkv.eval.codec_gate import GatePrompt, gate_table, run_gate

FACTS = [("Gull", 1778, "Sile"), ("Holm", 1791, "Tam"), ("Iona", 1804, "Una")]
QUESTION = "Who kept the lighthouse of port Holm?"


def documents() -> list[str]:
    return [
        f"Fact 6: the lighthouse of port {port} was built in {year} and its keeper was named {keeper}. Entry 2."
        for port, year, keeper in FACTS
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--codecs", default="cachegen,int8,lz4", help="codecs answered from beside uncompressed")
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--strategy", default=None, help="default: the configured one")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine.from_pretrained("smollm2")
    ids = engine.tokenize_chunks(documents())
    prompts = [
        GatePrompt("-".join(FACTS[i][0] for i in order), QUESTION, tuple(tuple(ids[i]) for i in order))
        for order in itertools.permutations(range(len(ids)))
    ]
    codecs = {name: name for name in args.codecs.split(",") if name}
    verdicts = run_gate(engine, prompts, codecs, args.strategy, None, args.tokens, print)
    print(gate_table(verdicts, f"lighthouse, {len(prompts)} prompts, {args.tokens} tokens"))
    for v in verdicts:
        print(f"{v.codec}: {len(v.changed)} of {v.prompts} answers changed against resident fp16 KV")
    engine.close()


if __name__ == "__main__":
    main()
