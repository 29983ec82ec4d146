"""Controllers: their gates are GateConfigs, they act on the gated mask, and the runner honours them."""

from dataclasses import replace

import pytest
import torch

import esper_fn as ef
from esper_fn.controllers import (
    MAX_GRAD_NORM,
    Action,
    FixedSchedule,
    Observation,
    Plateau,
    PlateauConfig,
    Static,
    budget_blocked,
    choose_seed,
    manage_seeds,
    observations_to_tensordict,
    observe,
)
from esper_fn.episode import Episode, start
from esper_fn.events import Advanced, Fossilized, Germinated, Pruned, read_events
from esper_fn.run import RunConfig, grow
from esper_fn.tasks import load

FAST = dict(task="mnist1d", host="mlp-impaired", epochs=8, checkpoint_every=100,
            plateau={"patience": 1, "min_delta": 1.0, "incubate_epochs": 1, "tempo": 2, "hold_epochs": 1,
                     "grow_until": 1.0})


def _state(stage_path=(), host=None):
    """An mlp-impaired state with a conv seed at "input", moved along `stage_path` (forced)."""
    s = ef.init(host or ef.hosts.hosts()["mlp-impaired"](), generator=torch.Generator().manual_seed(0))
    s = ef.germinate(s, "input", "conv1d_k5", generator=torch.Generator().manual_seed(1), tempo=2)
    for _ in stage_path:
        s = ef.advance(s, "input", force=True)
    return s


_TASK = load("mnist1d")


def _episode(state, metrics=None, budget=None, epoch=5, good=()) -> Episode:
    """An episode record around `state` at `epoch` (what a driver would hold after that epoch)."""
    ep = start(_TASK, state.host, seed=0, max_epochs=100, param_budget=budget)
    m = {"val_accuracy": 0.5, "val_loss": 1.0, **dict(metrics or {})}
    return replace(ep, state=state, metrics=m, epoch=epoch, good=tuple(good) or (m,))


def _obs(state, gates, metrics=None, budget=None, epoch=5):
    return observe(_episode(state, metrics, budget, epoch), gates)


def test_controllers_state_their_thresholds_as_gate_configs():
    p = Plateau(PlateauConfig(incubate_epochs=4, hold_epochs=2, min_contribution=0.01))
    assert p.gates == ef.GateConfig(min_training_epochs=4, min_holding_epochs=2, min_contribution=0.01,
                                    max_grad_norm=MAX_GRAD_NORM)
    f = FixedSchedule(incubate_epochs=2, hold_epochs=3)
    assert f.gates == ef.GateConfig(min_training_epochs=2, min_holding_epochs=3, max_grad_norm=MAX_GRAD_NORM,
                                    min_contribution=None)
    assert Static().gates == ef.GateConfig()


def test_manage_seeds_follows_the_gated_mask():
    gates = ef.GateConfig(min_training_epochs=2, min_holding_epochs=1, min_contribution=0.01)
    s = _state(["TRAINING"])
    assert manage_seeds(_obs(s, gates), gates) == []  # incubated 0 epochs of 2: wait
    s = ef.tick(ef.tick(s))
    assert manage_seeds(_obs(s, gates), gates) == [Action(ef.Op.ADVANCE, "input")]
    # a non-finite gradient masks ADVANCE once the incubation time is up: the seed is pruned
    graded = gates.model_copy(update={"max_grad_norm": 1e3})  # the gradient gate is off by default
    (a,) = manage_seeds(_obs(s, graded, {"grad_norm/input": float("inf")}), graded)
    assert a.op == ef.Op.PRUNE and "grad_norm/input" in a.reason
    # BLENDING: ADVANCE only once alpha is 1 (the mask says so; nothing is re-checked)
    b = ef.advance(s, "input")
    assert manage_seeds(_obs(b, gates), gates) == []
    b = ef.tick(ef.tick(b))
    assert manage_seeds(_obs(b, gates), gates) == [Action(ef.Op.ADVANCE, "input")]
    h = ef.advance(b, "input")
    helps = {"input/contribution": 0.5, "input/contribution_se": 0.05}
    assert manage_seeds(_obs(h, gates, helps), gates) == []  # held 0 epochs of 1
    h = ef.tick(h)
    assert manage_seeds(_obs(h, gates, helps), gates) == [Action(ef.Op.FOSSILIZE, "input")]
    (a,) = manage_seeds(_obs(h, gates, {"input/contribution": 0.001, "input/contribution_se": 0.0}), gates)
    assert a.op == ef.Op.PRUNE and "min_contribution 0.01" in a.reason
    # every action the controller asks for is one the ops accept with the same gates
    fossil = ef.fossilize(h, "input", gates=gates, telemetry=helps)
    assert fossil.stage("input") == ef.Stage.FOSSILIZED


