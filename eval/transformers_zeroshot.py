"""Zero-shot top-1 of an exported model in plain `transformers`, as whoever downloads it would compute it.

    python eval/transformers_zeroshot.py --model exports/demo --data data/demo/classification [--output r.json]

Imports only torch, PIL and transformers (never mmcl): `AutoModel` + `AutoProcessor` load the
export; the classifier is the mean of each class's prompt embeddings (`templates.json` x
`classnames.txt`, read beside the shards, as CLIP does), and every image in the shards
(`{key}.png|jpg|webp` + `{key}.cls`) is scored with `get_image_features`. Its top-1 must equal
`mmcl-zeroshot`'s on the same export and data when the export is exact (`mmcl_export.json`).
Prints one JSON line: {"acc1": ..., "images": N, "predictions": [...]}.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
from pathlib import Path

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


def read_shards(folder: Path) -> list[tuple[str, bytes, int]]:
    """(key, image bytes, label) of every labelled image in the folder's tar shards, in shard order."""
    samples = []
    for shard in sorted(folder.glob("*.tar")):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as archive:
            for member in archive:
                if member.isfile() and "." in member.name:
                    key, extension = member.name.split(".", 1)
                    members.setdefault(key, {})[extension.lower()] = archive.extractfile(member).read()
        for key, files in members.items():
            image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
            if image is not None and "cls" in files:
                samples.append((key, image, int(files["cls"].decode().strip())))
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="export folder (or Hub repo id)")
    parser.add_argument("--data", required=True, type=Path, help="folder of .tar shards with classnames.txt and templates.json")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    classnames = (args.data / "classnames.txt").read_text().splitlines()
    templates = json.loads((args.data / "templates.json").read_text())
    model = AutoModel.from_pretrained(args.model).eval()
    processor = AutoProcessor.from_pretrained(args.model, backend="pil")  # PIL: the resize mmcl evaluates with
    padding = {"padding": "max_length", "truncation": True}  # as the model was trained (model_max_length)
    with torch.no_grad():
        weights = []
        for name in classnames:
            prompts = processor.tokenizer([t.format(name) for t in templates], return_tensors="pt", **padding)
            embeddings = F.normalize(model.get_text_features(**prompts).pooler_output, dim=-1)
            weights.append(F.normalize(embeddings.mean(dim=0), dim=-1))
        classifier = torch.stack(weights)
        samples = read_shards(args.data)
        predictions = []
        for start in range(0, len(samples), args.batch_size):
            images = [Image.open(io.BytesIO(data)).convert("RGB") for _, data, _ in samples[start:start + args.batch_size]]
            pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
            features = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
            predictions += (features @ classifier.T).argmax(dim=-1).tolist()
    correct = sum(int(p == label) for p, (_, _, label) in zip(predictions, samples))
    result = {"acc1": correct / max(len(samples), 1), "images": len(samples), "predictions": predictions,
              "keys": [key for key, _, _ in samples]}
    if args.output:
        args.output.write_text(json.dumps(result) + "\n")
    print(f"plain transformers zero-shot top-1 of {args.model} on {args.data}: {result['acc1']:.1%} ({len(samples)} images)")
    print(json.dumps({k: v for k, v in result.items() if k not in ("predictions", "keys")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
