"""The model card (README.md) of an export: Hub metadata, then what a reader needs to use and trust it.

Front matter (YAML): library_name, pipeline_tag, license, tags, datasets and a model-index
with the run's final zero-shot and retrieval results (values exactly as in metrics.json).
Body: how to load (with what plain transformers reproduces and what it does not), a usage
snippet that runs as written against the export, results, towers, objectives, data,
hyper-parameters, hardware and time, the training plot and the file list.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlsplit

import yaml

from mmcl.export.source import RunFacts
from mmcl.redact import redact

MODEL_ID_LINE = 'model_id = "{model_id}"  # "." is this folder (run the code inside it), or its Hub repo id'
GENERIC_DIRS = {"train", "val", "valid", "validation", "test", "eval", "shards", "data", "tars", "classification",
                "retrieval", "zeroshot", "wds", "webdataset"}
# metrics.json prefix, model-index task type, task name, eval key naming the data
RESULT_FAMILIES = (
    ("zeroshot/", "zero-shot-image-classification", "Zero-shot image classification", "zeroshot_shards"),
    ("retrieval/", "image-text-retrieval", "Image-text retrieval", "retrieval_shards"),
    ("knn/", "image-classification", "kNN classification on frozen features", "knn_test_shards"),
    ("linear_probe/", "image-classification", "Linear probe on frozen features", "knn_test_shards"),
)
METRIC_NAMES = {
    "acc1": "top-1 accuracy",
    "acc5": "top-5 accuracy",
    "mean_per_class_recall": "mean per-class recall",
}
FILE_NOTES = {
    "config.json": "transformers model config",
    "model.safetensors": "weights (transformers layout)",
    "processor_config.json": "processor: image processor + tokenizer (AutoProcessor)",
    "preprocessor_config.json": "image processor alone (AutoImageProcessor)",
    "tokenizer.json": "tokenizer",
    "tokenizer_config.json": "tokenizer settings (model_max_length = context length)",
    "mmcl_export.json": "poolings, heads, exactness, image transform, source",
    "mmcl_heads.safetensors": "mmcl's projection heads, logit scale and bias",
    "mmcl_config.yaml": "the mmcl run config",
    "metrics.json": "final evaluation metrics of the run",
    "training.png": "loss and zero-shot accuracy over training",
    "README.md": "this card",
}


def render_card(info: dict[str, Any], facts: RunFacts, model_id: str, files: Sequence[str], *,
                license: str | None = None, datasets: Sequence[str] | None = None, name: str | None = None) -> str:
    """README.md text for the export described by `info` (mmcl_export.json) and the run `facts`.

    `model_id` is what the usage snippets load ("." for the folder itself; push sets the repo id);
    `name` is the card's title (default: the last part of `model_id`).
    """
    name = name or Path(model_id).name or "mmcl-model"
    front = front_matter(info, facts, name, license, datasets)
    sections = [
        _intro(info, facts, name),
        _usage(info, model_id),
        _results(facts),
        _model(info),
        _training(info, facts),
        _hardware(facts),
        "## Training curves\n\n![loss and zero-shot accuracy over training](training.png)" if "training.png" in files else "",
        _files(files),
        _limitations(info, license),
    ]
    body = "\n\n".join(section for section in sections if section)
    card = "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n\n" + body + "\n"
    return redact(card)  # the config is redacted already; this also covers --dataset names and anything else


def set_model_id(card: str, model_id: str) -> str:
    """The card with its usage snippet pointing at `model_id` (used by push: the Hub repo id)."""
    lines = card.splitlines(keepends=True)
    prefix = MODEL_ID_LINE.split("{")[0]
    for i, line in enumerate(lines):
        if line.startswith(prefix):
            lines[i] = MODEL_ID_LINE.format(model_id=model_id) + "\n"
    return "".join(lines)


def front_matter_of(card: str) -> dict[str, Any]:
    """Parse the YAML front matter of a card (raises ValueError when there is none)."""
    if not card.startswith("---\n") or "\n---\n" not in card[4:]:
        raise ValueError("the card has no YAML front matter")
    return yaml.safe_load(card[4:card.index("\n---\n", 4)])


# ----------------------------------------------------------------------------- metadata


def dataset_name(pattern: str | None) -> str | None:
    """A readable name for a shard pattern: its deepest folder that is not a split name ('laion400m').

    Only the path is looked at: a URL's host, credentials and query, and a `pipe:` command's other
    words, never name a dataset.
    """
    if not pattern:
        return None
    first = pattern.split("::")[0].strip()
    if first.startswith("pipe:"):  # the word naming the shard file
        words = [w.strip("'\"") for w in first[len("pipe:"):].split() if ".tar" in w or ".tgz" in w]
        first = words[-1] if words else ""
    if "://" in first:
        first = urlsplit(first).path
    for part in reversed(Path(first).parent.parts):
        if "{" not in part and part.lower() not in GENERIC_DIRS and part not in ("/", ".", ".."):
            return part
    return None


def _shard_count(pattern: str) -> list[int]:
    import braceexpand

    return [len(list(braceexpand.braceexpand(part.strip()))) for part in pattern.split("::") if part.strip()]


def front_matter(info: dict[str, Any], facts: RunFacts, name: str, license: str | None,
                 datasets: Sequence[str] | None) -> dict[str, Any]:
    dual = "text" in info
    data = facts.config.get("data") or {}
    evaluation = facts.config.get("eval") or {}
    names = list(datasets) if datasets else [n for n in (dataset_name(data.get("train_shards")),) if n]
    tags = ["mmcl", "clip" if dual else "self-supervised", "contrastive-learning",
            "vision-text-dual-encoder" if info["architecture"] == "VisionTextDualEncoderModel" else None,
            "siglip" if info["architecture"] == "SiglipModel" else "siglip2" if info["architecture"] == "Siglip2Model" else None,
            info["image"]["model_type"], info["text"]["model_type"] if dual else None, "deepspeed"]
    front: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "zero-shot-image-classification" if dual else "image-feature-extraction",
        "license": license or "other",
        "tags": list(dict.fromkeys(t for t in tags if t)),
    }
    if names:
        front["datasets"] = names
    results = model_index_results(facts.metrics or {}, evaluation)
    if results:
        front["model-index"] = [{"name": name, "results": results}]
    return front


def model_index_results(metrics: dict[str, Any], evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    """model-index results, one entry per evaluation family in metrics.json; a metric's `type` is its
    metrics.json key after the family prefix ('zeroshot/acc1' -> 'acc1'), `value` that key's value, unrounded."""
    results = []
    for prefix, task, task_name, shards_key in RESULT_FAMILIES:
        entries = [
            {"type": key[len(prefix):], "name": _metric_name(key[len(prefix):]), "value": value}
            for key, value in metrics.items()
            if key.startswith(prefix) and isinstance(value, (int, float)) and not isinstance(value, bool)
        ]
        if entries:
            dataset = dataset_name(evaluation.get(shards_key)) or "held-out shards"
            results.append({"task": {"type": task, "name": task_name},
                            "dataset": {"type": dataset, "name": dataset, "split": "held-out"},
                            "metrics": entries})
    return results


