"""Tamiyo network and baselines: masked sampling, gradients, save/load, flat layout, baselines."""

from __future__ import annotations

import pytest
import torch
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.objectives import ClipPPOLoss
from torchrl.objectives.value import GAE

from esper_fn import GateConfig
from esper_fn._lifecycle import Op
from esper_fn.envs import MorphogenesisEnv
from esper_fn.policies import (
    TamiyoError,
    dense_to_pyg,
    harm_labels,
    load_tamiyo,
    make_baseline,
    make_tamiyo,
    save_tamiyo,
)
from esper_fn.policies import tamiyo_parameters as parameters

SMALL = {"train": 200, "val": 100}
BPS = ("conv1d_k5", "conv1d_k3", "mlp_gelu", "lora_r4", "ia3")


@pytest.fixture(scope="module")
def env():
    return MorphogenesisEnv(task="mnist1d", host="mlp-impaired", num_envs=3, max_epochs=4, subset=SMALL,
                            blueprints=BPS, tempos=(1, 2), gates=GateConfig(min_training_epochs=1), seed=0)


def tamiyo(env, **kw):
    torch.manual_seed(0)
    return make_tamiyo(env.observation_spec, env.action_spec, blueprints=env.action_space.blueprints,
                       tempos=env.action_space.tempos, hidden=16, heads=2, **kw)


def test_dense_to_pyg_packs_real_nodes_and_offsets_edges():
    x = torch.arange(2 * 3 * 1, dtype=torch.float32).view(2, 3, 1)
    node_mask = torch.tensor([[True, True, False], [True, True, True]])
    edge_index = torch.tensor([[[0, 1, 0, 0], [1, 0, 0, 0]], [[1, 2, 0, 0], [2, 1, 0, 0]]])
    edge_mask = torch.tensor([[True, True, False, False], [True, True, False, False]])
    b = dense_to_pyg(x, node_mask, edge_index, edge_mask)
    assert b.x.flatten().tolist() == [0, 1, 3, 4, 5]
    assert b.batch.tolist() == [0, 0, 1, 1, 1]
    assert b.edge_index.tolist() == [[0, 1, 3, 4], [1, 0, 4, 3]]


def test_logits_follow_the_flat_layout_and_slot_count_is_free(env):
    actor, critic = tamiyo(env)
    td = env.reset()
    with torch.no_grad():
        out = actor(td.clone())
    assert out["logits"].shape == (3, env.action_space.n) == out["harm_logits"].shape
    assert out["value_uncertainty"].shape == (3, 1)
    # The same weights give a valid output on a padded graph with more slots (per-slot heads).
    big = td.clone()
    S, L = td["slot_mask"].shape[-1], td["node_mask"].shape[-1]
    pad = lambda t, n, v: torch.cat([t, torch.full((*t.shape[:-1], n), v, dtype=t.dtype)], -1)  # noqa: E731
    big.set("slot_mask", pad(td["slot_mask"], 2, False))
    big.set("slot_blueprint", pad(td["slot_blueprint"], 2, len(BPS)))
    big.set("node_mask", pad(td["node_mask"], 1, False))
    big.set("node_slot", pad(td["node_slot"], 1, -1))
    big.set("node_features", torch.cat([td["node_features"], torch.zeros(3, 1, td["node_features"].shape[-1])], 1))
    net = actor.module[0]
    g, slots, v = net(*[big[k] for k in net.in_keys])
    assert slots.shape[-2] == S + 2 and (slots[:, S:] == 0).all()
    g0, slots0, v0 = net(*[td[k] for k in net.in_keys])
    assert torch.allclose(slots[:, :S], slots0, atol=1e-6) and torch.allclose(v, v0, atol=1e-6)
    assert L == td["node_features"].shape[-2]


