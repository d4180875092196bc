"""`mmcl benchmark` on tiny datasets in CLIP_benchmark's WebDataset layout (real digits and shapes, real tar
shards) with a tiny mmcl model: equal to `clip_benchmark eval` 1.6.2 on the model's OpenCLIP-format export for
every task both run, its output files, the rerun that finishes only the missing tasks, `compare`, and the
one-sentence user errors. One `mmcl benchmark` run and two `clip_benchmark` subprocesses for the module."""
from __future__ import annotations

import csv
import json
import re
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmark_fixtures import TASK_LIST, tiny_model, write_suite, write_tokenizer
from mmcl.cli import main

CLIP_BENCHMARK_CLI = Path(__file__).resolve().parents[1] / "export" / "clip_benchmark_cli.py"
COMPARED = {"wds/digits": "digits_zeroshot_classification", "wds/shapes_multilabel": "shapes_multilabel_zeroshot_classification",
            "wds/digits_captions": "digits_captions_zeroshot_retrieval"}


def benchmark_argv(model: Path, root: Path, tasks: Path | str, out: Path) -> list[str]:
    return ["benchmark", "--model", str(model), "--root", str(root), "--tasks", str(tasks), "--out", str(out),
            "--batch-size", "16", "--workers", "0", "--device", "cpu"]


def clip_benchmark(export: Path, root: Path, out: Path, datasets: list[str], task: str) -> None:
    """`clip_benchmark eval` (through the NumPy >= 2.4 wrapper of tests/export) in float32 on `datasets`."""
    command = [sys.executable, str(CLIP_BENCHMARK_CLI), "eval", "--model_type", "open_clip", "--model", f"local-dir:{export}",
               "--pretrained", "none", "--dataset", *datasets, "--dataset_root", str(root / "wds_{dataset_cleaned}"),
               "--task", task, "--recall_k", "1", "5", "10", "--batch_size", "16", "--num_workers", "0",
               "--output", str(out / "{dataset}_{task}.json"), "--no_amp", "--quiet"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmark")
    data = write_suite(root / "data")
    run = tiny_model(write_tokenizer(root / "tokenizer"), root / "run")
    (root / "tasks.yaml").write_text(TASK_LIST)
    assert main(benchmark_argv(run, data, root / "tasks.yaml", root / "out")) == 0
    assert main(["export", "--run", str(run), "--out", str(root / "openclip"), "--format", "openclip"]) == 0
    (root / "clip_benchmark").mkdir()
    clip_benchmark(root / "openclip", data, root / "clip_benchmark", ["wds/digits", "wds/shapes_multilabel"],
                   "zeroshot_classification")
    clip_benchmark(root / "openclip", data, root / "clip_benchmark", ["wds/digits_captions"], "zeroshot_retrieval")
    return root


def result(folder: Path, stem: str) -> dict:
    return json.loads((folder / f"{stem}.json").read_text())


@pytest.mark.parametrize("dataset", sorted(COMPARED))
def test_mmcl_benchmark_equals_clip_benchmark_on_the_openclip_export(suite, dataset):
    """Same metrics, key for key (CLIP_benchmark writes float32 values: 1e-6 is far below one sample in 24)."""
    theirs = result(suite / "clip_benchmark", COMPARED[dataset])["metrics"]
    ours = result(suite / "out", COMPARED[dataset])["metrics"]
    print(f"\n{dataset}: CLIP_benchmark {theirs}\n{dataset}: mmcl benchmark {ours}")
    compared = [k for k, v in theirs.items() if not math.isnan(v)]  # acc5 is NaN below 5 classes there, absent here
    assert compared and set(compared) <= set(ours)
    for key in compared:
        assert ours[key] == pytest.approx(theirs[key], abs=1e-6), key
    if dataset == "wds/digits_captions":
        assert ours["mean_recall@1"] == pytest.approx((ours["image_retrieval_recall@1"] + ours["text_retrieval_recall@1"]) / 2)


def test_each_task_writes_a_clip_benchmark_json_and_the_suite_table_counts_the_tasks_present(suite):
    out = suite / "out"
    digits = result(out, "digits_zeroshot_classification")
    assert {"dataset", "model", "pretrained", "task", "metrics", "language"} <= set(digits)
    assert (digits["dataset"], digits["task"], digits["language"]) == ("wds/digits", "zeroshot_classification", "en")
    assert digits["mmcl"]["num_samples"] == 40 and digits["mmcl"]["main_metric"] == "acc1"
    probe = result(out, "digits_linear_probe_3shot")
    assert probe["mmcl"]["num_train"] == 30 and probe["mmcl"]["num_test"] == 40  # 3 shots x 10 classes
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["dataset"] for r in rows] == ["wds/digits", "wds/shapes_multilabel", "wds/digits_captions", "wds/digits",
                                            "wds/not_downloaded", ""]
    values = [float(r["value"]) for r in rows[:4]]
    assert values[0] == digits["metrics"]["acc1"] and values[3] == probe["metrics"]["acc1"]
    assert rows[4]["value"] == "" and rows[4]["status"] == "not present locally"
    assert float(rows[5]["value"]) == pytest.approx(sum(values) / 4) and rows[5]["status"] == "4 of 5 tasks"
    assert "over 4 of 5 tasks" in (out / "results.md").read_text()
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*tmp*"))  # the atomic writes left no temporary file


