"""log.wandb: the config keys, the one-sentence error without the package, the redacted config W&B
receives, and W&B's history against metrics.jsonl across a stop and a kill (real wandb, offline:
the runs are read back from W&B's own files, tests/wandb_history.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmcl.coerce import ConfigError
from mmcl.config import from_dict, save_config
from mmcl.engine.metrics_log import MetricsLog
from mmcl.engine.tracking import MISSING, PLOT_KEY, RUN_ID_KEY, start_tracker
from wandb_history import OfflineRun, max_difference, merged_by_step

pytest.importorskip("wandb")
REPO = Path(__file__).resolve().parents[2]
SECRET_USER, SECRET_SIG, SECRET_ENV = "tok3nInTheUrl", "sig5ecret", "hf_envSecretValue123"


def raw_config(tmp_path: Path, **wandb) -> dict:
    (tmp_path / "tokenizer").mkdir(exist_ok=True)
    return {"model": {"image": {"config": {"model_type": "vit"}},
                      "text": {"config": {"model_type": "bert"}, "tokenizer": str(tmp_path / "tokenizer")}},
            "output_dir": str(tmp_path / "run"),
            **({"log": {"wandb": wandb}} if wandb else {})}


def test_log_wandb_keys_and_their_defaults(tmp_path):
    assert from_dict(raw_config(tmp_path)).log.wandb is None
    settings = from_dict(raw_config(tmp_path, project="clip", entity="me", name="r1", tags=["a", "b"], mode="offline",
                                    dir=str(tmp_path / "w"))).log.wandb
    assert (settings.project, settings.entity, settings.name, settings.tags, settings.mode, settings.dir) == (
        "clip", "me", "r1", ["a", "b"], "offline", str(tmp_path / "w"))
    defaults = from_dict(raw_config(tmp_path, mode="offline")).log.wandb
    assert (defaults.project, defaults.entity, defaults.name, defaults.tags, defaults.dir) == ("mmcl", None, None, [], None)
    with pytest.raises(ConfigError, match=r"'log.wandb.mode' must be one of online, offline, disabled, got 'ofline'"):
        from_dict(raw_config(tmp_path, mode="ofline"))
    with pytest.raises(ConfigError, match=r"unknown key 'log.wandb.projet' — did you mean 'log.wandb.project'\?"):
        from_dict(raw_config(tmp_path, projet="x"))


def test_missing_wandb_package_is_one_sentence_before_torch_loads(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw_config(tmp_path, mode="offline")))
    probe = ("import sys; sys.modules['wandb'] = None\n"  # what Python does for a package that is not installed
             "from mmcl.engine.cli import main\n"
             "try:\n    main(['--config', sys.argv[1]])\n"
             "except SystemExit as stop:\n    print('torch' in sys.modules, stop.code)")
    result = subprocess.run([sys.executable, "-c", probe, str(config)], capture_output=True, text=True, cwd=REPO,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, timeout=120)
    assert result.stdout.split() == ["False", "2"], result.stdout + result.stderr
    assert result.stderr == f"mmcl: error: {config}: {MISSING}\n"
    assert "pip install wandb" in MISSING and MISSING.count(". ") == 0  # one sentence
    # a disabled log.wandb needs no package
    config.write_text(yaml.safe_dump(raw_config(tmp_path, mode="disabled")))
    from mmcl.engine.tracking import check_available

    check_available(from_dict(raw_config(tmp_path, mode="disabled")))


def test_config_sent_to_wandb_is_redacted_exactly_as_config_yaml(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET_ENV)
    monkeypatch.setattr(sys, "argv", ["train.py", f"data.train_shards=https://me:{SECRET_USER}@host/d.tar"])
    raw = raw_config(tmp_path, mode="offline", tags=["redaction"])
    raw["data"] = {"train_shards": f"https://me:{SECRET_USER}@host/d/{{00000..00003}}.tar?sig={SECRET_SIG}",
                   "val_shards": f"pipe:curl -s -H 'Authorization: Bearer {SECRET_ENV}' https://host/v.tar"}
    cfg = from_dict(raw)
    save_config(cfg, tmp_path / "config.yaml")
    tracker = start_tracker(cfg)
    tracker.log({"step": 1, "samples": 8, "time": 0.5, "loss": 2.0})
    tracker.finish()

    run = OfflineRun(tmp_path / "run" / "wandb")
    assert run.config() == yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert run.config()["data"]["train_shards"] == "https://***@host/d/{00000..00003}.tar?sig=***"
    assert run.config()["data"]["val_shards"] == "pipe:curl -s -H 'Authorization: Bearer $HF_TOKEN' https://host/v.tar"
    assert list(run.run_records()[0].tags) == ["redaction"]
    leaks = [f"{p}: {s}" for p in (tmp_path / "run").rglob("*") if p.is_file()
             for s in (SECRET_USER, SECRET_SIG, SECRET_ENV) if s.encode() in p.read_bytes()]
    assert leaks == []


def _segment(cfg, run_dir: Path, steps: range, checkpoint: int, seed: float, evaluate_at: int | None = None) -> str:
    """One launch as TrainingLog drives it: resume at `checkpoint` (the W&B id from its layout), write
    `steps` (loss a function of the step alone, as an exact resume gives; time/throughput the launch's own)."""
    layout = json.loads((run_dir / "layout.json").read_text()) if (run_dir / "layout.json").is_file() else {}
    log = MetricsLog(run_dir)
    logged = log.records()
    log.truncate_after(checkpoint)
    log.tracker = start_tracker(cfg, layout.get(RUN_ID_KEY), max((r["step"] for r in logged), default=0))
    for step in steps:
        log.write(step, {"loss": 1.0 / step, "lr/towers": 1e-3 * step, "samples_per_s": seed + step,
                         "time/data_s": seed / step}, samples=8 * step)
        if step == evaluate_at:
            log.write(step, {"zeroshot/acc1": 0.25, "retrieval/mean_r1": 0.5}, samples=8 * step)
    (run_dir / "layout.json").write_text(json.dumps({RUN_ID_KEY: log.tracker.run_id}))
    log.tracker.finish(run_dir / "training.png" if (run_dir / "training.png").is_file() else None, steps[-1])
    return log.tracker.run_id


def test_history_equals_metrics_jsonl_after_a_stop_and_keeps_the_killed_launchs_rows_after_a_kill(tmp_path):
    """Launch 1 stops at its checkpoint (step 4); launch 2 checkpoints at 6 and is killed after
    logging 8; launch 3 resumes at 6. One W&B run id; its history has every metrics.jsonl step with
    equal values, except steps 7-8, which W&B keeps from the killed launch (same losses, its timings)."""
    import matplotlib

    matplotlib.use("Agg")
    from mmcl.engine.metrics_log import plot_history

    cfg = from_dict(raw_config(tmp_path, mode="offline"))
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True)
    ids = [_segment(cfg, run_dir, range(1, 5), 0, seed=100.0, evaluate_at=4)]
    ids.append(_segment(cfg, run_dir, range(5, 9), 4, seed=200.0, evaluate_at=6))
    plot_history(MetricsLog(run_dir).records(), run_dir / "training.png")
    ids.append(_segment(cfg, run_dir, range(7, 11), 6, seed=300.0, evaluate_at=10))
    assert len(set(ids)) == 1

    run = OfflineRun(run_dir / "wandb")
    assert run.run_id == ids[0] and len(run.files) == 3
    history = run.history()
    plot = history[-1].pop(PLOT_KEY)
    assert plot["_type"] == "image-file" and history[-1]["step"] == 10
    assert [row["step"] for row in history] == list(range(1, 11))
    expected = merged_by_step(MetricsLog(run_dir).records())
    got = {row["step"]: row for row in history}
    assert sorted(expected) == sorted(got)
    exact = [step for step in expected if step not in (7, 8)]
    assert max(max_difference(got[s], expected[s]) for s in exact) == 0.0
    for step in (7, 8):  # the killed launch's rows: the same loss, LR and samples; its own timings
        assert {k: got[step][k] for k in ("loss", "lr/towers", "samples")} == {k: expected[step][k] for k in ("loss", "lr/towers", "samples")}
        assert got[step]["samples_per_s"] == 200.0 + step and expected[step]["samples_per_s"] == 300.0 + step
    assert got[4]["zeroshot/acc1"] == 0.25 and got[4]["loss"] == 0.25  # evaluation and training merged into one row


