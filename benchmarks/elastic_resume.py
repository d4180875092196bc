"""The elastic-resume figures README quotes: per ZeRO stage, a 2-rank run interrupted mid-epoch
and resumed at 1 and at 4 ranks (the launches of tests/e2e/test_elastic_resume_launches.py,
which asserts the same values).

    python benchmarks/elastic_resume.py [--out DIR]

Prints, per stage and resume, the interrupted epoch's coverage (samples expected, seen, seen
twice) and the largest difference between the re-partitioned fp32 weights / Adam moments and
the checkpoint's. Runs the real `deepspeed` launcher on CPU gloo ranks (DS_ACCELERATOR=cpu; the
1-rank resumes as `python train.py`): about as long as the e2e test module.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "e2e"))

import test_elastic_resume_launches as elastic  # noqa: E402

from data_tools.demo_dataset import build_demo  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args(argv)
    root = args.out or Path(tempfile.mkdtemp(prefix="mmcl_elastic_"))

    def new_dir(name: str) -> Path:
        path = root / name
        path.mkdir(parents=True, exist_ok=False)
        return path

    data = new_dir("digits24")
    build_demo(data, image_size=16, samples_per_shard=elastic.PER_SHARD)
    expected = elastic.epoch_keys(data)
    for stage, (first, debug0, interrupted_at, resumes, base) in elastic.launch_elastic_runs(data, new_dir).items():
        before = elastic.logged_keys(debug0, up_to=interrupted_at)
        for ranks, micro, workers, _, debug, _ in resumes:
            figures = elastic.coverage(expected, before, debug)
            print(f"ZeRO-{stage}: 2 ranks stopped by {elastic.SIGNAL[stage].name} at step {interrupted_at}, resumed on "
                  f"{ranks} ranks (micro batch {micro}, {workers} workers): {figures}")
        worst = elastic.max_differences(first, interrupted_at, resumes, new_dir(f"universal{stage}"))
        print(f"ZeRO-{stage}: largest |resumed - checkpoint| after re-partitioning: {worst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