def test_budget_blocked_names_the_budget_and_the_smallest_seed():
    s = ef.init(ef.hosts.hosts()["mlp-impaired"](), generator=torch.Generator().manual_seed(0))
    gates = ef.GateConfig()
    assert choose_seed(_obs(s, gates, budget=1100)) == ("input", "conv1d_k5@1.0.0")
    assert budget_blocked(_obs(s, gates, budget=1100)) is None
    obs = _obs(s, gates, budget=900)  # 74 parameters of room; the smallest candidate needs 113
    assert choose_seed(obs) is None
    reason = budget_blocked(obs)
    assert "budget of 900" in reason and "room for 74" in reason and "conv1d_k3@1.0.0" in reason and "113" in reason


def test_plateau_reports_a_blocked_germination():
    s = ef.init(ef.hosts.hosts()["mlp-impaired"](), generator=torch.Generator().manual_seed(0))
    p = Plateau(PlateauConfig(patience=1, min_delta=1.0, grow_until=1.0))
    m = {"val_accuracy": 0.4, "train_loss": 1.5}
    good = [{"val_accuracy": 0.4}, {"val_accuracy": 0.4}, m]
    assert p.decide(observe(_episode(s, m, 900, 3, good), p.gates)) == [] and "budget of 900" in p.blocked
    (a,) = p.decide(observe(_episode(s, m, 1100, 3, good), p.gates))
    assert a.op == ef.Op.GERMINATE and p.blocked is None


def test_controllers_are_functions_of_the_observation():
    """No memory between calls: the same observation gives the same decision, whatever came before."""
    s = ef.init(ef.hosts.hosts()["mlp-impaired"](), generator=torch.Generator().manual_seed(0))
    p = Plateau(PlateauConfig(patience=1, min_delta=1.0, grow_until=1.0, max_seeds=1))
    m = {"val_accuracy": 0.4, "train_loss": 1.5}
    obs = observe(_episode(s, m, 1100, 3, [{"val_accuracy": 0.4}, m]), p.gates)
    first = p.decide(obs)
    assert first and p.decide(obs) == first
    # the episode's germination count (not a counter in the controller) caps the seeds
    assert p.decide(replace(obs, germinated=1)) == []


def test_the_observation_round_trips_through_a_tensordict():
    s = _state(["TRAINING", "BLENDING", "HOLDING"])
    gates = ef.GateConfig(min_holding_epochs=1)
    m = {"input/contribution": 0.25, "input/contribution_se": 0.01, "grad_norm/input": 0.5, "input/dead": 0.1,
         "train_loss": 0.7}
    obs = _obs(ef.tick(s), gates, m, budget=1100)
    blueprints = tuple(ef.blueprints.registry())
    td = observations_to_tensordict([obs, obs], num_slots=5, blueprints=blueprints, horizon=8)
    assert td.batch_size == (2,) and td["seed_params"].shape == (2, 5, len(blueprints))
    back = Observation.from_tensordict(td[1], blueprints)
    assert back.episode is None
    # equal but for the slot names, which a TensorDict does not carry
    assert back == replace(obs, slots=tuple(replace(v, name=str(i)) for i, v in enumerate(obs.slots)))
    assert back.slots[0].contribution == 0.25 and back.slots[0].contribution_se == 0.01
    assert back.slots[1].contribution is None
    with pytest.raises(ValueError, match="holds 2"):
        observations_to_tensordict([obs], num_slots=2, blueprints=blueprints, horizon=8)


