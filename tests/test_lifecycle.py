"""The transition table, exhaustively, and the ops that enforce it."""

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import esper_fn as ef
from esper_fn import Op, Stage

HOST = ef.hosts.mlp((40, 16, 10))


def _state_in(stage: Stage, generator) -> ef.State:
    """Drive slot fc1 of a fresh state into `stage` through legal ops only."""
    s = ef.init(HOST, generator=generator)
    path = {
        Stage.DORMANT: [],
        Stage.GERMINATED: ["g"],
        Stage.TRAINING: ["g", "a"],
        Stage.BLENDING: ["g", "a", "a"],
        Stage.HOLDING: ["g", "a", "a", "ramp", "a"],
        Stage.FOSSILIZED: ["g", "a", "a", "ramp", "a", "f"],
        Stage.PRUNED: ["g", "p"],
        Stage.EMBARGOED: ["g", "p", "t"],
    }[stage]
    for step in path:
        if step == "g":
            s = ef.germinate(s, "fc1", "mlp_gelu", generator=generator, tempo=2)
        elif step == "a":
            s = ef.advance(s, "fc1")
        elif step == "ramp":
            s = ef.tick(ef.tick(s))
        elif step == "f":
            s = ef.fossilize(s, "fc1", force=True)  # the path, not the contribution gate, is under test
        elif step == "p":
            s = ef.prune(s, "fc1")
        elif step == "t":
            s = ef.tick(s)
    assert s.stage("fc1") == stage
    return s


def _do(s: ef.State, op: Op, generator) -> ef.State:
    if op == Op.GERMINATE:
        return ef.germinate(s, "fc1", "mlp_gelu", generator=generator)
    if op == Op.ADVANCE:
        return ef.advance(s, "fc1", force=True)
    if op == Op.FOSSILIZE:
        return ef.fossilize(s, "fc1", force=True)
    if op == Op.PRUNE:
        return ef.prune(s, "fc1")
    return s


@pytest.mark.parametrize("stage,op", list(itertools.product(Stage, [o for o in Op if o != Op.WAIT])))
def test_transition_table_exhaustive(stage, op, generator):
    s = _state_in(stage, generator)
    expected = ef.TRANSITIONS.get((stage, op))
    if expected is None:
        with pytest.raises(ef.IllegalTransitionError) as e:
            _do(s, op, generator)
        msg = str(e.value)
        assert "'fc1'" in msg and stage.name in msg and op.name in msg and "legal_actions" in msg
        assert isinstance(e.value, ValueError)
    else:
        out = _do(s, op, generator)
        assert out.stage("fc1") == expected
        assert s.stage("fc1") == stage  # the input state is untouched


@pytest.mark.parametrize("stage", list(Stage))
def test_legal_actions_follow_table(stage, generator):
    s = _state_in(stage, generator)
    legal = ef.legal_actions(s, gates=ef.GateConfig(min_contribution=None))["fc1"]  # the table alone
    table_ops = {op for (st, op) in ef.TRANSITIONS if st == stage}
    if stage == Stage.BLENDING:  # alpha is 0 here: the ramp gate masks ADVANCE until alpha reaches 1
        table_ops.discard(Op.ADVANCE)
    assert set(legal["ops"]) == table_ops | {Op.WAIT}
    assert bool(legal["blueprints"]) == (stage == Stage.DORMANT)


GATES = ef.GateConfig(min_training_epochs=2, min_holding_epochs=1, min_contribution=0.01, max_grad_norm=5.0)


@given(steps=st.lists(st.tuples(st.sampled_from(list(Op)), st.sampled_from(["fc1", "fc2"]),
                                st.floats(-0.1, 0.1), st.sampled_from([0.5, 50.0])), min_size=1, max_size=25))
def test_a_masked_action_never_raises_and_an_unmasked_one_does(steps):
    """legal_actions with gates and telemetry is exactly what the ops accept (no force)."""
    g = torch.Generator().manual_seed(0)
    s = ef.init(HOST, generator=g)
    for op, slot, contribution, grad in steps:
        tel = {k: v for n in ("fc1", "fc2") for k, v in
               ((f"{n}/contribution", contribution), (f"{n}/contribution_se", 0.01), (f"grad_norm/{n}", grad))}
        legal = ef.legal_actions(s, gates=GATES, telemetry=tel)[slot]
        kwargs = {"gates": GATES, "telemetry": tel}
        def run():
            if op == Op.GERMINATE:
                return ef.germinate(s, slot, legal["blueprints"][0] if legal["blueprints"] else "mlp_gelu", generator=g)
            if op == Op.ADVANCE:
                return ef.advance(s, slot, **kwargs)
            if op == Op.FOSSILIZE:
                return ef.fossilize(s, slot, **kwargs)
            if op == Op.PRUNE:
                return ef.prune(s, slot)
            return s
        if op in legal["ops"]:
            s = run()
        else:
            with pytest.raises((ef.IllegalTransitionError, ef.GateError)):
                run()
        s = ef.tick(s)


