"""CRC-32 (zlib's polynomial) that can be combined: crc(A + B) from crc(A), crc(B) and len(B).

Combining is what lets `prep --finalize` give a stitched store the very checksum a single build
would have, without reading the token data again. The same algebra holds for CRC-32C (the
Castagnoli polynomial, `poly=CRC32C_POLY`), which lets a checkpoint's files be checksummed in
segments on several threads (pipeline/training/manifest.py).
"""

from __future__ import annotations

import functools
import zlib

import numpy as np

_POLY = 0xEDB88320  # reflected CRC-32 polynomial, as zlib
CRC32C_POLY = 0x82F63B78  # reflected CRC-32C (Castagnoli) polynomial


def crc32(values: np.ndarray, crc: int = 0) -> int:
    """Continue `crc` over the little-endian bytes of `values`."""
    data = np.ascontiguousarray(values)
    if data.dtype.byteorder == ">":
        data = data.byteswap().view(data.dtype.newbyteorder("<"))
    return zlib.crc32(memoryview(data).cast("B"), crc)


def _apply(matrix: list[int], vector: int) -> int:
    """Multiply a 32x32 GF(2) matrix (one int per column) by a 32-bit vector."""
    out, i = 0, 0
    while vector:
        if vector & 1:
            out ^= matrix[i]
        vector >>= 1
        i += 1
    return out


def _square(matrix: list[int]) -> list[int]:
    return [_apply(matrix, column) for column in matrix]


def _compose(a: list[int], b: list[int]) -> list[int]:
    """The matrix of applying ``b``, then ``a``."""
    return [_apply(a, column) for column in b]


@functools.lru_cache(maxsize=64)
def _zero_bytes_operator(poly: int, n: int) -> tuple[int, ...]:
    """The linear map that appending ``n`` zero bytes applies to a CRC register.

    Appending a zero bit to the message is a linear map on the register; squaring its matrix
    doubles the number of zero bits, and the bits of ``n`` say which powers to compose. Cached:
    segment-wise checksums combine many pieces of the same length.
    """
    one_bit = [poly] + [1 << k for k in range(31)]
    op = _square(_square(_square(one_bit)))  # 8 zero bits = one zero byte
    out = [1 << k for k in range(32)]  # identity
    while n:
        if n & 1:
            out = _compose(op, out)
        n >>= 1
        if n:
            op = _square(op)
    return tuple(out)


def crc32_combine(crc_a: int, crc_b: int, len_b: int, poly: int = _POLY) -> int:
    """CRC of A+B given crc(A), crc(B) and the byte length of B (CRC-32, or CRC-32C with
    ``poly=CRC32C_POLY``): "len_b zero bytes" applied to crc(A), xor crc(B); the init and final
    xor of the CRC cancel in that sum."""
    if len_b == 0:
        return crc_a
    return _apply(list(_zero_bytes_operator(poly, len_b)), crc_a) ^ crc_b
