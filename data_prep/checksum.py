"""CRC-32 (zlib's polynomial) that can be combined: crc(A + B) from crc(A), crc(B) and len(B).

Combining is what lets `prep --finalize` give a stitched store the very checksum a single build
would have, without reading the token data again.
"""

from __future__ import annotations

import zlib

import numpy as np

_POLY = 0xEDB88320  # reflected CRC-32 polynomial, as zlib


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


def crc32_combine(crc_a: int, crc_b: int, len_b: int) -> int:
    """CRC-32 of A+B given crc(A), crc(B) and the byte length of B.

    Appending a zero bit to the message is a linear map on the CRC register; squaring its
    matrix doubles the number of zero bits. Applying "len_b zero bytes" to crc(A) and xoring
    crc(B) gives crc(A+B), because CRC-32's init and final xor cancel in that sum.
    """
    if len_b == 0:
        return crc_a
    one_bit = [_POLY] + [1 << n for n in range(31)]
    op = _square(_square(_square(one_bit)))  # 8 zero bits = one zero byte
    while len_b:
        if len_b & 1:
            crc_a = _apply(op, crc_a)
        len_b >>= 1
        if len_b:
            op = _square(op)
    return crc_a ^ crc_b