def test_a_rerun_runs_only_the_tasks_whose_result_is_missing_or_from_other_weights(suite, tmp_path, capsys):
    """A partial output (as a kill between tasks leaves it): the retrieval result gone, the multi-label one written
    for other weights. The rerun scores those two only, keeps the others byte for byte, and the figures come back."""
    out = tmp_path / "out"
    shutil.copytree(suite / "out", out)
    kept = {name: (out / name).read_bytes() for name in ("digits_zeroshot_classification.json", "digits_linear_probe_3shot.json")}
    (out / "digits_captions_zeroshot_retrieval.json").unlink()
    (out / ".digits_captions_zeroshot_retrieval.json.tmp4242").write_text('{"dataset": "wds/digi')  # cut by the kill
    (out / "results.md").unlink()
    stale = json.loads((out / "shapes_multilabel_zeroshot_classification.json").read_text())
    stale["mmcl"]["model_sha256"] = "0" * 64
    (out / "shapes_multilabel_zeroshot_classification.json").write_text(json.dumps(stale))
    capsys.readouterr()
    assert main(benchmark_argv(suite / "run", suite / "data", suite / "tasks.yaml", out)) == 0
    printed = capsys.readouterr().out
    ran = [m.group(1) for m in re.finditer(r"^\[\d+/\d+\] ([^:]+):", printed, flags=re.M)]
    assert ran == ["wds/shapes_multilabel zeroshot_classification", "wds/digits_captions zeroshot_retrieval"], printed
    assert "4 of 5 tasks present" in printed and "2 already done, 2 to run" in printed
    assert {name: (out / name).read_bytes() for name in kept} == kept
    for stem in ("digits_captions_zeroshot_retrieval", "shapes_multilabel_zeroshot_classification"):
        assert result(out, stem)["metrics"] == result(suite / "out", stem)["metrics"]
    assert (out / "results.md").read_text() == (suite / "out" / "results.md").read_text()
    assert not list(out.glob(".*tmp*"))  # the interrupted write's leftover is removed (mmcl's own file)


