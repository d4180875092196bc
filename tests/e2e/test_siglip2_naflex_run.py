"""A tiny SigLIP 2 NaFlex model on images of mixed aspect ratios (wide, tall, square) through the real
`deepspeed` launcher (2 CPU ranks, gloo) under ZeRO 1, 2 and 3, each step at a sequence length drawn from a list
with the micro-batch set by a token budget: it trains with falling loss, a launch resumed
from its middle checkpoint logs the same later losses bit for bit and ends on the same weights, `mmcl export`
of the ZeRO-3 run (from its partitioned checkpoint, and from its model/ folder) writes a Siglip2Model, and plain
transformers (AutoModel + AutoProcessor, and the zero-shot pipeline) gives mmcl's embeddings and predictions.

Six launches in all (one run and one resume per stage), shared by every test here through module fixtures.
The run's settings are in RUN below, in one place, so new data.naflex keys go there. The tokenizer is a
Siglip2Tokenizer (padded on the left, as `mmcl-train-tokenizer --siglip2` makes one) and prompts have 64 tokens,
what the zero-shot pipeline pads SigLIP prompts to: so SigLIP 2's last-position text head reads each caption's
last token, and the tiny model learns the classes in 6 steps.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from launch import NO_EVAL, ZERO_STAGES, deepspeed_command, losses, resume_copy, run, write_config
from PIL import Image
from siglip2_source import siglip2_tokenizer, write_caption_shard, write_class_shard

SIZES = [(40, 16), (16, 40), (32, 32), (64, 24)]  # (width, height): wide, tall, square, very wide
ENCODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
PATCH, MAX_PATCHES, CONTEXT, CLASSES = 8, 16, 64, 8  # 64 tokens: what the zero-shot pipeline pads SigLIP prompts to
STEPS, MIDDLE = 6, 3  # checkpoints at 3 and 6; the resume continues from 3
PROMPT = "a photo of the number {}"
LENGTHS, BUDGET = [4, 9, 16], 32  # per-step sequence lengths and patch tokens per rank and step

# The run, less its paths (filled in by `run_config`): 2 ranks, the token budget sets the batch.
RUN = {
    "model": {"image": {"config": {"model_type": "siglip2_vision_model", "patch_size": PATCH, "num_patches": MAX_PATCHES,
                                   **ENCODER},
                        "projection": "none"},
              "text": {"config": {"model_type": "siglip2_text_model", "vocab_size": 64, "max_position_embeddings": CONTEXT,
                                  "projection_size": 32, **ENCODER},
                       "context_length": CONTEXT, "projection": "none"},
              "embed_dim": 32, "logit_scale_init": 10.0, "logit_bias_init": -10.0},
    "objectives": {"siglip": 1.0},
    # Each step's sequence length drawn from LENGTHS, BUDGET // L images per rank and step (8, 3 or 2).
    "data": {"naflex": {"patch_size": PATCH, "max_num_patches": MAX_PATCHES, "sequence_lengths": LENGTHS,
                        "token_budget": BUDGET},
             "num_workers": 1, "shuffle_buffer": 8, "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
    "optim": {"lr": 2e-3, "warmup_steps": 1},
    "train": {"micro_batch_size": 4, "steps": STEPS, "log_every": 1, "checkpoint_every": MIDDLE},
    "eval": {"batch_size": 5},
    "seed": 0,
}


def image(i: int) -> Image.Image:
    """Sample i: one of 8 random pictures (class i % 8), at one of the 4 sizes."""
    w, h = SIZES[i % 4]
    return Image.fromarray(np.random.default_rng(i % CLASSES).integers(0, 256, (h, w, 3), dtype=np.uint8))


def run_config(root, output_dir) -> dict:
    config = copy.deepcopy(RUN)
    config["model"]["text"]["tokenizer"] = str(root / "tokenizer")
    config["data"]["train_shards"] = str(root / "train" / "00000.tar")
    config["eval"]["zeroshot_shards"] = str(root / "eval" / "00000.tar")
    config["output_dir"] = str(output_dir)
    return config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """train/ (64 captioned images), eval/ (16 labelled images with class names and the prompt), tokenizer/."""
    root = tmp_path_factory.mktemp("siglip2_naflex")
    (root / "train").mkdir()
    write_caption_shard(root / "train", [image(i) for i in range(64)], [PROMPT.format(i % CLASSES) for i in range(64)])
    (root / "eval").mkdir()
    write_class_shard(root / "eval", [image(i) for i in range(16)], [i % CLASSES for i in range(16)])
    (root / "eval" / "classnames.txt").write_text("\n".join(str(n) for n in range(CLASSES)))
    (root / "eval" / "templates.json").write_text(json.dumps([PROMPT]))
    siglip2_tokenizer(CONTEXT).save_pretrained(str(root / "tokenizer"))
    return root


@pytest.fixture(scope="module")
def runs(data):
    """stage -> (run dir, resumed run dir): a 6-step run per ZeRO stage (checkpoints at 3 and 6), and a
    launch that resumes it from step 3. Only the ZeRO-3 run evaluates at its end (zero-shot on eval/)."""
    out = {}
    for stage, ds_json in ZERO_STAGES.items():
        reference, resumed = data / f"zero{stage}", data / f"zero{stage}_resumed"
        config = write_config(data / f"zero{stage}.yaml", run_config(data, reference))
        no_eval = () if stage == 3 else NO_EVAL
        result = run(deepspeed_command(config, ds_json, 2, *no_eval))
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        resume_copy(reference, resumed, f"step_{MIDDLE:08d}")
        result = run(deepspeed_command(config, ds_json, 2, f"output_dir={resumed}", "train.resume=latest", *NO_EVAL))
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert f"resumed from {resumed / 'checkpoints' / f'step_{MIDDLE:08d}'}" in result.stdout
        out[stage] = reference, resumed
    return out


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory):
    """kind -> export folder of the ZeRO-3 run: "checkpoint" from its last (partitioned) checkpoint, consolidated
    from the ranks' shards; "model_dir" by `mmcl export --run` (its model/ folder, gathered at the end of training)."""
    from mmcl.cli import main
    from mmcl.export import export_run

    root, run_dir = tmp_path_factory.mktemp("exports"), runs[3][0]
    checkpoint = export_run(run_dir / "checkpoints" / f"step_{STEPS:08d}", root / "checkpoint")
    assert main(["export", "--run", str(run_dir), "--out", str(root / "model_dir")]) == 0
    return {"checkpoint": checkpoint, "model_dir": root / "model_dir"}


