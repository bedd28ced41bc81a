"""Bounded gzip: same bytes as gzip.decompress, linear in the body, refuses bombs and member floods."""

from __future__ import annotations

import gzip
import os
import random

import pytest

from sidecar.receivers.gzip_body import GzipError, gunzip


@pytest.mark.parametrize("size", [0, 1, 1000, 200_000, 3_000_000])
def test_round_trip(size):
    data = random.Random(size).randbytes(size // 2) + b"a" * (size - size // 2)
    assert gunzip(gzip.compress(data), limit=len(data) + 1) == data


def test_several_members_concatenate():
    parts = [b"first ", b"", b"second ", os.urandom(100_000)]
    body = b"".join(gzip.compress(p) for p in parts)
    assert gunzip(body, limit=10**7) == b"".join(parts)


def test_a_bomb_is_refused_as_too_large_without_inflating_it():
    bomb = gzip.compress(b"\0" * (64 * 2**20), compresslevel=9)
    with pytest.raises(GzipError) as e:
        gunzip(bomb, limit=2**20)
    assert e.value.too_large


def test_a_flood_of_tiny_members_is_refused_quickly():
    """5 MB of 23-byte members took 25.7 s of CPU before; it is refused after max_members."""
    body = gzip.compress(b"") * (5_000_000 // 20)
    with pytest.raises(GzipError, match="more than 64 gzip members"):  # stops at member 65, not 250,000
        gunzip(body, limit=20 * 2**20)


@pytest.mark.parametrize("body", [b"not gzip", gzip.compress(b"x" * 1000)[:-9], b""])
def test_invalid_or_truncated_is_an_error(body):
    with pytest.raises(GzipError):
        gunzip(body, limit=10**6)


def test_members_up_to_the_cap_are_accepted():
    body = gzip.compress(b"x" * 10) * 64
    assert gunzip(body, limit=10**6, max_members=64) == b"x" * 640
