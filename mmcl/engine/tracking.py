"""Weights & Biases beside metrics.jsonl and TensorBoard (`log.wandb`), written by rank 0 only.

What W&B gets:

- the resolved config, redacted exactly as `config.yaml` is (`mmcl.redact.redact_tree`), so a shard
  URL's token, a header or an environment value never leaves the machine;
- every metrics.jsonl record at its own step (`step=` is the optimizer step): losses, the LR of
  each parameter group, throughput, the step-time breakdown, evaluations, `samples` and `time`.
  Records of one step (the training record and an evaluation) become one history row, later values
  winning, as W&B merges them;
- the training plot (`training.png`) at the end, as the image `training_plot` on the last step's row.

W&B's console capture, code saving and run metadata (command line, git remote) are off: they
can hold shard URLs and tokens that mmcl does not see.

A resumed run continues the same W&B run: the run id is kept in every checkpoint (`layout.json`,
key `wandb_run_id`) and passed back as `wandb.init(id=..., resume="allow")`. W&B history only
grows: a step at or below the last one the run holds is refused. So after a kill, the steps
between the checkpoint and the kill that W&B already holds are not sent again (W&B keeps the
killed segment's rows there: the same losses, since resume is exact, but that segment's timings),
while metrics.jsonl keeps the rerun's. After a stop (SIGTERM, or a kill right after a checkpoint)
W&B's history equals metrics.jsonl. A run whose checkpoint has no W&B id (W&B switched on at a
resume) starts a new W&B run and sends it the records metrics.jsonl already holds first.

W&B's service (wandb-core) runs detached from the rank (`wandb beta core start`), so a launcher
that stops the run with SIGTERM to each rank's process tree does not kill it before the rank has
finished its step and saved; it ends the W&B run of a stopped or killed rank and exits 30 s after
it. W&B failing never stops the training (one line says so; metrics.jsonl goes on).

Offline (`mode: offline`) a launch writes `<dir>/wandb/offline-run-<time>-<id>/run-<id>.wandb`; a
resumed launch writes another folder with the same id. `wandb sync <dir>/wandb/offline-run-*`
uploads them in order as one run.

`check_available` runs with the config, before torch loads; the rest imports wandb only when a run starts.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmcl.coerce import ConfigError

if TYPE_CHECKING:
    from mmcl.config import RunConfig
    from mmcl.engine.run import Run

RUN_ID_KEY = "wandb_run_id"  # the key that keeps the W&B run id in each checkpoint's layout.json
PLOT_KEY = "training_plot"
MISSING = ("'log.wandb' needs the wandb package, which is not installed; run `pip install wandb` "
           "(or pip install 'mmcl[wandb]'), or remove log.wandb.")


def wanted(cfg: RunConfig) -> bool:
    """Whether the config asks for a W&B run (log.wandb set, mode not disabled)."""
    return cfg.log.wandb is not None and cfg.log.wandb.mode != "disabled"


def check_available(cfg: RunConfig, source: str = "the run config") -> None:
    """Raise ConfigError (one sentence) when log.wandb asks for W&B and the package is missing.
    Torch-free, so the training command says it before torch, DeepSpeed and the towers load."""
    if wanted(cfg) and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"{source}: {MISSING}")


def wandb_config(cfg: RunConfig) -> dict[str, Any]:
    """The config W&B receives: the resolved config as config.yaml holds it (credentials redacted)."""
    from mmcl.config import config_to_dict
    from mmcl.redact import redact_tree

    return redact_tree(config_to_dict(cfg))


def history_row(record: dict[str, Any]) -> dict[str, Any]:
    """The values of one metrics.jsonl record that W&B logs at its step (everything but `step`)."""
    return {key: value for key, value in record.items() if key != "step"}


class WandbTracker:
    """One W&B run; `log` takes metrics.jsonl records, `finish` ends the run (with the plot).

    W&B failing (its service gone, a full disk) never stops the training: the first failure is said
    in one line and the tracker stops; metrics.jsonl and TensorBoard go on."""

    def __init__(self, wandb_run: Any, logged_through: int = 0):
        self.wandb_run = wandb_run
        self.logged_through = logged_through  # the W&B run already holds the steps up to this one
        self.failed = False

    @property
    def run_id(self) -> str:
        return self.wandb_run.id

    def log(self, record: dict[str, Any]) -> None:
        """Log one metrics.jsonl record at its step (skipped when the W&B run already holds that step)."""
        step = int(record["step"])
        if step <= self.logged_through or self.failed:
            return
        self._call(self.wandb_run.log, history_row(record), step=step)

    def finish(self, plot: str | Path | None = None, step: int | None = None) -> None:
        """Add the training plot at `step` (the last one), then end the run (flushes an offline run's file)."""
        import wandb

        if plot is not None and Path(plot).is_file() and step is not None and step > self.logged_through:
            self._call(self.wandb_run.log, {PLOT_KEY: wandb.Image(str(plot), caption="loss and evaluation top-1 over steps")},
                       step=step)
        self._call(self.wandb_run.finish)

    def _call(self, method, *args, **kwargs) -> None:
        if self.failed:
            return
        try:
            method(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 (whatever W&B raises, the training goes on)
            from mmcl.engine.runtime import say
            from mmcl.redact import redact

            self.failed = True
            say(f"W&B stopped taking this run's records ({type(error).__name__}: {redact(str(error))[:200]}); "
                "metrics.jsonl and TensorBoard go on")


SERVICE_IDLE_TIMEOUT = "30s"  # how long the detached wandb-core outlives its last client (it writes the run's end then)


def _start_detached_service() -> bool:
    """Run W&B's service (wandb-core) outside this process's tree, via `wandb beta core start`.

    By default wandb.init starts wandb-core as a child of this rank, and a launcher that stops the
    run (the deepspeed launcher, torchrun: SIGTERM to each rank's process tree) kills it with the
    rank: the run's unflushed records (up to 15 s of them) are lost and the rank's next log fails,
    while the rank itself still has its step to finish and its checkpoint to save. Detached, the
    service outlives a stopped or killed rank, writes what it was sent, ends the run, and exits
    SERVICE_IDLE_TIMEOUT after its last client. A WANDB_SERVICE the user set is used as it is; a
    wandb without `beta core` keeps its default service. True when it set WANDB_SERVICE (for
    wandb.init to connect to; this process keeps that connection, so it is unset after)."""
    if os.environ.get("WANDB_SERVICE"):
        return False
    try:
        started = subprocess.run([sys.executable, "-m", "wandb", "beta", "core", "start", "--idle-timeout", SERVICE_IDLE_TIMEOUT],
                                 capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return False
    lines = started.stdout.strip().splitlines()
    if started.returncode != 0 or not lines:
        return False
    os.environ["WANDB_SERVICE"] = lines[-1].strip()
    return True


def _connected() -> bool:
    """Whether this process already holds a connection to a W&B service (an earlier run in it)."""
    from wandb.sdk import wandb_setup

    setup = getattr(wandb_setup, "_singleton", None)
    return getattr(setup, "_connection", None) is not None


def start_tracker(cfg: RunConfig, run_id: str | None = None, logged_through: int = 0) -> WandbTracker | None:
    """Start (run_id None) or continue (`id=run_id, resume="allow"`) the W&B run of `cfg`; None
    when log.wandb is unset or disabled. `logged_through`: the last step the continued run holds."""
    if not wanted(cfg):
        return None
    try:
        import wandb
    except ImportError:
        raise ConfigError(MISSING) from None
    from mmcl.redact import redact

    settings = cfg.log.wandb
    folder = Path(settings.dir or cfg.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    name = settings.name or Path(cfg.output_dir).resolve().name
    # No console capture, code, git or command-line metadata: they can carry secrets mmcl cannot redact.
    quiet = wandb.Settings(console="off", x_disable_meta=True, disable_git=True, save_code=False, disable_code=True,
                           x_save_requirements=False, silent=True)
    resume = {"id": run_id, "resume": "allow"} if run_id else {}
    detached = False if _connected() else _start_detached_service()
    try:
        wandb_run = wandb.init(project=settings.project, entity=settings.entity, name=redact(name),
                               tags=list(settings.tags) or None, mode=settings.mode, dir=str(folder),
                               config=wandb_config(cfg), settings=quiet, **resume)
    except Exception as error:  # noqa: BLE001 (login, network, permissions: each is one sentence for the user)
        from mmcl.engine.runtime import TrainingError

        reason = redact(str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)
        raise TrainingError(f"W&B could not start the run ({reason}); run `wandb login` or set WANDB_API_KEY for "
                            "log.wandb.mode=online, or use log.wandb.mode=offline.") from None
    finally:
        if detached:  # this process stays connected; its children must not inherit a service that ends with it
            os.environ.pop("WANDB_SERVICE", None)
    return WandbTracker(wandb_run, logged_through if run_id else 0)


def tracker_for_run(run: Run, logged: list[dict[str, Any]], kept: list[dict[str, Any]]) -> WandbTracker | None:
    """Rank 0's tracker of log.wandb (None without). It continues the W&B run whose id the resumed
    checkpoint keeps, or starts one and first sends it `kept` (the records metrics.jsonl kept from
    before); its id goes into every later checkpoint. `logged`: metrics.jsonl's records before
    the resume dropped those past the checkpoint (a killed launch had sent them to W&B)."""
    from mmcl.engine.runtime import say

    run_id = (run.saved_layout or {}).get(RUN_ID_KEY)
    logged_through = max((int(r["step"]) for r in logged), default=0)
    tracker = start_tracker(run.cfg, run_id, logged_through)
    if tracker is None:
        return None
    run.layout[RUN_ID_KEY] = tracker.run_id  # saved with each checkpoint (layout.json)
    if run_id is None:
        for record in kept:
            tracker.log(record)
    continued = f", continued after step {max(tracker.logged_through, run.step)}" if run_id else ""
    say(f"W&B run {tracker.run_id} ({run.cfg.log.wandb.mode}{continued})")
    return tracker
