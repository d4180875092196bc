"""No credential of a shard string leaves with the model: config.yaml, the card, mmcl_config.yaml."""
from __future__ import annotations

from pathlib import Path

import yaml
from export_helpers import build, run_config, write_run

from mmcl.config import load_config, save_config
from mmcl.export import export_run
from mmcl.export.card import front_matter_of

TRAIN = "https://reader:pw-Secret1-a8f3@cdn.example/laion400m/train/{00000..00009}.tar?token=tok-Secret2-77c1&exp=1767"
RETRIEVAL = 'pipe:curl -s -H "Authorization: Bearer bearer-Secret3-e5d0" https://cdn.example/coco/val/{00000..00001}.tar'
SECRETS = ("pw-Secret1-a8f3", "tok-Secret2-77c1", "bearer-Secret3-e5d0")


def files_holding(folder: Path, secrets=SECRETS) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and any(s.encode() in p.read_bytes() for s in secrets)]


def test_save_config_redacts_shard_credentials_and_keeps_the_rest(tokenizer_dir, tmp_path):
    config = run_config(tokenizer_dir)
    config.data.train_shards, config.eval.retrieval_shards = TRAIN, RETRIEVAL
    save_config(config, tmp_path / "config.yaml")

    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["data"]["train_shards"] == "https://***@cdn.example/laion400m/train/{00000..00009}.tar?token=***&exp=***"
    assert saved["eval"]["retrieval_shards"] == 'pipe:curl -s -H "Authorization: ***" https://cdn.example/coco/val/{00000..00001}.tar'
    assert files_holding(tmp_path) == []
    reloaded = load_config(tmp_path / "config.yaml")
    assert reloaded.model == config.model and reloaded.optim == config.optim  # everything else round-trips


def test_export_of_a_run_whose_config_holds_credentials_carries_none(tokenizer_dir, tmp_path):
    config = run_config(tokenizer_dir, text_pooling="pooler_output")
    model, tokenizer = build(config)
    run = write_run(tmp_path / "run", config, model, tokenizer,
                    metrics={"retrieval/image_retrieval_recall@1": 0.5, "steps": 3, "samples_seen": 96, "skipped": {}})
    raw = yaml.safe_load((run / "config.yaml").read_text())  # as an mmcl before redaction wrote it
    raw["data"]["train_shards"], raw["eval"]["retrieval_shards"] = TRAIN, RETRIEVAL
    (run / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))

    out = export_run(run, tmp_path / "export")

    assert files_holding(out) == []
    card = (out / "README.md").read_text()
    assert "Data: `https://***@cdn.example/laion400m/train/{00000..00009}.tar?token=***&exp=***` (10 shards" in card
    assert 'retrieval on `pipe:curl -s -H "Authorization: ***" https://cdn.example/coco/val/{00000..00001}.tar`' in card
    front = front_matter_of(card)
    assert front["datasets"] == ["laion400m"]  # the path's name, not the host or the credentials
    assert front["model-index"][0]["results"][0]["dataset"]["name"] == "coco"
    copied = yaml.safe_load((out / "mmcl_config.yaml").read_text())
    assert copied["data"]["train_shards"] == "https://***@cdn.example/laion400m/train/{00000..00009}.tar?token=***&exp=***"
