"""Which attention kernel a tower trains with when its config leaves `attn_implementation` unset.

transformers picks SDPA, the right kernel on CUDA and in float32. On the CPU in bf16, torch's
SDPA kernel is slow backwards at short sequences: forward + backward takes 3.6-5.4x as long as
transformers' eager (matmul) attention at 32-129 tokens, while from about 200 tokens on SDPA is
as fast or faster (`benchmarks/attention_cpu.py`; table in benchmarks/RESULTS.md). So a tower
trained on the CPU in bf16 whose training sequences are at most `EAGER_MAX_TOKENS` long runs
eager attention. CUDA, fp32, long sequences and an explicit `attn_implementation` are left as
they are. Both kernels compute the same attention, and the choice is not saved with the model
(transformers never serialises it), so exports and evaluation pick their own.
"""
from __future__ import annotations

import torch

from mmcl.models import DualEncoder
from mmcl.models.patch_dropout import kept_count
from mmcl.models.settings import ModelConfig

EAGER_MAX_TOKENS = 160  # measured crossover on the CPU in bf16: eager faster at <= 129 tokens, SDPA at >= 197


def training_tokens(model: DualEncoder, kind: str, cfg: ModelConfig, image_size: int | None = None) -> int | None:
    """Tokens per sequence the `kind` tower's layers see in training; None where it cannot be told.

    `image_size`: the side of the images the run feeds the tower (`data.image_size`); default the tower config's.
    """
    if kind == "text":
        return cfg.text.context_length
    config = model.image_tower.config
    image, patch = image_size or getattr(config, "image_size", None), getattr(config, "patch_size", None)
    if not isinstance(image, int) or not isinstance(patch, int):
        return None
    return 1 + kept_count((image // patch) ** 2, cfg.image.patch_dropout)  # the class token and the kept patches


def choose_attention(model: DualEncoder, cfg: ModelConfig, bf16: bool, image_size: int | None = None) -> list[str]:
    """Switch to eager attention the SDPA towers that train faster with it here (see the module
    docstring); returns their config keys, e.g. ["model.image", "model.text"]."""
    if not bf16 or torch.cuda.is_available():
        return []
    switched = []
    for kind, tower in (("image", model.image_tower), ("text", model.text_tower)):
        tower_cfg = getattr(cfg, kind)
        if tower is None or tower_cfg is None or tower_cfg.attn_implementation is not None:
            continue
        tokens = training_tokens(model, kind, cfg, image_size)
        if tower.config._attn_implementation == "sdpa" and tokens is not None and tokens <= EAGER_MAX_TOKENS:
            tower.set_attn_implementation("eager")
            switched.append(f"model.{kind}")
    return switched
