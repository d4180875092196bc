import json
import random

import pytest

from mmcl.data.shards import NoShardsError, ShardPiece, assign_pieces, expand_shards, read_shard_sizes


def touch(path):
    path.write_bytes(b"")
    return path


def test_brace_expansion_and_sources(tmp_path):
    for name in ["a-0.tar", "a-1.tar", "a-2.tar", "b-00.tar", "b-01.tar"]:
        touch(tmp_path / name)
    sources = expand_shards(f"{tmp_path}/a-{{0..2}}.tar::{tmp_path}/b-{{00..01}}.tar")
    assert sources == [
        [f"{tmp_path}/a-0.tar", f"{tmp_path}/a-1.tar", f"{tmp_path}/a-2.tar"],
        [f"{tmp_path}/b-00.tar", f"{tmp_path}/b-01.tar"],
    ]


def test_glob_lists_existing_files_sorted(tmp_path):
    for name in ["2.tar", "0.tar", "1.tar"]:
        touch(tmp_path / name)
    assert expand_shards(f"{tmp_path}/*.tar") == [[f"{tmp_path}/0.tar", f"{tmp_path}/1.tar", f"{tmp_path}/2.tar"]]


def test_partly_missing_source_keeps_named_shards(tmp_path):
    touch(tmp_path / "0.tar")
    assert expand_shards(f"{tmp_path}/{{0..1}}.tar") == [[f"{tmp_path}/0.tar", f"{tmp_path}/1.tar"]]


def test_no_matching_shards_names_the_pattern(tmp_path):
    pattern = f"{tmp_path}/missing-{{000..003}}.tar"
    with pytest.raises(NoShardsError, match="missing-\\{000..003\\}.tar"):
        expand_shards(pattern)
    assert issubclass(NoShardsError, ValueError)
    touch(tmp_path / "ok.tar")
    with pytest.raises(NoShardsError, match="nothing-"):
        expand_shards(f"{tmp_path}/ok.tar::{tmp_path}/nothing-{{0..1}}.tar")


def test_remote_urls_are_kept_as_written():
    assert expand_shards("pipe:cat x-{0..1}.tar::https://host/s-{0..1}.tar") == [
        ["pipe:cat x-0.tar", "pipe:cat x-1.tar"], ["https://host/s-0.tar", "https://host/s-1.tar"]
    ]


def test_sizes_from_sizes_json_and_img2dataset_stats(tmp_path):
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": 10, "00001.tar": 7}))
    (tmp_path / "00002_stats.json").write_text(json.dumps({"successes": 5, "failed": 1}))
    urls = [str(tmp_path / f"{i:05d}.tar") for i in range(3)]
    assert read_shard_sizes(urls) == [10, 7, 5]
    assert read_shard_sizes(urls + [str(tmp_path / "00003.tar")]) is None
    assert read_shard_sizes(["pipe:cat 00000.tar"]) is None


def owners(pieces_per_consumer, sizes, extra=3):
    """(shard, index) -> number of consumers keeping it, for indices up to size + extra."""
    counts = {}
    for pieces in pieces_per_consumer:
        for piece in pieces:
            shard = int(piece.url)
            for i in range(sizes[shard] + extra):
                if piece.keeps(i):
                    counts[shard, i] = counts.get(shard, 0) + 1
    return counts


@pytest.mark.parametrize("with_sizes", [True, False])
def test_assignment_keeps_every_sample_exactly_once(with_sizes):
    rng = random.Random(0)
    for num_shards in range(1, 11):
        for consumers in range(1, 10):
            sizes = [rng.randint(0, 9) for _ in range(num_shards)]
            urls = [str(s) for s in range(num_shards)]
            pieces = [assign_pieces(urls, sizes if with_sizes else None, c, consumers) for c in range(consumers)]
            counts = owners(pieces, sizes)
            # Every index (also past the recorded size: sizes can be wrong) has exactly one owner.
            assert counts == {(s, i): 1 for s in range(num_shards) for i in range(sizes[s] + 3)}
            # Index 0 of every shard has an owner, so shard-level failures are counted once.
            assert all(any(p.url == str(s) and p.keeps(0) for ps in pieces for p in ps) for s in range(num_shards))


def test_sized_assignment_balances_consumers():
    sizes = [100, 3, 50, 7, 40]
    urls = [str(i) for i in range(len(sizes))]
    shares = []
    for c in range(4):
        pieces = assign_pieces(urls, sizes, c, 4)
        shares.append(sum(
            sum(1 for i in range(sizes[int(p.url)]) if p.keeps(i)) for p in pieces
        ))
    assert shares == [50, 50, 50, 50]


def test_fewer_shards_than_consumers_splits_samples():
    pieces = [assign_pieces(["s0", "s1"], None, c, 5) for c in range(5)]
    assert pieces == [
        [ShardPiece("s0", stride=3, phase=0)], [ShardPiece("s1", stride=2, phase=0)],
        [ShardPiece("s0", stride=3, phase=1)], [ShardPiece("s1", stride=2, phase=1)],
        [ShardPiece("s0", stride=3, phase=2)],
    ]