@pytest.fixture(autouse=True)
def no_inherited_service():
    """The detached W&B service a tracker starts is this process's alone: WANDB_SERVICE is not left behind."""
    import os

    yield
    assert "WANDB_SERVICE" not in os.environ


def test_a_failing_wandb_never_stops_the_training_it_is_said_once(tmp_path, capsys):
    cfg = from_dict(raw_config(tmp_path, mode="offline"))
    log = MetricsLog(tmp_path / "run")
    log.tracker = start_tracker(cfg)
    log.write(1, {"loss": 1.0}, samples=8)
    log.tracker.wandb_run.finish()  # W&B gone under the tracker (as when its service is killed)
    for step in (2, 3):
        log.write(step, {"loss": 1.0 / step}, samples=8 * step)
    log.tracker.finish()
    assert [r["step"] for r in log.records()] == [1, 2, 3] and log.tracker.failed
    said = [line for line in capsys.readouterr().out.splitlines() if "W&B" in line]
    assert len(said) == 1 and said[0].startswith("[mmcl] W&B stopped taking this run's records (UsageError: ")
    assert said[0].endswith("; metrics.jsonl and TensorBoard go on")


def test_wandb_switched_on_at_a_resume_gets_the_earlier_records_first_and_its_id_goes_into_the_layout(tmp_path):
    from mmcl.engine.run import Run
    from mmcl.engine.tracking import tracker_for_run

    cfg = from_dict(raw_config(tmp_path, mode="offline"))
    log = MetricsLog(cfg.output_dir)
    Path(cfg.output_dir).mkdir(parents=True)
    for step in range(1, 5):  # the launch before, without log.wandb
        log.write(step, {"loss": 1.0 / step}, samples=8 * step)
    run = Run(cfg, engine=None, task=None, optimizer=None, tokenizer=None, loader=None, total_steps=6, feature_cache=False,
              layout={"world_size": 2}, resume_from=(Path(cfg.output_dir) / "checkpoints", "step_00000004"),
              saved_layout={"world_size": 2, "step": 4}, layout_changes=[], step=4)
    logged = log.records()
    log.truncate_after(4)
    log.tracker = tracker_for_run(run, logged, log.records())
    for step in (5, 6):
        log.write(step, {"loss": 1.0 / step}, samples=8 * step)
    log.tracker.finish()
    assert run.layout == {"world_size": 2, RUN_ID_KEY: log.tracker.run_id}
    history = OfflineRun(Path(cfg.output_dir) / "wandb").history()
    assert history == list(merged_by_step(log.records()).values())
