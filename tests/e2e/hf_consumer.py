"""What whoever downloads an export does, in a fresh process that imports transformers and never mmcl.

    python hf_consumer.py EXPORT_DIR REQUEST.json RESULT.json [EXPORT_DIR REQUEST.json RESULT.json ...]

Several exports in one call share the process start (one import of torch and transformers).

REQUEST.json: {"images": [PNG paths], "texts": [...], "classnames": [...], "template": "a {}."}.
RESULT.json:
  image_embeds, text_embeds   AutoModel + AutoProcessor (PIL backend, the card's padding), unit rows
  pipeline                    the label pipeline("zero-shot-image-classification") ranks first, per image
  snippets                    what each ```python block of the card's README.md printed, run as written inside
                              the export folder
  mmcl_imported               whether anything imported mmcl (it must not)
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import sys
from pathlib import Path


def main(folder: Path, request: dict) -> dict:
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from transformers import AutoModel, AutoProcessor, pipeline

    images = [Image.open(path).convert("RGB") for path in request["images"]]
    model = AutoModel.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder, backend="pil")
    inputs = processor(text=request["texts"], images=images, return_tensors="pt", padding="max_length", truncation=True)
    with torch.no_grad():
        image_embeds = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        text_embeds = model.get_text_features(input_ids=inputs["input_ids"],
                                              attention_mask=inputs["attention_mask"]).pooler_output
    classifier = pipeline("zero-shot-image-classification", model=str(folder))
    ranked = [classifier(image, candidate_labels=request["classnames"], hypothesis_template=request["template"])
              for image in images]
    snippets = []
    card = (folder / "README.md").read_text()
    for code in re.findall(r"```python\n(.*?)```", card, re.S):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), contextlib.chdir(folder):
            exec(compile(code, "README.md", "exec"), {})
        snippets.append(printed.getvalue())
    return {
        "architecture": type(model).__name__,
        "image_embeds": F.normalize(image_embeds, dim=-1).tolist(),
        "text_embeds": F.normalize(text_embeds, dim=-1).tolist(),
        "pipeline": [result[0]["label"] for result in ranked],
        "pipeline_scores": [[r["score"] for r in result] for result in ranked],
        "snippets": snippets,
        "mmcl_imported": any(name == "mmcl" or name.startswith("mmcl.") for name in sys.modules),
    }


if __name__ == "__main__":
    arguments = list(map(Path, sys.argv[1:]))
    for export, request_file, result_file in zip(arguments[0::3], arguments[1::3], arguments[2::3]):
        Path(result_file).write_text(json.dumps(main(export, json.loads(request_file.read_text()))))
