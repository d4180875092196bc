"""Peak memory of decoding one large image the way the training pipeline does.

    python benchmarks/sample_memory.py --megapixels 81 --mode gray16 [--mode rgb8 ...] [--json]

For each mode it writes a PNG of that many pixels (a smooth ramp, so it stays small on disk),
then, in a fresh subprocess, decodes it with `mmcl.data.samples.decode_image_tensor` (PIL ->
RGB uint8 [3, H, W], the path every PNG takes; with --crop, then CLIP's training crop) and reports the growth of the peak resident
set (ru_maxrss) over the process's peak just before decoding (after decoding an 8x8 copy, so
one-off costs of the code paths are not counted), the output tensor included, next to the image's 8-bit RGB
size (3 bytes per pixel). Run it with PYTHONPATH at another checkout to compare versions.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = ("gray16", "gray8", "rgb8", "rgba8")

CHILD = """
import resource, sys
path, max_pixels, crop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
from mmcl.data.samples import decode_image_tensor
from mmcl.data.transforms import clip_train_transform
transform = clip_train_transform(crop) if crop else (lambda image: image)
data = open(path, "rb").read()
import io
from PIL import Image
warm = io.BytesIO()
Image.open(path).resize((8, 8)).save(warm, "PNG")  # first use of PIL/torch paths: not this image's cost
transform(decode_image_tensor(warm.getvalue(), max_pixels))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
image = decode_image_tensor(data, max_pixels)
pixels = image.shape[1] * image.shape[2]
crop = transform(image)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(before, after, pixels)
"""


def write_png(path: Path, mode: str, width: int, height: int) -> None:
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 1, width, dtype=np.float32)[None, :].repeat(height, 0)
    if mode == "gray16":
        image = Image.fromarray((ramp * 65535).astype(np.uint16))
    elif mode == "gray8":
        image = Image.fromarray((ramp * 255).astype(np.uint8))
    else:
        grey = (ramp * 255).astype(np.uint8)
        channels = [grey, grey[::-1], np.full_like(grey, 128)] + ([np.full_like(grey, 200)] if mode == "rgba8" else [])
        image = Image.fromarray(np.stack(channels, axis=-1))
    image.save(path, "PNG", compress_level=1)


def measure(mode: str, megapixels: float, crop: int = 0) -> dict:
    """{"mode", "pixels", "rgb8_mb", "peak_growth_mb", "ratio"} for one image, decoded in a subprocess
    (then cropped by CLIP's training transform to `crop` px when `crop` > 0)."""
    width = int((megapixels * 1e6 * 4 / 3) ** 0.5)
    height = int(megapixels * 1e6 / width)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{mode}.png"
        write_png(path, mode, width, height)
        done = subprocess.run([sys.executable, "-c", CHILD, str(path), str(width * height), str(crop)], capture_output=True,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-2000:])
        before_kb, after_kb, pixels = (int(v) for v in done.stdout.split())
    rgb8 = 3 * pixels / 2**20
    growth = (after_kb - before_kb) / 1024
    return {"mode": mode, "crop": crop, "pixels": pixels, "rgb8_mb": round(rgb8, 1), "peak_growth_mb": round(growth, 1),
            "ratio": round(growth / rgb8, 2)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megapixels", type=float, default=81.0)
    parser.add_argument("--mode", choices=MODES, action="append")
    parser.add_argument("--crop", type=int, default=0, help="also apply CLIP's training crop to this size")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    for mode in args.mode or ["gray16", "rgb8"]:
        result = measure(mode, args.megapixels, args.crop)
        print(json.dumps(result) if args.json else
              f"{mode:>7}: {result['pixels'] / 1e6:.1f} Mpx, 8-bit RGB {result['rgb8_mb']} MB, "
              f"peak growth {result['peak_growth_mb']} MB ({result['ratio']}x)")


if __name__ == "__main__":
    main()