def _metric_name(key: str) -> str:
    if key in METRIC_NAMES:
        return METRIC_NAMES[key]
    if key.startswith("image_retrieval_recall@"):
        return f"text-to-image recall@{key.rsplit('@', 1)[1]}"
    if key.startswith("text_retrieval_recall@"):
        return f"image-to-text recall@{key.rsplit('@', 1)[1]}"
    return key.replace("_", " ")


# ----------------------------------------------------------------------------- sections


def _describe_side(side: dict[str, Any]) -> str:
    return f"{side['model_type']} ({side['tower_class']}, {side['pooling']} pooling, {side['projection']} head)"


def _intro(info: dict[str, Any], facts: RunFacts, name: str) -> str:
    source = info["source"]
    where = {"checkpoint": "a DeepSpeed checkpoint", "model_dir": "an mmcl model folder"}.get(source["kind"], "an in-memory model")
    step = f" at step {source['step']}" if source.get("step") is not None else ""
    if "text" in info:
        what = (f"A CLIP-style image-text model trained with mmcl: image tower {_describe_side(info['image'])} and text "
                f"tower {_describe_side(info['text'])}, both mapped into a shared {info['embed_dim']}-dimensional space.")
    else:
        what = f"An image encoder trained with mmcl's self-supervised objectives: {_describe_side(info['image'])}."
    return f"# {name}\n\n{what} Exported from {where}{step} as a `transformers` `{info['architecture']}`."


