"""Gates never pass blind, and the contribution gate demands evidence (a lower confidence bound)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import esper_fn as ef
from esper_fn import Op, Stage
from esper_fn.tasks import Task
from esper_fn.training import contribution_stats, contributions, grad_norms, telemetry, train_epoch

HOST = ef.hosts.mlp((40, 16, 10))


def _at(stage: Stage, tempo: int = 1) -> ef.State:
    s = ef.germinate(ef.init(HOST, generator=torch.Generator().manual_seed(0)), "fc1", "mlp_gelu",
                     generator=torch.Generator().manual_seed(1), tempo=tempo)
    for _ in range([Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING, Stage.HOLDING].index(stage)):
        s = ef.advance(s, "fc1", force=True)
    assert s.stage("fc1") == stage
    return s


# --- item 4: a gate that cannot read its input refuses, naming the key --------------------------------


def test_fossilize_without_telemetry_refuses_naming_the_key():
    h = _at(Stage.HOLDING)
    with pytest.raises(ef.MissingTelemetryError) as e:
        ef.fossilize(h, "fc1", gates=ef.GateConfig(min_contribution=0.01))
    msg = str(e.value)
    assert "'fc1/contribution'" in msg and "no telemetry" in msg and "force=True" in msg
    assert isinstance(e.value, ef.GateError) and isinstance(e.value, ValueError)
    # the default gate is on too: fossilize needs evidence unless forced
    with pytest.raises(ef.MissingTelemetryError, match="fc1/contribution"):
        ef.fossilize(h, "fc1")
    assert ef.fossilize(h, "fc1", force=True).stage("fc1") == Stage.FOSSILIZED  # mlp_gelu stays as structure


def test_a_misspelled_key_refuses_and_lists_the_keys_it_got():
    h = _at(Stage.HOLDING)
    with pytest.raises(ef.MissingTelemetryError) as e:
        ef.fossilize(h, "fc1", gates=ef.GateConfig(min_contribution=0.01, contribution_z=0.0),
                     telemetry={"contribution/fc1": 0.5})
    msg = str(e.value)
    assert "'fc1/contribution'" in msg and "'contribution/fc1'" in msg  # what it needs and what it got
    # the standard error is read as well when the bound uses it
    with pytest.raises(ef.MissingTelemetryError, match="'fc1/contribution_se'"):
        ef.fossilize(h, "fc1", gates=ef.GateConfig(min_contribution=0.01), telemetry={"fc1/contribution": 0.5})


def test_the_gradient_gate_is_off_by_default_and_never_blind_when_on():
    t = _at(Stage.TRAINING)
    assert ef.GateConfig().max_grad_norm is None
    assert ef.advance(t, "fc1").stage("fc1") == Stage.BLENDING  # off: no telemetry needed
    tight = ef.GateConfig(max_grad_norm=1e-6)
    with pytest.raises(ef.MissingTelemetryError, match="'grad_norm/fc1'"):
        ef.advance(t, "fc1", gates=tight)
    with pytest.raises(ef.GateError, match="gradient norm is 0.5"):
        ef.advance(t, "fc1", gates=tight, telemetry={"grad_norm/fc1": 0.5})
    assert ef.advance(t, "fc1", gates=tight, telemetry={"grad_norm/fc1": 1e-7}).stage("fc1") == Stage.BLENDING
    with pytest.raises(ef.GateError, match="not a number"):
        ef.advance(t, "fc1", gates=tight, telemetry={"grad_norm/fc1": "small"})


def test_a_gate_that_cannot_read_its_input_hides_the_op_and_the_op_names_the_key():
    h = _at(Stage.HOLDING)
    gates = ef.GateConfig(min_contribution=0.01)
    assert Op.FOSSILIZE not in ef.legal_actions(h, gates=gates, telemetry={"contribution/fc1": 0.5})["fc1"]["ops"]
    with pytest.raises(ef.MissingTelemetryError, match="'fc1/contribution'.*did you mean"):
        ef.fossilize(h, "fc1", gates=gates, telemetry={"contribution/fc1": 0.5})
    # a gate that refuses before it reads telemetry (too few epochs held) hides the op quietly, as the op refuses
    wait = ef.GateConfig(min_holding_epochs=2)
    assert Op.FOSSILIZE not in ef.legal_actions(h, gates=wait)["fc1"]["ops"]
    with pytest.raises(ef.GateError, match="min_holding_epochs"):
        ef.fossilize(h, "fc1", gates=wait)
    # with the gate off, nothing is read
    off = ef.GateConfig(min_contribution=None)
    assert Op.FOSSILIZE in ef.legal_actions(h, gates=off)["fc1"]["ops"]
    assert ef.fossilize(h, "fc1", gates=off).stage("fc1") == Stage.FOSSILIZED


KEYS = st.sampled_from(["fc1/contribution", "fc1/contribution_se", "grad_norm/fc1", "contribution/fc1", "fc1/grad"])


@given(steps=st.lists(st.tuples(st.sampled_from([Op.GERMINATE, Op.ADVANCE, Op.FOSSILIZE, Op.PRUNE, Op.WAIT]),
                                st.dictionaries(KEYS, st.floats(-0.2, 0.2), max_size=4),
                                st.sampled_from([None, 0.5])), min_size=1, max_size=20))
def test_the_mask_and_the_ops_agree_whatever_the_telemetry_holds(steps):
    """With keys present, missing or misspelled: the mask is always computed, an op it lists never
    raises, and an op it hides raises (MissingTelemetryError where a gate cannot read its input)."""
    g = torch.Generator().manual_seed(0)
    s = ef.init(HOST, generator=g)
    for op, tel, max_grad in steps:
        gates = ef.GateConfig(min_training_epochs=1, min_contribution=0.0, max_grad_norm=max_grad)

        def run():
            if op == Op.GERMINATE:
                return ef.germinate(s, "fc1", "mlp_gelu", generator=g, tempo=1)
            if op == Op.ADVANCE:
                return ef.advance(s, "fc1", gates=gates, telemetry=tel)
            if op == Op.FOSSILIZE:
                return ef.fossilize(s, "fc1", gates=gates, telemetry=tel)
            if op == Op.PRUNE:
                return ef.prune(s, "fc1")
            return s

        legal = ef.legal_actions(s, gates=gates, telemetry=tel)["fc1"]["ops"]  # never raises
        if op in legal:
            s = run()
        else:
            with pytest.raises((ef.IllegalTransitionError, ef.GateError)):
                run()  # a gate that cannot read its input raises MissingTelemetryError (a GateError)
        s = ef.tick(s)


# --- item 5: the contribution gate demands evidence ---------------------------------------------------


def _shifting_seed(shift: float = 1.0) -> ef.State:
    """A 2-class host that predicts argmax(x), with a HOLDING seed whose output adds `shift` to the
    class-1 logit: a sample x = (0.5, 0) flips from class 0 to class 1; x = (3, 0) does not."""
    host = ef.hosts.mlp((2, 2))
    s = ef.init(host, generator=torch.Generator().manual_seed(0))
    flat = dict(s.params_flat)
    flat[("host", "fc1", "weight")], flat[("host", "fc1", "bias")] = torch.eye(2), torch.zeros(2)
    s = s.replace(params_flat=flat)
    s = ef.germinate(s, "fc1", "mlp_gelu", generator=torch.Generator().manual_seed(1), tempo=1)
    flat = dict(s.params_flat)
    flat[("seeds", "fc1", "b2")] = torch.tensor([0.0, shift])
    s = s.replace(params_flat=flat)
    for _ in range(3):
        s = ef.advance(s, "fc1", force=True)
    assert s.stage("fc1") == Stage.HOLDING
    return s


def _data(helped: int, hurt: int, neutral: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`helped` samples the seed turns right, `hurt` it turns wrong, `neutral` it leaves right."""
    x = torch.tensor([[0.5, 0.0]] * (helped + hurt) + [[3.0, 0.0]] * neutral)
    y = torch.tensor([1] * helped + [0] * hurt + [0] * neutral)
    return x, y


