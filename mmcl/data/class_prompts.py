"""Captions made from class labels, for FLYP ("Finetune like you pretrain", Goyal et al. 2023).

A labelled sample (`.cls`, as `mmcl-write-shards imagenet` writes) is paired with one of its
class's prompts (a template filled with the class name) instead of a `.txt` caption, and the
clip loss then trains on those pairs as it would on image-caption pairs. The prompt is drawn
per sample and epoch from (seed, epoch, sample key) alone: the same on every rank layout, on
a resume, and in every DataLoader worker, so resumed and elastic runs see the same captions.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from .decode import BadSample
from .shards import derive_seed


@dataclass(frozen=True)
class ClassPrompts:
    """prompts[c]: the captions class c may get (at least one each); seed: the run's seed."""

    prompts: tuple[tuple[str, ...], ...]
    seed: int = 0

    def __post_init__(self) -> None:
        empty = [c for c, texts in enumerate(self.prompts) if not texts]
        if not self.prompts or empty:
            raise ValueError(f"every class needs at least one prompt; class {empty[0] if empty else 0} has none.")

    @classmethod
    def from_lists(cls, texts: list[str], class_ids: list[int], seed: int = 0) -> ClassPrompts:
        """From `mmcl.evaluation.prompts.expand_prompts`' (texts [P], class ids [P]) of classes 0..C-1."""
        grouped: list[list[str]] = [[] for _ in range(max(class_ids) + 1)] if class_ids else []
        for text, class_id in zip(texts, class_ids):
            grouped[class_id].append(text)
        return cls(tuple(tuple(group) for group in grouped), seed)

    def caption(self, label: int, key: str, epoch: int) -> str:
        """Class `label`'s prompt for sample `key` in `epoch`; raises BadSample("bad_label") for
        a label without class name."""
        if not 0 <= label < len(self.prompts):
            raise BadSample("bad_label", f"label {label} is not one of the {len(self.prompts)} classes of eval.classnames")
        choices = self.prompts[label]
        if len(choices) == 1:
            return choices[0]
        return choices[random.Random(derive_seed(self.seed, "class-prompt", epoch, key)).randrange(len(choices))]