def _exact_cell(side: dict[str, Any], method: str) -> str:
    if side["exact"]:
        how = f"; the export changed this: {'; '.join(side['adjustments'])}" if side["adjustments"] else ""
        return f"yes: `{method}` reproduces mmcl's embeddings{how}"
    if side.get("features") == "pooled":
        return f"no: {side['reason']}; use the mmcl loader"
    return f"no, and it returns NaN on purpose: {side['reason']}; use the mmcl loader"


def _usage(info: dict[str, Any], model_id: str) -> str:
    dual = "text" in info
    rows = ["| side | pooling | head | plain transformers |", "|---|---|---|---|"]
    if dual:
        rows.append(f"| image | {info['image']['pooling']} | {info['image']['projection']} | {_exact_cell(info['image'], 'get_image_features')} |")
        rows.append(f"| text | {info['text']['pooling']} | {info['text']['projection']} | {_exact_cell(info['text'], 'get_text_features')} |")
    else:
        side = info["image"]
        cell = ("yes: `pooler_output` is mmcl's pooled feature (before the head)" if side["exact"] else _exact_cell(side, "pooler_output"))
        rows.append(f"| image | {side['pooling']} | {side['projection']} (in mmcl_heads.safetensors) | {cell} |")
    check = info.get("processor_check", {})
    transform = info["image_transform"]
    processor_note = _naflex_note(transform, check) if "naflex" in transform else (
        f"The processor is a `CLIPImageProcessor` set to mmcl's evaluation transform (shorter side to "
        f"{transform['image_size']} px, bicubic; centre crop; mean {transform['mean']}, std {transform['std']}). "
        f"With `backend=\"pil\"` it matches mmcl's torchvision transform to {check.get('pil_max_abs_diff', float('nan')):.1e} "
        f"on a probe image; the default torchvision backend differs by {check.get('torchvision_max_abs_diff', float('nan')):.1e} "
        f"there (it resizes uint8 tensors, which can differ from PIL's bicubic by one grey level, "
        f"{1 / 255 / min(transform['std']):.1e} after normalisation). For images whose resized longer "
        f"side exceeds {transform['image_size']} px by 3 (mod 4) pixels, transformers' centre crop starts one pixel before "
        "torchvision's (it floors the half-pixel offset, torchvision rounds it to even)."
    )
    text = "## How to use\n\n" + "\n".join(rows) + "\n\n```python\n" + snippet(info, model_id) + "```\n\n" + processor_note
    if "text" in info and info["image"]["exact"] and info["text"]["exact"]:
        text += "\n\n" + _pipeline_usage(info, model_id)
    return text


def _naflex_note(transform: dict[str, Any], check: dict[str, Any]) -> str:
    naflex = transform["naflex"]
    return (f"The processor is a `Siglip2Processor` set to mmcl's NaFlex transform (aspect ratio kept, at most "
            f"{naflex['max_num_patches']} patches of {naflex['patch_size']} px, bilinear; mean {transform['mean']}, "
            f"std {transform['std']}); on a probe image `AutoProcessor` matches mmcl's patches to "
            f"{check.get('processor_max_abs_diff', float('nan')):.1e}.")


