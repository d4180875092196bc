"""`mmcl benchmark` and `eval.benchmark` under the real `deepspeed` launcher and `torchrun` with 2 CPU ranks.

One training launch (4 steps, eval.benchmark every 2 steps and at the end), then `mmcl benchmark` on the run's
model with 2 ranks under `deepspeed`, killed (SIGKILL to every process) in the middle and rerun under `torchrun`; the datasets are tiny
CLIP_benchmark-layout sets (classification, multi-label, retrieval, a 3-shot linear probe) and the
one-process reference runs in this process. The kill lands deterministically: the second task's first shard
is a named pipe nobody writes until the kill, so the first launch finishes task 1 and then waits on task 2.
"""
from __future__ import annotations

import json
import re
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

from launch import BIN, deepspeed_command, free_port, kill_tree, run, start, tiny_run_config, wait_for, write_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "evaluation"))
from benchmark_fixtures import TASK_LIST, write_suite  # noqa: E402

STEMS = ("digits_zeroshot_classification", "shapes_multilabel_zeroshot_classification",
         "digits_captions_zeroshot_retrieval", "digits_linear_probe_3shot")


@pytest.fixture(scope="module")
def launches(digits, tmp_path_factory):
    from mmcl.cli import main

    root = tmp_path_factory.mktemp("benchmark_launch")
    data = write_suite(root / "data")
    tasks = root / "tasks.yaml"
    tasks.write_text(TASK_LIST)
    config = tiny_run_config(digits, root / "run", steps=4, eval_every=2)
    config["eval"] = {"benchmark": str(tasks), "benchmark_root": str(data), "batch_size": 16}
    trained = run(deepspeed_command(write_config(root / "run.yaml", config)))
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    arguments = [str(BIN / "mmcl"), "benchmark", "--model", str(root / "run"), "--root", str(data), "--tasks", str(tasks),
                 "--out", str(root / "two_ranks"), "--batch-size", "16", "--workers", "0", "--device", "cpu"]
    command = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), *arguments]
    shard = data / "wds_shapes_multilabel" / "test" / "0.tar"
    shutil.move(shard, root / "0.tar")
    os.mkfifo(shard)
    first_task = root / "two_ranks" / f"{STEMS[0]}.json"
    killed = start(command)
    try:
        wait_for(lambda: first_task.is_file() or killed.poll() is not None, timeout=300, what="the first task's result")
    finally:
        kill_tree(killed, signal.SIGKILL)
        killed_output = killed.communicate()[0]
    at_kill = sorted(p.name for p in (root / "two_ranks").glob("*.json"))
    kept = first_task.read_bytes()
    shard.unlink()
    shutil.move(root / "0.tar", shard)
    # The rerun goes through torchrun: the suite runs under either launcher.
    launched = run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), *arguments])
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    assert first_task.read_bytes() == kept  # the task finished before the kill is not redone
    assert main(["benchmark", "--model", str(root / "run"), "--root", str(data), "--tasks", str(tasks),
                 "--out", str(root / "one"), "--batch-size", "16", "--workers", "0", "--device", "cpu"]) == 0
    return root, launched.stdout, killed_output, at_kill


def results(folder: Path) -> dict[str, dict]:
    return {stem: json.loads((folder / f"{stem}.json").read_text()) for stem in STEMS}


@pytest.mark.e2e
def test_a_run_killed_after_its_first_task_is_finished_by_a_rerun_that_runs_only_the_rest(launches):
    _, output, killed_output, at_kill = launches
    assert at_kill == [f"{STEMS[0]}.json", "mmcl_benchmark.json"], killed_output[-3000:]
    assert "0 already done, 4 to run over 2 rank(s)" in killed_output
    assert "not present locally (skipped): wds/not_downloaded" in output
    assert "4 of 5 tasks present" in output and "1 already done, 3 to run over 2 rank(s)" in output
    ran = [m.group(1) for m in re.finditer(r"^\[\d+/\d+\] ([^:]+):", output, flags=re.M)]
    assert ran == ["wds/shapes_multilabel zeroshot_classification", "wds/digits_captions zeroshot_retrieval",
                   "wds/digits linear_probe"], output[-3000:]


@pytest.mark.e2e
def test_two_ranks_give_the_one_process_results_on_every_task(launches):
    root, *_ = launches
    one, two = results(root / "one"), results(root / "two_ranks")
    for stem in STEMS:
        print(f"{stem}: 1 process {one[stem]['metrics']}\n{stem}: 2 ranks   {two[stem]['metrics']}")
        assert two[stem]["metrics"] == one[stem]["metrics"], stem
        assert {k: v for k, v in two[stem]["mmcl"].items() if k != "seconds"} == \
            {k: v for k, v in one[stem]["mmcl"].items() if k != "seconds"}
    assert (root / "two_ranks" / "results.csv").read_text() == (root / "one" / "results.csv").read_text()


@pytest.mark.e2e
def test_training_logs_each_tasks_main_metric_and_the_final_values_equal_mmcl_benchmark(launches):
    root, *_ = launches
    records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = {r["step"]: r for r in records if "benchmark/average" in r}
    assert sorted(evals) == [2, 4]  # every train.eval_every steps, and at the end
    final, one = evals[4], results(root / "one")
    expected = {"benchmark/digits": one["digits_zeroshot_classification"]["metrics"]["acc1"],
                "benchmark/shapes_multilabel":
                    one["shapes_multilabel_zeroshot_classification"]["metrics"]["mean_average_precision"],
                "benchmark/digits_captions": one["digits_captions_zeroshot_retrieval"]["metrics"]["mean_recall@1"],
                "benchmark/digits/linear_probe_3shot": one["digits_linear_probe_3shot"]["metrics"]["acc1"]}
    print(f"step 4 in training: { {k: final[k] for k in expected} }\nmmcl benchmark on run/: {expected}")
    for key, value in expected.items():
        assert final[key] == pytest.approx(value, abs=1e-6), key
    assert final["benchmark/average"] == pytest.approx(sum(expected.values()) / 4, abs=1e-6)
