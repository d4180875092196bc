"""WiSE-FT (Wortsman et al., 2022): interpolate the weights of a zero-shot and a fine-tuned model.

    mmcl wise-ft --zero-shot DIR --fine-tuned DIR --alpha 0.25 --alpha 0.5 --out DIR [--eval --data T --data H ...]

θ(α) = (1 − α)·θ_zero-shot + α·θ_fine-tuned, for every weight of two models of one architecture
(mmcl model directories, run directories or `mmcl export` folders). Each α is written as an exact
export (`mmcl.export.export.export_model`, which checks its embeddings) to <out>/alpha_<α>/. With
`eval`, each α is evaluated zero-shot on every dataset (the first is the fine-tuning target, the
others held-out), and <out> gets wise_ft.json (the sweep) and wise_ft.png (target vs held-out
accuracy, one point per α), as the paper plots it:

    <out>/
      alpha_0/, alpha_0.5/, alpha_1/    exports
      mmcl_wise_ft.json                 the inputs, the α values, the folders and (with --eval) the sweep
      wise_ft.png                       with --eval
"""
from __future__ import annotations

import argparse
import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from mmcl.export.errors import ExportError
from mmcl.export.staging import check_out, staged

INFO = "mmcl_wise_ft.json"  # also the marker that lets --overwrite replace an earlier wise-ft output
PLOT = "wise_ft.png"


@dataclass
class Loaded:
    """One input: a DualEncoder (float32, eval, CPU), its RunConfig and tokenizer (or None)."""

    path: str
    model: torch.nn.Module
    config: Any
    tokenizer: Any


def alpha_name(alpha: float) -> str:
    """The export folder of one α: alpha_0, alpha_0.25, alpha_1."""
    return f"alpha_{alpha:g}"


def check_alphas(alphas: Sequence[float]) -> list[float]:
    """The sorted distinct α values; each must lie in [0, 1]."""
    for alpha in alphas:
        if not 0.0 <= alpha <= 1.0:
            raise ExportError(f"--alpha {alpha:g} is outside [0, 1]; WiSE-FT mixes the two models with 0 <= alpha <= 1.")
    return sorted(set(float(alpha) for alpha in alphas))


def load_input(path: str | Path, flag: str) -> Loaded:
    """A model directory / run directory (its model/ or latest checkpoint), an `mmcl export` folder, or
    a `transformers` CLIPModel / SiglipModel / VisionTextDualEncoderModel folder or hub id (the model
    a fine-tune started from with `model.init_from`)."""
    from mmcl.config import ConfigError, from_dict
    from mmcl.export.source import load_model, locate
    from mmcl.models.init_source import source_kind

    folder = Path(path).expanduser()
    try:
        kind, described = source_kind(str(path))
        if kind in ("export", "clip", "siglip", "vtde"):  # rebuilt exactly through model.init_from
            from mmcl.model_dir import _self_contained
            from mmcl.models import build_tokenizer
            from mmcl.pretrained import build_model

            dual = kind != "export" or "text" in described
            raw = {"model": {"init_from": str(folder), **({} if dual else {"text": None})},
                   "objectives": {"clip": 1.0} if dual else {"simclr": 1.0}}
            config = from_dict(raw, source=f"{flag} {path}")
            torch.manual_seed(0)
            model = build_model(config.model).float().eval()
            tokenizer = build_tokenizer(config.model.text) if dual else None
            return Loaded(str(path), model, _self_contained(config, model, None), tokenizer)
        model, config, tokenizer = load_model(locate(folder))
        return Loaded(str(path), model, config, tokenizer)
    except (ExportError, ConfigError, ValueError, OSError) as error:
        message = str(error)
        raise ExportError(message if message.startswith(flag) else f"{flag} {path}: {message}") from error


def _architecture(loaded: Loaded) -> dict[str, Any]:
    """What must be equal for the weights to be mixed: each tower's config and head, the transform, the shapes."""
    model_cfg, data = loaded.config.model, loaded.config.data
    facts: dict[str, Any] = {}
    for side in ("image", "text"):
        tower = getattr(loaded.model, f"{side}_tower")
        if tower is None:
            facts[f"{side} tower"] = None
            continue
        # class and type here, sizes through the weight shapes: an export's tower config differs from its
        # model dir's in what the export aligned for transformers (pooler_act, eos_token_id), not in architecture
        facts[f"{side} tower"] = f"{type(tower).__name__} ({tower.config.model_type})"
        facts[f"{side} pooling"] = getattr(loaded.model, f"{side}_pooling")
        facts[f"{side} projection"] = getattr(model_cfg, side).projection
    facts["image transform"] = (data.image_size, list(data.image_mean or []), list(data.image_std or []))
    if model_cfg.text is not None:
        facts["context length"] = model_cfg.text.context_length
        facts["tokenizer"] = json.dumps(loaded.tokenizer.get_vocab(), sort_keys=True) if loaded.tokenizer else None
    facts["logit bias"] = loaded.model.logit_bias is not None
    return facts


