"""Start a DualEncoder from a `transformers` CLIPModel: its projections and logit scale.

`model.init_from: DIR` (a CLIPModel folder such as `mmcl convert openclip` writes, or a Hub id)
makes the config loader fill in both towers from DIR (`name_or_path`), the embedding width,
the context length and the image normalisation; `build_model` then calls
`load_clip_heads` to copy CLIPModel's `visual_projection` / `text_projection` into mmcl's
linear heads and its `logit_scale` (a log, like mmcl's), so step 0 computes CLIPModel's (and
the converted OpenCLIP model's) embeddings and logits.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

HEAD_NAMES = {"image_projection": "visual_projection.weight", "text_projection": "text_projection.weight"}
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"


def _weight_file(source: str, filename: str) -> Path:
    """A file of the CLIPModel at `source` (local folder, else a Hub id through the cache)."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        return folder / filename
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(source, filename))


def read_clip_tensors(source: str, names: list[str]) -> dict[str, torch.Tensor]:
    """The tensors `names` of a CLIPModel's safetensors weights (single file or sharded), nothing else."""
    from safetensors import safe_open

    try:
        files = {name: _weight_file(source, SINGLE_FILE) for name in names}
        if not files[names[0]].is_file():
            raise FileNotFoundError(files[names[0]])
    except (OSError, ValueError):
        index = json.loads(_weight_file(source, INDEX_FILE).read_text())["weight_map"]
        files = {name: _weight_file(source, index[name]) for name in names if name in index}
    out = {}
    for name, path in files.items():
        with safe_open(str(path), framework="pt") as handle:
            if name in handle.keys():
                out[name] = handle.get_tensor(name).float()
    return out


def load_clip_heads(model: nn.Module, source: str) -> None:
    """Copy CLIPModel's projections and logit scale from `source` into the DualEncoder `model` (in place)."""
    wanted = list(HEAD_NAMES.values()) + ["logit_scale"]
    try:
        tensors = read_clip_tensors(source, wanted)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"'model.init_from' = '{source}': its CLIPModel weights could not be read ({str(error)[:150]}).") from error
    missing = [name for name in wanted if name not in tensors]
    if missing:
        raise ValueError(f"'model.init_from' = '{source}' has no {', '.join(missing)}; it must be a CLIPModel "
                         "(e.g. written by `mmcl convert openclip`).")
    with torch.no_grad():
        for attribute, name in HEAD_NAMES.items():
            head = getattr(model, attribute)
            kind = "image" if attribute.startswith("image") else "text"
            if not isinstance(head, nn.Linear) or head.bias is not None or head.weight.shape != tensors[name].shape:
                raise ValueError(f"'model.{kind}.projection' must be linear with model.embed_dim = "
                                 f"{tensors[name].shape[0]} to start from the CLIPModel in '{source}'.")
            head.weight.copy_(tensors[name])
        model.logit_scale.copy_(tensors["logit_scale"].reshape(model.logit_scale.shape))
