"""Protobuf wire encoding for the stages that write bytes directly (no message objects): varints and length-delimited fields."""

from __future__ import annotations

#: the encoding of every varint below 2**14 (one or two bytes), looked up instead of computed
VARINTS = [bytes([n]) if n < 0x80 else bytes([(n & 0x7F) | 0x80, n >> 7]) for n in range(1 << 14)]


def encode_varint(n: int) -> bytes:
    """A non-negative integer as a protobuf varint."""
    if n < 16384:
        return VARINTS[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def length_delimited(tag: bytes, payload: bytes) -> bytes:
    """One length-delimited field: its encoded tag, the payload's length, the payload."""
    n = len(payload)
    return tag + (VARINTS[n] if n < 16384 else encode_varint(n)) + payload
