"""DecodePool: worker processes that decode `LayerTask`s on the other CPU cores.

cachegen's entropy decoder (constriction) holds the GIL, so threads cannot decode two layers at
once; processes can. Each worker is a `python` child importing this same ragkv checkout. It reads
tasks on stdin and answers on stdout, in order, and exits when its stdin closes (the pool closed, or
the parent died). A message is a 4-byte length, a small pickled header, then raw bytes: a task's
section on the way in, the decoded layer's tensor bytes on the way out (no pickling of bulk data).

In the parent, every worker has a writer thread (takes the next task from the shared queue, keeping
at most `depth` in the worker's pipe so it never waits between tasks) and a reader thread (resolves
the futures in order). A worker that dies breaks the pool: every pending future fails with
`DecodePoolError`, and callers decode inline from then on (`alive` is False).
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import BinaryIO

import torch

from ..chunk_cache import ChunkKV
from .codec import EncodedKV
from .layered import LayeredCodec, LayerTask

try:
    import fcntl
except ImportError:  # not a POSIX system: pipes keep their default size
    fcntl = None

log = logging.getLogger(__name__)

_LEN = struct.Struct("<I")
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)  # the directory that is the `ragkv` package
# The child imports the very checkout the parent runs (not whatever `ragkv` its sys.path finds first).
_BOOT = (
    "import importlib.util, sys\n"
    "root = sys.argv[1]\n"
    "spec = importlib.util.spec_from_file_location('ragkv', root + '/__init__.py', submodule_search_locations=[root])\n"
    "mod = importlib.util.module_from_spec(spec)\n"
    "sys.modules['ragkv'] = mod\n"
    "spec.loader.exec_module(mod)\n"
    "from ragkv.compression.pool import serve\n"
    "serve()\n"
)


class DecodePoolError(RuntimeError):
    """The pool cannot decode: a worker died or could not start (the message says which, and why)."""


def _send(out: BinaryIO, header: object, body: bytes | memoryview = b"") -> None:
    head = pickle.dumps(header, protocol=pickle.HIGHEST_PROTOCOL)
    out.write(_LEN.pack(len(head)) + head)
    if len(body):
        out.write(body)
    out.flush()


def _read_into(inp: BinaryIO, view: memoryview) -> None:
    """Fill `view` from `inp`; EOFError if the pipe closes first."""
    view = view.cast("B")
    got, n = 0, len(view)
    while got < n:
        k = inp.readinto(view[got:])
        if not k:
            raise EOFError(f"pipe closed after {got} of {n} bytes")
        got += k


def _read_exact(inp: BinaryIO, n: int) -> bytearray:
    buf = bytearray(n)
    _read_into(inp, memoryview(buf))
    return buf


def _receive(inp: BinaryIO) -> tuple[dict, bytearray]:
    """(header, body) of the next message; the header says how many body bytes follow (key "nbytes")."""
    (n,) = _LEN.unpack(_read_exact(inp, _LEN.size))
    header = pickle.loads(_read_exact(inp, n))
    return header, _read_exact(inp, header.get("nbytes", 0))


# -- the worker side --------------------------------------------------------------------------------
def serve(inp: BinaryIO | None = None, out: BinaryIO | None = None) -> None:
    """A worker's loop: decode each task from `inp` (stdin) and answer on `out` (stdout) until EOF."""
    torch.set_num_threads(1)  # the parent's cores are shared out by process, not by intra-op threads
    inp = inp or sys.stdin.buffer
    if out is None:  # keep fd 1 for answers only: anything a library prints goes to stderr
        out = os.fdopen(os.dup(1), "wb")
        os.dup2(2, 1)
        sys.stdout = sys.stderr
    _send(out, {"ready": os.getpid()})  # booted: torch and the codecs are imported
    while True:
        try:
            header, body = _receive(inp)
        except EOFError:
            return
        task = LayerTask(section=body, **header["task"])
        try:
            layer = task.run("cpu").contiguous()  # [2, T, H, D]
        except Exception as err:  # the parent re-raises it as the caller's error
            _send(out, {"error": _picklable(err)})
            continue
        raw = layer.view(torch.uint8).numpy()
        _send(out, {"nbytes": raw.nbytes}, memoryview(raw).cast("B"))