def test_embargo_counts_down_to_dormant(generator):
    s = _state_in(Stage.PRUNED, generator)
    s = ef.tick(s, gates=ef.GateConfig(embargo_epochs=3))
    assert s.stage("fc1") == Stage.EMBARGOED
    for _ in range(2):
        s = ef.tick(s, gates=ef.GateConfig(embargo_epochs=3))
        assert s.stage("fc1") == Stage.EMBARGOED
    s = ef.tick(s, gates=ef.GateConfig(embargo_epochs=3))
    assert s.stage("fc1") == Stage.DORMANT
    assert ef.germinate(s, "fc1", "lora_r4", generator=generator).stage("fc1") == Stage.GERMINATED


@pytest.mark.parametrize("curve", ef.CURVES)
def test_alpha_ramp_is_monotone_and_reaches_one(curve, generator):
    s = ef.init(HOST, generator=generator)
    s = ef.germinate(s, "fc1", "mlp_gelu", generator=generator, tempo=4, curve=curve)
    s = ef.advance(ef.advance(s, "fc1"), "fc1")
    alphas = [float(s.slots["alpha"][1])]
    for _ in range(4):
        s = ef.tick(s)
        alphas.append(float(s.slots["alpha"][1]))
    assert alphas[0] == 0.0 and alphas[-1] == 1.0
    assert all(b > a for a, b in zip(alphas, alphas[1:]))
    assert ef.advance(s, "fc1").stage("fc1") == Stage.HOLDING


def test_gates_refuse_with_reason_and_force_overrides(generator):
    gates = ef.GateConfig(min_training_epochs=2, min_holding_epochs=1, min_contribution=0.01)
    s = _state_in(Stage.TRAINING, generator)
    with pytest.raises(ef.GateError, match="min_training_epochs=2"):
        ef.advance(s, "fc1", gates=gates)
    with pytest.raises(ef.GateError, match="gradient norm"):
        ef.advance(ef.tick(ef.tick(s)), "fc1", gates=gates.model_copy(update={"max_grad_norm": 1e3}),
                   telemetry={"grad_norm/fc1": float("nan")})
    assert ef.advance(ef.tick(ef.tick(s)), "fc1", gates=gates).stage("fc1") == Stage.BLENDING
    assert ef.advance(s, "fc1", gates=gates, force=True).stage("fc1") == Stage.BLENDING
    h = _state_in(Stage.HOLDING, generator)
    with pytest.raises(ef.GateError, match="min_holding_epochs"):
        ef.fossilize(h, "fc1", gates=gates)
    with pytest.raises(ef.GateError, match="Prune it instead"):
        ef.fossilize(ef.tick(h), "fc1", gates=gates, telemetry={"fc1/contribution": 0.0, "fc1/contribution_se": 0.0})
    tel = {"fc1/contribution": 0.05, "fc1/contribution_se": 0.01}  # lower bound 0.05 - 1.645 * 0.01 > 0.01
    assert ef.fossilize(ef.tick(h), "fc1", gates=gates, telemetry=tel).stage("fc1") == Stage.FOSSILIZED


def test_blending_cannot_be_left_before_the_ramp_ends(generator):
    s = _state_in(Stage.BLENDING, generator)
    with pytest.raises(ef.GateError, match="still blending"):
        ef.advance(s, "fc1")
    forced = ef.advance(s, "fc1", force=True)
    assert forced.stage("fc1") == Stage.HOLDING and float(forced.slots["alpha"][1]) == 1.0


def test_unknown_slot_and_curve_errors(generator):
    s = ef.init(HOST, generator=generator)
    with pytest.raises(ef.HostError, match="fc1"):
        ef.germinate(s, "nope", "mlp_gelu")
    with pytest.raises(ef.GraftError, match="curve"):
        ef.germinate(s, "fc1", "mlp_gelu", curve="bouncy")
    with pytest.raises(ef.BlueprintError, match="Close matches"):
        ef.germinate(s, "fc1", "mlp_gleu")
    with pytest.raises(ef.BlueprintError, match="malformed"):
        ef.germinate(s, "fc1", "mlp_gelu@1.0")
    with pytest.raises(ef.BlueprintError, match="does not fit"):
        ef.germinate(s, "fc2", "width_k4")  # the output layer has no consumer to widen into


def test_alpha_curves_endpoints():
    for c in ef.CURVES:
        assert ef.alpha_at(c, 0.0) == pytest.approx(0.0, abs=1e-12)
        assert ef.alpha_at(c, 1.0) == 1.0
        assert 0 < ef.alpha_at(c, 0.5) < 1
    assert torch.is_tensor(ef.init(HOST).slots["alpha"])
