"""Inspect a WebDataset shard set: count samples, decode every image and caption, report damage.

    mmcl-inspect-shards 'out/{00000..00003}.tar' [more patterns or folders] [--json] [--no-captions] [--strict]

Prints one row per shard (samples, good, bad, problems) and totals; `--json` prints the same
as JSON. Exit status 1 when the set is unusable or damaged: a shard that cannot be opened or
is truncated, or no good sample at all; with `--strict`, also when any sample is bad.
Samples are decoded with `mmcl.data.decode`, the same code the training pipeline uses, and
every problem of a sample is counted by reason, never raised; members above the training
defaults' byte limits (64 KiB for .txt/.cls/.json, 256 MiB for images) are not read.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

from mmcl.data.decode import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_TEXT_BYTES,
    IMAGE_EXTENSIONS,
    BadSample,
    caption_list,
    decode_image,
    decode_label,
    decode_metadata,
    member_bytes,
)

from .errors import DataToolsError
from .shard_reader import ShardError, expand_urls, iter_samples, require_shards

MAX_EXAMPLES = 20  # bad samples listed per shard; the counts cover all of them


@dataclass
class ShardReport:
    """Result of reading one shard. `status`: ok, truncated or unreadable."""

    url: str
    status: str = "ok"
    error: str = ""
    samples: int = 0
    good: int = 0
    problems: Counter = field(default_factory=Counter)
    bad_samples: list[dict] = field(default_factory=list)
    expected: int | None = None  # from sizes.json next to the shard, when listed there

    @property
    def bad(self) -> int:
        return self.samples - self.good

    def to_dict(self) -> dict:
        return {
            "url": self.url,
            "status": self.status,
            "error": self.error,
            "samples": self.samples,
            "good": self.good,
            "bad": self.bad,
            "problems": dict(sorted(self.problems.items())),
            "bad_samples": self.bad_samples,
            "expected": self.expected,
        }


@dataclass
class SetReport:
    """Reports of all shards plus totals; `ok` is False when the set is unusable or damaged."""

    shards: list[ShardReport]
    strict: bool = False

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def good(self) -> int:
        return sum(s.good for s in self.shards)

    @property
    def problems(self) -> Counter:
        return sum((s.problems for s in self.shards), Counter())

    @property
    def ok(self) -> bool:
        if self.good == 0 or any(s.status != "ok" for s in self.shards):
            return False
        return not (self.strict and self.good != self.samples)

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "shards": [s.to_dict() for s in self.shards],
            "totals": {
                "shards": len(self.shards),
                "damaged_shards": sum(s.status != "ok" for s in self.shards),
                "samples": self.samples,
                "good": self.good,
                "bad": self.samples - self.good,
                "problems": dict(sorted(self.problems.items())),
            },
        }


def member_limit(field: str) -> int | None:
    """What the inspector reads of a member: images and .txt/.cls/.json up to the training defaults."""
    if field in IMAGE_EXTENSIONS:
        return DEFAULT_MAX_IMAGE_BYTES
    return DEFAULT_MAX_TEXT_BYTES if field in ("txt", "cls", "json") else None


def sample_problems(fields: dict[str, Any], captions: bool = True) -> list[tuple[str, str]]:
    """(reason, detail) for everything wrong with one sample; empty when it is usable.

    Nothing raises: whatever a member's bytes make a decoder do becomes a problem.
    """
    problems: list[tuple[str, str]] = []

    def check(field: str, reason: str, decode) -> None:
        try:
            decode(member_bytes(fields[field], field))
        except BadSample as error:
            problems.append((error.reason, str(error).removeprefix(error.reason).removeprefix(": ")))
        except Exception as error:  # a decoder failure nobody classified: still this sample's problem
            problems.append((reason, f"{type(error).__name__}: {error}"))

    image_field = next((ext for ext in IMAGE_EXTENSIONS if ext in fields), None)
    if image_field is None:
        problems.append(("missing_image", f"fields: {', '.join(sorted(fields))}"))
    else:
        check(image_field, "corrupt_image", decode_image)
    if captions:
        if "txt" not in fields:
            problems.append(("missing_caption", f"fields: {', '.join(sorted(fields))}"))
        else:
            check("txt", "bad_caption", caption_list)
    if "cls" in fields:
        check("cls", "bad_label", decode_label)
    if "json" in fields:
        check("json", "bad_json", decode_metadata)
    return problems


def inspect_shard(url: str, captions: bool = True) -> ShardReport:
    """Read one shard completely and check every sample."""
    report = ShardReport(url=url, expected=_expected_count(url))
    seen: set[str] = set()
    try:
        for key, fields in iter_samples(url, member_limit):
            report.samples += 1
            problems = sample_problems(fields, captions)
            if key in seen:  # webdataset would yield two samples with the same key
                problems.append(("duplicate_key", "key appears twice"))
            seen.add(key)
            if problems:
                report.problems.update(reason for reason, _ in problems)
                if len(report.bad_samples) < MAX_EXAMPLES:
                    report.bad_samples.append({"key": key, "problems": [f"{r}: {d}" if d else r for r, d in problems]})
            else:
                report.good += 1
    except ShardError as error:
        report.status, report.error = error.kind, error.detail
    return report


def inspect_shards(specs: str | list[str], captions: bool = True, workers: int = 1, strict: bool = False) -> SetReport:
    """Inspect every shard that `specs` (patterns, globs or folders) names, in order."""
    urls = require_shards(expand_urls(specs), specs)
    if workers > 1 and len(urls) > 1:
        with multiprocessing.get_context("spawn").Pool(min(workers, len(urls))) as pool:
            reports = pool.starmap(inspect_shard, [(url, captions) for url in urls])
    else:
        reports = [inspect_shard(url, captions) for url in urls]
    return SetReport(reports, strict=strict)


def _expected_count(url: str) -> int | None:
    """The shard's count in a `sizes.json` beside it, if there is one that lists it."""
    sizes = Path(url).parent / "sizes.json"
    try:
        value = json.loads(sizes.read_text(encoding="utf-8")).get(Path(url).name)
    except (OSError, ValueError, AttributeError, RecursionError):
        return None
    return value if isinstance(value, int) else None