def _picklable(err: Exception) -> Exception:
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        return DecodePoolError(f"{type(err).__name__}: {err}")


# -- the parent side --------------------------------------------------------------------------------
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # Linux's value where Python does not name it


def _widen(pipe: BinaryIO) -> None:
    """Grow a pipe's kernel buffer to 1 MiB (Linux; the 64 KiB default makes a layer a dozen round
    trips between the processes); best effort."""
    if fcntl is None:
        return
    try:
        fcntl.fcntl(pipe.fileno(), _F_SETPIPE_SZ, 1 << 20)
    except OSError:
        pass


_FIELDS = ("codec", "params", "shape", "stored", "layer", "num_layers", "dtype")  # LayerTask less its section


class _Worker:
    """One child process, a writer thread feeding it tasks and a reader thread resolving their futures."""

    def __init__(self, pool: DecodePool, index: int, depth: int) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT, _PACKAGE_ROOT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )
        for pipe in (self.proc.stdin, self.proc.stdout):
            _widen(pipe)
        self.pool = pool
        self.depth = depth
        self.slots = threading.Semaphore(depth)  # tasks in the worker's pipe or hands
        self.in_flight: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self.ready = threading.Event()  # set once the worker has booted (or has died trying)
        name = f"ragkv-decode-{index}"
        threading.Thread(target=self._write, name=f"{name}-w", daemon=True).start()
        threading.Thread(target=self._read, name=f"{name}-r", daemon=True).start()

    def _write(self) -> None:
        try:
            while True:
                self.slots.acquire()
                item = self.pool._tasks.get()
                if item is None or self.pool._error is not None:  # closed, or broken: stop feeding
                    if item is not None:
                        _fail(item[0], self.pool._error)
                    return
                fut, task, _ = item
                if not fut.set_running_or_notify_cancel():
                    self.slots.release()
                    continue
                self.in_flight.put(item)
                header = {"task": {f: getattr(task, f) for f in _FIELDS}, "nbytes": len(task.section)}
                _send(self.proc.stdin, header, task.section)
        except (OSError, ValueError):
            pass  # the worker is gone: the reader reports it
        finally:
            try:
                self.proc.stdin.close()  # the worker exits once it has answered what it holds
            except OSError:
                pass

    def _read(self) -> None:
        out = self.proc.stdout
        try:
            _receive(out)  # the worker's "ready"
        except (EOFError, OSError, ValueError) as err:
            self.pool._broken(self, err)
            return
        finally:
            self.ready.set()
        while True:
            try:
                (n,) = _LEN.unpack(_read_exact(out, _LEN.size))
                header = pickle.loads(_read_exact(out, n))
                fut, _, dest = self.in_flight.get()
                if "error" not in header:  # the layer's bytes go straight into `dest`: K rows, then V rows
                    for half in dest:
                        _read_into(out, memoryview(half.view(torch.uint8).numpy()))
            except (EOFError, OSError, ValueError) as err:
                self.pool._broken(self, err)
                for _ in range(self.depth):
                    self.slots.release()  # a writer waiting for a slot wakes up and sees the pool broken
                return
            self.slots.release()
            if "error" in header:
                _fail(fut, header["error"])
            elif not fut.done():
                fut.set_result(dest)

    def fail_in_flight(self, err: Exception) -> None:
        while True:
            try:
                fut, *_ = self.in_flight.get_nowait()
            except queue.Empty:
                return
            _fail(fut, err)


_Item = tuple[Future, LayerTask, torch.Tensor]


def _fail(fut: Future, err: Exception | None) -> None:
    if not fut.done():
        fut.set_exception(err or DecodePoolError("the decode pool is closed"))


