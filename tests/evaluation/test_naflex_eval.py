"""mmcl's evaluation commands read a SigLIP 2 NaFlex model directory: each image at its own aspect ratio as
patches at data.naflex.max_num_patches, so zero-shot and retrieval equal plain transformers (the export's
AutoModel + AutoProcessor) on the same images, and kNN runs on the same features."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from siglip2_source import write_siglip2_source

from mmcl.evaluation.cli import knn_main, retrieval_main, zeroshot_main

SIZES = [(40, 16), (16, 40), (32, 32), (90, 20), (24, 56), (48, 30)]
CLASSNAMES = ["cat", "dog", "tree", "car"]
TEMPLATE = "a photo of the {}"
COMMON = ["--device", "cpu", "--workers", "0", "--batch-size", "5"]


def images() -> list[Image.Image]:
    return [Image.fromarray(np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8))
            for i, (w, h) in enumerate(SIZES * 2)]


def caption(i: int) -> str:
    """A distinct caption per image (equal captions would tie in the retrieval ranking)."""
    return f"picture {i} of a {CLASSNAMES[i % len(CLASSNAMES)]}"


@pytest.fixture(scope="module")
def naflex_model(tmp_path_factory):
    """(root, model dir, export) of a model started from a tiny random Siglip2Model, and labelled, captioned shards."""
    from mmcl.config import from_dict
    from mmcl.export import export_model
    from mmcl.model_dir import save_model_dir
    from mmcl.models import build_tokenizer
    from mmcl.pretrained import build_model

    root = tmp_path_factory.mktemp("naflex_eval")
    write_siglip2_source(root / "source")
    cfg = from_dict({"model": {"init_from": str(root / "source")}, "objectives": {"siglip": 1.0}})
    model, tokenizer = build_model(cfg.model).eval(), build_tokenizer(cfg.model.text)
    save_model_dir(model, cfg, tokenizer, root / "model")
    export_model(model, cfg, tokenizer, root / "export")
    (root / "shards").mkdir()
    for number, start in enumerate((0, 7)):
        with tarfile.open(root / "shards" / f"{number:05d}.tar", "w") as tar:
            for i, picture in list(enumerate(images()))[start:start + 7]:
                out = io.BytesIO()
                picture.save(out, "PNG")
                label = i % len(CLASSNAMES)
                for ext, data in (("png", out.getvalue()), ("cls", str(label).encode()),
                                  ("txt", caption(i).encode())):
                    info = tarfile.TarInfo(f"{i:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (root / "shards" / "classnames.txt").write_text("\n".join(CLASSNAMES))
    (root / "shards" / "templates.json").write_text(json.dumps([TEMPLATE]))
    return root


def transformers_features(export, texts):
    """(image features [N, D], text features [T, D], logit scale, bias) from plain transformers, normalised."""
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(str(export)).eval()
    inputs = AutoProcessor.from_pretrained(str(export))(images=images(), text=texts, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    return (F.normalize(out.image_embeds, dim=-1), F.normalize(out.text_embeds, dim=-1),
            model.logit_scale.exp().item(), model.logit_bias.item())


def test_naflex_eval_model_logits_and_top1_equal_plain_transformers(naflex_model):
    from mmcl.evaluation.data import build_eval_loader
    from mmcl.evaluation.features import extract_features
    from mmcl.evaluation.loading import load_eval_model

    model = load_eval_model(str(naflex_model / "model"))
    loader = build_eval_loader(str(naflex_model / "shards"), model.transform, batch_size=5)
    ours = extract_features(loader, model.encode_image)["features"]
    prompts = [TEMPLATE.format(name) for name in CLASSNAMES]
    theirs_image, theirs_text, scale, bias = transformers_features(naflex_model / "export", prompts)
    assert ours.shape == theirs_image.shape == (12, theirs_text.shape[1])
    torch.testing.assert_close(ours, theirs_image, atol=1e-5, rtol=0)
    logits = scale * ours @ model.encode_text(prompts).T + bias
    expected = scale * theirs_image @ theirs_text.T + bias
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))


def test_mmcl_zeroshot_and_retrieval_on_a_naflex_model_equal_plain_transformers(naflex_model, tmp_path):
    from mmcl.evaluation.retrieval import retrieval_metrics

    prompts = [TEMPLATE.format(name) for name in CLASSNAMES]
    theirs_image, theirs_text, _, _ = transformers_features(naflex_model / "export", prompts)
    labels = torch.arange(12) % len(CLASSNAMES)
    predicted = (theirs_image @ theirs_text.T).argmax(-1)
    confusion = torch.zeros(4, 4, dtype=torch.long).index_put_((labels, predicted), torch.tensor(1), accumulate=True)
    model = ["--model", str(naflex_model / "model"), *COMMON, "--data", str(naflex_model / "shards")]
    assert zeroshot_main([*model, "--output", str(tmp_path / "zs.json"), "--confusion"]) == 0
    metrics = json.loads((tmp_path / "zs.json").read_text())["metrics"]
    assert metrics["confusion_matrix"] == confusion.tolist()
    assert metrics["acc1"] == pytest.approx((predicted == labels).float().mean().item(), abs=1e-9)

    assert retrieval_main([*model, "--output", str(tmp_path / "rt.json")]) == 0
    ours = json.loads((tmp_path / "rt.json").read_text())["metrics"]
    theirs_image, theirs_captions, _, _ = transformers_features(naflex_model / "export", [caption(i) for i in range(12)])
    expected = retrieval_metrics(theirs_image, theirs_captions, torch.arange(12))
    assert ours == pytest.approx(expected, abs=1e-9)


def test_mmcl_knn_reads_a_naflex_model_and_finds_each_image_itself(naflex_model, tmp_path):
    shards = str(naflex_model / "shards")
    assert knn_main(["--model", str(naflex_model / "model"), *COMMON, "--train-data", shards, "--test-data", shards,
                     "--k", "1", "--output", str(tmp_path / "knn.json")]) == 0
    result = json.loads((tmp_path / "knn.json").read_text())
    assert result["num_train"] == 12 and result["metrics"]["acc1"] == 1.0
