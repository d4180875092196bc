"""Shard strings that carry credentials: they work, and no message shows them.

A loopback HTTP server serves real shards (written by data_tools, img2dataset's per-shard
stats) only to a request with HTTP basic auth `reader:SECRET1` and `?token=SECRET2`, or with
the header `Authorization: Bearer SECRET3`; anything else gets 403.
"""
from __future__ import annotations

from collections import Counter

import pytest
from guarded_server import SECRET1, SECRET2, SECRET3, serve_guarded

from mmcl.data import build_train_loader
from mmcl.data.shards import NoShardsError, PipeRefusedError, expand_shards, lookup_shard_sizes

SIZES = [6, 6, 4]


@pytest.fixture
def guarded(tmp_path, kit):
    """(base URL without credentials, served folder) of shards 00000..00002 with NNNNN_stats.json."""
    root = tmp_path / "served"
    (root / "d").mkdir(parents=True)
    index = 0
    for shard, size in enumerate(SIZES):
        samples = []
        for _ in range(size):
            samples.append(kit.good_sample(f"{index:06d}", index))
            index += 1
        kit.write_shard(root / "d" / f"{shard:05d}.tar", samples)
        (root / "d" / f"{shard:05d}_stats.json").write_text(f'{{"successes": {size}}}')
    with serve_guarded(root) as host:
        yield host, root


def test_size_lookup_sends_url_credentials_and_names_a_failure_without_them(guarded):
    host, _ = guarded
    good = [f"http://reader:{SECRET1}@{host}/d/{s:05d}.tar?token={SECRET2}" for s in range(3)]
    assert lookup_shard_sizes(good).sizes == SIZES  # user:password@ sent as basic auth, as curl does

    wrong = [f"http://reader:{SECRET1}@{host}/d/{s:05d}.tar?token=wrong-{SECRET2}" for s in range(3)]
    lookup = lookup_shard_sizes(wrong)
    assert lookup.sizes is None
    assert lookup.missing == f"no sizes.json entry or 00000_stats.json for http://***@{host}/d/00000.tar?token=*** (HTTP 403)"


def test_env_values_in_a_url_are_expanded_by_mmcl_and_named_in_messages(guarded, monkeypatch):
    host, _ = guarded
    monkeypatch.setenv("SHARD_TOKEN", SECRET2)
    monkeypatch.setenv("SHARD_PASSWORD", SECRET1)
    [urls] = expand_shards(f"http://reader:$SHARD_PASSWORD@{host}/d/{{00000..00002}}.tar?token=${{SHARD_TOKEN}}")
    assert urls[0] == f"http://reader:{SECRET1}@{host}/d/00000.tar?token={SECRET2}"  # curl gets the values
    assert lookup_shard_sizes(urls).sizes == SIZES
    with pytest.raises(NoShardsError) as caught:
        expand_shards(f"http://reader:{SECRET1}@{host}/d/00000.tar::")
    assert str(caught.value) == f"shard pattern 'http://***@{host}/d/00000.tar::' has an empty '::' part."


def test_a_pipe_command_keeps_its_variables_for_the_shell(guarded, monkeypatch, tokenizer, kit):
    host, _ = guarded
    monkeypatch.setenv("SHARD_BEARER", SECRET3)
    pattern = f'pipe:curl -s -f -H "Authorization: Bearer $SHARD_BEARER" http://{host}/d/{{00000..00002}}.tar'
    [urls] = expand_shards(pattern)
    assert urls[1] == f'pipe:curl -s -f -H "Authorization: Bearer $SHARD_BEARER" http://{host}/d/00001.tar'
    assert lookup_shard_sizes(urls).sizes == SIZES  # the size lookup's command: the shell filled in the token
    loader = build_train_loader(kit.data_config(pattern, num_workers=1, shuffle_buffer=4), tokenizer, 8,
                                batch_size=4, seed=0, rank=0, world_size=1)
    keys = Counter(k for batch in loader for k in batch["keys"])
    assert len(keys) == sum(SIZES) and set(keys.values()) == {1}  # webdataset's reader: the same


def test_wds_secure_refuses_pipe_sources_before_running_them(guarded, monkeypatch, tmp_path):
    _, root = guarded
    monkeypatch.setenv("WDS_SECURE", "1")
    marker = tmp_path / "ran"
    pattern = f'pipe:touch {marker}; curl -s -H "Authorization: Bearer {SECRET3}" {root}/d/{{00000..00002}}.tar'
    with pytest.raises(PipeRefusedError) as caught:
        expand_shards(f"{root}/d/00000.tar::{pattern}")
    assert str(caught.value) == (
        f"the shard source 'pipe:touch {marker}; curl -s -H \"Authorization: ***\" {root}/d/{{00000..00002}}.tar' is a "
        "pipe: command, which WDS_SECURE=1 forbids; unset WDS_SECURE or name the shards by URL (http(s)://, s3://...).")
    lookup = lookup_shard_sizes([f"pipe:touch {marker}; cat {root}/d/00000.tar"])
    assert lookup.sizes is None and lookup.missing.endswith("(WDS_SECURE=1 forbids pipe: commands)")
    assert not marker.exists()  # no command ran
    monkeypatch.setenv("WDS_SECURE", "0")
    assert expand_shards(f"{root}/d/00000.tar::{pattern}")[1][0].startswith(f"pipe:touch {marker};")


def test_wds_secure_still_reads_local_shards(tmp_path, monkeypatch):
    """WDS_SECURE=1 forbids commands, not the user's own files (webdataset's gopen refuses both)."""
    import tarfile
    import io

    from mmcl.data.shards import open_shard
    from mmcl.data.stream import iter_tar_samples

    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w") as tar:
        for key in ("a", "b"):
            info = tarfile.TarInfo(f"{key}.txt")
            info.size = 5
            tar.addfile(info, io.BytesIO(f"cap {key}".encode()))
    monkeypatch.setenv("WDS_SECURE", "1")
    with open_shard(str(path)) as stream:
        samples = list(iter_tar_samples(stream, str(path), keep=lambda index: True))
    with open_shard(f"file:{path}") as stream:
        assert stream.read() == path.read_bytes()
    assert [s["txt"] for s in samples] == [b"cap a", b"cap b"]
