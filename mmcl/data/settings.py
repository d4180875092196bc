"""The `data` section of a run config (WebDataset input) and `ssl.views` (the two augmented views).

Field comments document the keys (README's configuration reference is generated from them).
Imports neither torch nor transformers.
"""
from __future__ import annotations

from dataclasses import dataclass

from mmcl.coerce import ConfigError, bounded, count, nonnegative, positive, probability


@dataclass
class NaFlexConfig:
    """SigLIP 2's NaFlex inputs: each image at its own aspect ratio as a variable number of patches."""

    patch_size: int = count(16)  # side of a square patch in pixels; must be the image tower's patch_size
    # the image is resized keeping its aspect ratio so that its patch grid fits this many patches (as
    # transformers' Siglip2ImageProcessor does); batches are padded to this sequence length (training with
    # sequence_lengths: to the step's length instead; evaluation and the export always use this one)
    max_num_patches: int = count(256)
    # Training only: each optimizer step draws its sequence length L uniformly from this list, the same on every
    # rank, from (seed, epoch, step); the step's images are resized to fit L patches and padded to L (e.g. [256,
    # 576, 784], as SigLIP 2 trains). Evaluation and export keep max_num_patches. None = every step uses max_num_patches
    sequence_lengths: list[int] | None = count(None)
    # Patch tokens per micro-batch per rank: a step of length L takes token_budget // L images per rank, so the
    # tokens per step stay about constant (train.micro_batch_size is then only DeepSpeed's nominal value, and an
    # epoch has total samples // (mean batch x ranks) micro-batches per rank). None = train.micro_batch_size images
    token_budget: int | None = count(None)

    def validate(self, key: str, source: str) -> None:
        if self.sequence_lengths is not None and not self.sequence_lengths:
            raise ConfigError(f"{source}: '{key}.sequence_lengths' is empty; list at least one length, e.g. [256, 576, 784].")
        longest = max(self.sequence_lengths or [self.max_num_patches])
        if self.token_budget is not None and self.token_budget < longest:
            raise ConfigError(f"{source}: '{key}.token_budget' {self.token_budget} is less than one image at the longest "
                              f"sequence length {longest}; raise it to at least {longest} (a multiple of it, times the "
                              "images per micro-batch you want).")


@dataclass
class DataConfig:
    """WebDataset input. Shard patterns use brace expansion; several sources join with `::`."""

    train_shards: str | None = None  # e.g. "data/{00000..00127}.tar::other/{0..9}.tar"
    train_weights: list[float] | None = nonnegative(None)  # sampling weight per `::` source (resampled mode)
    resampled: bool = False  # draw shards with replacement forever (epoch = samples_per_epoch)
    samples_per_epoch: int | None = count(None)  # epoch length in resampled mode
    shuffle_buffer: int = nonnegative(1000)  # samples held for shuffling (0 = no sample shuffle)
    num_workers: int = nonnegative(2)  # DataLoader worker processes per rank
    image_size: int = count(224)  # side of the square crops fed to the image tower
    image_mean: list[float] | None = bounded(None, 0, 1)  # normalisation; None = the image tower's processor or CLIP's
    image_std: list[float] | None = positive(None)
    train_crop_scale: list[float] = bounded([0.9, 1.0], 0, 1, low_open=True)  # RandomResizedCrop scale range
    max_pixels: int = count(89_478_485)  # images above this are skipped (decompression bombs)
    max_text_bytes: int = count(65_536)  # caption and .cls members above this many bytes are skipped unread
    max_image_bytes: int = count(268_435_456)  # image members above this many bytes are skipped unread (256 MiB)
    val_shards: str | None = None  # held-out image-caption shards (retrieval)
    # FLYP: caption each labelled (.cls) training image with a prompt of its class, made from
    # eval.classnames and eval.templates (one template drawn per sample and epoch), instead of
    # its .txt; same-class pairs of the global batch are then no negatives in the clip loss.
    captions_from_labels: bool = False
    # A curated subset to train on, without rewriting the shards: a Parquet file with one row per
    # selected sample, columns `key` and `probability` (per-epoch sampling probability in (0, 1]),
    # optionally `shard` + `index` (as `mmcl curate select` writes it). Each epoch delivers the
    # selected samples drawn from (seed, epoch, key); epoch mode takes its length from the file.
    selection: str | None = None
    # NaFlex (SigLIP 2 image towers): train and evaluate on patch sequences at each image's own aspect
    # ratio instead of square crops (image_size and train_crop_scale then do not apply); None = square crops
    naflex: NaFlexConfig | None = None

    def validate(self, key: str, source: str) -> None:
        if self.resampled and self.samples_per_epoch is None and self.train_shards is not None:
            raise ConfigError(f"{source}: 'data.samples_per_epoch' is required with 'data.resampled: true'.")
        if self.train_weights is not None and self.train_shards is not None:
            sources = self.train_shards.count("::") + 1
            if len(self.train_weights) != sources:
                raise ConfigError(
                    f"{source}: 'data.train_weights' has {len(self.train_weights)} weights for {sources} '::'-joined sources."
                )
        check_min_max(self.train_crop_scale, "data.train_crop_scale", source, "0 < min <= max <= 1")
        for name in ("image_mean", "image_std"):
            values = getattr(self, name)
            if values is not None and len(values) != 3:
                raise ConfigError(f"{source}: 'data.{name}' must have 3 values (R, G, B), got {len(values)}.")


@dataclass
class ViewsConfig:
    """The two augmented views of each image for the self-supervised objectives (SimCLR's recipe).

    Per-view settings are lists of two values (view 1, view 2). Their defaults depend on the
    run: SimCLR's symmetric views, or BYOL's asymmetric ones when `byol` is an objective.
    """

    crop_scale: list[float] = bounded([0.08, 1.0], 0, 1, low_open=True)  # RandomResizedCrop area range
    flip_p: float = probability(0.5)  # horizontal flip probability
    color_jitter: list[float] = nonnegative([0.4, 0.4, 0.4, 0.1])  # brightness, contrast, saturation, hue
    color_jitter_p: float = probability(0.8)  # probability of applying the colour jitter
    grayscale_p: float = probability(0.2)  # probability of converting to grey
    blur_p: list[float] | None = probability(None)  # Gaussian blur probability per view; None = [0.5, 0.5], BYOL [1.0, 0.1]
    blur_sigma: list[float] = positive([0.1, 2.0])  # blur sigma range (pixels); kernel = 10% of the side
    solarize_p: list[float] | None = probability(None)  # solarize probability per view; None = [0, 0], BYOL [0, 0.2]

    def validate(self, key: str, source: str) -> None:
        check_min_max(self.crop_scale, f"{key}.crop_scale", source, "0 < min <= max <= 1")
        if len(self.color_jitter) != 4 or self.color_jitter[3] > 0.5:
            raise ConfigError(f"{source}: '{key}.color_jitter' must be [brightness, contrast, saturation, hue] >= 0 with hue <= 0.5.")
        check_min_max(self.blur_sigma, f"{key}.blur_sigma", source, "0 < min <= max")
        for name in ("blur_p", "solarize_p"):
            values = getattr(self, name)
            if values is not None and len(values) != 2:
                raise ConfigError(f"{source}: '{key}.{name}' must have 2 values (view 1, view 2), got {len(values)}.")


def check_min_max(values: list[float], key: str, source: str, rule: str) -> None:
    """A [min, max] range (its items' bounds were checked already)."""
    if len(values) != 2 or not values[0] <= values[1]:
        raise ConfigError(f"{source}: '{key}' must be [min, max] with {rule}.")
