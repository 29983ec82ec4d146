"""Emrakul: sculpting fossilized seeds and host layers (`esper_fn.sculpt`), the env's SCULPT op, and
the run-level sculpt (`esper-fn grow --sculpt`, `esper-fn sculpt RUN_DIR`)."""

import json
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import esper_fn as ef
from esper_fn.actions import SCULPT_OP, ActionSpace, from_action, to_action
from esper_fn.checkpoint import CheckpointManager
from esper_fn.episode import Sculpt, sculpt_offered

MLP = ef.hosts.mlp((6, 8, 3), name="mlp-6-8-3")
CNN = ef.hosts.cnn1d((3, 3), (3, 3), length=12, n_classes=3, name="cnn-3-3")


def _data(shape, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    return x, (x.flatten(1)[:, :3].argmax(-1))


X, Y = _data((6,))
XC, YC = _data((12,))


def _fossil(host, slot, bid, x, y, steps=15, seed=0):
    """A host trained a little with a fossilized (non-mergeable) seed at `slot`."""
    g = torch.Generator().manual_seed(seed)
    s = ef.init(host, generator=g)
    s = ef.germinate(s, slot, bid, generator=g)
    for _ in range(3):
        s = ef.advance(s, slot, force=True)
    s = ef.fossilize(s, slot, force=True)
    for _ in range(steps):
        s, _ = ef.train_step(s, x, y)
    return s


MLP_FOSSIL = _fossil(MLP, "input", "conv1d_k3", X, Y)  # a conv block on the input (16 hidden channels); fc1 free
CNN_FOSSIL = _fossil(CNN, "conv1", "conv1d_k3", XC, YC)  # conv1's channels are the seed's; conv2's are free


def _snapshot(s: ef.State):
    return ({k: v.clone() for k, v in s.params_flat.items()}, {k: v.clone() for k, v in s.opt_flat.items()},
            s.slots.clone(), s.blueprints, s.sculpts)


def _same(s: ef.State, snap) -> bool:
    p, o, slots, bps, n = snap
    return (s.params_flat.keys() == p.keys() and all(torch.equal(s.params_flat[k], v) for k, v in p.items())
            and s.opt_flat.keys() == o.keys() and all(torch.equal(s.opt_flat[k], v) for k, v in o.items())
            and torch.equal(s.slots["stage"], slots["stage"]) and s.blueprints == bps and s.sculpts == n)


@given(keep=st.one_of(st.floats(0.45, 1.0), st.integers(1, 8)), by=st.sampled_from(["contribution", "magnitude"]),
       target=st.sampled_from([None, "input", "fc1"]), allocate=st.sampled_from(["greedy", "even"]))
def test_sculpt_is_pure_and_exports_exactly(keep, by, target, allocate):
    if isinstance(keep, int) and target is None:
        target = "fc1"
    snap = _snapshot(MLP_FOSSIL)
    try:
        new, report = ef.sculpt(MLP_FOSSIL, target, keep=keep, by=by, data=(X, Y), allocate=allocate)
    except ef.SculptError as e:  # only a float keep the target cannot reach
        assert isinstance(keep, float) and "smallest keep" in str(e)
        assert _same(MLP_FOSSIL, snap)
        return
    assert _same(MLP_FOSSIL, snap)  # the input state is untouched
    assert new.num_params() == report.params_after <= report.params_before == MLP_FOSSIL.num_params()
    if isinstance(keep, float):
        assert new.num_params() <= int(keep * MLP_FOSSIL.num_params())
    with torch.no_grad():
        assert torch.equal(ef.export(new)(X), ef.apply(new, X))  # the smaller nn.Module computes the same
        diff = (ef.apply(new, X) - ef.apply(MLP_FOSSIL, X)).abs()
    assert report.max_abs_dlogits == pytest.approx(float(diff.max()))
    if report.logit_bound is not None:
        assert float(diff.max()) <= report.logit_bound * (1 + 1e-5) + 1e-5
    new2, _ = ef.train_step(new, X, Y)  # the sculpted state trains
    assert new2.num_params() == new.num_params()


@pytest.mark.parametrize("keep", [0.9, 0.8, 0.7, 0.6])
def test_an_even_allocation_removes_the_same_fraction_of_every_group(keep):
    new, report = ef.sculpt(MLP_FOSSIL, keep=keep, data=(X, Y), allocate="even")
    assert report.allocate == "even" and new.num_params() <= int(keep * MLP_FOSSIL.num_params())
    groups = [(b, a) for t in report.targets for b, a in zip(t.units_before, t.units_after)]
    assert len(groups) == 2  # the input seed's 16 hidden channels and fc1's 8 units
    fractions = [(b - a) / b for b, a in groups]
    assert max(fractions) - min(fractions) <= 1 / min(b for b, _ in groups)  # at most one unit step apart
    greedy = ef.sculpt(MLP_FOSSIL, keep=keep, data=(X, Y))[1]
    assert greedy.allocate == "greedy"
    with pytest.raises(ef.SculptError, match="allocate='uneven'"):
        ef.sculpt(MLP_FOSSIL, keep=keep, data=(X, Y), allocate="uneven")


@pytest.mark.parametrize("state,x", [(MLP_FOSSIL, X), (CNN_FOSSIL, XC)])
def test_keeping_everything_is_the_identity(state, x):
    for keep in (1.0, max(max(t.units) for t in ef.sculptable(state).values())):
        new, report = ef.sculpt(state, keep=keep, data=(x, None)) if isinstance(keep, float) else \
            ef.sculpt(state, list(ef.sculptable(state)), keep=keep, data=(x, None))
        assert report.units_removed == 0 and report.params_after == report.params_before
        assert _same(new, _snapshot(state))
        assert torch.equal(ef.apply(new, x), ef.apply(state, x))


def test_sculpted_cnn_and_wrapped_hosts_export_exactly(generator):
    new, report = ef.sculpt(CNN_FOSSIL, keep=0.7, data=(XC, YC))
    assert {t.slot: t.kind for t in report.targets} == {"conv1": "seed", "conv2": "host"}
    assert new.params_flat[("host", "fc", "weight")].shape[1] % 3 == 0  # whole channels (3 positions each) of the head
    assert torch.equal(ef.export(new)(XC), ef.apply(new, XC))
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    s = ef.init(ef.wrap(model, X, slots=[nn.Linear]), generator=generator)
    assert list(ef.sculptable(s)) == ["0"]  # the Linear the second Linear reads through the ReLU
    new, _ = ef.sculpt(s, "0", keep=5, data=X)
    assert new.params_flat[("host", "0", "weight")].shape == (5, 6)
    assert new.params_flat[("host", "2", "weight")].shape == (3, 5)
    assert torch.equal(ef.export(new)(X), ef.apply(new, X))


@given(dead=st.sets(st.integers(0, 15), min_size=1, max_size=12), seed_units=st.booleans())
def test_removing_units_with_no_outgoing_weight_leaves_the_function_unchanged(dead, seed_units):
    """A unit whose outgoing weights are zero contributes nothing: the contribution criterion removes
    exactly those, and the output does not change (up to the rounding of a shorter sum)."""
    s = MLP_FOSSIL
    key, n = (("seeds", "input", "w2"), 16) if seed_units else (("host", "fc2", "weight"), 8)
    dead = {d % n for d in dead}
    if len(dead) == n:
        dead.pop()
    w = s.params_flat[key].clone()
    w[:, sorted(dead)] = 0.0
    s = s.replace(params_flat={**s.params_flat, key: w})
    target = "input" if seed_units else "fc1"
    new, report = ef.sculpt(s, target, keep=n - len(dead), data=(X, Y))
    assert report.units_removed == len(dead)
    kept = [u for u in range(n) if u not in dead]
    w_new = new.params_flat[key]
    assert torch.equal(w_new, w[:, kept])  # the dead units are the ones that went
    assert report.max_abs_dlogits <= 1e-5
    torch.testing.assert_close(ef.apply(new, X), ef.apply(s, X), rtol=0, atol=1e-5)


def test_optimizer_state_of_what_remains_is_carried():
    s = MLP_FOSSIL
    new, report = ef.sculpt(s, "fc1", keep=5, by="magnitude")
    assert report.samples == 0 and report.max_abs_dlogits is None  # no data: nothing measured
    w_old, w_new = s.params_flat[("host", "fc1", "weight")], new.params_flat[("host", "fc1", "weight")]
    kept = [next(i for i in range(8) if torch.equal(w_old[i], row)) for row in w_new]
    for m in ("mu", "nu"):
        assert torch.equal(new.opt_flat[(m, "host", "fc1", "weight")], s.opt_flat[(m, "host", "fc1", "weight")][kept])
        assert torch.equal(new.opt_flat[(m, "host", "fc1", "bias")], s.opt_flat[(m, "host", "fc1", "bias")][kept])
        assert torch.equal(new.opt_flat[(m, "host", "fc2", "weight")],
                           s.opt_flat[(m, "host", "fc2", "weight")][:, kept])
        assert s.opt_flat[(m, "host", "fc1", "weight")].abs().sum() > 0  # real moments, not zeros
    assert all(torch.equal(new.opt_flat[k], v) for k, v in s.opt_flat.items() if k[0] == "step")
    assert new.sculpts == 1 and s.sculpts == 0


def test_a_sculpted_state_checkpoints_and_an_unexplained_shrink_does_not(tmp_path):
    new, _ = ef.sculpt(CNN_FOSSIL, keep=0.6, data=(XC, YC))
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, new, {})
    back, _ = mgr.restore_state(CNN, 1)
    assert back.sculpts == 1 and all(torch.equal(back.params_flat[k], v) for k, v in new.params_flat.items())
    assert torch.equal(ef.apply(back, XC), ef.apply(new, XC))
    tensors, meta = ef.state_to_tensors(new)
    with pytest.raises(ef.CheckpointError, match="records no sculpt"):
        ef.state_from_tensors(CNN, tensors, {**meta, "sculpts": 0})


