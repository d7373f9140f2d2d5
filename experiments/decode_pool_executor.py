"""Study: could `concurrent.futures.ProcessPoolExecutor` (spawn) + shared-memory outputs replace the
hand-rolled `DecodePool` (compression/pool.py)? Issue #10 asks to replace it if it decodes within
10% of today's speed.

Both pools decode the same cachegen entries (real SmolLM2 chunk KV, fp16) with the same number of
workers; inline decoding on one core is the reference. Variants are interleaved per repeat (a
shared machine's load drifts) and each pool's output is checked bit-identical to inline.
`ExecutorPool` ships each layer's header and section bytes through the executor's pickling queue;
the worker decodes and writes the layer's K and V halves straight into a shared-memory block the
parent allocated for the whole batch, and the parent copies the batch out once.
    PYTHONPATH=... python experiments/decode_pool_executor.py \
        --data ../shared/data/cacheblend/musique_s.json --limit 2 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, wait
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import torch

from ragkv.chunk_cache import ChunkKV, precompute_many
from ragkv.compression import DecodePool, get_codec
from ragkv.compression.layered import LayerTask
from ragkv.compression.pool import _PACKAGE_ROOT

_FIELDS = ("codec", "params", "shape", "stored", "layer", "num_layers", "dtype")
# Run in each worker before any task is unpickled: `ragkv` is this very checkout (as DecodePool's boot).
_BOOT = (
    "import importlib.util, sys, torch\n"
    "torch.set_num_threads(1)\n"
    "root = {root!r}\n"
    "if 'ragkv' not in sys.modules:\n"
    "    spec = importlib.util.spec_from_file_location('ragkv', root + '/__init__.py', "
    "submodule_search_locations=[root])\n"
    "    mod = importlib.util.module_from_spec(spec)\n"
    "    sys.modules['ragkv'] = mod\n"
    "    spec.loader.exec_module(mod)\n"
)


def _decode_into(shm_name: str, k_offset: int, v_offset: int, header: dict, section: bytes) -> None:
    """Worker: decode one layer and write its K and V halves at their offsets in the shared block."""
    shm = SharedMemory(shm_name)  # spawn children share the parent's resource tracker: the parent unlinks
    try:
        layer = LayerTask(section=section, **header).run("cpu").contiguous()  # [2, T, H, D]
        for half, offset in ((layer[0], k_offset), (layer[1], v_offset)):
            raw = half.view(torch.uint8).reshape(-1)
            torch.frombuffer(shm.buf, dtype=torch.uint8, count=raw.numel(), offset=offset).copy_(raw)
            del raw
    finally:
        shm.close()


def _noop() -> int:
    return 0


class ExecutorPool:
    """The DecodePool interface the store uses (`alive`, `workers`, `decode_many`, `close`), built on
    ProcessPoolExecutor (spawn) with shared-memory outputs."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._ex = ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=exec,
            initargs=(_BOOT.format(root=_PACKAGE_ROOT), {}),
        )

    @property
    def alive(self) -> bool:
        return not self._ex._broken

    def wait_ready(self) -> None:
        wait([self._ex.submit(_noop) for _ in range(4 * self.workers)])

    def decode_many(self, codec, encs, device="cpu", dtype=None) -> list[ChunkKV]:
        jobs, total = [], 0
        for enc in encs:
            tasks = [codec.layer_task(enc, i, dtype) for i in range(int(enc.meta["shape"][1]))]
            shape = (2, len(tasks), *tasks[0].shape)  # [2, L, T, H, D]
            nbytes = torch.empty(0, dtype=tasks[0].dtype).element_size() * torch.Size(shape).numel()
            jobs.append((enc, tasks, shape, total))
            total += nbytes
        shm = SharedMemory(create=True, size=max(total, 1))
        try:
            futures = []
            for _, tasks, shape, base in jobs:
                half = torch.Size(shape[2:]).numel() * tasks[0].dtype.itemsize  # one layer's K (or V) bytes
                for i, task in enumerate(tasks):
                    k_off = base + i * half
                    v_off = base + (shape[1] + i) * half
                    header = {f: getattr(task, f) for f in _FIELDS}
                    futures.append(self._ex.submit(_decode_into, shm.name, k_off, v_off, header, bytes(task.section)))
            for f in futures:
                f.result()
            out = []
            for enc, tasks, shape, base in jobs:
                count = torch.Size(shape).numel()
                host = torch.frombuffer(shm.buf, dtype=tasks[0].dtype, count=count, offset=base).reshape(shape)
                out.append(ChunkKV(host.clone().to(device), int(enc.meta["pos0"])))  # one copy out of the block
                del host
            return out
        finally:
            shm.close()
            shm.unlink()

    def close(self) -> None:
        self._ex.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--format", default="musique")
    ap.add_argument("--limit", type=int, default=2)
    ap.add_argument("--max-chunks", type=int, default=None, help="passages per record (default all)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="decode_pool_executor.json")
    args = ap.parse_args()
    from ragkv.engine.prompt import PromptTemplate
    from ragkv.eval.datasets import load_samples
    from ragkv.models import load_adapter

    torch.set_grad_enabled(False)
    adapter = load_adapter("smollm2")
    chunks = [
        PromptTemplate.chunk_ids(adapter.tokenizer, c)
        for s in load_samples(args.data, args.format, args.limit, args.max_chunks)
        for c in s.chunks
    ]
    kvs = [kv.to(dtype=torch.float16) for kv in precompute_many(adapter, chunks, max_tokens_per_pass=2048)]
    print(f"precomputed {len(kvs)} chunks", flush=True)
    codec = get_codec("cachegen")
    encs = [codec.encode(kv) for kv in kvs]
    values = sum(kv.kv.numel() for kv in kvs)
    inline = [codec.decode(e) for e in encs]
    current, executor = DecodePool(args.workers), ExecutorPool(args.workers)
    current.wait_ready()
    executor.wait_ready()
    variants = {
        "inline": lambda: [codec.decode(e) for e in encs],
        "DecodePool": lambda: current.decode_many(codec, encs),
        "ProcessPoolExecutor+shm": lambda: executor.decode_many(codec, encs),
    }
    for name, fn in variants.items():  # warm-up and bit-identity check
        assert all(torch.equal(a.kv, b.kv) for a, b in zip(fn(), inline)), f"{name} differs from inline"
    times = {n: [] for n in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    current.close()
    executor.close()
    mb_s = {n: 2 * values / statistics.median(ts) / 1e6 for n, ts in times.items()}
    print(
        f"{len(kvs)} chunks, {sum(k.num_tokens for k in kvs)} tokens, {args.workers} workers, median of {args.repeats}"
    )
    print("| decode | MB/s (fp16-equivalent) | vs DecodePool |\n|---|---|---|")
    for n, v in mb_s.items():
        print(f"| {n} | {v:.0f} | {v / mb_s['DecodePool']:.2f} |")
    Path(args.out).write_text(json.dumps({"mb_s": mb_s, "seconds": times, "workers": args.workers}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
