"""`mmcl curate select`: each rule keeps exactly the expected samples, the rules combine in their order,
the selection file has its schema and marker, and user errors are one line."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmcl.cli import main as mmcl
from mmcl.curate.semdedup import greedy_keep, normalise


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = mmcl(["curate", "select", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def selected(path: Path) -> dict[str, float]:
    table = pq.read_table(path)
    return dict(zip(table.column("key").to_pylist(), table.column("probability").to_pylist()))


def info(path: Path) -> dict:
    return json.loads(pq.read_schema(path).metadata[b"mmcl"])


@pytest.fixture
def scored(tmp_path, kit):
    """Two parts, 10 samples; scores with a tie at 0.5 (k3 and k5)."""
    scores = [0.9, 0.1, 0.3, 0.5, 0.2, 0.5, 0.7, 0.05, 0.4, 0.6]
    rows = [{"key": f"k{i}", "score": s} for i, s in enumerate(scores)]
    return kit.write_scores(tmp_path / "scores", [rows[:6], rows[6:]])


def test_keep_fraction_keeps_the_top_scores_ties_broken_by_key(scored, tmp_path, capsys):
    out = tmp_path / "sel.parquet"
    code, stdout, _ = run(capsys, "--scores", str(scored), "--keep-fraction", "0.4", "--out", str(out))
    assert code == 0
    # top 4 of 10: 0.9 (k0), 0.7 (k6), 0.6 (k9), then 0.5 tied between k3 and k5: k3 by key.
    assert selected(out) == {"k0": 1.0, "k3": 1.0, "k6": 1.0, "k9": 1.0}
    assert "score" in stdout and "60.0%" in stdout  # removed 6 of 10


def test_keep_fraction_rounds_half_up(scored, tmp_path, capsys):
    out = tmp_path / "sel.parquet"
    assert run(capsys, "--scores", str(scored), "--keep-fraction", "0.25", "--out", str(out))[0] == 0
    assert set(selected(out)) == {"k0", "k6", "k9"}  # 2.5 -> 3


def test_min_score_keeps_scores_at_or_above(scored, tmp_path, capsys):
    out = tmp_path / "sel.parquet"
    assert run(capsys, "--scores", str(scored), "--min-score", "0.5", "--out", str(out))[0] == 0
    assert set(selected(out)) == {"k0", "k3", "k5", "k6", "k9"}


def test_selection_schema_order_and_metadata(scored, tmp_path, capsys):
    out = tmp_path / "sel.parquet"
    assert run(capsys, "--scores", str(scored), "--min-score", "0.5", "--out", str(out))[0] == 0
    table = pq.read_table(out)
    assert table.schema.names == ["key", "probability", "shard", "index"]
    assert [table.schema.field(n).type for n in table.schema.names] == [pa.string(), pa.float64(), pa.string(), pa.int32()]
    # scores order (shard, then position); shard and index carried from the scores
    assert table.column("key").to_pylist() == ["k0", "k3", "k5", "k6", "k9"]
    assert table.column("shard").to_pylist() == ["shards/00000.tar"] * 3 + ["shards/00001.tar"] * 2
    assert table.column("index").to_pylist() == [0, 3, 5, 0, 3]
    meta = info(out)
    assert meta["command"] == "select" and meta["version"] == 1
    assert meta["rules"] == [{"rule": "score", "arguments": {"min_score": 0.5}, "input": 10, "removed": 5, "output": 5}]
    assert meta["selected"] == 5 and meta["expected_per_epoch"] == 5.0


def planted_duplicates(seed: int = 0, dim: int = 32, clusters: int = 4, per_cluster: int = 15):
    """Rows of `clusters` groups of distinct samples plus planted near-duplicates; returns (rows, keys expected removed)."""
    rng = np.random.default_rng(seed)
    centers = normalise(rng.normal(size=(clusters, dim)))
    rows, removed = [], set()
    for c in range(clusters):
        for i in range(per_cluster):
            x = centers[c] + rng.normal(size=dim) / np.sqrt(dim)
            score = 0.5 + 0.01 * (c * per_cluster + i) / (clusters * per_cluster)
            rows.append({"key": f"c{c}-{i:02d}", "score": score, "image_embedding": x})
            if i % 3 == 0:  # a near-duplicate of this sample
                dup = x + 1e-3 * rng.normal(size=dim)
                higher = i == 3  # once per cluster the copy scores higher: then the original goes
                rows.append({"key": f"c{c}-{i:02d}-dup", "score": score + (0.1 if higher else -0.3), "image_embedding": dup})
                removed.add(f"c{c}-{i:02d}" if higher else f"c{c}-{i:02d}-dup")
    order = np.random.default_rng(seed + 1).permutation(len(rows))
    return [rows[k] for k in order], removed


def test_planted_duplicates_are_apart_from_the_rest():
    rows, removed = planted_duplicates()
    x = normalise(np.array([r["image_embedding"] for r in rows], dtype=np.float16))
    sims = x @ x.T
    keys = [r["key"] for r in rows]
    pairs = {(a, b) for a in range(len(keys)) for b in range(len(keys)) if a < b and sims[a, b] > 0.8}
    assert all(keys[a].split("-dup")[0] == keys[b].split("-dup")[0] for a, b in pairs)  # only planted pairs
    assert len(pairs) == len(removed) == 20


@pytest.mark.parametrize("clusters", [None, "4", "9"])
def test_dedup_removes_the_planted_duplicates_and_nothing_else(tmp_path, kit, capsys, clusters):
    rows, removed = planted_duplicates()
    scores = kit.write_scores(tmp_path / "scores", [rows[:40], rows[40:]])
    out = tmp_path / "sel.parquet"
    extra = ["--dedup-clusters", clusters] if clusters else []
    code, stdout, _ = run(capsys, "--scores", str(scores), "--dedup-threshold", "0.9", *extra, "--out", str(out))
    assert code == 0
    assert set(selected(out)) == {r["key"] for r in rows} - removed
    rule = info(out)["rules"][0]
    assert (rule["rule"], rule["input"], rule["removed"]) == ("dedup", 80, 20)
    assert rule["arguments"]["clusters"] == (int(clusters) if clusters else 9)  # default round(sqrt(80))


def test_greedy_keep_in_blocks_equals_one_block():
    rng = np.random.default_rng(3)
    base = normalise(rng.normal(size=(6, 8)))
    x = normalise(np.concatenate([base, base + 0.05 * rng.normal(size=(6, 8)), base[:3]])[rng.permutation(15)])
    whole = greedy_keep(x, 0.9, block=4096)
    assert whole.sum() == 6
    for block in (1, 2, 4, 7):
        assert greedy_keep(x, 0.9, block=block).tolist() == whole.tolist()


@pytest.fixture
def captioned(tmp_path, kit):
    captions = {
        "a0": "A CAT on a mat", "a1": "my cat", "a2": "the cat sleeps", "a3": "concatenate strings",  # 'cat' x4 (+a7)
        "b0": "a red car", "b1": "Red Car parked", "b2": "red car and a cat",  # 'red car' x3, b2 also 'cat'
        "c0": "a dog",  # 'dog' x1
        "u0": "nothing here", "u1": "",  # unmatched
    }
    rows = [{"key": k, "score": 0.5, "caption": c} for k, c in captions.items()]
    metadata = tmp_path / "metadata.txt"
    metadata.write_text("cat\nRed Car\n\n dog \ncat\nunicorn\n")
    return kit.write_scores(tmp_path / "scores", [rows]), metadata


def test_balancing_probabilities_follow_metaclip_sampling(captioned, tmp_path, capsys):
    scores, metadata = captioned
    out = tmp_path / "sel.parquet"
    code, stdout, _ = run(capsys, "--scores", str(scores), "--metadata", str(metadata), "--balance-threshold", "2",
                          "--out", str(out))
    assert code == 0
    cat, red_car = 2 / 5, 2 / 3  # 'cat' matches a0-a3 and b2 (5 samples), 'red car' b0-b2 (3): t=2
    expected = {"a0": cat, "a1": cat, "a2": cat, "a3": cat, "b0": red_car, "b1": red_car,
                "b2": 1 - (1 - cat) * (1 - red_car), "c0": 1.0}
    got = selected(out)
    assert got.keys() == expected.keys()  # unmatched u0, u1 dropped
    assert all(abs(got[k] - v) < 1e-12 for k, v in expected.items())
    rule = info(out)["rules"][0]
    assert (rule["input"], rule["removed"], rule["unmatched"], rule["arguments"]["entries"]) == (10, 2, 2, 4)
    assert rule["expected_per_epoch"] == pytest.approx(sum(expected.values()))
    assert f"expected per epoch {sum(expected.values()):.1f}" in stdout


def test_keep_unmatched_keeps_them_at_probability_one(captioned, tmp_path, capsys):
    scores, metadata = captioned
    out = tmp_path / "sel.parquet"
    assert run(capsys, "--scores", str(scores), "--metadata", str(metadata), "--balance-threshold", "100",
               "--keep-unmatched", "--out", str(out))[0] == 0
    assert selected(out) == {k: 1.0 for k in ["a0", "a1", "a2", "a3", "b0", "b1", "b2", "c0", "u0", "u1"]}


def test_rules_combine_in_order_score_dedup_balance(tmp_path, kit, capsys):
    rng = np.random.default_rng(5)
    base = normalise(rng.normal(size=(8, 16)))
    rows = []
    for i in range(8):
        rows.append({"key": f"s{i}", "score": 0.2 + 0.1 * i, "image_embedding": base[i],
                     "caption": "a cat" if i % 2 else "a dog"})
    rows.append({"key": "s7-dup", "score": 0.75, "image_embedding": base[7], "caption": "a cat"})  # dup of s7 (0.9)
    rows.append({"key": "s6-dup", "score": 0.95, "image_embedding": base[6], "caption": "a dog"})  # beats s6 (0.8)
    metadata = tmp_path / "m.txt"
    metadata.write_text("cat\n")
    scores = kit.write_scores(tmp_path / "scores", [rows])
    out = tmp_path / "sel.parquet"
    code, stdout, _ = run(capsys, "--scores", str(scores), "--min-score", "0.45", "--dedup-threshold", "0.99",
                          "--metadata", str(metadata), "--balance-threshold", "1", "--out", str(out))
    assert code == 0
    # score: drops s0-s2 (0.2, 0.3, 0.4) -> s3..s7, s7-dup, s6-dup; dedup: drops s7-dup and s6;
    # balance ('cat', t=1): s3, s5, s7 match (p 1/3), dogs s4, s6-dup unmatched and dropped.
    assert selected(out) == pytest.approx({"s3": 1 / 3, "s5": 1 / 3, "s7": 1 / 3})
    rules = info(out)["rules"]
    assert [(r["rule"], r["input"], r["removed"]) for r in rules] == [("score", 10, 3), ("dedup", 7, 2), ("balance", 5, 2)]
    lines = stdout.splitlines()
    assert [line.split()[0] for line in lines[1:4]] == ["score", "dedup", "balance"]


@pytest.mark.parametrize("argv, message", [
    (["--keep-fraction", "0"], "--keep-fraction must be in (0, 1]"),
    (["--keep-fraction", "1.5"], "--keep-fraction must be in (0, 1]"),
    (["--keep-fraction", "0.5", "--min-score", "0.1"], "pass only one"),
    (["--dedup-threshold", "1.0"], "--dedup-threshold must be a cosine similarity in (0, 1)"),
    (["--balance-threshold", "3"], "add --metadata FILE"),
    ([], "no rule given"),
])
def test_bad_arguments_are_one_line_errors(scored, tmp_path, capsys, argv, message):
    code, _, err = run(capsys, "--scores", str(scored), *argv, "--out", str(tmp_path / "sel.parquet"))
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "sel.parquet").exists()


def test_missing_scores_folder_and_metadata_file_are_named(scored, tmp_path, capsys):
    code, _, err = run(capsys, "--scores", str(tmp_path / "nope"), "--min-score", "0", "--out", str(tmp_path / "s.parquet"))
    assert code == 2 and f"scores folder {tmp_path / 'nope'} does not exist" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "--scores", str(tmp_path / "empty"), "--min-score", "0", "--out", str(tmp_path / "s.parquet"))
    assert code == 2 and "has no parts/*.parquet" in err
    code, _, err = run(capsys, "--scores", str(scored), "--metadata", str(tmp_path / "m.txt"), "--balance-threshold", "2",
                       "--out", str(tmp_path / "s.parquet"))
    assert code == 2 and f"metadata file {tmp_path / 'm.txt'} does not exist" in err


def test_empty_selection_is_an_error_and_writes_nothing(scored, tmp_path, capsys):
    out = tmp_path / "sel.parquet"
    code, stdout, err = run(capsys, "--scores", str(scored), "--min-score", "0.95", "--out", str(out))
    assert code == 2 and "the rules removed every sample" in err and not out.exists()
    assert "100.0%" in stdout  # the table still says what happened


def test_out_replaces_only_an_earlier_selection(scored, tmp_path, capsys):
    out = tmp_path / "sel.parquet"
    assert run(capsys, "--scores", str(scored), "--min-score", "0.5", "--out", str(out))[0] == 0
    code, _, err = run(capsys, "--scores", str(scored), "--min-score", "0.8", "--out", str(out))
    assert code == 2 and "pass --overwrite" in err and len(selected(out)) == 5
    assert run(capsys, "--scores", str(scored), "--min-score", "0.8", "--out", str(out), "--overwrite")[0] == 0
    assert set(selected(out)) == {"k0"}
    foreign = tmp_path / "other.parquet"
    pq.write_table(pa.table({"key": ["x"], "probability": [1.0]}), foreign)
    code, _, err = run(capsys, "--scores", str(scored), "--min-score", "0.5", "--out", str(foreign), "--overwrite")
    assert code == 2 and "not a selection written by `mmcl curate select`" in err
    assert pq.read_table(foreign).column("key").to_pylist() == ["x"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.parquet", "scores", "sel.parquet"]  # no temporary left


def test_keys_repeated_across_shards_are_reported(tmp_path, kit, capsys):
    scores = kit.write_scores(tmp_path / "scores", [[{"key": "a", "score": 0.3}, {"key": "b", "score": 0.4}],
                                                    [{"key": "a", "score": 0.5}]])
    out = tmp_path / "sel.parquet"
    code, stdout, _ = run(capsys, "--scores", str(scores), "--min-score", "0", "--out", str(out))
    assert code == 0 and "1 keys occur more than once" in stdout
    assert info(out)["repeated_keys"] == 1