def test_what_cannot_be_sculpted_is_a_typed_error(generator):
    s = ef.init(MLP, generator=generator)
    s = ef.advance(ef.germinate(s, "fc1", "mlp_gelu", generator=generator), "fc1")
    cases = [
        (lambda: ef.sculpt(s, "fc1", keep=0.5, data=X), "live seed.*fossilize"),
        (lambda: ef.sculpt(s, "fc9", keep=0.5, data=X), "no slot 'fc9'"),
        (lambda: ef.sculpt(s, "fc2", keep=0.5, data=X), "no hidden units"),
        (lambda: ef.sculpt(MLP_FOSSIL, "fc1", keep=0.0, data=X), r"keep=0.0 is out of range.*\(0, 1\]"),
        (lambda: ef.sculpt(MLP_FOSSIL, "fc1", keep=1.5, data=X), "out of range"),
        (lambda: ef.sculpt(MLP_FOSSIL, "fc1", keep=9, data=X), r"keep=9 units is out of range.*between 1 and 8"),
        (lambda: ef.sculpt(MLP_FOSSIL, "fc1", keep=0, data=X), "out of range"),
        (lambda: ef.sculpt(MLP_FOSSIL, "fc1", keep=True, data=X), "must be a float"),
        (lambda: ef.sculpt(MLP_FOSSIL, "fc1", keep=0.1, data=X), "smallest keep"),
        (lambda: ef.sculpt(MLP_FOSSIL, "fc1", keep=0.5), "pass data"),
        (lambda: ef.sculpt(MLP_FOSSIL, "fc1", keep=0.5, by="norm", data=X), "unknown criterion"),
        (lambda: ef.sculpt(ef.stack([MLP_FOSSIL, MLP_FOSSIL]), keep=0.5, data=X), "stacked"),
    ]
    for call, match in cases:
        with pytest.raises(ef.SculptError, match=match) as e:
            call()
        assert isinstance(e.value, ValueError) and isinstance(e.value, ef.EsperError)
    # LoRA at fc2 reads fc2's input, whose width sculpting fc1 would change; IA3 there reads its output
    free = ef.init(ef.hosts.mlp((6, 8, 5)), generator=generator)
    s2 = ef.germinate(free, "fc2", "lora_r4", generator=generator)
    with pytest.raises(ef.SculptError, match="reads that layer's input"):
        ef.sculpt(s2, "fc1", keep=4, data=X)
    assert "fc1" in ef.sculptable(ef.germinate(free, "fc2", "ia3", generator=generator))


