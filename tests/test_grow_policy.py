"""A learned policy in the core runner: ``esper-fn grow --controller tamiyo`` runs the shipped Tamiyo
through `esper_fn.envs.PolicyController`, and takes the same decisions and reaches the same accuracy
as the same policy stepping `MorphogenesisEnv` on the same seed (both drive `esper_fn.episode.step`
and observe with `esper_fn.envs.Observer`)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from torchrl.envs.utils import ExplorationType, set_exploration_type

import esper_fn as ef
from esper_fn.actions import ActionSpace, action_mask
from esper_fn.controllers import observe
from esper_fn.envs import MorphogenesisEnv, PolicyController, tamiyo_controller
from esper_fn.episode import start
from esper_fn.events import Advanced, Germinated, Rollback, read_events
from esper_fn.policies import SHIPPED_WEIGHTS, load_tamiyo, make_tamiyo, save_tamiyo
from esper_fn.run import RunConfig, grow, load_config, param_budget
from esper_fn.tasks import load
from esper_fn.training import evaluate

EPOCHS = 7
SEED = 1000003


def _grow(config, out, **kw):
    return grow(config, out, controller=tamiyo_controller(config.controller, governor=config.governor),
                progress=False, **kw)


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    out = tmp_path_factory.mktemp("grow-tamiyo")
    config = RunConfig(task="mnist1d", host="mlp-impaired", controller="tamiyo", epochs=EPOCHS, seed=SEED,
                       checkpoint_every=3)
    return config, _grow(config, out), out


def test_tamiyo_in_grow_matches_tamiyo_in_the_env(grown):
    config, summary, out = grown
    events = list(read_events(out / "events.jsonl"))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    grow_decisions = [(e.epoch, e.slot, e.blueprint) for e in events if isinstance(e, Germinated)]
    assert grow_decisions and grow_decisions[0][0] == 0, "the policy must be asked before the first epoch"

    actor, _, _ = load_tamiyo(SHIPPED_WEIGHTS)
    c = actor.tamiyo_config
    task = load(config.task, seed=config.seed)  # grow's task: the seed chooses the validation split
    params0 = 826
    env = MorphogenesisEnv(contexts=[(task, config.host)], num_envs=1, max_epochs=config.epochs, seed=config.seed,
                           blueprints=c.blueprints, tempos=c.tempos, governor=config.governor, lr=config.lr,
                           train=config.train, max_param_ratio=param_budget(config, params0) / params0)
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        td = env.rollout(config.epochs, actor)
    env_decisions = []
    for t, a in enumerate(td["action"][0].tolist()):
        act = env.action_space.decode(a)
        if act.op == ef.Op.GERMINATE:
            env_decisions.append((t, env.state(0).slot_names[act.slot], act.blueprint))
        else:
            assert act.op == ef.Op.WAIT, f"the check covers germinations only, the policy chose {act}"
    assert grow_decisions == env_decisions
    assert td["next", "metrics", "val_accuracy"][0].tolist() == pytest.approx(
        [m["val_accuracy"] for m in metrics], abs=1e-6)
    assert td["next", "metrics", "params"][0, -1].item() == summary.params_after
    assert evaluate(env.state(0), task.x_test, task.y_test)["accuracy"] == pytest.approx(summary.test_accuracy,
                                                                                         abs=1e-6)
    # the automatic lifecycle of the step shows up as ADVANCE events in grow's log
    assert any(isinstance(e, Advanced) and e.to_stage == "TRAINING" for e in events)


def test_tamiyo_grow_resumes_bit_identically(grown, tmp_path, crash_at):
    config, full, _ = grown
    with pytest.raises(crash_at.error):
        _grow(config, tmp_path / "r", on_epoch_start=crash_at(5))
    resumed = _grow(config, tmp_path / "r", resume=True)
    assert (resumed.test_accuracy, resumed.test_loss, resumed.params_after, resumed.germinated) == (
        full.test_accuracy, full.test_loss, full.params_after, full.germinated)
    _, meta = ef.checkpoint.CheckpointManager(tmp_path / "r" / "checkpoints").restore()
    ep = meta
    assert ep["epoch"] == EPOCHS and len(ep["evals"]) == EPOCHS + 1 and ep["params0"] == 826


def test_a_rollback_is_counted_and_the_policy_goes_on(tmp_path, nan_at):
    config = RunConfig(task="mnist1d", host="mlp-impaired", controller="tamiyo", epochs=5, seed=SEED,
                       checkpoint_every=5)
    s = _grow(config, tmp_path / "rb", on_epoch_start=nan_at(3))
    assert s.rollbacks == 1 and s.epochs == 5
    assert [e.epoch for e in read_events(tmp_path / "rb" / "events.jsonl") if isinstance(e, Rollback)] == [4]
    _, meta = ef.checkpoint.CheckpointManager(tmp_path / "rb" / "checkpoints").restore()
    ep = meta
    assert ep["counts"]["rollbacks"] == 1 and len(ep["evals"]) == 6 and len(ep["good"]) == 4


def test_tamiyo_path_and_errors(tmp_path):
    env = MorphogenesisEnv(task="mnist1d", host="mlp-impaired", num_envs=1, max_epochs=3, tempos=(3,),
                           blueprints=("conv1d_k3", "ia3"), subset={"train": 300, "val": 200})
    torch.manual_seed(0)
    actor, critic = make_tamiyo(env.observation_spec, env.action_spec, blueprints=env.action_space.blueprints,
                                tempos=env.action_space.tempos, hidden=8, heads=1, layers=1, value_heads=2)
    path = save_tamiyo(tmp_path / "t.safetensors", actor, critic)
    config = RunConfig(controller=f"tamiyo:{path}", epochs=2, seed=0)
    assert _grow(config, tmp_path / "run").epochs == 2
    with pytest.raises(ef.ConfigError, match="unknown controller"):
        load_config(controller="tamiyo:")
    with pytest.raises(ef.ConfigError, match="no Tamiyo weights"):
        tamiyo_controller(f"tamiyo:{tmp_path / 'missing.safetensors'}")
    with pytest.raises(ef.ConfigError, match="learned policy"):  # the core builds no learned controller
        grow(config, tmp_path / "core", progress=False)
    bad = PolicyController(lambda td: td.set("action", torch.full((1,), 5)), blueprints=("conv1d_k3",), tempos=(3,))
    with pytest.raises(ef.EsperError, match="mask forbids"):
        grow(RunConfig(epochs=2, seed=0), tmp_path / "bad", controller=bad, progress=False)


def test_the_mask_admits_a_network_of_exactly_the_budget():
    task = load("mnist1d")
    ep = start(task, ef.hosts.preset("mlp-impaired"), seed=0, max_epochs=3)
    space = ActionSpace(3, ("conv1d_k3@1.0.0",), (3,))
    obs = observe(ep, ef.GateConfig())
    cost = obs.slot("input").seeds["conv1d_k3@1.0.0"]
    germ = space.encode(ef.Op.GERMINATE, 0, "conv1d_k3", 3)
    exact = observe(replace(ep, param_budget=ep.params0 + cost), ef.GateConfig())
    assert action_mask(space, exact, advance=False, prunable=None)[germ]
    short = observe(replace(ep, param_budget=ep.params0 + cost - 1), ef.GateConfig())
    assert not action_mask(space, short, advance=False, prunable=None)[germ]
