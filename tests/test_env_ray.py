"""Scale-out recipe: collect from MorphogenesisEnv with TorchRL's RayCollector (two local workers).

ray is in the `test` extra (pyproject.toml), so CI runs this; it is not skipped when ray is missing."""

from __future__ import annotations

import pytest
import functools
import sys

import ray
import ray.cloudpickle
import torch
from tensordict.nn import TensorDictModule
from torch import nn

from esper_fn import GateConfig
from esper_fn.envs import MorphogenesisEnv, ray_collector

# Ray workers cannot import this test module: ship its functions and classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class MaskedUniform(nn.Module):
    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        return torch.multinomial(mask.float().reshape(-1, mask.shape[-1]), 1).reshape(mask.shape[:-1])


def spirals_env(num_envs: int, max_epochs: int) -> MorphogenesisEnv:
    return MorphogenesisEnv(task="spirals", host="mlp-impaired", num_envs=num_envs, max_epochs=max_epochs,
                            subset={"train": 100, "val": 100}, blueprints=("mlp_gelu", "lora_r4"), tempos=(1,),
                            gates=GateConfig(min_training_epochs=0))


@pytest.mark.slow
def test_ray_collector_two_local_workers():
    policy = TensorDictModule(MaskedUniform(), in_keys=["action_mask"], out_keys=["action"])
    collector = ray_collector(functools.partial(spirals_env, 2, 2), policy, frames_per_batch=8, total_frames=16,
                              num_workers=2)
    batches = []
    try:
        for batch in collector:  # not list(collector): RayCollector.__len__ fails in torchrl 0.14.1
            batches.append(batch)
    finally:
        collector.shutdown()
        ray.shutdown()
    assert sum(b.numel() for b in batches) == 16
    for b in batches:
        assert torch.isfinite(b["next", "reward"]).all()
        assert b["action_mask"].gather(-1, b["action"].unsqueeze(-1)).all()  # every action was legal
