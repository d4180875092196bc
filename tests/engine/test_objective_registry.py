"""An objective is declared once: adding one is its declaration (settings + `ObjectiveSpec` in
mmcl/objectives/settings.py, one registry entry), its module (mmcl/objectives/<name>.py) and one
field in the run config's section (mmcl/config.py) — and the config, the data needs, the task and
the docs follow. The test makes exactly those edits in a copy of mmcl/ and checks the result in a
fresh interpreter."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# 1. mmcl/objectives/settings.py: the torch-free declaration, appended, and its registry entry.
DECLARATION = '''

@dataclass
class VarianceConfig:
    """A toy VICReg-like variance term on a projection of the views."""

    out_dim: int = count(8)  # projector output width


VARIANCE = ObjectiveSpec("variance", "mmcl.objectives.variance:VarianceObjective", frozenset({"views"}), VarianceConfig,
                         "ssl.variance")
OBJECTIVES["variance"] = VARIANCE
'''

# 2. mmcl/objectives/variance.py: the nn.Module.
MODULE = '''
import torch

from mmcl.objectives.base import Objective, image_width


class VarianceObjective(Objective):
    name = "variance"

    def __init__(self, width, out_dim):
        super().__init__()
        self.head = torch.nn.Linear(width, out_dim)

    @classmethod
    def build(cls, model, cfg=None, chunk_size=None):
        return cls(image_width(model), cls.settings_in(cfg).out_dim)

    def forward(self, outputs, batch=None):
        z = self.head(outputs["view_features"]).float()
        return {"loss": torch.relu(1 - z.std(0)).mean()}
'''

# 3. mmcl/config.py: its settings' field in the ssl section.
CONFIG_FIELD = ("    triplet: TripletConfig = field(default_factory=TripletConfig)\n",
                "    variance: VarianceConfig = field(default_factory=VarianceConfig)\n")
CONFIG_IMPORT = ("from mmcl.objectives.settings import (", "from mmcl.objectives.settings import (VarianceConfig, ")


def add_variance_objective(root: Path) -> None:
    """The edits a new objective makes, applied to the copy of mmcl/ under `root`."""
    settings = root / "mmcl/objectives/settings.py"
    settings.write_text(settings.read_text() + DECLARATION)
    (root / "mmcl/objectives/variance.py").write_text(MODULE)
    config = root / "mmcl/config.py"
    text = config.read_text()
    for old, new in (CONFIG_IMPORT, (CONFIG_FIELD[0], CONFIG_FIELD[0] + CONFIG_FIELD[1])):
        assert old in text, old
        text = text.replace(old, new, 1)
    config.write_text(text)


NEW_OBJECTIVE = '''
import torch

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
assert "mmcl/objectives/variance.py" in objectives_table()
print("registered")
'''


@pytest.mark.slow
def test_a_registered_objective_gets_its_config_section_range_checks_data_needs_and_docs(tmp_path):
    shutil.copytree(REPO / "mmcl", tmp_path / "mmcl", ignore=shutil.ignore_patterns("__pycache__"))
    add_variance_objective(tmp_path)
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", NEW_OBJECTIVE], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("registered")


def test_every_declared_objective_with_settings_has_its_field_in_the_run_config():
    import typing

    from mmcl.config import RunConfig
    from mmcl.objectives import OBJECTIVES

    for spec in OBJECTIVES.values():
        if spec.settings is None:
            continue
        owner = RunConfig
        *sections, key = spec.settings_key.split(".")
        for section in sections:
            owner = typing.get_type_hints(owner)[section]
        assert typing.get_type_hints(owner)[key] is spec.settings, spec.name
