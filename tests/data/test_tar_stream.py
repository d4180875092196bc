import io
import random
import tarfile

import pytest

from mmcl.data.shards import ShardPiece
from mmcl.data.stream import BrokenTar, LazyMember, StreamContext, iter_tar_samples, materialize, read_piece, shuffled


def tar_bytes(members, fmt=tarfile.USTAR_FORMAT):
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


MEMBERS = [("k0.jpg", b"J0" * 300), ("k0.txt", b"t0"), ("k1.jpg", b"J1" * 300), ("k1.txt", b"t1"),
           ("dir/k2.seg.png", b"P2"), ("dir/k2.seg.TXT", b"t2"), ("__meta__", b"skip me")]


def samples(data, keep=lambda i: True, stop=None):
    return list(iter_tar_samples(io.BytesIO(data), "u", keep, stop))


def test_groups_files_by_key_and_lowercases_extensions():
    got = samples(tar_bytes(MEMBERS))
    assert [(s["__key__"], s["__index__"]) for s in got] == [("k0", 0), ("k1", 1), ("dir/k2", 2)]
    assert got[0]["jpg"] == b"J0" * 300 and got[0]["txt"] == b"t0"
    assert got[2]["seg.png"] == b"P2" and got[2]["seg.txt"] == b"t2"


def test_keep_and_stop_select_indices():
    got = samples(tar_bytes(MEMBERS), keep=lambda i: i % 2 == 1)
    assert [s["__key__"] for s in got] == ["k1"]
    assert [s["__key__"] for s in samples(tar_bytes(MEMBERS), stop=1)] == ["k0"]


def test_long_names_in_pax_and_gnu_formats():
    long = "x" * 150 + "/" + "y" * 120
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        got = samples(tar_bytes([(long + ".jpg", b"a"), (long + ".txt", b"b")], fmt=fmt))
        assert [(s["__key__"], s["jpg"], s["txt"]) for s in got] == [(long, b"a", b"b")]


# USTAR layout of MEMBERS: k0.jpg header 0, data 512-1536; k0.txt header 1536, data 2048;
# k1.jpg header 2560, data 3072-4096; k1.txt header 4096, data 4608; ...
@pytest.mark.parametrize("cut, kept_keys, reason, index", [
    (612, [], "unreadable_shard", 0),                 # inside the first member's data
    (2048, [], "truncated_shard", 0),                 # k0.txt's data missing: k0 dropped
    (3172, ["k0"], "truncated_shard", 1),             # inside k1.jpg's data: k1 dropped
    (4096, ["k0"], "truncated_shard", 1),             # at the header boundary before k1.txt
    (4096 + 200, ["k0"], "truncated_shard", 1),       # inside k1.txt's header
])
def test_truncation_is_reported_with_the_sample_in_progress(cut, kept_keys, reason, index):
    data = tar_bytes(MEMBERS)
    got = []
    with pytest.raises(BrokenTar) as error:
        for sample in iter_tar_samples(io.BytesIO(data[:cut]), "u", lambda i: True):
            got.append(sample["__key__"])
    assert got == kept_keys
    assert (error.value.reason, error.value.index) == (reason, index)


def test_missing_end_of_archive_block_counts_as_truncated():
    data = tar_bytes(MEMBERS[:4])  # k0, k1: members end at byte 5120, then the zero blocks
    assert len(samples(data)) == 2
    with pytest.raises(BrokenTar) as error:
        list(iter_tar_samples(io.BytesIO(data[:5120]), "u", lambda i: True))
    assert (error.value.reason, error.value.index) == ("truncated_shard", 1)


def test_not_a_tar_is_unreadable():
    with pytest.raises(BrokenTar) as error:
        samples(b"this is not a tar file" * 100)
    assert (error.value.reason, error.value.index) == ("unreadable_shard", 0)


