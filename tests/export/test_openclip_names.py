"""OpenCLIP <-> transformers CLIP names come from one two-way table: each direction inverts the other."""
import torch

from mmcl.export.openclip_import import OPENCLIP_STACKS, RESBLOCK_NAMES, TOWER_NAMES, map_tower


def tower_state(prefix: str, side: str, layers: int, width: int = 4) -> dict[str, torch.Tensor]:
    """Random tensors under every name of one transformers CLIP tower that the table covers."""
    generator = torch.Generator().manual_seed(0)
    state = {f"{prefix}.{name}": torch.randn(3, generator=generator) for _, s, name in TOWER_NAMES if s == side}
    for i in range(layers):
        layer = f"{prefix}.encoder.layers.{i}."
        for _, name in RESBLOCK_NAMES:
            state.update({f"{layer}{name}.{kind}": torch.randn(width, generator=generator) for kind in ("weight", "bias")})
        for p in "qkv":
            state[f"{layer}self_attn.{p}_proj.weight"] = torch.randn(width, width, generator=generator)
            state[f"{layer}self_attn.{p}_proj.bias"] = torch.randn(width, generator=generator)
    return state


def test_mapping_a_tower_to_openclip_and_back_gives_every_tensor_back():
    for side, prefix in (("image", "image_tower"), ("text", "text_tower")):
        state = tower_state(prefix, side, layers=2)
        openclip = map_tower(state, side, prefix, 2, to_openclip=True)
        back = map_tower(openclip, side, prefix, 2, to_openclip=False)
        assert back.keys() == state.keys()
        assert all(torch.equal(back[name], tensor) for name, tensor in state.items())
        stack = OPENCLIP_STACKS[side]
        assert openclip[f"{stack}.resblocks.1.attn.in_proj_weight"].shape == (12, 4)  # q, k, v fused
        assert torch.equal(openclip[f"{stack}.resblocks.1.attn.in_proj_weight"][4:8],
                           state[f"{prefix}.encoder.layers.1.self_attn.k_proj.weight"])
        assert torch.equal(openclip[f"{stack}.resblocks.0.ln_1.weight"], state[f"{prefix}.encoder.layers.0.layer_norm1.weight"])
    assert len(map_tower(tower_state("vision_model", "image", 0), "image", "vision_model", 0, to_openclip=True)) == 7