def test_masked_sampling_never_picks_an_illegal_action(env):
    actor, _ = tamiyo(env)
    env.set_seed(1)
    td = env.reset()
    S = env.max_slots
    for step in range(4):
        with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
            td = actor(td)
            many = actor(td.expand(300, *td.shape).clone())  # 300 draws per row: every draw is legal
        assert many["action_mask"].gather(-1, many["action"].unsqueeze(-1)).all()
        if step == 0:  # every slot dormant: many germinations are legal and get sampled
            assert len(set(many["action"].flatten().tolist())) > 10
        # a mask with only WAIT left always gives WAIT
        only = td.clone()
        only.set("action_mask", torch.zeros_like(td["action_mask"]))
        only["action_mask"][:, 0] = True
        assert (actor(only)["action"] == 0).all()
        td = env.step(td)["next"]
    assert S == 3


def test_loss_backpropagates_finite_gradients_into_every_parameter():
    env = MorphogenesisEnv(task="mnist1d", host="mlp-impaired", num_envs=4, max_epochs=7, subset=SMALL,
                           blueprints=BPS, tempos=(1,), gates=GateConfig(min_training_epochs=1), seed=0)
    actor, critic = tamiyo(env, safety_bias=0.5, uncertainty_bias=0.5)
    with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
        data = env.rollout(7, actor)
        GAE(gamma=0.99, lmbda=0.95, value_network=critic, deactivate_vmap=True)(data)
    loss = ClipPPOLoss(actor, critic, entropy_coeff=0.01, normalize_advantage=True)
    flat = data.reshape(-1)
    out = loss(flat)
    # The auxiliary safety loss and the per-head value loss (as train_ppo adds them).
    again = actor(flat.clone())
    harm = harm_labels(flat, env.action_space)
    logit = again["harm_logits"].gather(-1, flat["action"].unsqueeze(-1)).squeeze(-1)
    aux = torch.nn.functional.binary_cross_entropy_with_logits(logit, harm)
    ens = critic(flat.clone())["value_ensemble"]
    total = out["loss_objective"] + out["loss_critic"] + out["loss_entropy"] + aux + (ens - flat["value_target"]).pow(2).mean()
    total.backward()
    params = parameters(actor, critic)
    S = env.max_slots
    verdicts = data["action_mask"][..., -3 * S:].any()  # FOSSILIZE/PRUNE offered somewhere in the batch
    assert verdicts, "the rollout never reached HOLDING: the per-slot op head would get no gradient"
    for p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert sum(int((p.grad != 0).any()) for p in params) == len(params)


def test_save_load_round_trip(env, tmp_path):
    actor, critic = tamiyo(env)
    path = save_tamiyo(tmp_path / "t.safetensors", actor, critic, metadata={"seed": 3})
    actor2, critic2, meta = load_tamiyo(path, env.action_spec)
    assert meta == {"seed": 3}
    td = env.reset()
    with torch.no_grad():
        a, b = actor(td.clone()), actor2(td.clone())
        assert torch.equal(a["logits"], b["logits"]) and torch.equal(a["harm_logits"], b["harm_logits"])
        assert torch.equal(critic(td.clone())["state_value"], critic2(td.clone())["state_value"])
    assert actor2.tamiyo_config == actor.tamiyo_config
    _, _, _ = load_tamiyo(path, safety_bias=1.0)
    with pytest.raises(TamiyoError, match="overridden"):
        load_tamiyo(path, hidden=8)
    (tmp_path / "bad.safetensors").write_bytes(b"nope")
    with pytest.raises(Exception):
        load_tamiyo(tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError):
        load_tamiyo(tmp_path / "missing.safetensors")


def test_specs_must_match_the_action_layout(env):
    with pytest.raises(TamiyoError, match="1 \\+ S\\*B\\*T"):
        make_tamiyo(env.observation_spec, env.action_spec, blueprints=env.action_space.blueprints[:-1],
                    tempos=env.action_space.tempos)


def test_baselines_choose_only_legal_actions_and_grow_where_the_rule_says(env):
    layout = env.action_space
    conv = env.action_space.encode(Op.GERMINATE, 0, "conv1d_k5", 2)  # tempo 5 -> nearest offered, 2
    for name, kw in (("static", {}), ("random", {"wait_prob": 0.3}), ("schedule", {"start": 1, "every": 2}),
                     ("heuristic", {"patience": 1, "min_train_loss": 0.0, "grow_until": 1.0})):
        env.set_seed(0)
        with torch.no_grad():
            td = env.rollout(4, make_baseline(name, layout, **kw))
        acts = td["action"]
        assert td["action_mask"].gather(-1, acts.unsqueeze(-1)).all()
        if name == "static":
            assert (acts == 0).all()
        if name == "schedule":
            assert (acts[:, 1] == conv).all()  # epoch 1: conv seed on the raw input
        if name == "heuristic":
            assert ((acts == conv).sum(-1) <= 1).all()
    with pytest.raises(ValueError, match="unknown baseline"):
        make_baseline("nope", layout)