def format_table(report: SetReport) -> str:
    """Human-readable per-shard table, totals, and a few bad samples per shard."""
    width = max([len("total"), *(len(s.url) for s in report.shards)])
    lines = [f"{'shard':<{width}}  {'samples':>8}  {'good':>8}  {'bad':>6}  problems"]
    for shard in report.shards:
        notes = [f"{reason}={count}" for reason, count in sorted(shard.problems.items())]
        if shard.status != "ok":
            notes.insert(0, f"{shard.status.upper()}: {shard.error}")
        if shard.expected is not None and shard.expected != shard.samples:
            notes.append(f"sizes.json says {shard.expected}")
        lines.append(
            f"{shard.url:<{width}}  {shard.samples:>8}  {shard.good:>8}  {shard.bad:>6}  {', '.join(notes) or '-'}"
        )
    totals = ", ".join(f"{reason}={count}" for reason, count in sorted(report.problems.items())) or "-"
    lines.append(
        f"{'total':<{width}}  {report.samples:>8}  {report.good:>8}  {report.samples - report.good:>6}  {totals}"
    )
    for shard in report.shards:
        for sample in shard.bad_samples:
            lines.append(f"  {shard.url} {sample['key']}: {'; '.join(sample['problems'])}")
    damaged = sum(s.status != "ok" for s in report.shards)
    verdict = "OK" if report.ok else "FAILED"
    lines.append(
        f"{verdict}: {len(report.shards)} shards, {damaged} damaged, {report.good} good samples of {report.samples}"
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmcl-inspect-shards", description="Decode every sample of a shard set and report problems."
    )
    parser.add_argument(
        "shards", nargs="+", help="shard patterns like 'out/{00000..00003}.tar', globs, or folders of .tar files"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--no-captions", action="store_true", help="image-only shards: a missing .txt is not a problem")
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 when any sample is bad, not only when the set is unusable"
    )
    parser.add_argument(
        "--workers", metavar="N", type=int, default=1, help="processes reading shards in parallel (default 1)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (`mmcl-inspect-shards`); returns 0 when the set is usable, else exits 1."""
    args = build_parser().parse_args(argv)
    try:
        report = inspect_shards(args.shards, captions=not args.no_captions, workers=args.workers, strict=args.strict)
    except DataToolsError as error:
        raise SystemExit(f"mmcl-inspect-shards: error: {error}") from None
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_table(report))
    if not report.ok:
        raise SystemExit(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