def test_compare_prints_each_tasks_delta_and_the_average_over_common_tasks(suite, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(suite / "out", other)
    changed = json.loads((other / "digits_zeroshot_classification.json").read_text())
    before = changed["metrics"]["acc1"]
    changed["metrics"]["acc1"] = before + 0.25
    (other / "digits_zeroshot_classification.json").write_text(json.dumps(changed))
    capsys.readouterr()
    assert main(["benchmark", "compare", str(suite / "out"), str(other)]) == 0
    table = capsys.readouterr().out
    digits = next(line for line in table.splitlines() if line.startswith("Digits "))
    assert f"{before:.4f}" in digits and f"{before + 0.25:.4f} (+0.2500)" in digits
    average = next(line for line in table.splitlines() if line.startswith("average"))
    assert "4 common tasks" in average and "(+0.0625)" in average
    assert "(+0.0000)" in next(line for line in table.splitlines() if line.startswith("shapes_multilabel"))


def test_out_that_mmcl_did_not_write_is_refused_in_one_sentence_before_the_model_loads(suite, tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(benchmark_argv(tmp_path / "no-such-model", suite / "data", "datacomp", foreign)) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("mmcl: error: --out") and "did not write" in error and error.count("\n") == 0
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("entry, words", [
    ("- dataset: wds/cifar10\n  task: zeroshot\n", "'task' must be one of"),
    ("- dataset: wds/cifar10\n  task: zeroshot_classification\n  shots: 5\n", "only for linear_probe"),
    ("- dataset: wds/cifar10\n  task: linear_probe\n  metric: acc1\n", "unknown key 'metric'"),
    ("- {dataset: wds/a, task: zeroshot_retrieval}\n- {dataset: wds/a, task: zeroshot_retrieval}\n", "the same task"),
    ("dataset: wds/cifar10\n", "non-empty YAML list"),
])
def test_a_bad_task_list_is_one_sentence(entry, words, tmp_path, capsys):
    (tmp_path / "tasks.yaml").write_text(entry)
    assert main(benchmark_argv(tmp_path, tmp_path, tmp_path / "tasks.yaml", tmp_path / "out")) == 2
    error = capsys.readouterr().err.strip()
    assert words in error and error.count("\n") == 0 and not (tmp_path / "out").exists()


def test_builtin_lists_hold_datacomps_38_tasks_with_its_main_metrics_and_clip_benchmarks_suite():
    from mmcl.evaluation.benchmark_tasks import load_task_list

    _, datacomp = load_task_list("datacomp")
    assert len(datacomp) == 38
    metric = {t.name: t.main_metric for t in datacomp}
    assert {n for n, m in metric.items() if m == "mean_per_class_recall"} == {
        "Caltech-101", "FGVC Aircraft", "Oxford Flowers-102", "Oxford-IIIT Pet"}
    assert {n for n, m in metric.items() if m == "mean_recall@1"} == {"Flickr", "MSCOCO"}
    assert metric["iWildCam"] == "F1-macro_all" and metric["ImageNet 1k"] == "acc1"
    _, clip = load_task_list("clip_benchmark")
    assert len(clip) == 40 and {t.task for t in clip} == {"zeroshot_classification", "zeroshot_retrieval"}
    assert {t.dataset for t in clip} >= {"wds/imagenet1k", "wds/vtab/svhn", "wds/renderedsst2", "wds/mscoco_captions"}
    assert next(t for t in clip if t.dataset == "wds/flickr30k").main_metric == "image_retrieval_recall@5"


def test_dataset_folders_are_found_by_clip_benchmarks_and_datacomps_names(tmp_path):
    from mmcl.evaluation.benchmark_tasks import Task, dataset_folder

    (tmp_path / "wds_vtab-caltech101_test" / "test").mkdir(parents=True)  # DataComp's download folder
    (tmp_path / "wds_cifar10" / "test").mkdir(parents=True)  # CLIP_benchmark's
    task = Task("wds/vtab/caltech101", "zeroshot_classification", "mean_per_class_recall", "Caltech-101")
    assert dataset_folder(tmp_path, task) == tmp_path / "wds_vtab-caltech101_test"
    assert dataset_folder(tmp_path, Task("wds/cifar10", "zeroshot_classification", "acc1", "c")) == tmp_path / "wds_cifar10"
    assert dataset_folder(tmp_path, Task("wds/mnist", "zeroshot_classification", "acc1", "m")) is None


def test_a_missing_model_is_one_sentence(suite, tmp_path, capsys):
    assert main(benchmark_argv(tmp_path / "no-such-model", suite / "data", suite / "tasks.yaml", tmp_path / "out")) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("mmcl: error: --model") and "does not exist" in error and error.count("\n") == 0


def test_a_dataset_folder_that_cannot_serve_its_task_is_listed_as_not_scored_and_the_rest_runs(suite, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(suite / "data" / "wds_digits", root / "wds_digits")
    shutil.copytree(suite / "data" / "wds_digits", root / "wds_nameless")
    (root / "wds_nameless" / "classnames.txt").unlink()
    (tmp_path / "tasks.yaml").write_text("- {dataset: wds/nameless, task: zeroshot_classification}\n"
                                         "- {dataset: wds/digits, task: zeroshot_classification}\n")
    assert main(benchmark_argv(suite / "run", root, tmp_path / "tasks.yaml", tmp_path / "out")) == 0
    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
    assert rows[0]["value"] == "" and rows[0]["status"].startswith("not scored:") and "classnames.txt" in rows[0]["status"]
    assert float(rows[1]["value"]) == result(suite / "out", "digits_zeroshot_classification")["metrics"]["acc1"]
    assert rows[2]["status"] == "1 of 2 tasks"
    assert result(tmp_path / "out", "digits_zeroshot_classification")["model"] == "run"  # the run's name


def test_mmcls_own_shard_folders_score_as_mmcl_zeroshot_and_mmcl_retrieval_score_them(suite, tmp_path):
    """A folder of mmcl shards (img2dataset layout: .cls, or .txt with a JSON list of captions, classnames.txt
    beside) is a dataset too: the same figures as the one-dataset commands on the same shards."""
    from eval_helpers import CLASSNAMES, caption_samples, classification_samples, write_shards

    from mmcl.evaluation.cli import run_retrieval, run_zeroshot

    write_shards(tmp_path / "data" / "colours", classification_samples(18), per_shard=9)
    (tmp_path / "data" / "colours" / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
    write_shards(tmp_path / "data" / "captions", caption_samples(12), per_shard=6)
    (tmp_path / "tasks.yaml").write_text("- {dataset: colours, task: zeroshot_classification}\n"
                                         "- {dataset: captions, task: zeroshot_retrieval}\n")
    assert main(benchmark_argv(suite / "run", tmp_path / "data", tmp_path / "tasks.yaml", tmp_path / "out")) == 0
    common = ["--model", str(suite / "run" / "model"), "--device", "cpu", "--workers", "0", "--batch-size", "16"]
    zeroshot = run_zeroshot([*common, "--data", str(tmp_path / "data" / "colours")])
    retrieval = run_retrieval([*common, "--data", str(tmp_path / "data" / "captions")])
    assert result(tmp_path / "out", "colours_zeroshot_classification")["metrics"] == zeroshot["metrics"]
    ours = result(tmp_path / "out", "captions_zeroshot_retrieval")
    assert ours["mmcl"]["num_captions"] == retrieval["num_captions"] == 20  # 8 images with two captions, 4 with one
    assert {k: v for k, v in ours["metrics"].items() if k != "mean_recall@1"} == retrieval["metrics"]


def test_the_transformers_export_of_the_model_scores_the_same_on_every_task(suite, tmp_path):
    """An export (read through the loader distillation and `mmcl curate` use) gives the model directory's figures."""
    assert main(["export", "--run", str(suite / "run"), "--out", str(tmp_path / "export")]) == 0
    assert main(benchmark_argv(tmp_path / "export", suite / "data", suite / "tasks.yaml", tmp_path / "out")) == 0
    for stem in [*COMPARED.values(), "digits_linear_probe_3shot"]:
        ours, theirs = result(tmp_path / "out", stem)["metrics"], result(suite / "out", stem)["metrics"]
        assert ours.keys() == theirs.keys() and all(ours[k] == pytest.approx(theirs[k], abs=1e-6) for k in ours), stem


@pytest.mark.parametrize("settings, words", [({"benchmark": "datacomp"}, "go together"),
                                             ({"benchmark": "no-such-list.yaml", "benchmark_root": "."}, "does not exist"),
                                             ({"benchmark": "datacomp", "benchmark_root": "/no/such/root"}, "does not exist")])
def test_eval_benchmark_settings_are_checked_in_one_sentence(settings, words):
    from mmcl.coerce import ConfigError
    from mmcl.evaluation.settings import EvalConfig

    with pytest.raises(ConfigError) as error:
        EvalConfig(**settings).validate("eval", "run.yaml")
    assert words in str(error.value) and "'eval.benchmark" in str(error.value) and str(error.value).count("\n") == 0