@pytest.mark.parametrize("helped,hurt,neutral", [(2, 0, 15), (10, 0, 7), (0, 0, 17), (2, 2, 13), (1, 3, 36), (5, 0, 35)])
def test_contribution_and_its_standard_error_are_the_paired_difference(helped, hurt, neutral):
    s = _shifting_seed()
    x, y = _data(helped, hurt, neutral)
    d = [1.0] * helped + [-1.0] * hurt + [0.0] * neutral  # correct with the seed - correct without it
    stats = contribution_stats(s, x, y)["fc1"]
    assert stats["contribution"] == contributions(s, x, y)["fc1"]
    assert stats["contribution"] == pytest.approx(statistics.fmean(d), abs=1e-6)
    assert stats["se"] == pytest.approx(statistics.stdev(d) / math.sqrt(len(d)), rel=1e-9, abs=1e-12)
    task = Task("toy", x, y, x, y, x, y, n_classes=2, input_shape=(2,))  # a Task built from tensors
    tel = telemetry(s, task, {})
    assert tel["fc1/contribution"] == stats["contribution"] and tel["fc1/contribution_se"] == stats["se"]
    assert telemetry(s, (x, y), {}) == tel  # or just the validation tensors


@pytest.mark.parametrize("helped,hurt,neutral,passes", [
    (0, 0, 17, False),  # measured exactly 0: no evidence the seed helps (the old default kept it)
    (2, 2, 13, False),  # helps as often as it hurts
    (2, 0, 15, False),  # +0.118 on 17 samples: se 0.081, lower bound -0.015
    (10, 0, 7, True),   # +0.588, se 0.123, lower bound +0.386
    (5, 0, 35, True),   # +0.125 on 40 samples: se 0.053, lower bound +0.038
])
def test_the_default_gate_fossilizes_only_on_evidence(helped, hurt, neutral, passes):
    s = _shifting_seed()
    tel = telemetry(s, _data(helped, hurt, neutral), {})
    c, se = tel["fc1/contribution"], tel["fc1/contribution_se"]
    z = ef.GateConfig().contribution_z
    assert z == 1.645 and (c - z * se > 0) == passes
    legal = Op.FOSSILIZE in ef.legal_actions(s, telemetry=tel)["fc1"]["ops"]
    assert legal == passes
    if passes:
        assert ef.fossilize(s, "fc1", telemetry=tel).stage("fc1") == Stage.FOSSILIZED
    else:
        with pytest.raises(ef.GateError, match="lower bound") as e:
            ef.fossilize(s, "fc1", telemetry=tel)
        assert not isinstance(e.value, ef.MissingTelemetryError)
    # z = 0 is the bare comparison, still strict: an exact 0 never passes as "helps"
    bare = ef.GateConfig(contribution_z=0.0)
    assert (Op.FOSSILIZE in ef.legal_actions(s, gates=bare, telemetry=tel)["fc1"]["ops"]) == (c > 0)


