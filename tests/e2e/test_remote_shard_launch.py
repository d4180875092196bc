"""Epoch mode over http:// shards sized by img2dataset's NNNNN_stats.json: one real `deepspeed`
launch (2 CPU ranks) from a loopback HTTP server, which also meets two malformed captions (deeply
nested JSON brackets, and one above data.max_text_bytes) that it skips and counts; and the
one-sentence error when no size exists."""
from __future__ import annotations

import functools
import http.server
import io
import json
import tarfile
import threading
from collections import Counter
from pathlib import Path

import pytest

from launch import BIN, REPO, free_port, losses, run, tiny_run_config, write_config
from mmcl.engine.cli import main

SIZES = [24, 24, 24, 8]  # 80 samples: 5 steps of 2 ranks x 8
MICRO = 8
MALFORMED = {"bad_caption": b"[" * 30_000 + b"]" * 30_000,  # 60 kB: under data.max_text_bytes (64 KiB)
             "caption_too_large": b"a cat " * 20_000}


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def http_shards(digits, tmp_path_factory):
    """(served folder, base URL, keys in shard order, {reason: key of its malformed sample}) of the
    first 80 demo digits re-encoded as JPEG shards by data_tools (img2dataset's layout: per-shard
    NNNNN_stats.json, sizes.json removed), the captions of the last shard's first two samples
    replaced by MALFORMED ones, plus a copy without stats files."""
    from data_tools.samples import ImageOptions, SourceItem
    from data_tools.shard_reader import iter_samples
    from data_tools.write_shards import write_shards

    root = tmp_path_factory.mktemp("http_root")
    items = []
    for key, fields in iter_samples(digits / "train" / "00000.tar"):
        items.append(SourceItem(source=key, image=fields["png"], captions=(fields["txt"].decode(),)))
        if len(items) == sum(SIZES):
            break
    stats = write_shards(items, root / "i2d", samples_per_shard=24, image_options=ImageOptions(output_format="jpg"))
    assert [s.successes for s in stats.shards] == SIZES
    (root / "i2d" / "sizes.json").unlink()
    malformed = _replace_captions(root / "i2d" / "00003.tar", list(MALFORMED.values()))
    keys = [key for s in range(len(SIZES)) for key, _ in iter_samples(root / "i2d" / f"{s:05d}.tar")]
    with tarfile.open(root / "i2d" / "00000.tar") as tar:  # real JPEG bytes, as img2dataset stores them
        assert {name.split(".", 1)[1] for name in tar.getnames()} == {"jpg", "txt", "json"}
        assert tar.extractfile(tar.getnames()[0]).read()[:3] == b"\xff\xd8\xff"
    (root / "no_stats").mkdir()
    for s in range(len(SIZES)):
        (root / "no_stats" / f"{s:05d}.tar").write_bytes((root / "i2d" / f"{s:05d}.tar").read_bytes())
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}", keys, dict(zip(MALFORMED, malformed))
    server.shutdown()
    server.server_close()


def _replace_captions(shard: Path, captions: list[bytes]) -> list[str]:
    """Rewrite `shard` with the .txt of its first samples replaced by `captions`; returns their keys."""
    with tarfile.open(shard) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar.getmembers()]
    texts = [info.name for info, _ in members if info.name.endswith(".txt")][: len(captions)]
    with tarfile.open(shard, "w") as tar:
        for info, data in members:
            if info.name in texts:
                data = captions[texts.index(info.name)]
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return [name.split(".", 1)[0] for name in texts]


def epoch_config(digits: Path, tmp_path: Path) -> Path:
    config = tiny_run_config(digits, tmp_path / "run", micro_batch_size=MICRO, epochs=1)
    del config["train"]["steps"]
    return write_config(tmp_path / "run.yaml", config)


def test_epoch_over_http_shards_takes_its_length_from_the_stats_and_sees_each_sample_once(http_shards, digits, tmp_path):
    root, base, keys, malformed = http_shards
    debug = tmp_path / "debug"
    # overrides on both sides of --deepspeed_config, as launch scripts write them
    command = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), str(REPO / "train.py"),
               "--config", str(epoch_config(digits, tmp_path)), "train.log_every=1",
               "--deepspeed_config", str(REPO / "configs/ds/zero2.json"),
               f"data.train_shards={base}/i2d/{{00000..00003}}.tar"]
    result = run(command, timeout=900, extra_env={"MMCL_DEBUG_DIR": str(debug)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    expected_steps = sum(json.loads((root / "i2d" / f"{s:05d}_stats.json").read_text())["successes"]
                         for s in range(len(SIZES))) // (2 * MICRO)
    assert expected_steps == 5
    assert sorted(losses(tmp_path / "run")) == list(range(1, expected_steps + 1))
    seen = {rank: [k for line in (debug / f"keys_rank{rank}.jsonl").read_text().splitlines()
                   for k in json.loads(line)["keys"]] for rank in (0, 1)}
    counts = Counter(seen[0] + seen[1])
    # every good sample once; the two malformed ones skipped, counted (summed over the ranks) and
    # made up for by two repeats on the rank that met them, so both ranks keep equal steps
    assert set(counts) == set(keys) - set(malformed.values())
    assert sum(counts.values()) == 80 and sum(n - 1 for n in counts.values()) == 2
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["skipped"] == {"bad_caption": 1, "caption_too_large": 1}
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {k: v for k, v in [r for r in logged if "loss" in r][-1].items() if k.startswith("skipped/")} == {
        "skipped/bad_caption": 1, "skipped/caption_too_large": 1}
    # split by the sizes (each rank a contiguous 40 of the epoch's shard order); whole shards
    # round-robin would give one rank 48 samples and the other 32 plus 8 repeats
    assert len(seen[0]) == len(seen[1]) == 40


@pytest.mark.parametrize("world_size, overrides, need", [
    (None, [], "the epoch length needs"),
    ("2", ["train.steps=3"], "equal steps on 2 ranks needs"),
])
def test_http_shards_without_sizes_stop_with_one_sentence(http_shards, digits, tmp_path, capsys, monkeypatch,
                                                          world_size, overrides, need):
    import torch.distributed as dist

    _, base, _, _ = http_shards
    if world_size:
        monkeypatch.setenv("WORLD_SIZE", world_size)
    with pytest.raises(SystemExit) as caught:
        main(["--config", str(epoch_config(digits, tmp_path)), f"data.train_shards={base}/no_stats/{{00000..00003}}.tar",
              *overrides])
    assert caught.value.code == 2 and not dist.is_initialized()
    steps = " or train.steps" if world_size is None else ""
    assert capsys.readouterr().err == (
        f"mmcl: error: {need} the size of data.train_shards, which is unknown: no sizes.json entry or "
        f"00000_stats.json for {base}/no_stats/00000.tar (HTTP 404); put a sizes.json (shard file name -> sample "
        f"count) or img2dataset's NNNNN_stats.json files beside the shards, or set data.samples_per_epoch{steps} "
        "(or use data.resampled: true).\n")
