"""Entropy coding of integer symbol streams with `constriction` (ANS), for the CacheGen-style codec.

One stream = one (layer, K/V, channel group) of centred integer symbols with its own distribution.
To decode fast, `k` symbols from a window of `A` codes are coded as one joint symbol of A**k codes
under the product of the stream's marginal histogram (the same bits as coding them one by one, k times
fewer decoder steps). The window's last code is ESC: values outside it follow in a nested stream.
"""

from __future__ import annotations

import constriction
import numpy as np

Categorical = constriction.stream.model.Categorical
AnsCoder = constriction.stream.stack.AnsCoder

# (symbols per joint symbol k, log2 of the window A): joint alphabets A**k of at most 2**12 codes.
LAYOUTS = ((4, 3), (3, 4), (2, 6), (1, 12))
_RAW_ESCAPES = ((1, 12),)  # escapes of escapes: a k=1 stream whose own escapes are stored as raw int32
_HEADER = 6  # int32s: k, log2A, hist_lo, hist_len, n_words, n_esc
_PREFER_LARGER_K = 1.02  # take a larger k (faster decode) while it costs at most 2% more bits


def _entropy_bits(counts: np.ndarray) -> float:
    """Bits to code the symbols counted in `counts` with their own empirical distribution."""
    c = counts[counts > 0].astype(np.float64)
    return float(-(c * np.log2(c / c.sum())).sum())