def _pipeline_usage(info: dict[str, Any], model_id: str) -> str:
    """The zero-shot pipeline, for exports that plain transformers reproduces on both sides."""
    sigmoid = info["architecture"] in ("SiglipModel", "Siglip2Model")
    note = ("Scores are independent sigmoid probabilities (SigLIP); the pipeline pads prompts to 64 tokens."
            if sigmoid else "Scores are a softmax over the candidate labels.")
    if info["architecture"] == "VisionTextDualEncoderModel":
        note += (" transformers logs that VisionTextDualEncoderModel is not in the pipeline's list of supported "
                 "models; it runs all the same (the pipeline only needs `logits_per_image`).")
    return (
        "Zero-shot classification with the `transformers` pipeline:\n\n```python\n"
        "from PIL import Image\nfrom transformers import pipeline\n\n"
        f"{MODEL_ID_LINE.format(model_id=model_id)}\n"
        "classifier = pipeline(\"zero-shot-image-classification\", model=model_id)\n"
        'image = Image.new("RGB", (64, 48), (200, 30, 30))  # any RGB image\n'
        'print(classifier(image, candidate_labels=["cat", "dog"], hypothesis_template="a photo of a {}."))\n'
        f"```\n\n{note}"
    )


def snippet(info: dict[str, Any], model_id: str) -> str:
    """Python code that loads the export and computes embeddings; runs as written, offline."""
    head = MODEL_ID_LINE.format(model_id=model_id)
    image = 'image = Image.new("RGB", (64, 48), (200, 30, 30))  # any RGB image\n'
    if "text" not in info:
        if info["image"]["exact"]:
            return (
                "import torch\nfrom PIL import Image\nfrom transformers import AutoImageProcessor, AutoModel\n\n"
                f"{head}\nmodel = AutoModel.from_pretrained(model_id).eval()\n"
                "processor = AutoImageProcessor.from_pretrained(model_id, backend=\"pil\")\n\n" + image +
                "with torch.no_grad():\n"
                "    features = model(**processor(images=image, return_tensors=\"pt\")).pooler_output  # mmcl's pooled features\n"
                "print(features.shape)\n"
            )
        return (
            "from PIL import Image\nfrom mmcl.export import load_exported  # needs the mmcl package\n\n"
            f"{head}\nmodel = load_exported(model_id)\n" + image +
            "embeddings = model.encode_image(model.preprocess([image]))  # [1, D], unit rows, after the head\n"
            "print(embeddings.shape)\n"
        )
    bias = info.get("logit_bias")
    texts = 'texts = ["a photo of a cat", "a photo of a dog"]\n'
    if info["image"]["exact"] and info["text"]["exact"] and "naflex" in info["image_transform"]:
        scale = "model.logit_scale.exp()"
        code = (
            "import torch\nfrom PIL import Image\nfrom transformers import AutoModel, AutoProcessor\n\n"
            f"{head}\nmodel = AutoModel.from_pretrained(model_id).eval()\n"
            "processor = AutoProcessor.from_pretrained(model_id)  # mmcl's NaFlex patches, context length and padding\n\n"
            + image + texts +
            "inputs = processor(text=texts, images=image, return_tensors=\"pt\")\n"
            "with torch.no_grad():\n"
            "    image_embeds = model.get_image_features(pixel_values=inputs[\"pixel_values\"], spatial_shapes=inputs[\"spatial_shapes\"],\n"
            "                                            pixel_attention_mask=inputs[\"pixel_attention_mask\"]).pooler_output\n"
            "    text_embeds = model.get_text_features(input_ids=inputs[\"input_ids\"], attention_mask=inputs[\"attention_mask\"]).pooler_output\n"
            "image_embeds = torch.nn.functional.normalize(image_embeds, dim=-1)\n"
            "text_embeds = torch.nn.functional.normalize(text_embeds, dim=-1)\n"
        )
    elif info["image"]["exact"] and info["text"]["exact"]:
        scale = "model.logit_scale.exp()"
        code = (
            "import torch\nfrom PIL import Image\nfrom transformers import AutoModel, AutoProcessor\n\n"
            f"{head}\nmodel = AutoModel.from_pretrained(model_id).eval()\n"
            "processor = AutoProcessor.from_pretrained(model_id, backend=\"pil\")  # PIL resize = mmcl's eval transform\n\n"
            + image + texts +
            "inputs = processor(text=texts, images=image, return_tensors=\"pt\", padding=\"max_length\", truncation=True)\n"
            "with torch.no_grad():\n"
            "    image_embeds = model.get_image_features(pixel_values=inputs[\"pixel_values\"]).pooler_output\n"
            "    text_embeds = model.get_text_features(input_ids=inputs[\"input_ids\"], attention_mask=inputs[\"attention_mask\"]).pooler_output\n"
            "image_embeds = torch.nn.functional.normalize(image_embeds, dim=-1)\n"
            "text_embeds = torch.nn.functional.normalize(text_embeds, dim=-1)\n"
        )
    else:
        scale = "model.logit_scale"
        code = (
            "import torch\nfrom PIL import Image\nfrom mmcl.export import load_exported  # needs the mmcl package: applies mmcl's pooling and heads\n\n"
            f"{head}\nmodel = load_exported(model_id)\n\n" + image + texts +
            "image_embeds = model.encode_image(model.preprocess([image]))  # [1, D], unit rows\n"
            "text_embeds = model.encode_text(**model.tokenize(texts))  # [2, D], unit rows\n"
        )
    if bias is None:
        code += f"probs = ({scale} * image_embeds @ text_embeds.T).softmax(dim=-1)\n"
    else:  # sigmoid-loss models: independent probabilities with the learnt bias
        code += f"probs = torch.sigmoid({scale} * image_embeds @ text_embeds.T + {bias!r})\n"
    return code + "print(probs)\n"