@given(ops=st.lists(st.sampled_from(["germinate", "advance", "fossilize", "prune", "tick", "sculpt"]),
                    min_size=1, max_size=12),
       slot=st.sampled_from(["input", "fc1", "fc2"]))
def test_an_offered_sculpt_never_raises_and_any_other_does(ops, slot):
    """`sculpt_offered` (the env's SCULPT mask) is exactly where a `Sculpt` decision applies."""
    g = torch.Generator().manual_seed(1)
    s = ef.init(MLP, generator=g)
    for op in ops:
        offered = sculpt_offered(s)
        if op == "sculpt":
            target = ef.sculptable(s).get(slot)
            keep = Sculpt(slot).units(max(target.units)) if target else 1
            if offered[slot]:
                new, report = ef.sculpt(s, slot, keep=keep, data=(X, Y))
                assert report.units_removed >= 1 and new.num_params() < s.num_params()
                s = new
            else:
                with pytest.raises(ef.SculptError):
                    ef.sculpt(s, slot, keep=keep if target is None else max(target.units) + 1, data=(X, Y))
            continue
        legal = ef.legal_actions(s, gates=ef.GateConfig(min_contribution=None))[slot]
        stage = legal["stage"]
        if op == "germinate" and ef.Op.GERMINATE in legal["ops"] and "mlp_gelu@1.0.0" in legal["blueprints"]:
            s = ef.germinate(s, slot, "mlp_gelu", generator=g)
        elif op == "advance" and stage in (ef.Stage.GERMINATED, ef.Stage.TRAINING, ef.Stage.BLENDING):
            s = ef.advance(s, slot, force=True)
        elif op == "fossilize" and stage == ef.Stage.HOLDING:
            s = ef.fossilize(s, slot, force=True)
        elif op == "prune" and ef.Op.PRUNE in legal["ops"]:
            s = ef.prune(s, slot)
        elif op == "tick":
            s = ef.tick(s)


