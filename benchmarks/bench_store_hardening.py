"""Disk tier hardening: a writer SIGKILLed again and again beside a process that reopens the tier and
runs its check (what `ragkv cache gc` and every start do) in a loop; and random damage to the tier's
`catalog.sqlite`. Prints a table and writes JSON.

`python benchmarks/bench_store_hardening.py --kills 20 --corruptions 50 --out hardening_store.json`

kill loop: every entry a writer reported as committed (its `put` returned) must still be in the
catalog, with its file, and read back bit-exact; the checker process must never crash.
corruptions: 64 random bytes at a random offset of `catalog.sqlite` (40 entries), then a reopen; no
healthy payload file may be deleted, and every entry must be readable again (healed from headers).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPE = (2, 4, 16, 2, 32)  # [2, L, T, H, D]

_WRITER = """
import sys, torch
from ragkv.chunk_cache import ChunkKey, ChunkKV
from ragkv.storage.disk import DiskTier
root, i = sys.argv[1], int(sys.argv[2])
tier = DiskTier(root, 1 << 40, "lz4")
print("open", flush=True)
while True:
    g = torch.Generator().manual_seed(i)
    tier.put(ChunkKey.of("m", "t", [i], "default"), ChunkKV(torch.randn(*SHAPE, generator=g).half(), 1))
    print(i, flush=True)
    i += 1
""".replace("SHAPE", repr(SHAPE))

_CHECKER = """
import os, sys
from ragkv.storage.disk import DiskTier
root, stop = sys.argv[1], sys.argv[2]
n = 0
while not os.path.exists(stop):
    tier = DiskTier(root, 1 << 40, "lz4")  # opening runs check()
    tier.check()  # and again, as `ragkv cache gc` does
    tier.close()
    n += 1
print(n, flush=True)
"""


def _key(i: int):
    from ragkv.chunk_cache import ChunkKey

    return ChunkKey.of("m", "t", [i], "default")


def _chunk(i: int):
    from ragkv.chunk_cache import ChunkKV

    g = torch.Generator().manual_seed(i)
    return ChunkKV(torch.randn(*SHAPE, generator=g).half(), 1)  # [2, L, T, H, D]


def _same(kv, expected) -> bool:
    return kv is not None and all(torch.equal(kv.layer(i).cpu(), expected.layer(i)) for i in range(expected.num_layers))


def python_env(tmp: Path) -> dict:
    """Environment whose `import ragkv` is the package this script imported."""
    import ragkv

    (tmp / "py").mkdir(parents=True, exist_ok=True)
    link = tmp / "py" / "ragkv"
    if not link.exists():
        link.symlink_to(Path(ragkv.__file__).resolve().parent)
    return {**os.environ, "PYTHONPATH": str(tmp / "py")}


def kill_loop(work: Path, kills: int = 20, seed: int = 0, min_s: float = 0.3, max_s: float = 1.5) -> dict:
    """SIGKILL a writer `kills` times while a checker reopens + checks the tier in a loop."""
    from ragkv.storage.disk import DiskTier

    rng = random.Random(seed)
    env = python_env(work)
    root, stop = work / "tier", work / "stop"
    checker = subprocess.Popen(
        [sys.executable, "-c", _CHECKER, str(root), str(stop)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    committed: list[int] = []
    writer_crashes = 0
    t0 = time.perf_counter()
    for _ in range(kills):
        start = (max(committed) + 1) if committed else 0
        w = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(root), str(start)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert w.stdout is not None
        w.stdout.readline()  # "open": torch imported and the tier opened
        time.sleep(rng.uniform(min_s, max_s))
        w.send_signal(signal.SIGKILL)
        out, err = w.communicate(timeout=60)
        committed += [int(x) for x in out.split()]
        if w.returncode != -signal.SIGKILL:
            writer_crashes += 1
            print(err[-2000:], file=sys.stderr)
    stop.touch()
    c_out, c_err = checker.communicate(timeout=120)
    checker_ok = checker.returncode == 0
    if not checker_ok:
        print(c_err.decode()[-3000:], file=sys.stderr)
    tier = DiskTier(root, 1 << 40, "lz4")
    files = {p.relative_to(tier.root).as_posix() for p in (tier.root / "data").rglob("*.kv")}
    lost = [i for i in committed if not tier.lookup(_key(i))]
    files_gone = [i for i in committed if tier.lookup(_key(i)) and tier._index[_key(i)].file not in files]
    wrong = [i for i in committed if tier.lookup(_key(i)) and not _same(tier.get(_key(i)), _chunk(i))]
    tier.close()
    return {
        "kills": kills,
        "committed_entries": len(committed),
        "lost_entries": len(lost),
        "healthy_files_deleted": len(files_gone),
        "wrong_reads": len(wrong),
        "checker_rounds": int(c_out.split()[-1]) if checker_ok and c_out.split() else 0,
        "checker_crashes": 0 if checker_ok else 1,
        "writer_crashes": writer_crashes,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def catalog_corruptions(work: Path, trials: int = 50, entries: int = 40, nbytes: int = 64, seed: int = 0) -> dict:
    """`trials` x (copy a 40-entry tier, write `nbytes` random bytes into its catalog.sqlite, reopen)."""
    from ragkv.storage.catalog import CatalogDamaged
    from ragkv.storage.disk import DiskTier

    rng = random.Random(seed)
    base = work / "base"
    tier = DiskTier(base, 1 << 40)
    for i in range(entries):
        tier.put(_key(i), _chunk(i))
    tier.close()
    healthy = {p.relative_to(base).as_posix(): p.read_bytes() for p in (base / "data").rglob("*.kv")}
    outcome = {"healed": 0, "repaired": 0, "clear_error": 0, "crash": 0}
    deleted = unreadable = 0
    for t in range(trials):
        trial = work / f"trial{t}"
        shutil.copytree(base, trial)
        db = trial / "catalog.sqlite"
        size = db.stat().st_size
        at = rng.randrange(0, max(1, size - nbytes))
        with open(db, "r+b") as f:
            f.seek(at)
            f.write(bytes(rng.randrange(256) for _ in range(nbytes)))
        try:
            again = DiskTier(trial, 1 << 40, grace_s=0)
        except CatalogDamaged as err:
            print(f"trial {t}: {err}", file=sys.stderr)
            outcome["clear_error"] += 1
            again = None
        except Exception as err:  # noqa: BLE001 - counted: the store must reopen or say how to heal
            outcome["crash"] += 1
            print(f"trial {t}: {type(err).__name__}: {err}", file=sys.stderr)
            again = None
        if again is not None:
            outcome["healed" if again.last_check.healed_from else "repaired"] += 1
            unreadable += sum(not _same(again.get(_key(i)), _chunk(i)) for i in range(entries))
            again.close()
        deleted += sum(
            not (trial / rel).exists() or (trial / rel).read_bytes() != data for rel, data in healthy.items()
        )
        shutil.rmtree(trial)
    return {
        "trials": trials,
        "entries": entries,
        **outcome,
        "healthy_payloads_deleted": deleted,
        "entries_unreadable_after_reopen": unreadable,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--corruptions", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="hardening_store.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ragkv-harden-") as tmp:
        result = {
            "kill_loop": kill_loop(Path(tmp) / "kills", args.kills, args.seed),
            "catalog_corruptions": catalog_corruptions(Path(tmp) / "corrupt", args.corruptions, seed=args.seed),
        }
    for name, r in result.items():
        print(f"{name:22s} " + "  ".join(f"{k}={v}" for k, v in r.items()))
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
