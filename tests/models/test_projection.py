import pytest
import torch
from torch import nn

from mmcl.models import build_projection


def test_linear_projection_has_no_bias():
    head = build_projection("linear", 32, 16)
    assert isinstance(head, nn.Linear) and head.bias is None and head.weight.shape == (16, 32)


def test_mlp_hidden_width_defaults_to_the_larger_side_and_can_be_set():
    head = build_projection("mlp", 32, 16)
    assert [type(m) for m in head] == [nn.Linear, nn.GELU, nn.Linear]
    assert head[0].out_features == 32 and head[2].out_features == 16
    assert build_projection("mlp", 8, 16)[0].out_features == 16
    assert build_projection("mlp", 32, 16, hidden_dim=64)[0].out_features == 64
    x = torch.randn(3, 32)
    torch.testing.assert_close(head(x), head[2](nn.functional.gelu(head[0](x))))


def test_none_projection_is_identity_when_widths_match():
    x = torch.randn(3, 16)
    assert torch.equal(build_projection("none", 16, 16)(x), x)


def test_none_projection_with_other_width_is_refused():
    with pytest.raises(ValueError, match=r"'model.text.projection' is none but the tower's pooled width is 32, not model.embed_dim = 16"):
        build_projection("none", 32, 16, key="model.text")
