"""Imitation for Tamiyo: teachers chosen on the train split, demonstrations through the env, and
behaviour cloning that reproduces the teachers' decisions."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from torchrl.envs.utils import ExplorationType, set_exploration_type

import esper_fn as ef
from esper_fn.bench import Instance, Suite
from esper_fn.envs import MorphogenesisEnv
from esper_fn.policies import RunRecord, make_tamiyo
from esper_fn.policies._bench import make_policy
from esper_fn.policies._imitation import behavior_clone, demonstrations, teachers
from esper_fn.policies._ppo import plot_training

SUITE = Suite(
    name="imitation-test",
    blueprints=("conv1d_k3@1.0.0", "mlp_gelu@1.0.0"),
    tempos=(2,),
    num_slots=3,
    instances=(
        Instance(name="moons", split="train", task="moons", host="mlp-w2", epochs=4, budget_ratio=4.0,
                 train_subset=150),
        Instance(name="mnist1d", split="train", task="mnist1d", host="mlp-w4", epochs=4, budget_ratio=2.0,
                 train_subset=150),
        Instance(name="spirals", split="test", task="spirals", host="mlp-w2", epochs=4, budget_ratio=4.0),
    ),
)


def _rec(instance, controller, val, params=100, split="train", seed=0):
    return RunRecord(controller=controller, seed=seed, context=instance, test_accuracy=val, val_accuracy=val,
                     params=params, params0=100, compute_gflops=0.0, instance=instance, split=split)


def test_teachers_are_chosen_on_the_train_split_by_validation_accuracy():
    recs = [_rec("moons", "static", 0.8), _rec("moons", "recipe:first-mlp-0", 0.9),
            _rec("mnist1d", "recipe:input-conv-0", 0.7), _rec("mnist1d", "recipe:first-mlp-0", 0.6),
            _rec("mnist1d", "static", 0.7, params=50),  # a tie goes to fewer parameters
            _rec("moons", "heuristic", 0.99), _rec("moons", "recipe:input-conv-0", 0.99, split="test")]
    assert teachers(recs, SUITE.split("train")) == {"moons": "recipe:first-mlp-0", "mnist1d": "static"}
    with pytest.raises(ef.ConfigError, match="train split"):
        teachers(recs, SUITE.split("test"))
    with pytest.raises(ef.ConfigError, match="no train-split family records"):
        teachers(recs[:1], SUITE.split("train"))


def test_cloning_reproduces_the_teachers_decisions(tmp_path):
    make = functools.partial(MorphogenesisEnv, blueprints=SUITE.blueprints, tempos=SUITE.tempos,
                             max_slots=SUITE.num_slots)
    plays = [(SUITE.instance("moons"), "recipe:first-mlp-0"), (SUITE.instance("mnist1d"), "recipe:input-conv-0")]
    data = demonstrations(make, plays, [0, 1, 2], make_policy, progress=False)
    assert data.shape[0] == 2 * 3 * 4 and "instance" in data.keys() and "return" in data.keys()
    grown = data["action"] != 0
    assert int(grown.sum()) >= 6  # each teacher germinates in each episode
    env = make(instances=SUITE.split("train"), num_envs=2, seed=0)
    torch.manual_seed(0)
    actor, critic = make_tamiyo(env.observation_spec, env.action_spec, blueprints=env.action_space.blueprints,
                                tempos=env.action_space.tempos, hidden=16, heads=2, layers=1, value_heads=2)
    assert actor.tamiyo_config.instance_dim == data["instance"].shape[-1]
    log = []
    m = behavior_clone(actor, critic, data, epochs=60, lr=3e-3, batch_size=16, holdout=0.0,
                       generator=torch.Generator().manual_seed(0), on_epoch=lambda e, mm: log.append({"epoch": e, **mm}))
    assert m["train_growth_accuracy"] == 1.0 and m["train_accuracy"] > 0.95
    assert [r["epoch"] for r in log] == list(range(1, 61)) and log[-1]["loss"] < log[0]["loss"]
    (tmp_path / "imitation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    assert plot_training(tmp_path) == [tmp_path / "imitation.png"]  # the cloning curves, as train-tamiyo writes them
    assert (tmp_path / "imitation.png").read_bytes()[:4] == b"\x89PNG"
    # played greedily, the clone takes the teachers' decisions on their instances
    for inst, teacher in plays:
        e = make(instances=[inst], num_envs=1, seed=0)
        with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
            td = e.rollout(inst.epochs, actor)
        want = [a for a in data["action"].reshape(2, 3, 4)[plays.index((inst, teacher)), 0].tolist()]
        assert td["action"][0].tolist() == want
