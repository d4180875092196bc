"""The call path of one training step, from the trainer's loop to the image-text loss.

    python tests/e2e/step_depth.py DIGITS_DIR OUT_DIR [GRAD_ACCUM_STEPS]

Trains one step in this process (one rank, DeepSpeed ZeRO-2 on the CPU, the tiny e2e config)
with `ClipLoss.forward` wrapped to record the stack the first time it runs, and prints as JSON
the frames from `loop` (mmcl/engine/trainer.py) to the loss: every frame, and mmcl's own.
"""
import json
import os
import sys
import traceback
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from launch import free_port, tiny_run_config  # noqa: E402

os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")

import mmcl.losses.clip as clip  # noqa: E402
from mmcl.distributed import run_command  # noqa: E402
from mmcl.engine.cli import main  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
data, out = Path(sys.argv[1]), Path(sys.argv[2])
config = tiny_run_config(data, out / "run", steps=1, grad_accum_steps=int(sys.argv[3]) if len(sys.argv) > 3 else 1)
(out / "run.yaml").write_text(yaml.safe_dump(config))
recorded = []
forward = clip.ClipLoss.forward


def recording_forward(self, *args, **kwargs):
    if not recorded:
        stack = traceback.extract_stack()[:-1]  # less this wrapper, which stands for ClipLoss.forward
        start = next(i for i, f in enumerate(stack) if f.name == "loop" and f.filename.endswith("mmcl/engine/trainer.py"))
        for frame in stack[start:]:
            name = os.path.relpath(frame.filename, REPO) if frame.filename.startswith(str(REPO)) else frame.filename
            recorded.append({"file": name, "function": frame.name, "mmcl": name.startswith("mmcl/")})
        recorded.append({"file": "mmcl/losses/clip.py", "function": "forward", "mmcl": True})
    return forward(self, *args, **kwargs)


def run() -> int:
    status = main(["--config", str(out / "run.yaml")])
    print("FRAMES " + json.dumps(recorded))
    return status


clip.ClipLoss.forward = recording_forward
run_command(run)
