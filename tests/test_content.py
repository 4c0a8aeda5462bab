"""daemon.delivery.content on real files: the content hash, and what a new version is to a
delivery."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import xxhash

from daemon.delivery import content
from daemon.delivery.files import FileSlice
from daemon.errors import FileChangedError
from daemon.state import PriorDelivery
from tests.support.data import content_hash_of

KiB = 1024


def _write(path: Path, data: bytes) -> os.stat_result:
    path.write_bytes(data)
    return os.stat(path)


@pytest.mark.parametrize("segment", [1, 1000, 64 * KiB, 300 * KiB, 10**9])
async def test_hash_file_follows_the_definition(tmp_path: Path, segment: int) -> None:
    data = random.Random(segment).randbytes(300 * KiB + 7)
    if segment == 1:
        data = data[:3000]  # one segment per byte: keep it short
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert await content.hash_file(path, len(data), segment) == content_hash_of(data, segment)
    assert content.segment_size(content_hash_of(data, segment)) == segment


async def test_hash_file_uses_known_digests_instead_of_reading(tmp_path: Path) -> None:
    data = random.Random(1).randbytes(10 * KiB)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    true = [xxhash.xxh3_128(data[i : i + 4096]).digest() for i in range(0, len(data), 4096)]
    assert await content.hash_file(path, len(data), 4096, known={1: true[0]}) == content.combine(
        4096, true
    )
    # A known digest is taken as given (it was computed while that part was sent).
    other = await content.hash_file(path, len(data), 4096, known={2: b"\0" * 16})
    assert other == content.combine(4096, [true[0], b"\0" * 16, true[2]])


def test_segment_size_refuses_what_is_not_ours() -> None:
    for text in (None, "", "sha256:10:" + "0" * 32, "xxh3-128:0:" + "0" * 32, "xxh3-128:x:y"):
        assert content.segment_size(text) is None


async def test_file_slice_hashes_each_pass_afresh(tmp_path: Path) -> None:
    data = random.Random(2).randbytes(5 * KiB)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    got: list[bytes] = []
    part = FileSlice(path, 1000, 3000, chunk_size=700, on_digest=got.append)
    for _ in range(2):  # a retry reads the slice again
        assert b"".join([c async for c in part.chunks()]) == data[1000:4000]
    assert got == [xxhash.xxh3_128(data[1000:4000]).digest()] * 2
    cut = [c async for c in FileSlice(path, 0, 5 * KiB, on_digest=got.append).chunks()]
    assert b"".join(cut) == data and len(got) == 3


def _prior(st: os.stat_result, digest: str | None) -> PriorDelivery:
    return PriorDelivery(
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        inode=st.st_ino,
        ctime_ns=st.st_ctime_ns,
        remote_id=7,
        content_hash=digest,
    )


async def _compare(path: Path, prior: PriorDelivery, *, appends: bool = True) -> str:
    st = os.stat(path)
    return await content.compare(
        path,
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        inode=st.st_ino,
        ctime_ns=st.st_ctime_ns,
        prior=prior,
        appends=appends,
    )


async def test_compare_tells_appended_unchanged_and_new(tmp_path: Path) -> None:
    path = tmp_path / "run.csv"
    data = random.Random(3).randbytes(50 * KiB)
    st = _write(path, data)
    prior = _prior(st, content_hash_of(data, 16 * KiB))  # delivered in 16 KiB parts

    path.chmod(0o600)  # only the ctime moves
    assert await _compare(path, prior) == "unchanged"
    with path.open("ab") as fh:
        fh.write(b"more rows\n")
    assert await _compare(path, prior) == "appended"
    assert await _compare(path, prior, appends=False) == "new"
    # Larger, but the first bytes differ: a rewrite.
    _write(path, b"X" + data[1:] + b"more")
    assert await _compare(path, prior) == "new"
    # Same size, same mtime, other bytes (rewritten in place, mtime restored).
    _write(path, b"Y" + data[1:])
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert await _compare(path, prior) == "new"
    # Same bytes, another mtime: a new version by the rules (only ctime/inode are ignored).
    _write(path, data)
    assert await _compare(path, prior) == "new"
    # Shorter, or no usable hash: new.
    _write(path, data[:100])
    assert await _compare(path, prior) == "new"
    _write(path, data + b"more")
    assert await _compare(path, _prior(st, None)) == "new"


async def test_compare_notices_a_file_written_during_the_read(tmp_path: Path) -> None:
    path = tmp_path / "run.csv"
    data = random.Random(4).randbytes(20 * KiB)
    st = _write(path, data)
    prior = _prior(st, content_hash_of(data, len(data)))
    with path.open("ab") as fh:
        fh.write(b"x")
    now = os.stat(path)
    with path.open("ab") as fh:
        fh.write(b"y")  # after the version was pinned
    with pytest.raises(FileChangedError):
        await content.compare(
            path,
            size=now.st_size,
            mtime_ns=now.st_mtime_ns,
            inode=now.st_ino,
            ctime_ns=now.st_ctime_ns,
            prior=prior,
        )


def test_same_mtime_allows_a_copy_that_kept_less_precision() -> None:
    t = 1_700_000_000_123_456_789
    assert content.same_mtime(t, t)
    assert content.same_mtime(t, 1_700_000_000_000_000_000)  # whole seconds
    assert content.same_mtime(t, 1_700_000_000_123_456_000)  # microseconds
    assert not content.same_mtime(t, 1_700_000_001_000_000_000)
    assert not content.same_mtime(t, 1_700_000_000_123_456_788)
    assert not content.same_mtime(t, 1_700_000_000_123_000_001)
