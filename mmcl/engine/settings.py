"""The `optim`, `train` and `log` sections of a run config.

Field comments document the keys (README's configuration reference is generated from them).
Imports neither torch nor deepspeed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mmcl.coerce import ConfigError, bounded, count, nonnegative, positive, probability


@dataclass
class OptimConfig:
    """AdamW with parameter groups and a schedule."""

    lr: float = positive(5e-4)  # peak learning rate of the projections, logit scale and fresh towers
    image_lr: float | None = positive(None)  # image tower's learning rate (None = lr); pretrained towers often want less
    text_lr: float | None = positive(None)  # text tower's learning rate (None = lr)
    # layer-wise lr decay: layer i of a tower's N-layer stack gets its lr x decay^(N+1-i), the embeddings (what
    # precedes the stack) decay^(N+1), the final norms/pooler after it the full lr; heads and logit scale the full lr
    layer_decay: float | None = bounded(None, 0, 1, low_open=True)
    image_layer_decay: float | None = bounded(None, 0, 1, low_open=True)  # the image tower's decay (None = layer_decay)
    text_layer_decay: float | None = bounded(None, 0, 1, low_open=True)  # the text tower's decay (None = layer_decay)
    weight_decay: float = nonnegative(0.2)  # not applied to biases, norms, embeddings' position tables, logit scale/bias
    betas: list[float] = bounded([0.9, 0.98], 0, 1, high_open=True)  # AdamW's beta1, beta2
    eps: float = positive(1e-6)  # AdamW's epsilon
    schedule: Literal["cosine", "constant_cooldown", "constant"] = "cosine"  # all with linear warmup
    warmup_steps: int = nonnegative(0)  # linear warmup from 0 to the peak over the first N steps
    cooldown_steps: int = nonnegative(0)  # constant_cooldown: linear decay to min_lr over the last N steps
    min_lr_ratio: float = probability(0.0)  # floor of the schedule, as a fraction of each group's peak
    grad_clip: float | None = positive(1.0)  # max global gradient norm (None = no clipping)

    def validate(self, key: str, source: str) -> None:
        if len(self.betas) != 2:
            raise ConfigError(f"{source}: '{key}.betas' must have 2 values (beta1, beta2), got {len(self.betas)}.")


@dataclass
class TrainConfig:
    """Batch sizes, length, precision, and how often to log, evaluate and save."""

    micro_batch_size: int = count(32)  # samples per rank per forward
    grad_accum_steps: int = count(1)  # micro-batches per optimizer step
    global_batch_size: int | None = count(None)  # optional check: must equal micro * accum * world size
    accumulation: Literal["feature_cache", "plain"] = "feature_cache"  # feature_cache: the exact large-batch gradient of clip/siglip/distill (GradCache); plain: per micro-batch
    steps: int | None = count(None)  # optimizer steps to train (None = epochs * steps per epoch)
    epochs: int = count(1)  # used when steps is None
    precision: Literal["fp32", "bf16", "fp16"] | None = None  # None: as the DeepSpeed JSON says (fp32 if silent)
    log_every: int = count(10)  # steps between log lines / monitor events
    eval_every: int | None = nonnegative(None)  # steps between evaluations (None or 0 = only at the end)
    checkpoint_every: int | None = nonnegative(None)  # steps between checkpoints (None or 0 = only at the end)
    keep_checkpoints: int = count(2)  # newest checkpoints kept on disk
    resume: str | None = None  # "latest" or a checkpoint directory (any world size / workers / micro batch)
    allow_batch_change: bool = False  # resume with another global batch: remaining steps re-derived from remaining samples
    # resume a checkpoint whose pickles hold objects other than tensors and DeepSpeed's own types
    # (refused by default: unpickling them can run code); only for checkpoints you trust
    trust_checkpoint: bool = False
    zero_stage: int | None = bounded(None, 0, 3)  # ZeRO stage when no --deepspeed_config is given (default 2)
    max_nonfinite_steps: int = count(5)  # abort after this many non-finite losses in a row
    patch_dropout_final_steps: int = nonnegative(0)  # train the last N steps with every patch token (FLIP's unmasked tuning)
    # torch.compile the towers (inductor; the CPU needs a C++ compiler). The first steps include
    # the compilation. Not with ZeRO stage 3 (refused at start-up).
    compile: bool = False


@dataclass
class WandbConfig:
    """Weights & Biases tracking (rank 0 only), beside metrics.jsonl and TensorBoard: the resolved config
    (redacted as config.yaml is), every metrics.jsonl record at its step, the training plot; a resumed
    run continues the same W&B run (its id is kept in each checkpoint). Needs `pip install wandb`."""

    project: str = "mmcl"  # W&B project the run is logged to
    entity: str | None = None  # W&B team or user (None = your default entity)
    name: str | None = None  # the run's display name (None = the output_dir's folder name)
    tags: list[str] = field(default_factory=list)  # tags shown in the W&B run table
    # online: stream to the server (needs `wandb login` or WANDB_API_KEY); offline: write the run under
    # dir for a later `wandb sync DIR/wandb/offline-run-*`; disabled: log nothing (keeps the keys in the config)
    mode: Literal["online", "offline", "disabled"] = "online"
    dir: str | None = None  # folder W&B writes its files under, in a wandb/ subfolder (None = output_dir)

    def validate(self, key: str, source: str) -> None:
        if not self.project.strip():
            raise ConfigError(f"{source}: '{key}.project' is empty; name a W&B project (e.g. mmcl).")


@dataclass
class LogConfig:
    """Where the training metrics go besides metrics.jsonl, TensorBoard and the console."""

    wandb: WandbConfig | None = None  # Weights & Biases, e.g. {project: clip, mode: offline} (None = off)