def test_an_observation_under_stricter_gates_withdraws_what_they_refuse():
    h = ef.tick(_state(["TRAINING", "BLENDING", "HOLDING"]))
    lax = _obs(h, ef.GateConfig(contribution_z=0), {"input/contribution": 0.001})
    assert ef.Op.FOSSILIZE in lax.slot("input").ops
    strict = ef.GateConfig(min_holding_epochs=1, min_contribution=0.01, contribution_z=0)
    assert ef.Op.FOSSILIZE not in lax.under(strict).slot("input").ops
    # built with the same gates, nothing changes
    same = _obs(h, strict, {"input/contribution": 0.5})
    assert same.under(strict) == same


def test_fixed_schedule_through_grow(tmp_path):
    cfg = RunConfig(**{**FAST, "controller": "schedule", "schedule_every": 2, "epochs": 9})
    s = grow(cfg, tmp_path / "sched", progress=False)
    events = read_events(tmp_path / "sched" / "events.jsonl")
    germ = [e for e in events if isinstance(e, Germinated)]
    assert [e.epoch for e in germ][:1] == [2] and germ[0].slot == "input"
    stages = [(e.from_stage, e.to_stage) for e in events if isinstance(e, Advanced) and e.slot == "input"]
    assert stages[:3] == [("GERMINATED", "TRAINING"), ("TRAINING", "BLENDING"), ("BLENDING", "HOLDING")]
    # the schedule fossilizes whatever the seed contributes, once it has held hold_epochs
    assert any(isinstance(e, Fossilized) for e in events) and s.fossilized >= 1 and s.pruned == 0
    adv = {(e.to_stage): e.epoch for e in events if isinstance(e, Advanced) and e.slot == "input"}
    fos = next(e.epoch for e in events if isinstance(e, Fossilized))
    # the run's FixedSchedule takes incubate_epochs and hold_epochs (1 and 1) from the plateau config
    assert adv["BLENDING"] - adv["TRAINING"] == 1 and fos - adv["HOLDING"] == 1


def test_a_seed_below_min_contribution_is_pruned_by_the_controller(tmp_path):
    cfg = RunConfig(**{**FAST, "plateau": {**FAST["plateau"], "min_contribution": 1.0, "max_seeds": 1}})
    s = grow(cfg, tmp_path / "prune", progress=False)
    events = read_events(tmp_path / "prune" / "events.jsonl")
    pruned = [e for e in events if isinstance(e, Pruned)]
    assert len(pruned) == 1 and pruned[0].slot == "input" and "not above min_contribution 1.0" in pruned[0].reason
    assert s.pruned == 1 and s.fossilized == 0 and s.params_after == 826
    holding = next(e for e in events if isinstance(e, Advanced) and e.to_stage == "HOLDING")
    assert pruned[0].epoch - holding.epoch == 1  # hold_epochs=1, then the gate refused FOSSILIZE


@pytest.mark.parametrize("bad", [{"grad_norm/input": float("nan")}, {"grad_norm/input": 1e9}])
def test_the_gradient_gate_prunes_an_unhealthy_seed(bad):
    p = Plateau(PlateauConfig(incubate_epochs=1))  # its gates switch the gradient gate on (MAX_GRAD_NORM)
    s = ef.tick(_state(["TRAINING"]))
    (a,) = p.decide(_obs(s, p.gates, bad))
    assert a.op == ef.Op.PRUNE and "grad_norm/input" in a.reason
