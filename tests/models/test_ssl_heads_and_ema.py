"""SSL heads, the BYOL momentum schedule, EMA updates, and SSL views through the dual encoder."""
import math

import pytest
import torch
import torch.nn.functional as F

from mmcl.models import FloatBatchNorm1d, MLPHead, build_model, cosine_momentum, ema_update_, frozen_copy

from .tiny import image_batch, model_config


@pytest.mark.parametrize("base", [0.99, 0.996])
def test_momentum_schedule_at_start_middle_and_end(base):
    total = 1000
    assert cosine_momentum(0, total, base) == pytest.approx(base)
    assert cosine_momentum(total // 2, total, base) == pytest.approx((1 + base) / 2)
    assert cosine_momentum(total, total, base) == pytest.approx(1.0)
    assert cosine_momentum(total // 4, total, base) == pytest.approx(1 - (1 - base) * (math.cos(math.pi / 4) + 1) / 2)
    values = [cosine_momentum(k, total, base) for k in range(total + 1)]
    assert all(a <= b for a, b in zip(values, values[1:]))  # never decreases
    assert cosine_momentum(2 * total, total, base) == 1.0  # clamped past the end


def test_ema_update_moves_the_target_towards_the_online_weights_in_float32():
    target = [torch.zeros(3), torch.ones(2, 2)]
    online = [torch.full((3,), 10.0, dtype=torch.bfloat16), torch.full((2, 2), 3.0)]
    ema_update_(target, online, momentum=0.9)
    assert torch.allclose(target[0], torch.full((3,), 1.0))  # 0.9 * 0 + 0.1 * 10
    assert torch.allclose(target[1], torch.full((2, 2), 1.2))  # 0.9 * 1 + 0.1 * 3
    assert target[0].dtype == torch.float32
    ema_update_(target, online, momentum=1.0)  # the end of the schedule: frozen
    assert torch.allclose(target[0], torch.full((3,), 1.0))
    with pytest.raises(ValueError, match="target shape"):
        ema_update_([torch.zeros(2)], [torch.zeros(3)], 0.5)


def test_frozen_copy_is_an_equal_copy_without_gradients():
    head = MLPHead(8, 16, 4)
    copy = frozen_copy(head)
    assert all(not p.requires_grad for p in copy.parameters())
    assert all(torch.equal(a, b) and a is not b for a, b in zip(head.parameters(), copy.parameters()))
    assert all(p.requires_grad for p in head.parameters())


def test_mlp_head_shapes_and_layers():
    head = MLPHead(32, 64, 16, num_layers=3)
    kinds = [type(m).__name__ for m in head.layers]
    assert kinds == ["Linear", "FloatBatchNorm1d", "ReLU", "Linear", "FloatBatchNorm1d", "ReLU", "Linear"]
    assert head(torch.randn(5, 32)).shape == (5, 16)
    assert [type(m).__name__ for m in MLPHead(32, 64, 16, num_layers=1).layers] == ["Linear"]


def test_float_batchnorm_equals_batchnorm_and_accepts_low_precision_parameters():
    torch.manual_seed(0)
    reference, ours = torch.nn.BatchNorm1d(6), FloatBatchNorm1d(6)
    with torch.no_grad():
        reference.weight.uniform_(); reference.bias.uniform_()
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(10, 6)
    assert torch.allclose(ours(x), reference(x), atol=1e-6)
    assert torch.allclose(ours.running_mean, reference.running_mean) and ours.num_batches_tracked.item() == 1
    ours.eval(), reference.eval()
    assert torch.allclose(ours(x), reference(x), atol=1e-6)
    # DeepSpeed's bf16: parameters cast, running statistics kept in float32
    ours.train()
    ours.weight.data, ours.bias.data = ours.weight.data.bfloat16(), ours.bias.data.bfloat16()
    out = ours(x.bfloat16())
    assert out.dtype == torch.bfloat16 and ours.running_mean.dtype == torch.float32


def test_views_go_through_the_tower_once_and_give_pooled_features():
    torch.manual_seed(0)
    model = build_model(model_config(text=None)).eval()
    images, v1, v2 = image_batch(2, seed=1), image_batch(2, seed=2), image_batch(2, seed=3)
    calls = []
    model.image_tower.register_forward_hook(lambda module, args, kwargs_or_out: calls.append(1))
    out = model(pixel_values=images, views=[v1, v2])
    assert len(calls) == 1
    assert out["view_features"].shape == (4, 32)  # [2B, tower width]: pooled, before the projection
    assert torch.allclose(out["view_features"][:2], model.pooled_image_features(v1), atol=1e-5)
    assert torch.allclose(out["view_features"][2:], model.pooled_image_features(v2), atol=1e-5)
    assert torch.allclose(out["image_features"], model.encode_image(images), atol=1e-5)
    assert torch.allclose(out["image_features"].norm(dim=-1), torch.ones(2))
    assert torch.allclose(model.encode_image(images, normalize=False),
                          model.image_projection(model.pooled_image_features(images)))
    only_views = model(views=[v1, v2])
    assert "image_features" not in only_views and torch.allclose(only_views["view_features"], out["view_features"], atol=1e-5)
    assert F.normalize(only_views["view_features"], dim=-1).shape == (4, 32)
