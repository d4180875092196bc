"""One training step reads top to bottom: the loop, one accumulation function, the task, the
objective, the loss (mmcl frames; DeepSpeed's and torch's own call frames sit in between)."""
import json
import subprocess
import sys
from pathlib import Path

from launch import env

HERE = Path(__file__).resolve().parent


def frames(digits, out, accumulation: int) -> list[dict]:
    out.mkdir(parents=True)
    result = subprocess.run([sys.executable, str(HERE / "step_depth.py"), str(digits), str(out), str(accumulation)],
                            cwd=HERE.parents[1], env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("FRAMES "))
    return json.loads(line[len("FRAMES "):])


def test_from_the_loop_to_the_loss_is_six_mmcl_frames_in_five_files(digits, tmp_path):
    recorded = frames(digits, tmp_path / "plain", 1)
    path = [(f["file"], f["function"]) for f in recorded if f["mmcl"]]
    assert path == [("mmcl/engine/trainer.py", "loop"), ("mmcl/engine/steps.py", "plain_backward"),
                    ("mmcl/engine/task.py", "forward"), ("mmcl/engine/task.py", "combine"),
                    ("mmcl/objectives/image_text.py", "forward"), ("mmcl/losses/clip.py", "forward")]
