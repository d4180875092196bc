"""Projection heads: pooled tower features [B, in_dim] -> shared embedding space [B, embed_dim].

- `linear`: one Linear without bias, as CLIP (weights ~ N(0, in_dim^-0.5), like OpenCLIP).
- `mlp`: Linear -> GELU -> Linear; hidden width `hidden_dim`, default max(in_dim, embed_dim).
- `none`: identity; the pooled width must already equal embed_dim.
"""
from __future__ import annotations

from torch import nn


def build_projection(
    kind: str, in_dim: int, embed_dim: int, hidden_dim: int | None = None, key: str = "model.image"
) -> nn.Module:
    """The head named `kind` (`linear`, `mlp`, `none`); `key` names the tower in errors."""
    if kind == "linear":
        head = nn.Linear(in_dim, embed_dim, bias=False)
        nn.init.normal_(head.weight, std=in_dim**-0.5)
        return head
    if kind == "mlp":
        hidden = hidden_dim or max(in_dim, embed_dim)
        return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))
    if kind == "none":
        if in_dim != embed_dim:
            raise ValueError(
                f"'{key}.projection' is none but the tower's pooled width is {in_dim}, not model.embed_dim = "
                f"{embed_dim}; set model.embed_dim to {in_dim} or use a linear or mlp projection."
            )
        return nn.Identity()
    raise ValueError(f"'{key}.projection' = '{kind}' is unknown; use linear, mlp or none.")