def check_same_architecture(zero_shot: Loaded, fine_tuned: Loaded) -> None:
    """Raise ExportError (one sentence) unless the two models can be interpolated weight by weight."""
    a, b = _architecture(zero_shot), _architecture(fine_tuned)
    what = next((key for key in a if a[key] != b.get(key)), None)
    if what is None:
        shapes_a = {name: tuple(t.shape) for name, t in zero_shot.model.state_dict().items()}
        shapes_b = {name: tuple(t.shape) for name, t in fine_tuned.model.state_dict().items()}
        name = next((name for name in sorted(set(shapes_a) | set(shapes_b)) if shapes_a.get(name) != shapes_b.get(name)), None)
        what = None if name is None else f"weight '{name}' ({shapes_a.get(name)} vs {shapes_b.get(name)})"
    if what is not None:
        raise ExportError(f"--zero-shot {zero_shot.path} and --fine-tuned {fine_tuned.path} differ in their {what}; "
                          "WiSE-FT mixes the weights of two models of one architecture, so pass the model that was "
                          "fine-tuned from the zero-shot one.")


def interpolate(zero_shot: dict[str, torch.Tensor], fine_tuned: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """(1 − α)·θ0 + α·θ1 for every floating-point tensor; integer buffers are taken from θ0 (they must agree).

    α = 0 and α = 1 return copies of θ0 and θ1 themselves: the formula would turn -0.0 into 0.0 and
    NaN·0 into NaN, and the ends of the sweep must be the two inputs bit for bit."""
    if alpha == 0.0:
        return {name: tensor.clone() for name, tensor in zero_shot.items()}
    if alpha == 1.0:
        return {name: tensor.clone() for name, tensor in fine_tuned.items()}
    mixed = {}
    for name, theta0 in zero_shot.items():
        theta1 = fine_tuned[name]
        if theta0.is_floating_point():
            mixed[name] = (1.0 - alpha) * theta0 + alpha * theta1
        else:
            if not torch.equal(theta0, theta1):
                raise ExportError(f"the integer buffer '{name}' differs between the two models; they are not one architecture.")
            mixed[name] = theta0.clone()
    return mixed


def eval_model(model, config, tokenizer, name: str, device: torch.device):
    """An EvalModel (mmcl.evaluation.loading) over an in-memory DualEncoder."""
    import torch.nn.functional as F

    from mmcl.evaluation.loading import EvalModel, eval_transform, text_encoder

    model = model.to(device).eval()

    @torch.no_grad()
    def encode_image(pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(model.encode_image(pixel_values.to(device)).float(), dim=-1)

    return EvalModel(encode_image=encode_image,
                     encode_text=text_encoder(model, tokenizer, config.model.text.context_length, device),
                     transform=eval_transform(config.data.image_size, config.data.image_mean, config.data.image_std),
                     name=name, pretrained=name, device=device, module=model)


def wise_ft(zero_shot: str, fine_tuned: str, alphas: Sequence[float], out_dir: str | Path, *, overwrite: bool = False,
            eval_args: argparse.Namespace | None = None) -> dict[str, Any]:
    """Write the exports of every α (and, with `eval_args`, the sweep) into `out_dir`; returns the summary.

    eval_args: the parsed mmcl-zeroshot options (add_zeroshot_options, batch_size, workers, split,
    device) and `data`, a list of datasets: the fine-tuning target first, then the held-out ones."""
    from mmcl.export.export import export_model

    alphas = check_alphas(alphas)
    out = check_out(out_dir, overwrite=overwrite, sources=[zero_shot, fine_tuned], what="output folder")
    if eval_args is not None and len(eval_args.data) < 2:
        raise ExportError("--eval needs at least two --data: the fine-tuning target first, then held-out data.")
    theta0, theta1 = load_input(zero_shot, "--zero-shot"), load_input(fine_tuned, "--fine-tuned")
    check_same_architecture(theta0, theta1)
    if eval_args is not None and theta0.config.model.text is None:
        raise ExportError(f"--eval classifies zero-shot, which needs a text tower; {zero_shot} has none.")
    state0, state1 = theta0.model.state_dict(), theta1.model.state_dict()
    summary: dict[str, Any] = {"format": "mmcl-wise-ft", "zero_shot": _label(zero_shot),
                               "fine_tuned": _label(fine_tuned), "alphas": alphas,
                               "exports": {f"{alpha:g}": alpha_name(alpha) for alpha in alphas}}
    rows = []
    with staged(out) as staging:
        for alpha in alphas:
            model = copy.deepcopy(theta0.model)
            model.load_state_dict(interpolate(state0, state1, alpha))
            export_model(model, theta0.config, theta0.tokenizer, staging / alpha_name(alpha))
            if eval_args is not None:
                rows.append({"alpha": alpha, **evaluate(model, theta0, eval_args, alpha)})
        if eval_args is not None:
            names = dataset_names(eval_args.data)
            summary["datasets"] = {"target": names[0], "held_out": names[1:]}
            summary["sweep"] = rows
            plot_sweep(rows, staging / PLOT, target=names[0])
            summary["plot"] = PLOT
        (staging / INFO).write_text(json.dumps(summary, indent=2) + "\n")
    summary["out"] = str(out)
    return summary


def _label(path: str) -> str:
    """A model's name for the summary without machine paths: its folder, or run/model for a run's model/."""
    path = Path(path).expanduser().resolve()
    return f"{path.parent.name}/{path.name}" if path.name == "model" else path.name


def dataset_names(datas: Sequence[str]) -> list[str]:
    """One distinct short name per --data, without machine paths: its folder (a shard's parent), with
    as many parent folders as it takes to tell two apart (…/digits/classification vs …/shapes/classification)."""
    from mmcl.redact import redact

    folders = []
    for data in datas:
        path = Path(redact(data.split("::")[0]))
        folders.append((path if path.is_dir() else path.parent).parts or (str(path),))
    for depth in range(1, max(len(parts) for parts in folders) + 1):
        names = ["/".join(parts[-depth:]) for parts in folders]
        if len(set(names)) == len(names):
            return names
    return [f"{name}#{index}" for index, name in enumerate(names)]  # the same data given twice


def evaluate(model, loaded: Loaded, args: argparse.Namespace, alpha: float) -> dict[str, Any]:
    """Top-1 of the mixed model on every dataset: {"target": acc, "held_out": mean acc, "per_dataset": {...}}."""
    from mmcl.evaluation.running import setup_distributed, zeroshot_metrics

    device = setup_distributed(args.device)
    evaluated = eval_model(model, loaded.config, loaded.tokenizer, alpha_name(alpha), device)
    per_dataset = {}
    for data, name in zip(args.data, dataset_names(args.data)):
        metrics, _ = zeroshot_metrics(args, evaluated, device, data)
        per_dataset[name] = float(metrics["acc1"])
    accuracies = list(per_dataset.values())
    model.cpu()
    return {"target": accuracies[0], "held_out": sum(accuracies[1:]) / len(accuracies[1:]), "per_dataset": per_dataset}


def format_sweep(rows: list[dict[str, Any]]) -> str:
    """The α sweep as a table: α, target top-1, held-out top-1 (mean), then each dataset's top-1."""
    names = list(rows[0]["per_dataset"])
    header = ["alpha", "target", "held-out"] + names
    widths = [max(8, len(name)) for name in header]
    lines = ["  ".join(f"{name:>{width}}" for name, width in zip(header, widths))]
    for row in rows:
        values = [f"{row['alpha']:g}", f"{row['target']:.4f}", f"{row['held_out']:.4f}"]
        values += [f"{row['per_dataset'][name]:.4f}" for name in names]
        lines.append("  ".join(f"{value:>{width}}" for value, width in zip(values, widths)))
    return "\n".join(lines)


def plot_sweep(rows: list[dict[str, Any]], path: Path, target: str) -> Path:
    """PNG: top-1 on the target (x) against top-1 on held-out data (y), one labelled point per α."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, ys = [row["target"] for row in rows], [row["held_out"] for row in rows]
    figure, axes = plt.subplots(figsize=(5.5, 4.5))
    axes.plot(xs, ys, color="tab:gray", linewidth=1, zorder=1)
    points = axes.scatter(xs, ys, c=[row["alpha"] for row in rows], cmap="viridis", vmin=0, vmax=1, zorder=2)
    labels: dict[tuple[float, float], list[str]] = {}
    for row, x, y in zip(rows, xs, ys):  # α values that land on one point share one label
        labels.setdefault((x, y), []).append(f"{row['alpha']:g}")
    for (x, y), alphas in labels.items():
        axes.annotate(f"α={', '.join(alphas)}", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    for values, limit in ((xs, axes.set_xlim), (ys, axes.set_ylim)):  # at least 0.1 wide, within [0, 1]
        middle, half = (max(values) + min(values)) / 2, max(0.05, (max(values) - min(values)) * 0.6)
        limit(max(0.0, middle - half), min(1.0, middle + half))
    figure.colorbar(points, ax=axes, label="α (0: zero-shot, 1: fine-tuned)")
    axes.set_xlabel(f"top-1 on the target ({target})")
    axes.set_ylabel("top-1 on held-out data (mean)")
    axes.set_title("WiSE-FT: weight interpolation")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
