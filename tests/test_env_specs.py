"""MorphogenesisEnv with TorchRL's tooling: check_env_specs on every host preset, transforms, collectors."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.envs import ActionMask, Compose, RewardSum, StepCounter, TransformedEnv
from torchrl.envs.utils import check_env_specs

from esper_fn import GateConfig, hosts
from esper_fn.envs import MorphogenesisEnv

with warnings.catch_warnings():
    # torchrl 0.14.1 warns about its own VanillaWeightUpdater while importing torchrl.collectors.
    warnings.simplefilter("ignore", DeprecationWarning)
    from torchrl.collectors import Collector, MultiSyncCollector

SMALL = {"train": 100, "val": 100}
BPS = ("conv1d_k5", "mlp_gelu", "lora_r4", "attention_mhsa")


class MaskedUniform(nn.Module):
    """Samples a legal action uniformly (reads the mask, so it works in any process)."""

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        return torch.multinomial(mask.float().reshape(-1, mask.shape[-1]), 1).reshape(mask.shape[:-1])


def masked_policy() -> TensorDictModule:
    return TensorDictModule(MaskedUniform(), in_keys=["action_mask"], out_keys=["action"])


def make_env(num_envs: int = 2, max_epochs: int = 2, **kw) -> MorphogenesisEnv:
    args = dict(task="mnist1d", host="mlp-impaired", num_envs=num_envs, max_epochs=max_epochs, subset=SMALL,
                blueprints=BPS, tempos=(1,), gates=GateConfig(min_training_epochs=0))
    args.update(kw)
    return MorphogenesisEnv(**args)


@pytest.mark.parametrize("num_envs", [1, 4])
@pytest.mark.parametrize("host", sorted(hosts.hosts()))
def test_check_env_specs_on_every_preset(host, num_envs):
    # each preset on MNIST-1D, except the 2-D CNNs, which take images
    env = make_env(num_envs, host=host, task="mnist5k-img" if host.startswith("cnn2d") else "mnist1d")
    check_env_specs(env, seed=0)
    td = env.rollout(3, masked_policy(), break_when_any_done=False)  # crosses an episode end and a reset
    assert td.shape == (num_envs, 3)


@pytest.mark.parametrize("num_envs", [1, 4])
def test_check_env_specs_mixed_contexts(num_envs):
    contexts = [("mnist1d", "mlp-impaired"), ("mnist1d", "cnn-impaired"), ("mnist1d", "transformer-small"),
                ("digits", "mlp-impaired"), ("spirals", "mlp-impaired-deep")]
    env = make_env(num_envs, contexts=contexts, task=None, host=None, seed=1)
    check_env_specs(env, seed=0)
    td = env.rollout(2, masked_policy())
    assert td["global_features"].isfinite().all() and td["next", "reward"].isfinite().all()


def test_step_counter_and_reward_sum():
    # ActionMask keeps the transformed env's action spec masked, so its random actions stay legal.
    env = TransformedEnv(make_env(3, max_epochs=3), Compose(ActionMask(), StepCounter(), RewardSum()))
    check_env_specs(env, seed=0)
    td = env.rollout(5, masked_policy(), break_when_any_done=False)
    assert td["next", "step_count"][:, :3].squeeze(-1).tolist() == [[1, 2, 3]] * 3
    assert td["next", "step_count"][:, 3].squeeze(-1).tolist() == [1] * 3  # reset after the episode end
    torch.testing.assert_close(td["next", "episode_reward"][:, 2], td["next", "reward"][:, :3].sum(1))


def test_collector_resets_finished_rows():
    env = make_env(2, max_epochs=2)
    collector = Collector(env, masked_policy(), frames_per_batch=8, total_frames=16,
                          auto_register_policy_transforms=False)
    batches = list(collector)
    collector.shutdown()
    assert len(batches) == 2 and batches[0].shape == (2, 4)
    done = torch.cat([b["next", "done"] for b in batches], 1).squeeze(-1)
    assert done.tolist() == [[False, True] * 4] * 2
    assert torch.isfinite(batches[1]["next", "reward"]).all()


def spirals_env(num_envs: int = 2, max_epochs: int = 2) -> MorphogenesisEnv:
    """A cheap env for worker processes: no MNIST-1D generation, the impaired MLP (2-16-2) on two spirals."""
    return MorphogenesisEnv(task="spirals", host="mlp-impaired", num_envs=num_envs, max_epochs=max_epochs,
                            subset=SMALL, blueprints=("mlp_gelu", "lora_r4"), tempos=(1,),
                            gates=GateConfig(min_training_epochs=0))


@pytest.mark.slow
def test_multi_sync_collector_with_two_workers():
    make = functools.partial(spirals_env, 2, 2)
    collector = MultiSyncCollector([make, make], masked_policy(), frames_per_batch=8, total_frames=8,
                                   auto_register_policy_transforms=False)
    batches = list(collector)
    collector.shutdown()
    assert sum(b.numel() for b in batches) == 8
    assert torch.isfinite(batches[0]["next", "reward"]).all()


# --- TorchRL wrappers, placements and snapshots -------------------------------------------------------


def _masked(env):
    return TransformedEnv(env, Compose(ActionMask(), StepCounter(), RewardSum()))


def test_action_mask_on_the_outer_batched_env_passes_check_env_specs():
    from torchrl.envs import SerialEnv

    torch.manual_seed(0)
    check_env_specs(_masked(SerialEnv(2, functools.partial(spirals_env, 1, 2))))


def test_action_mask_inside_a_serial_env_fails_with_a_typed_error_naming_the_fix():
    from torchrl.envs import SerialEnv

    from esper_fn.envs import IllegalActionError

    torch.manual_seed(0)
    inner = SerialEnv(2, lambda: _masked(spirals_env(1, 2)))
    with pytest.raises(IllegalActionError, match="ActionMask\\(\\) on the outermost env"):
        for _ in range(20):  # the parent's unmasked spec soon samples an illegal action
            check_env_specs(inner)


@pytest.mark.slow
def test_action_mask_on_the_outer_parallel_env_passes_check_env_specs():
    from torchrl.envs import ParallelEnv

    torch.manual_seed(0)
    env = _masked(ParallelEnv(2, functools.partial(spirals_env, 1, 2)))
    try:
        check_env_specs(env)
    finally:
        env.close()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["static", "heuristic"])
def test_baselines_without_parameters_run_in_a_multi_sync_collector(name):
    from esper_fn.policies import make_baseline

    make = functools.partial(spirals_env, 2, 2)
    collector = MultiSyncCollector([make, make], make_baseline(name, make().action_space), frames_per_batch=8,
                                   total_frames=8, auto_register_policy_transforms=False)
    batches = list(collector)
    collector.shutdown()
    assert sum(b.numel() for b in batches) == 8 and (batches[0]["action"] >= 0).all()


def test_observation_norm_as_the_torchrl_tutorial_uses_it_on_the_batched_env():
    from torchrl.envs import ObservationNorm

    torch.manual_seed(0)
    env = TransformedEnv(spirals_env(2, 3), Compose(ActionMask(), ObservationNorm(in_keys=["global_features"],
                                                                                  standard_normal=True)))
    env.transform[1].init_stats(num_iter=6, reduce_dim=(0, 1), cat_dim=1)  # a batched env: [N, T, F]
    n_features = env.base_env.observation_spec["global_features"].shape[-1]
    assert env.transform[1].loc.shape == (n_features,)  # one statistic per feature, over rows and steps
    td = env.rollout(3)
    assert torch.isfinite(td["global_features"]).all()


def test_import_of_the_rewards_module_the_docs_point_to():
    import importlib

    rewards = importlib.import_module("esper_fn.envs.rewards")
    assert set(rewards.REWARDS) >= {"delta_accuracy", "sparse_terminal", "contribution"}


def test_a_snapshot_restores_rows_mid_episode_bit_exactly(tmp_path):
    from torchrl.envs.utils import step_mdp

    from esper_fn.checkpoint import CheckpointManager

    g = torch.Generator().manual_seed(0)

    def act(td):
        td["action"] = torch.stack([m.nonzero().flatten()[torch.randint(int(m.sum()), (), generator=g)]
                                    for m in td["action_mask"]])
        return td

    env = make_env(num_envs=3, max_epochs=6, seed=5)
    td = env.reset()
    for _ in range(2):
        td = step_mdp(env.step(act(td)))
    CheckpointManager(tmp_path).save(2, *env.snapshot())
    at = g.get_state()
    ref = []
    for _ in range(3):
        td = env.step(act(td))
        ref.append(td["next"].exclude("controller").clone())
        td = step_mdp(td)
    other = make_env(num_envs=3, max_epochs=6, seed=99)
    other.reset()
    td = other.restore(*CheckpointManager(tmp_path).restore(2))
    g.set_state(at)
    for want in ref:
        td = other.step(act(td))
        got = td["next"].exclude("controller")
        assert all(torch.equal(got[k], want[k]) for k in want.keys(True, True))
        td = step_mdp(td)
    with pytest.raises(Exception, match="another env"):
        make_env(num_envs=2).restore(*CheckpointManager(tmp_path).restore(2))
