"""A SigLIP 2 NaFlex model exports as a Siglip2Model whose AutoProcessor is mmcl's NaFlex transform:
plain transformers reproduces mmcl's embeddings on images of mixed aspect ratios."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from siglip2_source import CONTEXT, MAX_PATCHES, PATCH, mixed_images, write_siglip2_source

from mmcl.config import from_dict
from mmcl.data.naflex import NaFlexPatchesU8, naflex_batch
from mmcl.engine.sizes import loss_chunk_size
from mmcl.engine.task import TrainingTask
from mmcl.export import export_model, load_exported
from mmcl.models import build_tokenizer, tokenize
from mmcl.pretrained import build_model

SIZES = [(40, 16), (16, 40), (32, 32), (90, 20)]
CAPTIONS = ["a photo of the digit 7", "the number 3", "a tall tree", "a wide car"]


def images() -> list[Image.Image]:
    return mixed_images(SIZES)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A model started from a tiny Siglip2Model, trained 3 steps on NaFlex batches, exported."""
    source = tmp_path_factory.mktemp("siglip2")
    write_siglip2_source(source)
    cfg = from_dict({"model": {"init_from": str(source)}, "objectives": {"siglip": 1.0}})
    model = build_model(cfg.model)
    tokenizer = build_tokenizer(cfg.model.text)
    mean, std = cfg.data.image_mean, cfg.data.image_std
    transform = NaFlexPatchesU8(cfg.data.naflex.patch_size, cfg.data.naflex.max_num_patches)
    tensors = [torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous() for image in images()]
    batch = {**naflex_batch([transform(t) for t in tensors], mean, std), **tokenize(tokenizer, CAPTIONS, CONTEXT)}
    task = TrainingTask(model, cfg.objectives, loss_chunk_size(cfg, 1), cfg)
    optimizer = torch.optim.AdamW(task.parameters(), lr=1e-3)
    for _ in range(3):
        loss = task(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    out = export_model(model, cfg, tokenizer, tmp_path_factory.mktemp("out") / "export")
    return out, model, batch


def test_siglip2_naflex_export_is_a_siglip2_model_that_plain_transformers_reproduces(exported):
    from transformers import AutoModel, AutoProcessor, Siglip2Model

    out, model, batch = exported
    info = json.loads((out / "mmcl_export.json").read_text())
    assert info["architecture"] == "Siglip2Model" and info["image"]["exact"] and info["text"]["exact"]
    assert info["image_transform"]["naflex"] == {"patch_size": PATCH, "max_num_patches": MAX_PATCHES}
    assert info["processor_check"]["processor_max_abs_diff"] <= 1e-5
    hf = AutoModel.from_pretrained(str(out)).eval()
    assert isinstance(hf, Siglip2Model)
    inputs = AutoProcessor.from_pretrained(str(out))(images=images(), text=CAPTIONS, return_tensors="pt")
    for key in ("spatial_shapes", "pixel_attention_mask", "input_ids", "attention_mask"):
        assert torch.equal(inputs[key].long(), batch[key].long()), key
    with torch.no_grad():
        theirs_image = hf.get_image_features(pixel_values=inputs["pixel_values"], spatial_shapes=inputs["spatial_shapes"],
                                             pixel_attention_mask=inputs["pixel_attention_mask"]).pooler_output
        theirs_text = hf.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).pooler_output
        ours_image = model.encode_image(batch["pixel_values"], pixel_attention_mask=batch["pixel_attention_mask"],
                                        spatial_shapes=batch["spatial_shapes"])
        ours_text = model.encode_text(batch["input_ids"], batch["attention_mask"])
        logits = hf(**inputs).logits_per_image
        ours = model(input_ids=batch["input_ids"])
    torch.testing.assert_close(F.normalize(theirs_image, dim=-1), ours_image, atol=1e-5, rtol=0)
    torch.testing.assert_close(F.normalize(theirs_text, dim=-1), ours_text, atol=1e-5, rtol=0)
    expected = ours["logit_scale"] * ours_image @ ours_text.T + ours["logit_bias"]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def test_the_mmcl_loader_reproduces_a_siglip2_export_from_naflex_patches(exported):
    out, model, batch = exported
    loaded = load_exported(out)
    images_in = {key: batch[key] for key in ("pixel_values", "pixel_attention_mask", "spatial_shapes")}
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(**images_in), model.encode_image(**images_in), atol=1e-5, rtol=0)
        torch.testing.assert_close(loaded.encode_text(**loaded.tokenize(CAPTIONS)),
                                   model.encode_text(batch["input_ids"], batch["attention_mask"]), atol=1e-5, rtol=0)


def test_the_model_cards_snippet_runs_with_plain_transformers_on_the_naflex_processor(exported):
    import contextlib
    import io
    import re

    out = exported[0]
    code = re.findall(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S)[0]
    assert "spatial_shapes" in code and "backend" not in code
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.chdir(out):
        exec(compile(code, "README.md", "exec"), {})
    assert "tensor(" in printed.getvalue()