def test_read_piece_counts_once_per_event_by_the_owner_of_the_index(tmp_path):
    path = tmp_path / "t.tar"
    data = tar_bytes(MEMBERS)
    path.write_bytes(data[:3172])  # breaks inside sample 1
    counters = [StreamContext() for _ in range(2)]
    for phase, counter in enumerate(counters):
        list(read_piece(ShardPiece(str(path), stride=2, phase=phase), counter))
    assert [c.counts for c in counters] == [{}, {"truncated_shard": 1}]
    missing = StreamContext()
    assert list(read_piece(ShardPiece(str(tmp_path / "nope.tar")), missing)) == []
    assert missing.counts == {"unreadable_shard": 1}


def test_pipe_urls_are_read(tmp_path):
    path = tmp_path / "t.tar"
    path.write_bytes(tar_bytes(MEMBERS))
    got = list(read_piece(ShardPiece(f"pipe:cat {path}"), StreamContext()))
    assert [s["__key__"] for s in got] == ["k0", "k1", "dir/k2"]
    failed = StreamContext()
    assert list(read_piece(ShardPiece(f"pipe:cat {tmp_path}/absent.tar 2>/dev/null"), failed)) == []
    assert failed.counts == {"unreadable_shard": 1}


def test_shuffle_buffer_is_a_seeded_permutation():
    a = list(shuffled(range(100), 10, random.Random(1)))
    assert sorted(a) == list(range(100)) and a != list(range(100))
    assert a == list(shuffled(range(100), 10, random.Random(1)))
    assert a != list(shuffled(range(100), 10, random.Random(2)))
    assert list(shuffled(range(5), 0, random.Random(1))) == list(range(5))


def test_lazy_members_load_the_same_bytes(tmp_path):
    path = tmp_path / "t.tar"
    path.write_bytes(tar_bytes(MEMBERS))
    with open(path, "rb") as stream:
        lazy = list(iter_tar_samples(stream, str(path), lambda i: True, lazy=lambda: True))
    assert isinstance(lazy[0]["jpg"], LazyMember)
    eager = [dict(s, __url__=str(path)) for s in samples(tar_bytes(MEMBERS))]
    assert [materialize(s) for s in lazy] == eager


class CountingStream(io.RawIOBase):
    """A non-seekable byte stream (a pipe, an HTTP body) that records its largest single read."""

    def __init__(self, data: bytes):
        self.inner, self.largest = io.BytesIO(data), 0

    def readable(self):
        return True

    def read(self, n=-1):
        chunk = self.inner.read(n)
        self.largest = max(self.largest, len(chunk))
        return chunk


def test_members_above_their_limit_or_not_needed_are_left_unread():
    from mmcl.data.decode import Oversized, Unread

    big = b"x" * (3 << 20)
    data = tar_bytes([("k0.jpg", b"J0"), ("k0.txt", big), ("k0.npy", big), ("k1.jpg", b"J1"), ("k1.txt", b"t1")])
    limit = {"jpg": 10, "txt": 1000}.get
    for stream in (io.BytesIO(data), CountingStream(data)):
        got = list(iter_tar_samples(stream, "u", lambda i: True, member_limit=limit))
        assert got[0]["jpg"] == b"J0" and got[0]["txt"] == Oversized(len(big), 1000) and got[0]["npy"] == Unread(len(big))
        assert got[1]["txt"] == b"t1"
    assert stream.largest <= 1 << 20  # skipped in 1 MiB reads, never held whole


def test_an_oversized_extended_header_is_a_broken_shard_not_a_memory_spike():
    name = "k" * 2000 + ".txt"
    data = bytearray(tar_bytes([(name, b"t")], fmt=tarfile.GNU_FORMAT))
    assert data[156:157] == b"L"
    data[124:136] = b"%011o\0" % (64 << 20)  # claims a 64 MiB long name
    data[148:156] = b" " * 8
    data[148:156] = b"%06o\0 " % sum(data[:512])
    with pytest.raises(BrokenTar, match="extended header"):
        list(iter_tar_samples(io.BytesIO(bytes(data)), "u", lambda i: True))
