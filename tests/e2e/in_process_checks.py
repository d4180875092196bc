"""Launched once by `deepspeed --num_gpus 2` for the whole session (tests/e2e/conftest.py:
`in_process_checks`): the single-step engine checks that need a real process group but no
training run, one after another in this one launch, so the launcher and the ranks start once.

- "accumulation": accumulation_equivalence.py under ZeRO 1, 2, 3 (tests/e2e/test_accumulation.py)
- "accumulation_patch_dropout": the same with patch dropout 0.5 (tests/e2e/test_patch_dropout_launches.py)
- "distill_accumulation": distill_accumulation.py (tests/e2e/test_distill.py)
- "byol_ema": byol_ema_zero.py (tests/e2e/test_ssl_training.py)

Each script still runs alone (its own `main`). Writes {name: results} to argv[1] (JSON) from rank 0.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mmcl.engine.runtime import init_process_group, select_accelerator  # noqa: E402

select_accelerator()

import accumulation_equivalence  # noqa: E402
import byol_ema_zero  # noqa: E402
import distill_accumulation  # noqa: E402

from mmcl.distributed import get_rank, run_command  # noqa: E402

CHECKS = {
    "accumulation": lambda: accumulation_equivalence.measure([1, 2, 3]),
    "accumulation_patch_dropout": lambda: accumulation_equivalence.measure([1, 2, 3], patch_dropout=0.5),
    "distill_accumulation": distill_accumulation.measure,
    "byol_ema": byol_ema_zero.measure,
}


def main() -> None:
    out_path = [a for a in sys.argv[1:] if not a.startswith("--local_rank")][0]  # the launcher adds --local_rank
    init_process_group()
    results = {name: check() for name, check in CHECKS.items()}
    if get_rank() == 0:
        Path(out_path).write_text(json.dumps(results))


if __name__ == "__main__":
    run_command(main)