def _window(log2a: int) -> tuple[int, int]:
    """(lowest value, ESC code) of a window of 2**log2a codes: values lo .. -lo, then ESC."""
    a = 1 << log2a
    return -(a // 2) + 1, a - 1


def _joint_model(counts: np.ndarray, hist_lo: int, a: int, k: int) -> Categorical:
    """Product distribution over A**k joint codes from the marginal `counts` placed at `hist_lo`."""
    p = np.zeros(a, dtype=np.float64)
    p[hist_lo : hist_lo + len(counts)] = counts
    joint = p
    for _ in range(k - 1):
        joint = np.multiply.outer(p, joint).ravel()  # [A**i]; the newest digit is the most significant
    return Categorical(joint, perfect=False)


_VALUE_TABLES: dict[tuple[int, int], np.ndarray] = {}


def _value_table(k: int, log2a: int) -> np.ndarray:
    """The k window values (ESC as lo + ESC) of every joint code: [A**k, k], int8 (int16 for windows
    over 128 codes), so unpacking a stream is one row gather (`take(axis=0)` copies k-byte rows)."""
    table = _VALUE_TABLES.get((k, log2a))
    if table is None:
        a = 1 << log2a
        codes = (np.arange(a**k, dtype=np.int64)[:, None] >> (log2a * np.arange(k))) & (a - 1)  # [A**k, k]
        table = (codes + _window(log2a)[0]).astype(np.int8 if log2a <= 7 else np.int16)  # values lo .. A/2
        _VALUE_TABLES[(k, log2a)] = table
    return table


def _unpack(joint: np.ndarray, k: int, log2a: int, n: int) -> np.ndarray:
    """The first `n` window values [n] (int8 or int16) of the joint codes `joint` [n / k]."""
    return _value_table(k, log2a).take(joint, axis=0).reshape(-1)[:n]  # [n / k, k] -> [n]


def _codes(sym: np.ndarray, log2a: int) -> np.ndarray:
    """Window codes [n] of `sym`: value - lo inside the window, ESC outside."""
    lo, esc = _window(log2a)
    u = sym - lo
    return np.where((u >= 0) & (u < esc), u, esc)


def encode_stream(sym: np.ndarray, layouts: tuple[tuple[int, int], ...] = LAYOUTS) -> bytes:
    """Bytes of the int symbols `sym` [n] (n >= 1); `decode_stream` inverts it exactly."""
    sym = sym.astype(np.int64, copy=False)
    n = sym.size
    costs = []
    for k, log2a in layouts:
        u = _codes(sym, log2a)
        n_esc = int(np.count_nonzero(u == _window(log2a)[1]))
        esc_bits = 32 if (k, log2a) in _RAW_ESCAPES else 12  # rough: raw int32, or nested-coded
        costs.append(_entropy_bits(np.bincount(u, minlength=1 << log2a)) + esc_bits * n_esc)
    best = min(costs)
    k, log2a = next(lay for lay, cost in zip(layouts, costs) if cost <= _PREFER_LARGER_K * best)
    a, esc = 1 << log2a, _window(log2a)[1]
    u = _codes(sym, log2a)  # [n]
    counts_full = np.bincount(u, minlength=a)
    nz = np.flatnonzero(counts_full)
    hist_lo, hist_len = int(nz[0]), int(nz[-1] - nz[0] + 1)
    counts = counts_full[hist_lo : hist_lo + hist_len].astype(np.uint32)  # [hist_len]
    pad = (-n) % k
    if pad:  # pad with the most frequent code, which surely has probability > 0
        u = np.concatenate([u, np.full(pad, int(counts_full.argmax()))])
    joint = (u.reshape(-1, k) << (log2a * np.arange(k))).sum(axis=1).astype(np.int32)  # [n / k]
    coder = AnsCoder()
    coder.encode_reverse(joint, _joint_model(counts, hist_lo, a, k))
    words = coder.get_compressed().astype(np.uint32)  # [n_words]
    escaped = sym[u[:n] == esc]  # [n_esc], in stream order
    header = np.array([k, log2a, hist_lo, hist_len, len(words), len(escaped)], dtype=np.int32)
    parts = [header.tobytes(), counts.tobytes(), words.tobytes()]
    if len(escaped):
        raw = (k, log2a) in _RAW_ESCAPES
        parts.append(escaped.astype(np.int32).tobytes() if raw else encode_stream(escaped, _RAW_ESCAPES))
    return b"".join(parts)


def decode_stream(
    buf: memoryview | bytes, offset: int, n: int, layouts: tuple[tuple[int, int], ...] = LAYOUTS
) -> tuple[np.ndarray, int]:
    """The `n` symbols [n] of the stream starting at `offset` in `buf`, and the offset after it: int8
    or int16 while every value fits its window, int32 when escaped values follow."""
    header = np.frombuffer(buf, dtype=np.int32, count=_HEADER, offset=offset)
    k, log2a, hist_lo, hist_len, n_words, n_esc = (int(v) for v in header)
    if (k, log2a) not in layouts or not (0 <= hist_lo and 0 < hist_len <= (1 << log2a) - hist_lo):
        raise ValueError(f"malformed entropy stream header {header.tolist()}")
    if not 0 <= n_esc <= n:
        raise ValueError(f"stream claims {n_esc} escapes among {n} symbols")
    pos = offset + 4 * _HEADER
    counts = np.frombuffer(buf, dtype=np.uint32, count=hist_len, offset=pos)
    pos += 4 * hist_len
    words = np.frombuffer(buf, dtype=np.uint32, count=n_words, offset=pos)
    pos += 4 * n_words
    a = 1 << log2a
    lo, esc = _window(log2a)
    joint = AnsCoder(words.copy()).decode(_joint_model(counts, hist_lo, a, k), -(-n // k))  # [n / k]
    sym = _unpack(joint, k, log2a, n)  # [n] int8 / int16
    if n_esc:  # (no scan when the header counts none: the section's CRC vouches for the header)
        where = np.flatnonzero(sym == lo + esc)
        if len(where) != n_esc:
            raise ValueError(f"stream has {len(where)} ESC codes but {n_esc} escaped values")
        if (k, log2a) in _RAW_ESCAPES:
            values = np.frombuffer(buf, dtype=np.int32, count=n_esc, offset=pos)
            pos += 4 * n_esc
        else:
            values, pos = decode_stream(buf, pos, n_esc, _RAW_ESCAPES)
        sym = sym.astype(np.int32)
        sym[where] = values
    return sym, pos