def _results(facts: RunFacts) -> str:
    metrics = facts.metrics or {}
    prefixes = tuple(family[0] for family in RESULT_FAMILIES)
    rows = [(key, value) for key, value in metrics.items() if key.startswith(prefixes) and isinstance(value, (int, float))]
    if not rows:
        return "## Results\n\nThe run recorded no final evaluation (eval.zeroshot_shards, eval.retrieval_shards or eval.knn_*_shards)."
    evaluation = facts.config.get("eval") or {}
    lines = ["## Results", "", "Final evaluation of the run (metrics.json):", "", "| metric | value |", "|---|---|"]
    lines += [f"| {key.split('/')[0]}: {_metric_name(key.split('/', 1)[1])} | {value:.4f} |" for key, value in rows]
    sources = [f"zero-shot on `{evaluation['zeroshot_shards']}`" if evaluation.get("zeroshot_shards") else "",
               f"retrieval on `{evaluation['retrieval_shards']}`" if evaluation.get("retrieval_shards") else "",
               f"kNN / linear probe on `{evaluation['knn_test_shards']}` (neighbours and training set: "
               f"`{evaluation.get('knn_train_shards')}`)" if evaluation.get("knn_test_shards") else ""]
    if any(sources):
        lines += ["", "Data: " + "; ".join(s for s in sources if s) + "."]
    return "\n".join(lines)


