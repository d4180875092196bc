"""Patch dropout (FLIP): train a ViT on a random subset of its patch tokens.

`attach_patch_dropout(tower, p)` registers a forward hook on the tower's embeddings module
(ViT, DeiT, CLIP/SigLIP vision, DINOv2 and any tower whose embeddings give tokens [B, T, D]).
In training mode the hook turns the embeddings' output [B, P + N, D] (P prefix tokens: class,
distillation or register tokens; N patch tokens, position embeddings already added) into
[B, P + K, D] with K = round((1 - p) * N): the prefix is always kept, and each image keeps its
own random K patches, in their original order. The transformer layers then run on fewer
tokens; every token keeps the position it was embedded with. In eval mode (evaluation,
zero-shot, kNN, export) or with `active` False (the unmasked finish) the hook does nothing.

The random choice uses the global torch RNG of the tokens' device, like dropout does: the
feature-cache accumulation replays that RNG state for its re-encoding pass (same kept tokens
as the caching pass) and checkpoints save and restore it (same kept tokens after a resume).
A hook rather than a wrapper module keeps parameter names, and so checkpoints and exports,
unchanged; the towers' own attention code runs unchanged (no attention mask is needed: every
image keeps the same number of tokens).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

# Attribute of the embeddings module that holds its hook (so a deep copy, e.g. an EMA target,
# carries its own, and `set_patch_dropout` finds every one).
HOOK_ATTRIBUTE = "_mmcl_patch_dropout"


def kept_count(num_patches: int, p: float) -> int:
    """round((1 - p) * N), at least 1."""
    return max(1, int(round((1.0 - p) * num_patches)))


def keep_indices(batch: int, num_patches: int, p: float, device: torch.device | str = "cpu") -> Tensor:
    """[B, K] sorted indices of the patches each image keeps (a uniform random K-subset per row)."""
    scores = torch.rand(batch, num_patches, device=device)
    return scores.argsort(dim=1)[:, :kept_count(num_patches, p)].sort(dim=1).values


def drop_patches(tokens: Tensor, p: float, prefix_tokens: int) -> Tensor:
    """tokens [B, P + N, D] -> [B, P + K, D]: the P prefix tokens, then each row's kept patches."""
    prefix, patches = tokens[:, :prefix_tokens], tokens[:, prefix_tokens:]
    batch, num_patches, width = patches.shape
    index = keep_indices(batch, num_patches, p, tokens.device)
    kept = patches.gather(1, index.unsqueeze(-1).expand(-1, -1, width))
    return torch.cat([prefix, kept], dim=1)


class PatchDropout:
    """The forward hook: drops patch tokens when `tower` is training and `active` is True.

    The tower's mode, not the embeddings' own, decides: a tower locked below its last layers
    keeps its frozen embeddings in eval mode, yet trains. `tokens_out` is the token count
    [P + K or P + N] of the last call's output, for logging.
    """

    def __init__(self, p: float, prefix_tokens: int, tower: nn.Module | None = None) -> None:
        self.p = float(p)
        self.prefix_tokens = prefix_tokens
        self.tower = tower
        self.active = True
        self.tokens_out: int | None = None

    def __call__(self, module: nn.Module, args, output: Tensor) -> Tensor:
        training = (self.tower if self.tower is not None else module).training
        if training and self.active and self.p > 0:
            output = drop_patches(output, self.p, self.prefix_tokens)
        self.tokens_out = output.shape[1]
        return output


def embeddings_module(tower: nn.Module) -> nn.Module | None:
    """The tower's patch-embedding module: the shallowest submodule named `embeddings`."""
    found = [(name.count("."), name, module) for name, module in tower.named_modules()
             if name.rsplit(".", 1)[-1] == "embeddings"]
    return min(found, key=lambda item: item[:2])[2] if found else None


def attach_patch_dropout(tower: nn.Module, p: float, key: str = "model.image") -> PatchDropout:
    """Register patch dropout with rate `p` on `tower`; returns the hook.

    The number of prefix tokens is measured once, by running the embeddings on one blank image
    of the config's size. Raises ValueError (one sentence naming `key`) when the tower's
    embeddings do not give a token sequence (ConvNeXt, ResNet: 4D feature maps).
    """
    config = getattr(tower, "config", None)
    embeddings = embeddings_module(tower)
    patch, size = getattr(config, "patch_size", None), getattr(config, "image_size", None)
    tokens = None
    if embeddings is not None and patch is not None and size is not None:
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        patch_h, patch_w = (patch, patch) if isinstance(patch, int) else tuple(patch)
        blank = torch.zeros(1, getattr(config, "num_channels", 3), height, width)
        was_training = embeddings.training
        try:  # in eval mode, on a forked RNG: the probe must not change what is initialised after it
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                tokens = embeddings.eval()(blank)
        except (TypeError, RuntimeError, ValueError):
            tokens = None
        finally:
            embeddings.train(was_training)
    if not (torch.is_tensor(tokens) and tokens.dim() == 3):
        raise ValueError(
            f"'{key}.patch_dropout' needs an image tower whose embeddings give a token sequence [B, T, D] (vit, deit, "
            f"clip_vision_model, siglip_vision_model, dinov2), but {type(tower).__name__} does not; set it to 0."
        )
    prefix = tokens.shape[1] - (height // patch_h) * (width // patch_w)
    if prefix < 0:
        raise ValueError(
            f"'{key}.patch_dropout': {type(tower).__name__}'s embeddings give fewer tokens than patches; set it to 0."
        )
    hook = PatchDropout(p, prefix, tower)
    embeddings.register_forward_hook(hook)
    setattr(embeddings, HOOK_ATTRIBUTE, hook)
    return hook


def patch_dropout_hooks(module: nn.Module) -> list[PatchDropout]:
    """Every patch-dropout hook inside `module` (the image tower's, and those of its copies)."""
    return [getattr(m, HOOK_ATTRIBUTE) for m in module.modules() if isinstance(getattr(m, HOOK_ATTRIBUTE, None), PatchDropout)]


def set_patch_dropout(module: nn.Module, active: bool) -> int:
    """Switch every patch-dropout hook inside `module` on or off; returns how many there are."""
    hooks = patch_dropout_hooks(module)
    for hook in hooks:
        hook.active = active
    return len(hooks)


def patch_dropout_active(completed_steps: int, total_steps: int, final_steps: int) -> bool:
    """Whether the step after `completed_steps` drops patches: all but the last `final_steps` steps do."""
    return completed_steps < total_steps - final_steps