def test_one_validation_sample_is_no_evidence():
    s = _shifting_seed()
    tel = telemetry(s, _data(1, 0, 0), {})
    assert tel["fc1/contribution"] == 1.0 and tel["fc1/contribution_se"] == math.inf
    assert Op.FOSSILIZE not in ef.legal_actions(s, telemetry=tel)["fc1"]["ops"]


# --- telemetry for custom loops ---------------------------------------------------------------------


def test_grad_norms_from_train_step_equal_train_epochs():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(250, 40, generator=g), torch.randint(0, 10, (250,), generator=g)
    task = Task("toy", x, y, x[:20], y[:20], x[:20], y[:20], n_classes=10, input_shape=(40,))
    s = _at(Stage.TRAINING)
    epoch_state, epoch_metrics = train_epoch(s, task, generator=torch.Generator().manual_seed(3))
    # the same epoch by hand: the same batches, grad_stats=True, then grad_norms over the mean
    state, sq = s, []
    for xb, yb in task.batches("train", 100, generator=torch.Generator().manual_seed(3)):
        state, m = ef.train_step(state, xb, yb, grad_stats=True)
        sq.append(m["grad_sq"])
    norms = grad_norms(state, torch.stack(sq).mean(0))
    assert set(norms) == {"grad_norm/host", "grad_norm/fc1"}
    for k, v in norms.items():
        assert v == pytest.approx(epoch_metrics[k], rel=1e-6)
    tel = telemetry(state, task, {**norms})
    assert ef.advance(state, "fc1", gates=ef.GateConfig(max_grad_norm=1e3), telemetry=tel).stage("fc1") == Stage.BLENDING