def _model(info: dict[str, Any]) -> str:
    sides = ["image"] + (["text"] if "text" in info else [])
    lines = ["## Model", "", "| | " + " | ".join(f"{s} tower" for s in sides) + " |", "|---|" + "---|" * len(sides)]
    for label, key in (("class", "tower_class"), ("model type", "model_type"), ("parameters", "parameters"),
                       ("hidden size", "hidden_size"), ("layers", "num_hidden_layers"), ("pooling", "pooling"),
                       ("projection head", "projection")):
        lines.append(f"| {label} | " + " | ".join(_fmt(info[s].get(key)) for s in sides) + " |")
    bias = info.get("logit_bias")
    lines += ["", f"Embedding size {info['embed_dim']}; logit scale {info['logit_scale']:.4g} (clamped at "
              f"{info['logit_scale_max']:g}); logit bias {'none' if bias is None else f'{bias:.4g}'}."]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def _table(section: dict[str, Any]) -> list[str]:
    return ["| key | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in section.items()]


def _training(info: dict[str, Any], facts: RunFacts) -> str:
    config, metrics = facts.config, facts.metrics or {}
    if not config:
        return ""
    objectives = config.get("objectives") or {}
    lines = ["## Training", "", "Objectives: " + ", ".join(f"{name} (weight {weight})" for name, weight in objectives.items()) + "."]
    data = config.get("data") or {}
    if data.get("train_shards"):
        counts = _shard_count(data["train_shards"])
        lines += ["", f"Data: `{data['train_shards']}` ({' + '.join(map(str, counts))} shards"
                  + (f", resampled, {data.get('samples_per_epoch')} samples per epoch" if data.get("resampled") else "")
                  + f"), image size {data.get('image_size')}."]
    if metrics:
        skipped = metrics.get("skipped") or {}
        skipped_text = ", ".join(f"{k}: {v}" for k, v in skipped.items()) if skipped else "none"
        lines += ["", f"Steps {_fmt(metrics.get('steps'))}; samples seen {_fmt(metrics.get('samples_seen'))}; "
                  f"skipped samples: {skipped_text}; non-finite steps {_fmt(metrics.get('nonfinite_steps'))}."]
    for section in ("optim", "train", "loss"):
        if config.get(section):
            lines += ["", f"### {section}", ""] + _table(config[section])
    return "\n".join(lines)


def _hardware(facts: RunFacts) -> str:
    ds, records, metrics = facts.deepspeed or {}, facts.records, facts.metrics or {}
    if not ds and not records and not metrics.get("hardware"):
        return ""
    rows: dict[str, Any] = {}
    micro, accum, total = ds.get("train_micro_batch_size_per_gpu"), ds.get("gradient_accumulation_steps"), ds.get("train_batch_size")
    if micro and accum and total:
        rows["world size (ranks)"] = total // (micro * accum)
        rows["global batch"] = total
    zero = (ds.get("zero_optimization") or {}).get("stage")
    if zero is not None:
        rows["ZeRO stage"] = zero
    rows["precision"] = "bf16" if (ds.get("bf16") or {}).get("enabled") else "fp16" if (ds.get("fp16") or {}).get("enabled") else "fp32"
    hardware = metrics.get("hardware") or {}
    if "world size (ranks)" not in rows and "world_size" in hardware:
        rows["world size (ranks)"] = hardware["world_size"]
    if "precision" in hardware:
        rows["precision"] = hardware["precision"]
    rows["device"] = hardware.get("device", "not recorded by the run")
    timed = [r for r in records if "time" in r]
    if "wall_time_s" in metrics:
        rows["wall time"] = f"{metrics['wall_time_s'] / 60:.1f} min"
    elif timed:
        rows["training-loop time"] = f"{timed[-1]['time']:.1f} s (metrics.jsonl; counted from the last (re)start, without start-up)"
    speeds = [r["samples_per_s"] for r in records if "samples_per_s" in r]
    if speeds:
        rows["throughput (last logged)"] = f"{speeds[-1]:.1f} samples/s"
    return "## Hardware and time\n\n" + "\n".join(_table(rows))


def _files(files: Sequence[str]) -> str:
    lines = ["## Files", ""] + [f"- `{name}`: {FILE_NOTES.get(name, 'tokenizer file')}" for name in files]
    return "\n".join(lines)


def _limitations(info: dict[str, Any], license: str | None) -> str:
    lines = ["## Limitations", ""]
    inexact = [kind for kind in ("image", "text") if kind in info and not info[kind]["exact"]]
    if inexact:
        lines.append(f"- Plain `transformers` does not reproduce the {' and '.join(inexact)} side (see How to use); "
                     "`mmcl.export.load_exported` does, from this folder's weights and mmcl_export.json.")
    if "text" not in info:
        lines.append("- The heads of the self-supervised objectives (SimCLR's projector, BYOL's projector and predictor) "
                     "serve training only and are not exported; continue training from the run's DeepSpeed checkpoint.")
    if info.get("logit_bias") is not None and info["architecture"] not in ("SiglipModel", "Siglip2Model"):
        lines.append("- The model was trained with a sigmoid loss and a logit bias, which transformers' "
                     "VisionTextDualEncoderModel has no slot for; the bias is in mmcl_export.json and mmcl_heads.safetensors.")
    lines.append(f"- License: `{license or 'other'}` as given at export; the licenses of the pretrained towers and "
                 "the training data also apply.")
    return "\n".join(lines)
