"""A guard for one gap in DeepSpeed's universal-checkpoint loader under ZeRO 1/2 (DeepSpeed 0.19).

`ZeROOptimizer.load_hp_checkpoint_state_from_checkpoint_dir` loads, per optimizer group, the
fragments of the fp32 weights and Adam moments that this rank's flat partition holds, then
reads `steps[0]` of the fragments' steps. After re-partitioning over more ranks, a small group
(biases, the logit scale) can lie wholly in other ranks' partitions: this rank holds no
fragment, `steps` is empty and the load fails with IndexError. `tolerate_empty_partitions()`
runs DeepSpeed's own loop with that one case handled: such a group's flat partition holds only
alignment padding, so its moments are zeros and its step the one of the other groups. Every
real fragment is still read by DeepSpeed's `load_hp_checkpoint_state` (nothing is re-sharded here).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch


def _load_hp_checkpoint_state_from_checkpoint_dir(self, lp_groups_name: str, checkpoint_dir: str) -> None:
    from deepspeed.runtime.base_optimizer import _get_universal_checkpoint_ep_info
    from deepspeed.runtime.utils import bwc_tensor_model_parallel_rank
    from deepspeed.utils.tensor_fragment import map_to_flat_opt_states

    checkpoint_dir = os.path.join(checkpoint_dir, "zero")
    optim_state_path = os.path.join(checkpoint_dir, "optimizer_state.pt")
    if not os.path.isfile(optim_state_path):
        raise FileNotFoundError(f"{optim_state_path} (the universal checkpoint's optimizer state) is missing")
    # loaded as DeepSpeed does; resume runs this inside restricted_unpickling, which makes it weights-only
    optim_sd = torch.load(optim_state_path, weights_only=False)
    self._load_global_state(optim_sd)
    tp_rank = bwc_tensor_model_parallel_rank(mpu=self.mpu)
    if self.mpu is None:
        tp_world_size = 1
    elif hasattr(self.mpu, "get_slice_parallel_world_size"):
        tp_world_size = self.mpu.get_slice_parallel_world_size()
    else:
        tp_world_size = self.mpu.get_tensor_model_parallel_world_size()
    ep_rank, ep_size = _get_universal_checkpoint_ep_info()

    without_fragments, all_keys, common_step = [], set(), None
    lp_groups = getattr(self, lp_groups_name)
    for i, (param_group, loaded_param_group) in enumerate(zip(self.optimizer.param_groups, optim_sd["param_groups"])):
        opt_keys, steps = set(), []
        for lp in lp_groups[i]:
            if lp._hp_mapping is not None:
                step = lp.load_hp_checkpoint_state(os.path.join(checkpoint_dir, self.param_names[lp]), tp_rank,
                                                   tp_world_size, ep_rank=ep_rank, ep_size=ep_size)
                opt_keys.update(lp._hp_mapping.get_optim_state_keys())
                steps.append(step)
        hp_param = param_group["params"][0]
        if steps:
            if any(step != steps[0] for step in steps):
                raise RuntimeError(f"optimizer group {i}: fragments saved at different steps {steps}")
            if steps[0] is not None:
                self.optimizer.state[hp_param]["step"] = steps[0]
                common_step = steps[0]
            map_to_flat_opt_states(hp_param, lp_groups[i], self.optimizer.state, opt_keys)
            all_keys |= opt_keys
        else:  # the case DeepSpeed does not handle: this rank's partition of the group is padding only
            without_fragments.append(hp_param)
        for key, value in loaded_param_group.items():
            if key != "params":
                param_group[key] = value
    for hp_param in without_fragments:
        for key in all_keys:
            self.optimizer.state[hp_param][key] = torch.zeros_like(hp_param)
        if common_step is not None:
            self.optimizer.state[hp_param]["step"] = common_step


@contextlib.contextmanager
def tolerate_empty_partitions() -> Iterator[None]:
    """Within the block, ZeRO 1/2 universal loads accept groups of which a rank holds no fragment."""
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    original = ZeROOptimizer.load_hp_checkpoint_state_from_checkpoint_dir
    ZeROOptimizer.load_hp_checkpoint_state_from_checkpoint_dir = _load_hp_checkpoint_state_from_checkpoint_dir
    try:
        yield
    finally:
        ZeROOptimizer.load_hp_checkpoint_state_from_checkpoint_dir = original
