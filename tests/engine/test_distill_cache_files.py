"""The distill feature cache's files: two processes flushing into one `distill.cache_dir` while reading
each other's files never see a partial file (write to a temporary name, fsync, rename), and a file
left unreadable by a machine crash is skipped (its entries get encoded again), not a crash."""
import multiprocessing

import pytest
import torch

from mmcl.objectives.teacher_cache import TeacherFeatureCache

FINGERPRINT = {"teacher_sha256": "0" * 64, "transform": "ResizeCenterCropU8(size=24)"}
FLUSHES, ROWS, WIDTH = 20, 250, 256  # 256 kB a file

def write(directory: str, rank: int, results) -> None:
    """One writer process: FLUSHES files of ROWS rows into `directory`; puts (rank, rows it holds, unreadable files)."""
    torch.set_num_threads(1)  # forked: one intra-op thread before any torch op, as DataLoader workers do
    cache = TeacherFeatureCache(directory, FINGERPRINT, rank)
    for flush in range(FLUSHES):
        cache.add_images([f"r{rank}-{flush}-{row}" for row in range(ROWS)],
                         torch.full((ROWS, WIDTH), float(1000 * rank + flush)))
        cache.flush()  # writes this flush's file, then reads every file the other writer finished
    results.put((rank, len(cache), cache.unreadable_files))


@pytest.mark.slow
def test_two_writers_sharing_a_cache_dir_never_expose_a_partial_file(tmp_path):
    # forked, not `python -c`: the writers start without importing torch and mmcl again
    context = multiprocessing.get_context("fork")
    results = context.SimpleQueue()
    writers = [context.Process(target=write, args=(str(tmp_path), rank, results)) for rank in (0, 1)]
    for writer in writers:
        writer.start()
    reader = TeacherFeatureCache(tmp_path, FINGERPRINT, rank=2)
    while any(w.is_alive() for w in writers):
        reader.refresh()  # load_file raises on a truncated file; refresh would count it unreadable
    for writer in writers:
        writer.join()
    assert all(w.exitcode == 0 for w in writers), [w.exitcode for w in writers]
    reader.refresh()
    assert reader.unreadable_files == 0
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind
    assert len(list(tmp_path.glob("features-r*.safetensors"))) == 2 * FLUSHES
    final = TeacherFeatureCache(tmp_path, FINGERPRINT, rank=3)
    assert len(final) == len(reader) == 2 * FLUSHES * ROWS
    # each writer read whatever the other had finished (timing), never a partial file; every row has its value
    written = sorted(results.get() for _ in writers)
    assert [rank for rank, _, _ in written] == [0, 1]
    assert all(rows >= FLUSHES * ROWS and unreadable == 0 for _, rows, unreadable in written), written
    for rank in (0, 1):
        for flush in (0, FLUSHES - 1):
            row = final.images([f"r{rank}-{flush}-{ROWS - 1}"])[0]
            assert torch.equal(row, torch.full((WIDTH,), float(1000 * rank + flush)))


def test_an_unreadable_feature_file_is_skipped_and_counted(tmp_path):
    first = TeacherFeatureCache(tmp_path, FINGERPRINT)
    first.add_images(["a", "b"], torch.ones(2, 4))
    first.flush()
    (tmp_path / "features-r1-cutshort.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"image/c\":")
    later = TeacherFeatureCache(tmp_path, FINGERPRINT, rank=1)
    assert later.unreadable_files == 1
    assert [row is not None for row in later.images(["a", "b", "c"])] == [True, True, False]
