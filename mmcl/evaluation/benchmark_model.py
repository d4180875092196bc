"""The model `mmcl benchmark` scores, from any folder mmcl evaluates, as an `EvalModel`.

- an mmcl run directory (its model/) or model directory: `mmcl.evaluation.loading.mmcl_eval_model`
  (square crops or SigLIP 2 NaFlex patches, as the run's data config says);
- an mmcl export, a transformers CLIP / SigLIP / SigLIP 2 / VisionTextDualEncoder folder (e.g. what
  `mmcl convert openclip` writes from an OpenCLIP checkpoint), or `openclip:ARCH` with --weights: the
  loaders the distillation teacher and `mmcl curate` use (`mmcl.objectives.teacher`).

`fingerprint` is the SHA-256 of the weights: a result file is reused on a rerun only for the same weights.
"""
from __future__ import annotations

from pathlib import Path

import torch

from mmcl.evaluation.benchmark_tasks import BenchmarkError
from mmcl.evaluation.loading import EvalModel, eval_transform


def model_path(spec: str) -> str:
    """`spec`, or its model/ folder when it is a run directory; a missing local path is a BenchmarkError."""
    from mmcl.model_dir import model_location

    location = model_location(spec)
    if location is None:
        raise BenchmarkError(f"--model '{spec}' does not exist; pass an mmcl run, model directory or export, a "
                             "transformers CLIP/SigLIP folder, or openclip:ARCH with --weights.")
    return location


def load_benchmark_model(spec: str, device: torch.device, weights: str | None = None,
                         openclip_config: str | None = None) -> tuple[EvalModel, str]:
    """(EvalModel on `device`, SHA-256 of its weights) for the model `spec` names (see the module docstring)."""
    from mmcl.model_dir import is_model_dir

    path = model_path(spec)
    if is_model_dir(path):
        from mmcl.evaluation.loading import mmcl_eval_model
        from mmcl.objectives.teacher import weights_sha256

        model = mmcl_eval_model(path, device)
        model.name = Path(spec).expanduser().resolve().name  # the run's name, not its model/ folder's
        return model, weights_sha256(model.module)
    return _teacher_model(path, device, weights, openclip_config)


def _teacher_model(spec: str, device: torch.device, weights: str | None,
                   openclip_config: str | None) -> tuple[EvalModel, str]:
    from mmcl.data.tokenize import CaptionTokenizer
    from mmcl.objectives.teacher import OptionNames, TeacherLoadError, load_image_text_model

    try:
        teacher = load_image_text_model(spec, weights, openclip_config, OptionNames("--model", "--weights",
                                                                                    "--openclip-config"))
    except TeacherLoadError as error:
        raise BenchmarkError(str(error)) from None
    teacher.to(device)
    inputs = teacher.inputs()
    tokenize = CaptionTokenizer(inputs.tokenizer, inputs.context_length)

    def encode_text(texts: list[str]) -> torch.Tensor:
        return teacher.encode_text(*tokenize(texts))

    if inputs.naflex is not None:
        from mmcl.data.naflex import NaFlexEvalTransform, unpack_naflex

        transform = NaFlexEvalTransform(inputs.naflex[0], inputs.naflex[1], inputs.mean, inputs.std)

        def encode_image(packed: torch.Tensor) -> torch.Tensor:
            return teacher.encode_image(**unpack_naflex(packed))
    else:
        transform = eval_transform(inputs.image_size, inputs.mean, inputs.std)
        encode_image = teacher.encode_image
    name = Path(spec).name if not spec.startswith(("openclip:", "hf-hub:")) else spec
    return (EvalModel(encode_image=encode_image, encode_text=encode_text, transform=transform, name=name,
                      pretrained=weights or spec, device=torch.device(device), module=teacher.module), teacher.sha256)
