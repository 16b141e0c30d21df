"""GGUF's quantized blocks read into the engine's quantized layout (models/quant.py): codes,
scales and zero points, so that a GGUF's projections stay quantized in memory on a GPU.

Every type below is "a code times a scale, minus an offset" per group of 16 or 32 along K, so it
maps onto W = (code - zero) * scale with a float zero = offset / scale. What each becomes:

    type  file bits/weight  codes      group  W in the file                 scale     zero
    Q4_0  4.5               4 bits     32     d (q - 8)                     d         8
    Q4_1  5.0               4 bits     32     d q + m                       d         -m / d
    Q5_0  5.5               8 (5 used) 32     d (q - 16)                    d         16
    Q5_1  6.0               8 (5 used) 32     d q + m                       d         -m / d
    Q8_0  8.5               8 bits     32     d q  (q signed)               d         128 (code q + 128)
    Q4_K  4.5               4 bits     32     d sc q - dmin mn              d sc      dmin mn / (d sc)
    Q5_K  5.5               8 (5 used) 32     d sc q - dmin mn              d sc      dmin mn / (d sc)
    Q6_K  6.6               8 (6 used) 16     d sc (q - 32)  (sc signed)    d sc      32

What is lost against the file: memory, not values. 5- and 6-bit codes take a byte; the K-quants'
6-bit sub-block scales become a float32 scale and zero per group (the engine's layout has one
level of scales). Values: d sc and d q are exact in float32; a fractional zero rounds once, so W
is within a float32 rounding of the file's (tests/test_gguf_quantized.py). A group whose scale is
0 holds one value everywhere; it is kept as codes 0, zero -1, scale that value.
Other types (Q2_K, Q3_K, the IQ types, ...) are not read here: such a file is served dequantized.
"""
from __future__ import annotations

import numpy as np

# type name -> (elements a block, bytes a block, code bits in the layout, group size)
LAYOUTS = {"Q4_0": (32, 18, 4, 32), "Q4_1": (32, 20, 4, 32), "Q5_0": (32, 22, 8, 32), "Q5_1": (32, 24, 8, 32),
           "Q8_0": (32, 34, 8, 32), "Q4_K": (256, 144, 4, 32), "Q5_K": (256, 176, 8, 32),
           "Q6_K": (256, 210, 8, 16)}


def served(type_name: str) -> bool:
    return type_name in LAYOUTS


def _f16(b: np.ndarray) -> np.ndarray:
    """Two bytes a row -> float32 [rows]."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32).reshape(-1)


def _nibbles_split(qs: np.ndarray) -> np.ndarray:
    """[n, 16] bytes -> [n, 32]: low nibbles are elements 0..15, high nibbles 16..31 (Q4_0/Q4_1/Q5_*)."""
    return np.concatenate((qs & 0xF, qs >> 4), axis=1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """[n, 4] bytes (a little-endian uint32) -> [n, 32]: bit j is element j's fifth bit."""
    bits = np.ascontiguousarray(qh).view("<u4").reshape(-1, 1) >> np.arange(32, dtype=np.uint32)
    return ((bits & 1) << 4).astype(np.uint8)


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes -> eight 6-bit scales and eight 6-bit mins per super-block: the
    first four in the low 6 bits of bytes 0..3 (scales) and 4..7 (mins); the last four from the
    nibbles of bytes 8..11 with their top 2 bits from the top of bytes 0..3 / 4..7."""
    sc = np.empty((s.shape[0], 8), np.uint8)
    mn = np.empty((s.shape[0], 8), np.uint8)
    sc[:, :4], mn[:, :4] = s[:, 0:4] & 63, s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc, mn


def _k_codes(qs: np.ndarray, qh: np.ndarray | None) -> np.ndarray:
    """Q4_K/Q5_K codes, [n, 256]: four chunks of 32 bytes, each the low nibbles of 32 elements
    then the high nibbles of the next 32; Q5_K's fifth bits from qh, bit 2c / 2c+1 of byte l for
    chunk c's two halves."""
    n = qs.shape[0]
    q = qs.reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    q = (q & 0xF).reshape(n, 8, 32)
    if qh is not None:
        q = q | (((qh.reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1) << 4)
    return q.reshape(n, 256)


def _offset_layout(codes, scale, offset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W = scale * code - offset per group -> (codes, scale, zero = offset / scale); a group
    whose scale is 0 holds -offset everywhere: codes 0, zero -1, scale -offset."""
    scale64, offset64 = scale.astype(np.float64), offset.astype(np.float64)
    flat = scale64 == 0
    zero = np.where(flat, -1.0, offset64 / np.where(flat, 1.0, scale64))
    scale = np.where(flat, -offset64, scale64)
    if flat.any():
        codes = codes.copy()
        codes[np.repeat(flat, codes.shape[1] // flat.shape[1], axis=1)] = 0
    return codes, scale.astype(np.float32), zero.astype(np.float32)


def decode(type_name: str, raw: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A tensor's rows of blocks (uint8 [N, K / block * bytes]) -> codes uint8 [N, K], scales
    float32 [N, K / G], zeros float32 [N, K / G], G the type's group (LAYOUTS)."""
    block, size, _, group = LAYOUTS[type_name]
    rows = raw.shape[0]
    b = np.ascontiguousarray(raw).reshape(-1, size)  # one block a row
    n = b.shape[0]
    if type_name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        d = _f16(b[:, 0:2])
        if type_name == "Q8_0":
            codes = (b[:, 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
            scale, zero = d, np.full(n, 128.0, np.float32)
        else:
            with_min = type_name in ("Q4_1", "Q5_1")
            at = 4 if with_min else 2
            qh = None
            if type_name.startswith("Q5"):
                qh, at = b[:, at:at + 4], at + 4
            codes = _nibbles_split(b[:, at:at + 16])
            if qh is not None:
                codes = codes | _high_bits(qh)
            if with_min:  # W = d q + m
                codes, scale, zero = _offset_layout(codes, d.reshape(-1, 1), -_f16(b[:, 2:4]).reshape(-1, 1))
            else:
                scale, zero = d, np.full(n, 8.0 if type_name == "Q4_0" else 16.0, np.float32)
        scale, zero = scale.reshape(n, 1), zero.reshape(n, 1)
    elif type_name in ("Q4_K", "Q5_K"):
        d, dmin = _f16(b[:, 0:2]).reshape(n, 1), _f16(b[:, 2:4]).reshape(n, 1)
        sc, mn = _k_scales(b[:, 4:16])
        qh = b[:, 16:48] if type_name == "Q5_K" else None
        codes = _k_codes(b[:, 48:176] if qh is not None else b[:, 16:144], qh)
        codes, scale, zero = _offset_layout(codes.reshape(n * 8, 32), (d * sc).reshape(-1, 1),
                                            (dmin * mn).reshape(-1, 1))
    else:  # Q6_K: ql [128], qh [64], scales int8 [16], d
        ql, qh, sc, d = b[:, :128], b[:, 128:192], b[:, 192:208].view(np.int8), _f16(b[:, 208:210])
        lo = (ql.reshape(n, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0xF  # [n, half, 2, 64]
        hi = (qh.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3  # [n, half, 4, 32]
        codes = lo.reshape(n, 2, 4, 32) | (hi << 4)
        scale = d.reshape(n, 1) * sc.astype(np.float32)
        zero = np.full((n, 16), 32.0, np.float32)
    codes = codes.reshape(rows, k)
    return codes, scale.reshape(rows, k // group), zero.reshape(rows, k // group)