def test_the_sculpt_layout_is_opt_in_and_appended_after_prune():
    bps, tempos = ("a@1.0.0", "b@1.0.0"), (3, 5)
    plain, sculpting = ActionSpace(3, bps, tempos), ActionSpace(3, bps, tempos, sculpt=True)
    assert plain.n == 1 + 3 * 2 * 2 + 3 * 3 and sculpting.n == plain.n + 3
    for i in range(plain.n):  # every action of the default layout keeps its index and meaning
        assert sculpting.decode(i) == plain.decode(i)
    for s in range(3):
        i = plain.n + s
        assert sculpting.decode(i).op == SCULPT_OP and sculpting.decode(i).slot == s
        assert sculpting.encode(SCULPT_OP, s) == i
        assert int(sculpting.unravel(torch.tensor([i]))[0]) == SCULPT_OP
        a = to_action(sculpting, i, ["input", "fc1", "fc2"])
        assert a == Sculpt(["input", "fc1", "fc2"][s], keep=sculpting.sculpt_keep)
        assert from_action(sculpting, a, ["input", "fc1", "fc2"]) == i
    with pytest.raises(ef.EsperError, match="no SCULPT"):
        plain.encode(SCULPT_OP, 0)
    with pytest.raises(ef.EsperError, match="sculpt_keep"):
        ActionSpace(3, bps, tempos, sculpt=True, sculpt_keep=1.0)


