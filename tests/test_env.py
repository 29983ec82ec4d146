"""MorphogenesisEnv: action space, masks, lifecycle modes, governor, rewards, seeding, partial resets."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from tensordict import TensorDict

import esper_fn as ef
from esper_fn import GateConfig, Op, Stage
from esper_fn.envs import (
    GLOBAL_FEATURES,
    NODE_FEATURES,
    SLOT_FEATURES,
    ActionSpace,
    EnvStateError,
    IllegalActionError,
    MorphogenesisEnv,
    RewardInputs,
    rewards,
)
from esper_fn.run import GovernorConfig
from esper_fn.tasks import load

SMALL = {"train": 200, "val": 100}
BPS = ("conv1d_k5", "mlp_gelu", "lora_r4", "ia3")


def make(**kw) -> MorphogenesisEnv:
    args = dict(task="mnist1d", host="mlp-impaired", num_envs=2, max_epochs=4, subset=SMALL, blueprints=BPS,
                gates=GateConfig(min_training_epochs=1))
    args.update(kw)
    return MorphogenesisEnv(**args)


def masked_random(generator: torch.Generator):
    """A deterministic masked uniform policy."""

    def policy(td):
        td.set("action", torch.multinomial(td["action_mask"].float(), 1, generator=generator).squeeze(-1))
        return td

    return policy


def step(env, actions) -> TensorDict:
    td = TensorDict({"action": torch.tensor(actions, dtype=torch.int64)}, batch_size=[env.num_envs])
    return env.step(td)["next"]


# --- action space ------------------------------------------------------------------------------


def test_action_space_round_trip():
    space = ActionSpace(3, ("a@1.0.0", "b@1.0.0"), (3, 5))
    assert space.n == 1 + 3 * 2 * 2 + 3 * 3
    seen = set()
    for index in range(space.n):
        a = space.decode(index)
        assert space.encode(a.op, a.slot, a.blueprint, a.tempo) == index
        seen.add((a.op, a.slot, a.blueprint, a.tempo))
    assert len(seen) == space.n
    assert space.decode(0).op == Op.WAIT
    assert space.encode(Op.GERMINATE, 2, "b", 5) == space.encode(Op.GERMINATE, 2, "b@1.0.0", 5)
    for bad in (lambda: space.decode(space.n), lambda: space.encode(Op.PRUNE, 3),
                lambda: space.encode(Op.GERMINATE, 0, "c", 3), lambda: space.encode(Op.GERMINATE, 0, "a", 4)):
        with pytest.raises(IllegalActionError):
            bad()


def test_reset_observation_shapes_and_mask():
    env = make(num_envs=3)
    td = env.reset()
    S, A = env.max_slots, env.action_space.n
    assert S == 3 and A == 1 + 3 * len(BPS) * 3 + 9
    assert td["slot_features"].shape == (3, S, len(SLOT_FEATURES))
    assert td["node_features"].shape == (3, env.max_nodes, len(NODE_FEATURES))
    assert td["global_features"].shape == (3, len(GLOBAL_FEATURES))
    assert td["action_mask"].shape == (3, A) and td["action_mask"][:, 0].all()
    assert td["slot_mask"].all() and td["node_mask"].all() and td["edge_mask"].all()
    assert (td["slot_blueprint"] == len(BPS)).all()
    # mlp-impaired: input slot, fc1 layer, fc1 slot, fc2 layer, fc2 slot.
    assert td["node_slot"][0].tolist() == [0, -1, 1, -1, 2]
    for key in ("slot_features", "node_features", "global_features"):
        assert torch.isfinite(td[key]).all() and td[key].abs().max() <= 5
    mask = td["action_mask"][0]
    space = env.action_space
    # Every slot is DORMANT: only WAIT and germinations of fitting blueprints.
    for j in mask.nonzero().flatten().tolist()[1:]:
        assert space.decode(j).op == Op.GERMINATE
    # conv1d_k5 fits the input slot (vector signal); LoRA needs a Linear before the slot.
    assert mask[space.encode(Op.GERMINATE, 0, "conv1d_k5", 5)]
    assert not mask[space.encode(Op.GERMINATE, 0, "lora_r4", 5)]
    assert mask[space.encode(Op.GERMINATE, 1, "lora_r4", 5)]


def test_illegal_action_raises_typed_error():
    env = make()
    env.reset()
    fossilize = env.action_space.encode(Op.FOSSILIZE, 0)
    with pytest.raises(IllegalActionError, match="masked out") as info:
        step(env, [0, fossilize])
    assert isinstance(info.value, ef.EsperError) and isinstance(info.value, ValueError)
    germinate = env.action_space.encode(Op.GERMINATE, 0, "conv1d_k5", 5)
    for bad in (-1, env.action_space.n, fossilize):
        with pytest.raises(IllegalActionError):
            step(env, [germinate, bad])
    # A refused step changes nothing, not even the rows whose actions were legal.
    assert env.state(0).stage("input") == Stage.DORMANT and env.episode(0).counts.germinated == 0


@pytest.mark.parametrize("lifecycle", ["auto", "full"])
def test_masked_random_policy_never_raises(lifecycle):
    env = make(num_envs=4, max_epochs=6, lifecycle=lifecycle, tempos=(1, 2))
    g = torch.Generator().manual_seed(1)
    td = env.rollout(6, masked_random(g))
    assert td.shape == (4, 6)
    ops = {env.action_space.decode(a).op for a in td["action"].flatten().tolist()}
    assert Op.GERMINATE in ops
    assert torch.isfinite(td["next", "reward"]).all()
    assert td["next", "done"][:, -1].all()


def test_auto_lifecycle_advances_and_offers_the_verdict_at_holding():
    # The verdict, not the evidence gate, is under test: on these 100 validation samples the seed
    # measures exactly 0, which the default contribution gate refuses (tests/test_gates.py).
    env = make(num_envs=1, max_epochs=8, tempos=(2,), gates=GateConfig(min_training_epochs=1, min_contribution=None))
    env.reset()
    space = env.action_space
    td = step(env, [space.encode(Op.GERMINATE, 0, "conv1d_k5", 2)])
    stages = []
    for _ in range(5):
        stages.append(env.state(0).stage("input"))
        if stages[-1] == Stage.HOLDING:
            break
        mask = td["action_mask"][0]
        # The policy never advances in auto mode, and may prune only at HOLDING.
        assert not mask[space.encode(Op.ADVANCE, 0)] and not mask[space.encode(Op.PRUNE, 0)]
        td = step(env, [0])
    assert stages[:2] == [Stage.TRAINING, Stage.BLENDING] and stages[-1] == Stage.HOLDING
    mask = td["action_mask"][0]
    assert mask[space.encode(Op.FOSSILIZE, 0)] and mask[space.encode(Op.PRUNE, 0)]
    td = step(env, [space.encode(Op.FOSSILIZE, 0)])
    assert env.state(0).stage("input") == Stage.FOSSILIZED
    assert td["slot_features"][0, 0, SLOT_FEATURES.index("stage_fossilized")] == 1
    assert td["slot_blueprint"][0, 0] == space.blueprint_index("conv1d_k5")
    assert td["metrics", "param_ratio"][0] > 1


def test_full_lifecycle_waits_for_the_policy():
    env = make(num_envs=1, lifecycle="full")
    env.reset()
    space = env.action_space
    td = step(env, [space.encode(Op.GERMINATE, 1, "mlp_gelu", 3)])
    td = step(env, [0])
    assert env.state(0).stage("fc1") == Stage.GERMINATED
    assert td["action_mask"][0, space.encode(Op.ADVANCE, 1)]
    assert td["action_mask"][0, space.encode(Op.PRUNE, 1)]
    step(env, [space.encode(Op.ADVANCE, 1)])
    assert env.state(0).stage("fc1") == Stage.TRAINING


def test_rows_train_under_no_grad():
    """Collectors step envs under torch.no_grad(); the env must still train its hosts."""
    env = make(num_envs=1)
    env.reset()
    before = env.state(0).params_flat[("host", "fc1", "weight")].clone()
    with torch.no_grad():
        td = step(env, [0])
    assert not torch.equal(env.state(0).params_flat[("host", "fc1", "weight")], before)
    assert td["metrics", "train_loss"].isfinite().all()


def test_episode_end_flags_and_stepping_a_done_row():
    env = make(max_epochs=2)
    env.reset()
    first = step(env, [0, 0])
    assert not first["done"].any()
    last = step(env, [0, 0])
    assert last["done"].all() and last["terminated"].all() and last["truncated"].all()
    assert not last["action_mask"][:, 1:].any()
    with pytest.raises(EnvStateError, match="reset it") as e:
        step(env, [0, 0])
    assert isinstance(e.value, RuntimeError) and isinstance(e.value, ef.EsperError)
    with pytest.raises(EnvStateError, match="not been reset"):
        step(make(), [0, 0])
    env = make(max_epochs=1, terminal_at_budget=False)
    env.reset()
    last = step(env, [0, 0])
    assert last["truncated"].all() and not last["terminated"].any() and last["done"].all()


def test_partial_reset_touches_only_flagged_rows():
    env = make(num_envs=3, max_epochs=5, seed=7)
    env.reset()
    assert [env.run_seed(i) for i in range(3)] == [7, 8, 9]
    td = step(env, [0, 0, 0])
    kept = [env.state(0), env.state(2)]
    td.set("_reset", torch.tensor([[False], [True], [False]]))
    td = env.reset(td)
    assert [env.run_seed(i) for i in range(3)] == [7, 8 + 3, 9]
    assert env.state(0) is kept[0] and env.state(2) is kept[1]
    assert td["metrics", "epoch"].tolist() == [1.0, 0.0, 1.0]
    assert not td["done"].any()


def test_same_seed_same_policy_is_bit_identical_and_seeds_differ():
    def run(seed):
        env = make(num_envs=3, max_epochs=3, seed=seed, tempos=(1,))
        return env.rollout(5, masked_random(torch.Generator().manual_seed(3)), break_when_any_done=False)

    a, b, c = run(0), run(0), run(1)
    assert set(a.keys(True, True)) == set(b.keys(True, True))
    for key in a.keys(True, True):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, equal_nan=True, msg=f"{key} differs")
    assert not torch.equal(a["next", "metrics", "val_accuracy"], c["next", "metrics", "val_accuracy"])


def test_rows_follow_the_run_seed_enumeration_and_contexts_mix():
    env = MorphogenesisEnv(contexts=[("mnist1d", "mlp-impaired"), ("mnist1d", "cnn-impaired")], num_envs=6,
                           max_epochs=2, subset=SMALL, blueprints=BPS, seed=3)
    td = env.reset()
    assert env.max_slots == 4  # cnn-impaired: input, conv1, conv2, fc
    contexts = td["context"].tolist()
    assert set(contexts) == {0, 1}
    for i, c in enumerate(contexts):
        assert env.context(i) is env.contexts[c]
        assert td["slot_mask"][i].sum() == len(env.state(i).slot_names)
        assert env.state(i).host is env.contexts[c].host  # rows of a context share the host object
    again = MorphogenesisEnv(contexts=[("mnist1d", "mlp-impaired"), ("mnist1d", "cnn-impaired")], num_envs=2,
                             max_epochs=2, subset=SMALL, blueprints=BPS, seed=3)
    assert again.reset()["context"].tolist() == contexts[:2]  # the context is a function of the run seed
    env.rollout(2, masked_random(torch.Generator().manual_seed(0)))


def test_governor_rolls_back_prunes_and_terminates():
    base = load("mnist1d")
    x = base.x_train.clone()
    x[:5] = float("nan")  # every epoch's train loss is NaN: the governor rolls each one back
    broken = dataclasses.replace(base, x_train=x)
    env = MorphogenesisEnv(contexts=[(broken, "mlp-impaired")], num_envs=1, max_epochs=10, subset=SMALL,
                           blueprints=BPS, governor=GovernorConfig(max_rollbacks=1))
    td0 = env.reset()
    space = env.action_space
    td = step(env, [space.encode(Op.GERMINATE, 0, "conv1d_k5", 3)])
    assert env.state(0).stage("input") == Stage.PRUNED  # the live seed involved is pruned
    assert td["metrics", "rollbacks"].item() == 1 and not td["done"].any()
    # Restored to the pre-graft function: no accuracy change, no parameter change: only the penalty.
    assert td["metrics", "val_accuracy"].item() == td0["metrics", "val_accuracy"].item()
    assert td["reward"].item() == pytest.approx(-0.05)
    td = step(env, [0])
    assert td["terminated"].all() and not td["truncated"].any()
    assert td["reward"].item() == pytest.approx(-0.05 - 1.0 + td["metrics", "val_accuracy"].item())


def test_delta_accuracy_return_telescopes():
    env = make(num_envs=2, max_epochs=4, tempos=(1,))
    td = env.rollout(4, masked_random(torch.Generator().manual_seed(5)))
    acc0 = td["metrics", "val_accuracy"][:, 0]
    acc_t = td["next", "metrics", "val_accuracy"][:, -1]
    ratio = td["next", "metrics", "param_ratio"][:, -1]
    rb = td["next", "metrics", "rollbacks"][:, -1]
    expected = 2 * acc_t - acc0 - 0.1 * (ratio - 1) - 0.05 * rb
    torch.testing.assert_close(td["next", "reward"].sum((1, 2)), expected, atol=1e-5, rtol=0)


def test_reward_functions_follow_their_formulas():
    t = lambda *v: torch.tensor(v)  # noqa: E731
    x = RewardInputs(val_accuracy=t(0.6, 0.5), prev_val_accuracy=t(0.5, 0.5), param_ratio=t(1.2, 1.0),
                     prev_param_ratio=t(1.0, 1.0), fossilized_contribution=t(0.3, 0.0),
                     rolled_back=t(False, True), failed=t(False, True), done=t(True, True))
    torch.testing.assert_close(rewards.delta_accuracy(rent=0.5)(x), t(0.1 - 0.1 + 0.6, -0.05 - 1.0 + 0.5))
    torch.testing.assert_close(rewards.sparse_terminal(rent=0.5)(x), t(0.6 - 0.1, 0.5 - 0.05 - 1.0))
    torch.testing.assert_close(rewards.contribution(rent=0.5, terminal=0.0)(x), t(0.3 - 0.1, -0.05 - 1.0))
    assert rewards.delta_accuracy()(dataclasses.replace(x, done=t(False, False), failed=t(False, False)))[0] == \
        pytest.approx(0.1 - 0.02)


def test_the_test_split_never_enters_observations_or_rewards():
    base = load("mnist1d")
    poisoned = dataclasses.replace(base, x_test=torch.full_like(base.x_test, float("nan")),
                                   y_test=torch.zeros_like(base.y_test))

    def run(task):
        env = MorphogenesisEnv(contexts=[(task, "mlp-impaired")], num_envs=2, max_epochs=3, subset=SMALL,
                               blueprints=BPS, tempos=(1,), gates=GateConfig(min_training_epochs=0))
        return env.rollout(3, masked_random(torch.Generator().manual_seed(2)))

    a, b = run(base), run(poisoned)
    for key in a.keys(True, True):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, equal_nan=True)


def test_param_budget_masks_large_seeds():
    env = make(num_envs=1, max_param_ratio=1.1)  # 826 params: room for 82
    mask = env.reset()["action_mask"][0]
    space = env.action_space
    for j in mask.nonzero().flatten().tolist()[1:]:
        a = space.decode(j)
        state = env.state(0)
        name = state.slot_names[a.slot]
        assert ef.blueprints.get(a.blueprint).param_count(state.spec(name)) <= 82
    assert not mask[space.encode(Op.GERMINATE, 0, "conv1d_k5", 5)]  # 177 parameters


def test_invalid_configuration_is_a_config_error():
    for kw in ({"num_envs": 0}, {"lifecycle": "manual"}, {"reward": "nope"}, {"tempos": ()},
               {"blueprints": ["no_such_seed"]}, {"subset": {"test": 5}}):
        with pytest.raises(ef.ConfigError):
            make(**kw)
    with pytest.raises(ef.ConfigError):
        MorphogenesisEnv(task="mnist1d")
    assert not math.isnan(make().reset()["global_features"].sum())


def test_rows_can_train_through_kernels():
    """kernels= routes every group's epoch through its (here uncompiled, same arithmetic) kernel."""
    from esper_fn.tezzeret import KernelCache

    kc = KernelCache(compile=False)
    env = make(kernels=kc, max_epochs=3)
    ref = make(max_epochs=3)
    a, b = env.reset(), ref.reset()
    for _ in range(2):
        a = step(env, [0, 0])
        b = step(ref, [0, 0])
    assert kc.stats.hits > 0 and kc.stats.misses == 0
    torch.testing.assert_close(a["global_features"], b["global_features"], rtol=1e-3, atol=1e-3)