@pytest.mark.parametrize("stage", sorted(ZERO_STAGES))
def test_naflex_training_under_zero_stage_lowers_the_loss_and_resume_continues_bit_for_bit(runs, stage):
    from safetensors.torch import load_file

    reference, resumed = runs[stage]
    logged, continued = losses(reference), losses(resumed)
    assert sorted(logged) == list(range(1, STEPS + 1)) and logged[STEPS] < 0.5 * logged[1], logged
    assert sorted(continued) == list(range(MIDDLE + 1, STEPS + 1))
    assert all(continued[step] == logged[step] for step in continued), (continued, logged)
    records = {run_dir: {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                         if "loss" in r} for run_dir in (reference, resumed)}
    lengths = {step: r["sequence_length"] for step, r in records[reference].items()}
    assert set(lengths.values()) <= set(LENGTHS) and len(set(lengths.values())) >= 2, lengths  # drawn per step
    assert all(r["global_batch"] == BUDGET // r["sequence_length"] * 2 for r in records[reference].values())
    assert {s: r["sequence_length"] for s, r in records[resumed].items()} == {s: lengths[s] for s in continued}
    expected, got = (load_file(run_dir / "model" / "model.safetensors") for run_dir in (reference, resumed))
    assert expected.keys() == got.keys()
    assert all(torch.equal(got[name], expected[name]) for name in expected)


def test_zero3_checkpoint_export_equals_the_model_folder_export_as_a_siglip2_model(exports):
    from safetensors.torch import load_file

    for export in exports.values():
        info = json.loads((export / "mmcl_export.json").read_text())
        assert (info["architecture"], info["image"]["exact"], info["text"]["exact"]) == ("Siglip2Model", True, True)
    assert json.loads((exports["checkpoint"] / "mmcl_export.json").read_text())["source"]["kind"] == "checkpoint"
    gathered, consolidated = (load_file(exports[kind] / "model.safetensors") for kind in ("model_dir", "checkpoint"))
    assert gathered.keys() == consolidated.keys()
    assert all(torch.equal(gathered[name], consolidated[name]) for name in gathered)


def mmcl_outputs(run_dir, pictures: list[Image.Image]) -> dict:
    """The run's model/ on `pictures` (patches by mmcl's NaFlex transform) against the class prompts: its
    normalised image_features [N, D], text_features [CLASSES, D] and scaled, biased logits [N, CLASSES]."""
    from mmcl.data.naflex import NaFlexPatchesU8, naflex_batch
    from mmcl.model_dir import load_mmcl_model_dir
    from mmcl.models import tokenize

    model, _, tokenizer = load_mmcl_model_dir(run_dir / "model")
    transform = NaFlexPatchesU8(PATCH, MAX_PATCHES)
    patches = naflex_batch([transform(torch.from_numpy(np.array(p)).permute(2, 0, 1).contiguous()) for p in pictures],
                           [0.5] * 3, [0.5] * 3)
    with torch.no_grad():
        ours = model(**patches, **tokenize(tokenizer, [PROMPT.format(n) for n in range(CLASSES)], CONTEXT))
    ours["logits"] = ours["logit_scale"] * ours["image_features"] @ ours["text_features"].T + ours["logit_bias"]
    return ours


@pytest.mark.parametrize("kind", ["checkpoint", "model_dir"])
def test_plain_transformers_predictions_on_the_zero3_export_equal_mmcls(runs, exports, kind):
    from transformers import AutoModel, AutoProcessor

    pictures, labels = [image(i) for i in range(16)], [PROMPT.format(n) for n in range(CLASSES)]
    ours = mmcl_outputs(runs[3][0], pictures)
    inputs = AutoProcessor.from_pretrained(str(exports[kind]))(images=pictures, text=labels, return_tensors="pt")
    # patch grids (rows, columns) of the wide, tall, square and very wide pictures
    assert sorted({tuple(shape) for shape in inputs["spatial_shapes"].tolist()}) == [(2, 5), (2, 6), (4, 4), (5, 2)]
    with torch.no_grad():
        theirs = AutoModel.from_pretrained(str(exports[kind])).eval()(**inputs)
    torch.testing.assert_close(theirs.logits_per_image, ours["logits"], atol=1e-4, rtol=0)
    assert torch.equal(theirs.logits_per_image.argmax(-1), ours["logits"].argmax(-1))
    assert torch.sigmoid(ours["logits"]).argmax(-1).tolist() == torch.sigmoid(theirs.logits_per_image).argmax(-1).tolist()
    torch.testing.assert_close(F.normalize(theirs.image_embeds, dim=-1), ours["image_features"], atol=1e-5, rtol=0)
    torch.testing.assert_close(F.normalize(theirs.text_embeds, dim=-1), ours["text_features"], atol=1e-5, rtol=0)


def test_in_run_naflex_zeroshot_equals_mmcl_zeroshot_plain_transformers_and_the_pipeline(runs, exports, data, tmp_path):
    from transformers import AutoModel, AutoProcessor, pipeline

    from mmcl.evaluation.cli import zeroshot_main

    run_dir, export = runs[3][0], exports["checkpoint"]
    logged = json.loads((run_dir / "metrics.json").read_text())["zeroshot/acc1"]
    assert zeroshot_main(["--model", str(run_dir / "model"), "--data", str(data / "eval" / "00000.tar"),
                          "--device", "cpu", "--workers", "0", "--output", str(tmp_path / "zs.json")]) == 0
    assert json.loads((tmp_path / "zs.json").read_text())["metrics"]["acc1"] == pytest.approx(logged, abs=1e-9)
    hf = AutoModel.from_pretrained(str(export)).eval()
    prompts = [PROMPT.format(n) for n in range(CLASSES)]
    pictures, truth = [image(i) for i in range(16)], [i % CLASSES for i in range(16)]
    inputs = AutoProcessor.from_pretrained(str(export))(images=pictures, text=prompts, return_tensors="pt")
    with torch.no_grad():
        predicted = hf(**inputs).logits_per_image.argmax(-1).tolist()
    assert logged == pytest.approx(np.mean([p == t for p, t in zip(predicted, truth)]), abs=1e-9)
    assert logged > 1 / CLASSES and len(set(predicted)) > 1  # the model learnt something: equal predictions say a lot
    # the pipeline (64-token prompts for SigLIP: CONTEXT) scores each label with sigmoid(mmcl's logit)
    classifier = pipeline("zero-shot-image-classification", model=str(export))
    ranked = [classifier(p, candidate_labels=[str(n) for n in range(CLASSES)], hypothesis_template=PROMPT)
              for p in pictures]
    assert [int(result[0]["label"]) for result in ranked] == predicted
    scores = torch.tensor([[next(r["score"] for r in result if r["label"] == str(n)) for n in range(CLASSES)]
                           for result in ranked])
    torch.testing.assert_close(scores, torch.sigmoid(mmcl_outputs(run_dir, pictures)["logits"]), atol=1e-5, rtol=0)
