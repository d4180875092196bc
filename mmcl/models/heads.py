"""MLP heads of the self-supervised objectives (SimCLR projector, BYOL projector and predictor).

    MLPHead(in_dim, hidden_dim, out_dim, num_layers, output_norm=False, sync_batchnorm=False):
        [B, in_dim] -> (Linear -> BatchNorm1d -> ReLU) x (num_layers - 1) -> Linear [-> BatchNorm1d] -> [B, out_dim]

SimCLR's projector is 2 layers (2048 -> 128 here by default), SLIP's 3 (4096 -> 256); BYOL's
projector and predictor are 2 layers (4096 -> 256); SimSiam's projector is 3 layers with a
BatchNorm on its output too (`output_norm`). Linear layers followed by BatchNorm have no
bias. lightly's `heads.py` and solo-learn use the same shapes.

BatchNorm normalises with the statistics of this rank's batch, or with `sync_batchnorm`
with those of the global batch (all ranks), as the SimCLR, BYOL and MoCo v3 recipes do.
torch's SyncBatchNorm needs CUDA; `FloatBatchNorm1d(sync=True)` works on gloo and NCCL
alike: two all-reduces per layer and step (the per-feature sums, then the sums of squared
deviations from the global mean), differentiable, so every rank's gradient is that of
BatchNorm over the concatenated global batch. It computes in float32 whatever the
parameter dtype, because DeepSpeed casts parameters to bf16/fp16 but keeps buffers (the
running statistics) in float32, which torch's batch_norm refuses to mix.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmcl.distributed import all_reduce_with_grad


class FloatBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d computed in float32 (input, affine parameters, statistics); output in the input's dtype.

    sync: in training, normalise with the global batch's statistics (all ranks' rows). Every
    rank must then call forward the same number of times (it runs collectives).
    """

    def __init__(self, num_features: int, sync: bool = False, **kwargs):
        super().__init__(num_features, **kwargs)
        self.sync = sync

    def extra_repr(self) -> str:
        return super().extra_repr() + (", sync=True" if self.sync else "")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        if self.sync and self.training:
            return self._global_batch_norm(x, momentum)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        out = F.batch_norm(
            x.float(),
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight.float() if self.weight is not None else None,
            self.bias.float() if self.bias is not None else None,
            use_batch_stats,
            momentum,
            self.eps,
        )
        return out.to(x.dtype)

    def _global_batch_norm(self, x: Tensor, momentum: float) -> Tensor:
        """x [B_local, C] normalised by the mean and (biased) variance over all ranks' rows."""
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))  # float64 stays float64
        # The row count rides along with the sums: one collective for both.
        count_and_sums = all_reduce_with_grad(torch.cat([x32.new_tensor([x32.shape[0]]), x32.sum(0)]))
        count = count_and_sums[0].detach()
        mean = count_and_sums[1:] / count
        centered = x32 - mean
        # Deviations from the global mean, not sum(x^2) - N mean^2: no cancellation in float32.
        var = all_reduce_with_grad(centered.square().sum(0)) / count
        out = centered * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            out = out * self.weight.to(x32.dtype) + self.bias.to(x32.dtype)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                unbiased = var.detach() * count / (count - 1).clamp_min(1)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        return out.to(x.dtype)


class MLPHead(nn.Module):
    """[B, in_dim] -> [B, out_dim]; see the module docstring. Input is cast to the weights' dtype."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, output_norm: bool = False,
                 sync_batchnorm: bool = False):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"an MLP head needs at least 1 layer, got {num_layers}.")
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(width, hidden_dim, bias=False), FloatBatchNorm1d(hidden_dim, sync=sync_batchnorm),
                       nn.ReLU(inplace=True)]
            width = hidden_dim
        layers.append(nn.Linear(width, out_dim, bias=not output_norm))
        if output_norm:
            layers.append(FloatBatchNorm1d(out_dim, sync=sync_batchnorm))
        self.layers = nn.Sequential(*layers)
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x.to(self.layers[0].weight.dtype))
