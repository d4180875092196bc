"""An objective is declared once: registering a new class is all the config, the data needs, the
task and the docs need. Run in a fresh interpreter, because the run config's sections are built
from the registry when `mmcl.config` is first imported."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

NEW_OBJECTIVE = '''
from dataclasses import dataclass

import torch

from mmcl.coerce import count
from mmcl.engine.objectives import OBJECTIVES
from mmcl.engine.objectives.base import Objective, image_width


@dataclass
class VarianceConfig:
    """A toy VICReg-like variance term on a projection of the views."""

    out_dim: int = count(8)  # projector output width


class VarianceObjective(Objective):
    name = "variance"
    settings = VarianceConfig
    settings_key = "ssl.variance"
    needs = frozenset({"views"})

    def __init__(self, width, out_dim):
        super().__init__()
        self.head = torch.nn.Linear(width, out_dim)

    @classmethod
    def build(cls, model, cfg=None, chunk_size=None):
        return cls(image_width(model), cls.settings_in(cfg).out_dim)

    def forward(self, outputs, batch=None):
        z = self.head(outputs["view_features"]).float()
        return {"loss": torch.relu(1 - z.std(0)).mean()}


OBJECTIVES["variance"] = VarianceObjective  # the registration

from mmcl.config import ConfigError, from_dict, uses_text, uses_views
from mmcl.docs import config_reference, objectives_table
from mmcl.engine.task import TrainingTask
from mmcl.models import build_model

VIT = {"model_type": "vit", "image_size": 16, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 1,
       "num_attention_heads": 2, "intermediate_size": 64}
RUN = {"model": {"image": {"config": VIT, "projection": "none", "pooling": "cls"}, "embed_dim": 32},
       "objectives": {"variance": 1.0}, "ssl": {"variance": {"out_dim": 4}}}
cfg = from_dict(RUN)
assert cfg.ssl.variance.out_dim == 4 and uses_views(cfg) and not uses_text(cfg)
try:
    from_dict({**RUN, "ssl": {"variance": {"out_dim": 0}}})
    raise AssertionError("out_dim 0 was accepted")
except ConfigError as error:
    assert "'ssl.variance.out_dim' must be >= 1, got 0." in str(error), error
task = TrainingTask(build_model(cfg.model), cfg.objectives, None, cfg)
out = task({"views": [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)]})
assert out["loss"].requires_grad and out["variance"] >= 0 and task.needs == {"views"}
assert "| `variance` |" in objectives_table() and "  variance:" in config_reference()
assert "projector output width (>= 1)" in config_reference()
print("registered")
'''


@pytest.mark.slow
def test_a_registered_objective_gets_its_config_section_range_checks_data_needs_and_docs():
    result = subprocess.run([sys.executable, "-c", NEW_OBJECTIVE], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("registered")