def test_sculpt_through_the_env_shrinks_a_fossilized_seed():
    """Grow a conv seed on the input under the full lifecycle, fossilize it, then SCULPT it through the env."""
    from esper_fn.envs import MorphogenesisEnv

    env = MorphogenesisEnv(task="mnist1d", host="mlp-impaired", num_envs=1, max_epochs=8, seed=0, lifecycle="full",
                           blueprints=["conv1d_k3"], tempos=(1,), sculpt=True, subset={"train": 200, "val": 100},
                           gates=ef.GateConfig(min_training_epochs=0, min_holding_epochs=0, min_contribution=None))
    sp = env.action_space
    td = env.reset()
    names = env.state(0).slot_names
    slot = names.index("input")
    assert bool(td["action_mask"][0, sp.encode(SCULPT_OP, names.index("fc1"))])  # a free host layer: offered
    plan = [sp.encode(ef.Op.GERMINATE, slot, "conv1d_k3", 1)] + [sp.op_base(ef.Op.ADVANCE) + slot] * 3
    for a in plan:
        assert not bool(td["action_mask"][0, sp.encode(SCULPT_OP, slot)])  # a live seed: never offered
        td = env.step(td.set("action", torch.tensor([a])))["next"]
    td = env.step(td.set("action", torch.tensor([sp.op_base(ef.Op.FOSSILIZE) + slot])))["next"]
    assert env.state(0).stage("input") == ef.Stage.FOSSILIZED
    before = env.state(0).num_params()
    assert bool(td["action_mask"][0, sp.encode(SCULPT_OP, slot)])
    env.step(td.set("action", torch.tensor([sp.encode(SCULPT_OP, slot)])))
    s = env.state(0)
    assert s.params_flat[("seeds", "input", "w1")].shape[0] == 12  # 16 hidden channels, keep 0.75
    assert s.num_params() == before - 4 * 7 and env.episode(0).counts.sculpted == 1


def _tiny_run(tmp_path, **overrides):
    from esper_fn.run import RunConfig

    cfg = dict(task="mnist1d", host="mlp-impaired", controller="static", epochs=2, seed=0, checkpoint_every=1)
    return RunConfig(**{**cfg, **overrides}), tmp_path / "run"


def test_grow_with_sculpt_logs_fine_tunes_and_resumes(tmp_path):
    from esper_fn.events import Sculpted, read_events
    from esper_fn.run import grow

    config, out = _tiny_run(tmp_path, sculpt=0.8, sculpt_epochs=1)
    s = grow(config, out, progress=False)
    assert s.sculpt is not None and s.epochs == 3 and s.params_after == s.sculpt.report.params_after <= 0.8 * 826
    events = read_events(out / "events.jsonl")
    (e,) = [e for e in events if isinstance(e, Sculpted)]
    assert e.epoch == 2 and e.params_before == 826 and e.units == {"fc1": s.sculpt.report.targets[0].units_after}
    assert json.loads((out / "summary.json").read_text())["sculpt"]["report"]["params_after"] == s.params_after
    again = grow(config, out, resume=True, progress=False)  # a finished sculpted run resumes as itself
    assert again.sculpt == s.sculpt and again.test_accuracy == s.test_accuracy


def test_esper_fn_sculpt_on_a_finished_run_and_its_one_line_errors(tmp_path, capsys, crash_at):
    from esper_fn.cli import main
    from esper_fn.run import grow

    config, out = _tiny_run(tmp_path)
    first = grow(config, out, progress=False)
    assert main(["sculpt", str(out), "--keep", "0.9", "--fine-tune-epochs", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "sculpt (epoch 2, keep 0.9)" in printed and "test accuracy" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sculpt"]["fine_tune_epochs"] == 1 and summary["epochs"] == 3
    # the times cover the whole run, both processes: the wall time includes the first one's
    assert summary["train_seconds"] > first.train_seconds
    assert summary["wall_seconds"] > first.wall_seconds * 0.5 and \
        summary["wall_seconds"] >= summary["train_seconds"] + summary["telemetry_seconds"]
    assert "sculpt: 0.9" in (out / "config.yaml").read_text()
    mgr = CheckpointManager(out / "checkpoints")
    assert mgr.steps()[-1] == 3
    cases = [
        (["sculpt", str(out), "--keep", "0.8"], "sculpted already"),
        (["sculpt", str(tmp_path / "nothing"), "--keep", "0.8"], "not a run directory"),
        (["sculpt", str(out), "--keep", "1.5"], r"--keep: .*\(0, 1\]"),
        (["sculpt", str(out), "--keep", "0.8", "--fine-tune-epochs", "-1"], "--fine-tune-epochs"),
    ]
    for argv, match in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert __import__("re").search(match, err), err
    unfinished, out2 = _tiny_run(tmp_path, epochs=4)
    out2 = tmp_path / "unfinished"
    with pytest.raises(crash_at.error):
        grow(unfinished, out2, progress=False, on_epoch_start=crash_at(3))
    assert main(["sculpt", str(out2), "--keep", "0.8"]) == 2
    assert re.search(r"is not finished \(epoch 3 of 4\)", capsys.readouterr().err)