def test_a_deferring_policy_takes_the_fallback_exactly_where_the_ensemble_is_unsure(env):
    from esper_fn.policies import DeferringPolicy, TamiyoError
    from esper_fn.policies._baselines import make_baseline

    actor, _ = tamiyo(env)
    td = env.reset()
    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        own = actor(td.clone())
        spread = own["value_uncertainty"].reshape(-1)
        static = make_baseline("static", env.action_space)
        never = DeferringPolicy(actor, static, threshold=float(spread.max()) + 1.0)(td.clone())
        always = DeferringPolicy(actor, static, threshold=0.0)(td.clone())
        middle = float(spread.median())
        some = DeferringPolicy(actor, static, threshold=middle)(td.clone())
    assert torch.equal(never["action"], own["action"]) and not never["deferred"].any()
    assert always["deferred"].all() and (always["action"] == 0).all()  # static: WAIT everywhere
    unsure = spread > middle
    assert torch.equal(some["deferred"], unsure)
    assert torch.equal(some["action"], torch.where(unsure, torch.zeros_like(own["action"]), own["action"]))
    with pytest.raises(TamiyoError, match="threshold"):
        DeferringPolicy(actor, static, threshold=-1.0)


def test_a_resolving_policy_leaves_no_seed_on_trial_at_the_horizon(env):
    from esper_fn import LIVE_STAGES
    from esper_fn.policies import ResolvingPolicy

    actor, _ = tamiyo(env, wait_bias=-20.0)  # germinates wherever it may
    space = env.action_space
    rule = ResolvingPolicy(actor, space, GateConfig(min_training_epochs=1))
    live = torch.tensor([int(s) for s in LIVE_STAGES])
    ends = {}
    for name, policy in (("actor", actor), ("rule", rule)):
        td, changed = env.reset(), 0
        for _ in range(4):
            with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
                own = actor(td.clone())
                td = policy(td)
            a = td["action"]
            assert td["action_mask"].gather(-1, a[:, None]).all()  # always legal
            if name == "rule":
                same = a == own["action"]
                assert torch.equal(~same, td["resolved"])  # "resolved" marks exactly the rows it changed
                changed += int(td["resolved"].sum())
                for i in torch.nonzero(~same).flatten().tolist():  # where it changed one: a late germination
                    was = space.decode(int(own["action"][i]))  # replaced, or a seed resolved
                    now = space.decode(int(a[i]))
                    late = was.op == Op.GERMINATE and int(td["controller", "epoch"][i]) + 1 + was.tempo + 1 > 3
                    assert late or now.op in (Op.FOSSILIZE, Op.PRUNE)
            td = env.step(td)["next"]
        ends[name] = torch.isin(td["controller", "stage"], live).any(-1)
    assert ends["actor"].any()  # left alone, the eager actor ends with seeds on trial
    assert not ends["rule"].any() and changed > 0
    # Without (1) the rule only ever resolves seeds: every action it changed became FOSSILIZE or PRUNE.
    only = ResolvingPolicy(actor, space, GateConfig(min_training_epochs=1), keep_helping=True, block_late=False)
    td = env.reset()
    for _ in range(4):
        with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
            own = actor(td.clone())
            td = only(td)
        for i in torch.nonzero(td["resolved"]).flatten().tolist():
            assert space.decode(int(td["action"][i])).op in (Op.FOSSILIZE, Op.PRUNE)
            assert float(td["controller", "contribution"][i, space.decode(int(td["action"][i])).slot]) <= 0 or \
                space.decode(int(td["action"][i])).op == Op.FOSSILIZE
        assert torch.equal(td["action"][~td["resolved"]], own["action"][~td["resolved"]])
        td = env.step(td)["next"]
