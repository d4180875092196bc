"""Weights files named on the command line or in the config: one sentence for a bad one, and a pickle
that would run code is never unpickled (`mmcl convert openclip --weights`, `distill.weights`).

The crafted files are real torch.save pickles whose __reduce__ would create a marker file.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from mmcl.cli import main as mmcl_main
from mmcl.objectives.settings import DistillConfig
from mmcl.objectives.teacher import TeacherLoadError, load_teacher

TINY = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "layers": 1, "width": 16, "head_width": 8, "patch_size": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def files(tmp_path):
    """(OpenCLIP config of 'tiny-weights-args', marker, {kind: weights file})."""
    config = tmp_path / "tiny-weights-args.json"
    config.write_text(json.dumps(TINY))
    marker = tmp_path / "marker"
    torch.save({"state_dict": Payload(marker)}, tmp_path / "crafted.pt")
    with open(tmp_path / "crafted_legacy.pt", "wb") as handle:  # torch's pre-zip format, read by its own unpickler
        torch.save({"state_dict": Payload(marker)}, handle, _use_new_zipfile_serialization=False)
    (tmp_path / "empty.bin").write_bytes(b"")
    return config, marker, {"crafted": tmp_path / "crafted.pt", "legacy": tmp_path / "crafted_legacy.pt",
                            "empty": tmp_path / "empty.bin", "device": "/dev/null", "folder": tmp_path,
                            "missing": tmp_path / "missing.pt"}


EXPECTED = {
    "crafted": "holds a pickled 'posix.system', not only tensors, and unpickling it could run code; pass a .safetensors "
               "file or a .pt/.bin holding only the state dict's tensors.",
    "legacy": "holds a pickled 'posix.system', not only tensors, so it is not loaded (unpickling it could run code); "
              "pass a .safetensors file or a state dict of tensors.",
    "empty": "is empty; pass a .safetensors file or a .pt/.bin holding only the state dict's tensors.",
}
# What is not a file at all is refused by the argument check before any work (mmcl.export.staging).
NOT_A_FILE = {"device": "is not a regular file", "folder": "is a folder", "missing": "does not exist"}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_convert_names_what_is_wrong_with_the_weights_file_in_one_line(kind, files, tmp_path, capsys):
    config, marker, weights = files
    code = mmcl_main(["convert", "openclip", "--model", "tiny-weights-args", "--config", str(config),
                      "--weights", str(weights[kind]), "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert code == 2
    assert error == f"mmcl: error: OpenCLIP weights file {weights[kind]} {EXPECTED[kind]}\n"
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", sorted(NOT_A_FILE))
def test_convert_refuses_weights_that_are_no_file_before_any_work(kind, files, tmp_path, capsys):
    config, marker, weights = files
    code = mmcl_main(["convert", "openclip", "--model", "tiny-weights-args", "--config", str(config),
                      "--weights", str(weights[kind]), "--out", str(tmp_path / "out")])
    assert code == 2
    assert capsys.readouterr().err == f"mmcl: error: --weights {weights[kind]} {NOT_A_FILE[kind]}; pass the file itself.\n"
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["crafted", "legacy", "device"])
def test_distill_weights_that_are_not_plain_tensors_are_refused_without_running_them(kind, files):
    config, marker, weights = files
    with pytest.raises(TeacherLoadError) as error:
        load_teacher(DistillConfig(teacher="openclip:tiny-weights-args", openclip_config=str(config), weights=str(weights[kind])))
    message = str(error.value)
    assert message.count("\n") == 0 and "pass a .safetensors file" in message
    assert ("pickled" in message) if kind != "device" else message.startswith("distill.weights '/dev/null' is not a regular file")
    assert not marker.exists()