class DecodePool:
    """`workers` child processes decoding `LayerTask`s; `submit` returns a Future of the CPU tensor."""

    def __init__(self, workers: int, depth: int = 2) -> None:
        if workers < 1 or depth < 1:
            raise ValueError(f"DecodePool needs workers >= 1 and depth >= 1, got {workers}, {depth}")
        self.workers = workers
        self._tasks: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._error: DecodePoolError | None = None
        self._closed = False
        self._procs = [_Worker(self, i, depth) for i in range(workers)]

    def wait_ready(self, timeout: float | None = 60.0) -> bool:
        """Block until every worker has booted (imported torch and the codecs: about a second each);
        True if all are up and the pool is alive. Work submitted earlier simply queues meanwhile."""
        for w in self._procs:
            if not w.ready.wait(timeout):
                return False
        return self.alive

    @property
    def alive(self) -> bool:
        """True while the pool is open and no worker has died."""
        return self._error is None and not self._closed

    def submit(self, task: LayerTask, out: torch.Tensor | None = None) -> Future:
        """Decode `task` in a worker: a Future of its layer [2, T, H, D] on the CPU in `task.dtype`,
        written into `out` when given (a CPU tensor of that shape and dtype whose K and V halves are
        each contiguous, e.g. `kv[:, layer]` of a [2, L, T, H, D] tensor)."""
        if not self.alive:
            raise self._error or DecodePoolError("the decode pool is closed")
        shape = (2, *task.shape)
        if out is None:
            out = torch.empty(shape, dtype=task.dtype)
        elif (
            tuple(out.shape) != shape
            or out.dtype != task.dtype
            or out.device.type != "cpu"
            or not (out[0].is_contiguous() and out[1].is_contiguous())
        ):
            raise ValueError(
                f"out must be a CPU {task.dtype} tensor {shape} with contiguous K and V halves; "
                f"got {out.dtype} {tuple(out.shape)} on {out.device}"
            )
        fut: Future = Future()
        self._tasks.put((fut, task, out))
        return fut

    def decode_many(
        self,
        codec: LayeredCodec,
        encs: list[EncodedKV],
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> list[ChunkKV]:
        """Whole entries, every layer of every entry queued at once so the workers never wait on the
        caller; inline when the codec gains nothing from workers or the pool is down."""
        device = torch.device(device)
        if not (codec.parallel_decode and self.alive):
            return [codec.decode(e, device, dtype) for e in encs]
        jobs = []
        for enc in encs:
            tasks = [codec.layer_task(enc, i, dtype) for i in range(int(enc.meta["shape"][1]))]
            host = torch.empty(2, len(tasks), *tasks[0].shape, dtype=tasks[0].dtype)  # [2, L, T, H, D]
            jobs.append((enc, host, tasks, [self._submit_or_none(t, host[:, i]) for i, t in enumerate(tasks)]))
        out = []
        for enc, host, tasks, futures in jobs:
            for i, (task, fut) in enumerate(zip(tasks, futures)):
                if fut is not None:
                    try:
                        fut.result()
                        continue
                    except DecodePoolError:
                        pass
                host[:, i] = task.run("cpu")  # not submitted, or the pool broke under this call: finish here
            out.append(ChunkKV(host.to(device), int(enc.meta["pos0"])))
        return out

    def decode(
        self, codec: LayeredCodec, enc: EncodedKV, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> ChunkKV:
        """One whole entry (see `decode_many`)."""
        return self.decode_many(codec, [enc], device, dtype)[0]

    def _submit_or_none(self, task: LayerTask, out: torch.Tensor) -> Future | None:
        try:
            return self.submit(task, out)
        except DecodePoolError:
            return None

    def _broken(self, worker: _Worker, err: Exception) -> None:
        """A worker's pipe closed: after close() that is its exit; otherwise the pool is broken."""
        with self._lock:
            first = not self._closed and self._error is None
            if first:
                self._error = DecodePoolError(
                    f"decode worker pid {worker.proc.pid} stopped (exit code {worker.proc.poll()}: {err}); "
                    "callers decode inline from now on"
                )
                log.warning("%s", self._error)
        worker.fail_in_flight(self._error or DecodePoolError("the decode pool is closed"))
        if first:
            for w in self._procs:
                if w is not worker:
                    w.proc.kill()
            while True:  # tasks no worker will take
                try:
                    item = self._tasks.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    _fail(item[0], self._error)

    def close(self) -> None:
        """Stop the workers once they have answered what they hold; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for _ in self._procs:
            self._tasks.put(None)
        for w in self._procs:
            try:
                w.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                w.proc.kill()

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
