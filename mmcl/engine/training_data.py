"""The trainer's side of the data: fail-fast checks of the shards, the loader, endless batches."""
from __future__ import annotations

import os
from typing import Any, Iterator

from mmcl.config import RunConfig
from mmcl.data.class_prompts import ClassPrompts
from mmcl.data.loader import ShardLoader, TeacherData, build_train_loader
from mmcl.data.selection import SelectionError, check_selection_file
from mmcl.data.reinforced import ReinforcedStore, StoreError
from mmcl.data.shards import expand_shards, is_local, lookup_shard_sizes, refuse_pipes
from mmcl.data.transforms import ssl_view_pair
from mmcl.engine.runtime import TrainingError, say
from mmcl.objectives import needs_of
from mmcl.objectives.distill import teacher_transform


def check_shards(cfg: RunConfig) -> None:
    """Every local shard the pattern names must exist, and data.selection must be a usable selection
    file (checked on every rank, before any work).

    The pipeline itself tolerates a shard that disappears mid-run (it is skipped and counted);
    at start-up a missing one is almost always a typo in the range, so it is an error here.
    """
    if cfg.data.train_shards is None:
        raise TrainingError("data.train_shards is not set; point it at WebDataset shards, e.g. 'data/{00000..00127}.tar'.")
    for key in ("zeroshot_shards", "retrieval_shards", "knn_train_shards", "knn_test_shards"):
        refuse_pipes(getattr(cfg.eval, key, None), f"eval.{key}")  # WDS_SECURE=1: now, not after training
    refuse_pipes(cfg.data.train_shards)
    for urls in expand_shards(cfg.data.train_shards):
        missing = [u for u in urls if is_local(u) and not os.path.isfile(u)]
        if missing:
            raise TrainingError(
                f"{len(missing)} of the {len(urls)} shards named by data.train_shards do not exist "
                f"(first: {missing[0]}); fix the {{start..end}} range."
            )
    if cfg.data.selection is not None:
        try:
            check_selection_file(cfg.data.selection)  # the footer: cheap, and every rank stops alike
        except SelectionError as error:
            raise TrainingError(str(error)) from None
    check_epoch_size(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # the process group does not exist yet


def check_epoch_size(cfg: RunConfig, world_size: int) -> None:
    """Epoch mode needs the data's size when the run length comes from epochs, or when several
    ranks must run equal steps: from `sizes.json` or img2dataset's `NNNNN_stats.json` beside the
    shards (local or remote, `shards.lookup_shard_sizes`), else `data.samples_per_epoch`. Every
    rank reads the same files, so all stop here with the same sentence, or none does."""
    data = cfg.data
    if data.resampled or data.samples_per_epoch is not None or (cfg.train.steps is not None and world_size == 1):
        return
    if data.selection is not None:  # the selection file gives the epoch's size
        return
    urls = [url for source in expand_shards(data.train_shards) for url in source]
    lookup = lookup_shard_sizes(urls)
    if lookup.sizes is None:
        steps = " or train.steps" if world_size == 1 else ""
        need = "the epoch length" if cfg.train.steps is None else f"equal steps on {world_size} ranks"
        raise TrainingError(
            f"{need} needs the size of data.train_shards, which is unknown: {lookup.missing}; put a sizes.json "
            f"(shard file name -> sample count) or img2dataset's NNNNN_stats.json files beside the shards, "
            f"or set data.samples_per_epoch{steps} (or use data.resampled: true)."
        )


def build(cfg: RunConfig, tokenizer, rank: int, world_size: int, teacher=None) -> ShardLoader:
    """The training loader, yielding what the objectives need: the CLIP view (`pixel_values`) and
    captions for clip/siglip, two SSL views (`views`) for simclr/byol, and with `teacher` (a
    distillation teacher's `TeacherInputs`) its own view and tokens of each sample; with
    `distill.store`, each sample's stored crop of the epoch and the teachers' stored features."""
    needs = needs_of(cfg.objectives, cfg)
    context_length = cfg.model.text.context_length if cfg.model.text is not None else 77
    teacher_data = None
    if "teacher" in needs:
        if teacher is None:
            raise TrainingError("the distill objective needs its teacher's inputs to build the data stream.")
        teacher_data = TeacherData(teacher_transform(cfg, teacher), teacher.tokenizer, teacher.context_length,
                                   teacher.mean, teacher.std)
    store = None
    if "store" in needs:
        try:
            store = ReinforcedStore.open(cfg.distill.store, cfg.seed, cfg.data.image_size)
        except StoreError as error:
            raise TrainingError(str(error)) from None
    loader = build_train_loader(cfg.data, tokenizer if "text" in needs else None, context_length,
                                batch_size=cfg.train.micro_batch_size, seed=cfg.seed, rank=rank, world_size=world_size,
                                view_transforms=ssl_views(cfg) if "views" in needs else None,
                                pixel_values="pixel_values" in needs, teacher=teacher_data,
                                class_prompts=class_prompts(cfg) if cfg.data.captions_from_labels else None,
                                store=store, grad_accum_steps=cfg.train.grad_accum_steps)
    schedule = loader.cfg.lengths
    if schedule is not None:
        sizes = ", ".join(f"{length}: {size}" for length, size in zip(schedule.lengths, schedule.batch_sizes()))
        say(f"data.naflex: each step pads to a sequence length drawn from {schedule.lengths} (the same on every rank); "
            f"images per micro-batch per rank {{{sizes}}}"
            + (f" (token_budget {schedule.token_budget}; train.micro_batch_size is DeepSpeed's nominal value)"
               if schedule.token_budget is not None else "")
            + (f"; {loader.steps_per_epoch} micro-batches per epoch" if loader.steps_per_epoch else ""))
    selection = loader.cfg.selection
    if selection is not None:
        per_epoch = ("the resampled stream filtered by it" if cfg.data.resampled else
                     f"{loader.steps_per_epoch} steps per epoch from its expected draw" if loader.steps_per_epoch else
                     "epochs run to the end of the data")
        say(f"data.selection {selection.path}: {selection.rows} selected samples ({len(selection.partial)} balanced, "
            f"drawn per epoch); {per_epoch}")
    return loader


def class_prompts(cfg: RunConfig) -> ClassPrompts:
    """FLYP's captions (`data.captions_from_labels`): eval.templates filled with each of
    eval.classnames (class i = the i-th name), or the bare names without templates, as the
    zero-shot evaluation makes them."""
    from mmcl.evaluation.prompts import expand_prompts
    from mmcl.evaluation.settings import entries

    try:
        classnames = entries(cfg.eval.classnames, "classnames")
        templates = entries(cfg.eval.templates, "templates") or ["{}"]
        texts, class_ids = expand_prompts(classnames, templates)
    except (OSError, ValueError) as error:
        raise TrainingError(f"data.captions_from_labels cannot make the class prompts: {error}") from None
    return ClassPrompts.from_lists(texts, class_ids, cfg.seed)


def ssl_views(cfg: RunConfig):
    """The two view transforms from `ssl.views`: BYOL's asymmetric recipe when byol is an objective, else SimCLR's."""
    views = cfg.ssl.views
    return ssl_view_pair(cfg.data.image_size, "byol" if "byol" in cfg.objectives else "simclr",
                         crop_scale=views.crop_scale, flip_p=views.flip_p, color_jitter=views.color_jitter,
                         color_jitter_p=views.color_jitter_p, grayscale_p=views.grayscale_p, blur_p=views.blur_p,
                         blur_sigma=views.blur_sigma, solarize_p=views.solarize_p)


def endless(loader: ShardLoader) -> Iterator[dict[str, Any]]:
    """Batches across epoch boundaries; the loader's own state says where it is."""
    while True:
        yield from loader


def skip_counts(loader: ShardLoader) -> dict[str, int]:
    """Skipped samples by reason, summed over every rank (a collective: every rank calls it)."""
    return loader.skip_counts(all_ranks=True)
