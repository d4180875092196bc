"""Shard sizes of remote shards (http://, pipe:) from img2dataset's NNNNN_stats.json or sizes.json,
read over a loopback HTTP server from real shards written by data_tools, and the loader's split by them."""
from __future__ import annotations

import functools
import http.server
import io
import threading
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from data_tools.samples import SourceItem
from data_tools.write_shards import write_shards
from mmcl.data import build_train_loader
from mmcl.data.shards import assign_pieces, lookup_shard_sizes, read_shard_sizes, sibling_url

# Shards of 10 samples, the last of 2; shard 1's stats also count one corrupt input (11 inputs,
# 10 successes), as img2dataset's do.
SUCCESSES = [10, 10, 10, 2]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(root folder, base URL) of a loopback HTTP server over a folder of real JPEG shards with
    per-shard NNNNN_stats.json and no sizes.json (img2dataset's output)."""
    root = tmp_path_factory.mktemp("served")
    items, seed = [], 0
    for shard, good in enumerate(SUCCESSES):
        for i in range(good + (shard == 1)):
            seed += 1
            image = b"not a jpeg" if shard == 1 and i == 4 else jpeg(seed)
            items.append(SourceItem(source=f"in{seed}", image=image, captions=(f"a photo of number {seed}",)))
    stats = write_shards(items, root / "img2dataset", samples_per_shard=10)
    assert [s.successes for s in stats.shards] == SUCCESSES and len(stats.shards[1].failures) == 1
    (root / "img2dataset" / "sizes.json").unlink()  # img2dataset writes only the per-shard stats
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, "JPEG")
    return out.getvalue()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def urls(pattern: str, count: int = 4) -> list[str]:
    return [pattern.format(i=i) for i in range(count)]


def test_sizes_of_http_shards_come_from_img2dataset_stats(served):
    _, base = served
    assert read_shard_sizes(urls(base + "/img2dataset/{i:05d}.tar")) == SUCCESSES


@pytest.mark.parametrize("command", ["curl -s -f {base}/img2dataset/{i:05d}.tar", "cat {root}/img2dataset/{i:05d}.tar"])
def test_sizes_of_pipe_shards_come_from_the_same_command(served, command):
    root, base = served
    pipe_urls = urls("pipe:" + command.replace("{base}", base).replace("{root}", str(root)))
    assert read_shard_sizes(pipe_urls) == SUCCESSES


def test_sizes_json_beside_http_shards_wins(served):
    root, base = served
    folder = root / "with_sizes_json"
    folder.mkdir()
    (folder / "sizes.json").write_text('{"00000.tar": 7, "00001.tar": 5}')
    (folder / "00001_stats.json").write_text('{"successes": 99}')  # sizes.json is read first
    (folder / "00002_stats.json").write_text('{"successes": 4}')  # ... and stats fill what it lacks
    assert read_shard_sizes(urls(base + "/with_sizes_json/{i:05d}.tar", 3)) == [7, 5, 4]


def test_a_shard_without_stats_is_named_with_the_reason(served):
    _, base = served
    lookup = lookup_shard_sizes(urls(base + "/img2dataset/{i:05d}.tar", 6))
    assert lookup.sizes is None
    assert lookup.missing == f"no sizes.json entry or 00004_stats.json for {base}/img2dataset/00004.tar (HTTP 404)"
    lookup = lookup_shard_sizes(urls("pipe:curl -s -f " + base + "/nowhere/{i:05d}.tar", 1))
    assert lookup.missing == (f"no sizes.json entry or 00000_stats.json for pipe:curl -s -f {base}/nowhere/00000.tar "
                              "(the command exited with status 22)")  # curl -f: 22 = HTTP error


def test_sibling_urls_follow_the_shard_url_scheme():
    assert sibling_url("http://h:8/d/00001.tar?token=x", "00001_stats.json") == "http://h:8/d/00001_stats.json?token=x"
    assert sibling_url("https://h/00001.tar", "sizes.json") == "https://h/sizes.json"
    assert sibling_url("s3://bucket/a/b/00001.tar", "sizes.json") == "s3://bucket/a/b/sizes.json"
    assert (sibling_url("pipe:aws s3 cp s3://b/d/00012.tar - --region x", "00012_stats.json")
            == "pipe:aws s3 cp s3://b/d/00012_stats.json - --region x")
    assert (sibling_url("pipe:curl -L 'http://h/shard.00007.tar' | tee /dev/null", "sizes.json")
            == "pipe:curl -L 'http://h/sizes.json' | tee /dev/null")
    assert sibling_url("/data/x/00003.tar", "sizes.json") == "/data/x/sizes.json"
    assert sibling_url("file:/data/x/00003.tar", "00003_stats.json") == "/data/x/00003_stats.json"


def test_loader_splits_http_shards_by_their_stats_each_sample_once(served, tokenizer, kit):
    """2 ranks x 2 workers over 32 samples in shards of 10, 10, 10, 2: with the sizes each consumer
    gets a contiguous 8 (whole shards round-robin would give the last consumer 2 and repeats)."""
    _, base = served
    pattern = base + "/img2dataset/{00000..00003}.tar"
    seen: Counter = Counter()
    for rank in range(2):
        cfg = kit.data_config(pattern, num_workers=2, shuffle_buffer=4)
        loader = build_train_loader(cfg, tokenizer, 8, batch_size=4, seed=0, rank=rank, world_size=2)
        assert loader.cfg.sizes == SUCCESSES and loader.steps_per_epoch == 32 // 8
        batches = list(loader)
        assert len(batches) == 4 and loader.repeated_samples() == 0
        seen.update(k for b in batches for k in b["keys"])
    assert len(seen) == 32 and set(seen.values()) == {1}
    # the same pieces assign_pieces gives local shards of those sizes
    pieces = [assign_pieces(urls(base + "/img2dataset/{i:05d}.tar"), SUCCESSES, c, 4) for c in range(4)]
    assert [[(p.url[-9:], p.start, p.stop) for p in consumer] for consumer in pieces] == [
        [("00000.tar", 0, 8)], [("00000.tar", 8, None), ("00001.tar", 0, 6)],
        [("00001.tar", 6, None), ("00002.tar", 0, 4)], [("00002.tar", 4, None), ("00003.tar", 0, None)]]


def test_a_pipe_command_without_a_tar_name_has_no_size():
    lookup = lookup_shard_sizes(["pipe:cat shard-0"])
    assert lookup.sizes is None and lookup.missing == "no shard file name (NAME.tar) to look up sizes for in 'pipe:cat shard-0'"
