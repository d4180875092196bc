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

NaFlex towers (SigLIP 2's `Siglip2VisionModel`: padded patch sequences with a `pixel_attention_mask`)
get `NaFlexPatchDropout` instead: each image keeps round((1 - p) * n) of its n REAL patches (never
the padding), chosen before the layers from the mask, and the batch shrinks to the longest kept
count with a new mask; the tower's encoder and its MAP head then read that mask (see
`attach_naflex_patch_dropout`).
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


def naflex_keep(mask: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """pixel_attention_mask [B, L] (1 = real patch, real patches first) -> (index [B, K], new mask [B, K] int32):
    row i keeps K_i = round((1 - p) * n_i) (>= 1) of its n_i real patches, uniformly at random, in their
    original order, padded to K = max K_i (padded slots index patch 0 and are masked out)."""
    real = mask.bool()
    counts = real.sum(dim=1)
    kept = torch.clamp(torch.round((1.0 - p) * counts.double()), min=1).long()
    width = int(kept.max())
    scores = torch.rand(mask.shape, device=mask.device).masked_fill(~real, 2.0)  # padding sorts after every real patch
    chosen = scores.argsort(dim=1)[:, :width]
    slot = torch.arange(width, device=mask.device)[None, :]
    used = slot < kept[:, None]
    index = torch.where(used, chosen, mask.shape[1]).sort(dim=1).values
    return torch.where(used, index, 0), used.to(mask.dtype)


class NaFlexPatchDropout:
    """Patch dropout for a NaFlex tower: a forward pre-hook on the tower picks each image's kept real patches
    and replaces `pixel_attention_mask` by the kept tokens' mask; a forward hook on its embeddings gathers
    those tokens (position embeddings already added). Inactive in eval mode or with `active` False."""

    def __init__(self, p: float, tower: nn.Module) -> None:
        self.p = float(p)
        self.tower = tower
        self.active = True
        self.tokens_out: int | None = None
        self.pending: Tensor | None = None

    def before(self, module: nn.Module, args, kwargs):
        mask = kwargs.get("pixel_attention_mask")
        self.pending = None
        if not (self.tower.training and self.active and self.p > 0 and mask is not None):
            self.tokens_out = None if mask is None else mask.shape[1]
            return None
        self.pending, kwargs["pixel_attention_mask"] = naflex_keep(mask, self.p)
        self.tokens_out = self.pending.shape[1]
        return args, kwargs

    def __call__(self, module: nn.Module, args, output: Tensor) -> Tensor:
        if self.pending is None:
            return output
        index, self.pending = self.pending, None
        return output.gather(1, index.unsqueeze(-1).expand(-1, -1, output.shape[-1]))


def attach_naflex_patch_dropout(tower: nn.Module, p: float) -> NaFlexPatchDropout:
    """Register NaFlex patch dropout with rate `p` on a `Siglip2VisionModel`; returns the hook."""
    hook = NaFlexPatchDropout(p, tower)
    embeddings = embeddings_module(tower)
    tower.register_forward_pre_hook(hook.before, with_kwargs=True)
    embeddings.register_forward_hook(hook)
    setattr(embeddings, HOOK_ATTRIBUTE, hook)
    return hook


def attach_patch_dropout(tower: nn.Module, p: float, key: str = "model.image") -> PatchDropout | NaFlexPatchDropout:
    """Register patch dropout with rate `p` on `tower`; returns the hook.

    The number of prefix tokens is measured once, by running the embeddings on one blank image
    of the config's size. Raises ValueError (one sentence naming `key`) when the tower's
    embeddings do not give a token sequence (ConvNeXt, ResNet: 4D feature maps).
    """
    config = getattr(tower, "config", None)
    if getattr(config, "model_type", None) == "siglip2_vision_model":
        return attach_naflex_patch_dropout(tower, p)
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


def patch_dropout_hooks(module: nn.Module) -> list[PatchDropout | NaFlexPatchDropout]:
    """Every patch-dropout hook inside `module` (the image tower's, and those of its copies)."""
    return [getattr(m, HOOK_ATTRIBUTE) for m in module.modules() if isinstance(getattr(m, HOOK_ATTRIBUTE, None), (PatchDropout, NaFlexPatchDropout))]


def set_patch_dropout(module: nn.Module, active: bool) -> int:
    """Switch every patch-dropout hook inside `module` on or off; returns how many there are."""
    hooks = patch_dropout_hooks(module)
    for hook in hooks:
        hook.active = active
    return len(hooks)


def patch_dropout_active(completed_steps: int, total_steps: int, final_steps: int) -> bool:
    """Whether the step after `completed_steps` drops patches: all but the last `final_steps` steps do."""
    return completed_steps < total_steps - final_steps
