"""Functional core: purity, function preservation, equivalence with eager PyTorch, stacking."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import esper_fn as ef
from esper_fn import Stage

MLP = ef.hosts.mlp((40, 16, 10))
CNN = ef.hosts.cnn1d()


def _snapshot(state: ef.State) -> dict:
    return {
        "params": {k: v.clone() for k, v in state.params_flat.items()},
        "buffers": {k: v.clone() for k, v in state.buffers_flat.items()},
        "opt": {k: v.clone() for k, v in state.opt_flat.items()},
        "slots": state.slots.clone(),
        "blueprints": state.blueprints,
    }


def _same(state: ef.State, snap: dict) -> bool:
    for name in ("params", "buffers", "opt"):
        flat = getattr(state, name + "_flat")
        if list(flat) != list(snap[name]) or any(not torch.equal(flat[k], snap[name][k]) for k in flat):
            return False
    return (state.slots == snap["slots"]).all() and state.blueprints == snap["blueprints"]


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 40, generator=g), torch.randint(0, 10, (n,), generator=g)


OPS = st.lists(st.sampled_from(["germ", "adv", "tick", "fos", "prune", "train"]), min_size=1, max_size=12)


@given(ops=OPS, slot=st.sampled_from(["input", "fc1", "fc2"]), bp=st.sampled_from(["mlp_gelu", "lora_r4", "ia3", "conv1d_k5", "width_k4"]))
def test_every_op_is_pure(ops, slot, bp):
    """No op modifies its input state, whatever sequence of (legal or illegal) ops is applied."""
    g = torch.Generator().manual_seed(1)
    x, y = _data()
    s = ef.init(MLP, generator=g)
    for op in ops:
        snap = _snapshot(s)
        try:
            if op == "germ":
                new = ef.germinate(s, slot, bp, generator=g)
            elif op == "adv":
                new = ef.advance(s, slot, force=True)
            elif op == "tick":
                new = ef.tick(s)
            elif op == "fos":
                new = ef.fossilize(s, slot, force=True)
            elif op == "prune":
                new = ef.prune(s, slot)
            else:
                new, _ = ef.train_step(s, x, y)
        except (ef.IllegalTransitionError, ef.BlueprintError):
            new = s
        assert _same(s, snap), f"{op} modified its input"
        s = new


@pytest.mark.parametrize("host", [MLP, CNN, ef.hosts.mlp((40, 8, 8, 10))], ids=lambda h: h.name)
@given(seed=st.integers(0, 2**16))
def test_germinate_preserves_function_and_prune_restores_it(host, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = _data(seed=seed)
    s = ef.init(host, generator=g)
    for _ in range(2):
        s, _ = ef.train_step(s, x, y)
    base = ef.apply(s, x)
    for slot in s.slot_names:
        for bid, bp in ef.blueprints.registry().items():
            if not bp.fits(s.spec(slot)) or bp.meta.requires_capability:
                continue
            grafted = ef.germinate(s, slot, bid, generator=g)
            # at alpha 1 (HOLDING), where the seed's whole output counts: it must be born silent
            blended = ef.advance(ef.advance(ef.advance(grafted, slot), slot), slot, force=True)
            assert float(blended.slots["alpha"][blended.index(slot)]) == 1.0
            assert (ef.apply(blended, x) - base).abs().max() <= 1e-6, (slot, bid)
            assert torch.equal(ef.apply(ef.prune(blended, slot), x), base), (slot, bid)
            pruned = ef.prune(grafted, slot)
            assert list(pruned.params_flat) == list(s.params_flat)
            assert list(pruned.opt_flat) == list(s.opt_flat)


def _grown(host, slot, bid, g, x, y, steps=5):
    s = ef.init(host, generator=g)
    s = ef.germinate(s, slot, bid, generator=g, tempo=2)
    s = ef.advance(ef.advance(s, slot), slot)
    s = ef.tick(s)
    for _ in range(steps):
        s, _ = ef.train_step(s, x, y)
    s = ef.tick(s)
    for _ in range(steps):
        s, _ = ef.train_step(s, x, y)
    return ef.advance(s, slot)


@pytest.mark.parametrize("slot,bid", [("fc1", "lora_r4"), ("fc2", "lora_r8"), ("fc1", "ia3"), ("fc1", "width_k4"), ("fc1", "width_k16")])
def test_fossilize_merge_preserves_function_and_frees_the_slot(slot, bid, generator):
    x, y = _data()
    s = _grown(MLP, slot, bid, generator, x, y)
    before = ef.apply(s, x)
    assert (before - ef.apply(ef.prune(s, slot), x)).abs().max() > 1e-4  # the seed learned something
    f = ef.fossilize(s, slot, force=True)  # the merge is under test, not the contribution gate
    assert (ef.apply(f, x) - before).abs().max() <= 1e-5
    assert f.stage(slot) == Stage.DORMANT and not f.seed_params(slot)
    assert all(k[1] != "seeds" for k in f.opt_flat)
    # optimizer state mirrors the (possibly widened) parameters
    for m in f.optimizer.mirrors:
        for k, p in f.params_flat.items():
            leaf = f.opt_flat[(m, *k)]
            assert leaf.shape == (() if m == "step" else p.shape)
    f2, _ = ef.train_step(f, x, y)  # and it keeps training
    assert torch.isfinite(ef.apply(f2, x)).all()


def test_width_growth_widens_the_host(generator):
    x, y = _data()
    f = ef.fossilize(_grown(MLP, "fc1", "width_k4", generator, x, y), "fc1", force=True)
    assert f.params["host", "fc1", "weight"].shape == (20, 40)
    assert f.params["host", "fc2", "weight"].shape == (10, 20)
    assert f.spec("fc1").shape == (20,)
    g2 = ef.germinate(f, "fc1", "lora_r4", generator=generator)  # slot shapes follow the params
    assert g2.seed_params("fc1")["B"].shape == (20, 4)


def test_non_mergeable_fossil_is_permanent_and_trains_with_the_host(generator):
    x, y = _data()
    s = _grown(CNN, "conv1", "conv1d_k3", generator, x, y)
    f = ef.fossilize(s, "conv1", force=True)
    assert f.stage("conv1") == Stage.FOSSILIZED and float(f.slots["alpha"][1]) == 1.0
    with pytest.raises(ef.IllegalTransitionError):
        ef.prune(f, "conv1")
    f2, _ = ef.train_step(f, x, y)
    for k in f.params_flat:  # host (upstream and downstream) and the fossil all keep learning
        assert not torch.equal(f.params_flat[k], f2.params_flat[k]), k
    assert torch.equal(ef.apply(f, x), ef.export(f)(x))


@pytest.mark.parametrize("host", [MLP, CNN, ef.hosts.transformer(seq_len=40, d_model=16, n_heads=2, n_layers=1)],
                         ids=lambda h: h.name)
def test_export_equals_apply(host, generator):
    x, y = _data()
    s = ef.init(host, generator=generator)
    slot = s.slot_names[1]
    bid = next(b for b, bp in ef.blueprints.registry().items() if bp.fits(s.spec(slot)))
    s = _grown(host, slot, bid, generator, x, y, steps=2)
    m = ef.export(s)
    assert isinstance(m, nn.Module)
    assert torch.equal(m(x), ef.apply(s, x))
    # the seed is an ordinary submodule, grafted after the layer its slot follows
    grafts = [mod for mod in m.modules() if isinstance(mod, ef.Graft)]
    assert len(grafts) == 1 and any(".seed." in n for n in m.state_dict())
    # training the export does not touch the state
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    F.cross_entropy(m(x), y).backward()
    opt.step()
    assert not torch.equal(m(x), ef.apply(s, x))


def test_functional_gradients_equal_eager_autograd(generator):
    """One train step with SGD equals an eager nn.Module step with torch.optim.SGD."""
    x, y = _data()
    module = nn.Sequential(nn.Linear(40, 16), nn.ReLU(), nn.Linear(16, 10))
    host = ef.wrap(module, x, slots=[nn.Linear])
    s = ef.init(host, optimizer=ef.optim.sgd(0.1, momentum=0.9))
    eager = copy.deepcopy(module)
    opt = torch.optim.SGD(eager.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        s, _ = ef.train_step(s, x, y)
        opt.zero_grad()
        F.cross_entropy(eager(x), y).backward()
        opt.step()
    for name, p in eager.named_parameters():
        torch.testing.assert_close(s.params_flat[("host", *name.split("."))], p.detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("make,ref", [
    (lambda: ef.optim.adam(1e-2), lambda p: torch.optim.Adam(p, lr=1e-2)),
    (lambda: ef.optim.adam(1e-2, weight_decay=0.1), lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1)),
    (lambda: ef.optim.adamw(1e-2, weight_decay=0.1), lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)),
    (lambda: ef.optim.sgd(1e-2, momentum=0.9, nesterov=True, weight_decay=1e-3),
     lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-3)),
])
def test_optimizers_match_torch_optim(make, ref, generator):
    x, y = _data()
    s = ef.init(MLP, optimizer=make(), generator=generator)
    module = nn.Sequential(nn.Linear(40, 16), nn.ReLU(), nn.Linear(16, 10))
    with torch.no_grad():
        for (name, p) in module.named_parameters():
            layer = {"0": "fc1", "2": "fc2"}[name.split(".")[0]]
            p.copy_(s.params_flat[("host", layer, name.split(".")[1])])
    opt = ref(module.parameters())
    for _ in range(5):
        s, _ = ef.train_step(s, x, y)
        opt.zero_grad()
        F.cross_entropy(module(x), y).backward()
        opt.step()
    torch.testing.assert_close(s.params_flat[("host", "fc1", "weight")], module[0].weight.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [lambda: ef.optim.adam(1e-2), lambda: ef.optim.adamw(1e-2),
                                  lambda: ef.optim.sgd(0.1, momentum=0.9)], ids=["adam", "adamw", "sgd"])
def test_optimizer_init_update_is_a_pure_public_pair(make, generator):
    """`Optimizer.init` / `Optimizer.update` over TensorDicts equal the train-step path and mutate nothing."""
    opt = make()
    x, y = _data()
    s = ef.init(MLP, optimizer=opt, generator=generator)
    params = s.params.clone()
    state = opt.init(params)
    assert set(state.keys()) == set(opt.mirrors)
    assert all(float(v.abs().sum()) == 0 for v in state.values(True, True))
    grads = torch.func.grad(lambda p: F.cross_entropy(
        F.linear(F.relu(F.linear(x, p["host", "fc1", "weight"], p["host", "fc1", "bias"])),
                 p["host", "fc2", "weight"], p["host", "fc2", "bias"]), y))(params)
    snap_p, snap_s = params.clone(), state.clone()
    new_p, new_s = opt.update(grads, state, params)
    assert (params == snap_p).all() and (state == snap_s).all()  # inputs untouched
    ref, _ = ef.train_step(s, x, y)
    for k, v in ref.params_flat.items():
        torch.testing.assert_close(new_p.get(k), v, rtol=1e-6, atol=1e-7)
    for k, v in ref.opt_flat.items():
        torch.testing.assert_close(new_s.get(k), v, rtol=1e-6, atol=1e-7)
    # a subset of leaves: the others keep their values
    only = grads.exclude(("host", "fc2"))
    p2, s2 = opt.update(only, state, params)
    assert torch.equal(p2["host", "fc2", "weight"], params["host", "fc2", "weight"])
    assert not torch.equal(p2["host", "fc1", "weight"], params["host", "fc1", "weight"])


def test_optimizer_partition_learning_rates(generator):
    x, y = _data()
    s = ef.init(MLP, optimizer=ef.optim.sgd({"host": 0.0, "seeds": 0.1}), generator=generator)
    s = ef.advance(ef.advance(ef.germinate(s, "fc1", "mlp_gelu", generator=generator), "fc1"), "fc1")
    s = ef.tick(s)
    s2, _ = ef.train_step(s, x, y)
    assert all(torch.equal(s.params_flat[k], s2.params_flat[k]) for k in s.params_flat if k[0] == "host")
    assert not torch.equal(s.seed_params("fc1")["w2"], s2.seed_params("fc1")["w2"])
    with pytest.raises(ef.EsperError, match="lr mapping"):
        ef.optim.adam({"hots": 1e-3})


def test_new_seed_gets_zero_optimizer_state(generator):
    x, y = _data()
    s = ef.init(MLP, generator=generator)
    for _ in range(3):
        s, _ = ef.train_step(s, x, y)
    g = ef.germinate(s, "fc1", "lora_r4", generator=generator)
    for m in g.optimizer.mirrors:
        for name in ("A", "B"):
            assert float(g.opt_flat[(m, "seeds", "fc1", name)].abs().sum()) == 0.0
    assert float(g.opt_flat[("step", "host", "fc1", "weight")]) == 3.0


def test_training_stage_keeps_the_live_output_equal_to_the_host(generator):
    """While incubating, the live network is the host exactly; the shadow pass trains the seed."""
    x, y = _data()
    s = ef.init(MLP, generator=generator)
    s = ef.advance(ef.germinate(s, "input", "conv1d_k5", generator=generator), "input")
    twin = ef.init(MLP, generator=torch.Generator().manual_seed(0))
    for _ in range(5):
        s, m = ef.train_step(s, x, y)
        twin, _ = ef.train_step(twin, x, y)
        assert "shadow_loss" in m
    # the host trained exactly as the seedless twin did (the seed never touched it)
    assert torch.equal(ef.apply(s, x), ef.apply(twin, x))
    w0 = ef.germinate(ef.init(MLP, generator=torch.Generator().manual_seed(0)), "input", "conv1d_k5",
                      generator=torch.Generator().manual_seed(0))
    assert not torch.equal(s.seed_params("input")["w2"], w0.seed_params("input")["w2"])


def test_shadow_incubation_keeps_the_seed_bounded(generator):
    """Measured failure of the straight-through incubator: the seed output explodes to 100-1000x the
    host activation. Shadow incubation with Adam at lr 1e-2 must keep it comparable to h."""
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(40, 10, generator=g)
    x = torch.randn(512, 40, generator=g)
    y = (torch.tanh(x.roll(1, -1) * x) @ teacher).argmax(-1)
    s = ef.init(MLP, optimizer=ef.optim.adam(1e-2), generator=generator)
    s = ef.advance(ef.germinate(s, "input", "conv1d_k5", generator=generator), "input")
    bp = ef.blueprints.get("conv1d_k5")
    for epoch in range(5):
        for i in range(0, 512, 64):
            s, _ = ef.train_step(s, x[i:i + 64], y[i:i + 64])
        delta = bp.apply(s.seed_params("input"), x, None, s.spec("input"), False)
        ratio = float(delta.norm() / x.norm())
        assert ratio < 3.0, f"epoch {epoch}: seed output is {ratio:.1f}x the host activation"
    assert ratio > 1e-3  # and it did learn


def test_stacked_hosts_match_individual_hosts(generator):
    x, y = _data()
    states = [ef.init(MLP, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    states = [ef.advance(ef.advance(ef.germinate(s, "input", "conv1d_k5", generator=torch.Generator().manual_seed(9)),
                                    "input"), "input") for s in states]
    states = [ef.tick(s) for s in states]
    xs, ys = x.expand(3, *x.shape), y.expand(3, *y.shape)
    stacked = ef.stack(states)
    stacked, m = ef.train_step(stacked, xs, ys)
    singles = [ef.train_step(s, x, y)[0] for s in states]
    assert m["loss"].shape == (3,)
    for a, b in zip(ef.unstack(stacked), singles):
        for k in a.params_flat:
            torch.testing.assert_close(a.params_flat[k], b.params_flat[k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ef.apply(stacked, xs), torch.stack([ef.apply(s, x) for s in singles]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ef.GraftError, match="seeds"):
        ef.stack([states[0], ef.init(MLP)])


# --- wrap -----------------------------------------------------------------------------------------


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.BatchNorm1d(4), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(160, 12), nn.ReLU(), nn.Linear(12, 10))

    def forward(self, x):
        return self.head(self.enc(x.unsqueeze(1)).flatten(1))


def test_wrap_equals_module_forward_buffers_included(generator):
    torch.manual_seed(0)
    net = _Net()
    x, y = _data()
    host = ef.wrap(net, x, slots=["enc.0", nn.Linear, nn.BatchNorm1d])
    names = [s.name for s in host.slots()]
    assert set(names) == {"input", "enc_0", "head_0", "head_2", "enc_1"}
    assert host.slot("head_0").consumer == "head_2"
    s = ef.init(host, optimizer=ef.optim.sgd(0.05))
    ref = copy.deepcopy(net)
    ref.eval()
    assert torch.equal(ef.apply(s, x), ref(x))
    # a training step updates BatchNorm statistics as the module would, without mutating anything
    ref.train()
    opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    opt.zero_grad()
    F.cross_entropy(ref(x), y).backward()
    opt.step()
    before = {k: v.clone() for k, v in s.buffers_flat.items()}
    s2, _ = ef.train_step(s, x, y)
    assert all(torch.equal(before[k], s.buffers_flat[k]) for k in before)
    for name, b in ref.named_buffers():
        torch.testing.assert_close(s2.buffers_flat[("host", *name.split("."))], b, rtol=1e-5, atol=1e-6)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(s2.params_flat[("host", *name.split("."))], p.detach(), rtol=1e-5, atol=1e-6)
    ref.eval()
    torch.testing.assert_close(ef.apply(s2, x), ref(x), rtol=1e-5, atol=1e-5)
    # the caller's module was never touched
    assert not net._forward_hooks and all(not m._forward_hooks for m in net.modules())


def test_wrap_slots_grow_and_export(generator):
    x, y = _data()
    net = _Net()
    host = ef.wrap(net, x, slots=[nn.Linear])
    s = ef.init(host)
    s = _grown(host, "head_0", "width_k4", generator, x, y, steps=3)
    f = ef.fossilize(s, "head_0", force=True)
    assert f.params["host", "head", "0", "weight"].shape == (16, 160)
    torch.testing.assert_close(ef.apply(f, x), ef.apply(s, x), rtol=0, atol=1e-5)
    assert torch.equal(ef.export(f)(x), ef.apply(f, x))


def test_wrap_errors():
    x, _ = _data()
    net = _Net()
    with pytest.raises(ef.HostError, match="valid names are"):
        ef.wrap(net, x, slots=["enc.7"])
    with pytest.raises(ef.HostError, match="contains"):
        ef.wrap(net, x, slots=[nn.Conv2d])
    with pytest.raises(ef.HostError, match="supported types"):
        ef.wrap(net, x, slots=[nn.ReLU])
    mha = nn.Sequential(nn.Linear(4, 8))
    mha.add_module("att", nn.MultiheadAttention(8, 2))
    with pytest.raises(ef.HostError, match="batch_first"):
        ef.wrap(mha, torch.randn(2, 3, 4), slots=[nn.MultiheadAttention])
    with pytest.raises(ValueError):  # HostError is a ValueError too
        ef.wrap(net, x, slots=[3])


def test_transformer_host_trains_on_sequences(generator):
    host = ef.hosts.transformer(seq_len=12, d_model=16, n_heads=2, n_layers=2, n_classes=3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 12, generator=g)
    y = (x.mean(-1) > 0).long() + (x[:, 0] > 1).long()
    s = ef.init(host, generator=generator)
    s = ef.advance(ef.advance(ef.germinate(s, "block1", "mlp_gelu", generator=generator), "block1"), "block1")
    s = ef.tick(s)
    losses = []
    for _ in range(30):
        s, m = ef.train_step(s, x, y)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] * 0.7
    tok = ef.hosts.transformer(seq_len=6, d_model=8, n_heads=2, n_layers=1, vocab_size=11)
    st_ = ef.init(tok, generator=generator)
    assert ef.apply(st_, torch.randint(0, 11, (4, 6))).shape == (4, 10)


def test_train_epoch_is_pure_and_donation_matches_copying(generator):
    from esper_fn.tasks import load
    from esper_fn.training import TrainConfig, train_epoch

    task = load("spirals", seed=0)
    host = ef.hosts.mlp((2, 16, 2))
    s = ef.advance(ef.germinate(ef.init(host, generator=generator), "fc1", "mlp_gelu", generator=generator), "fc1")
    snap = _snapshot(s)
    out, m = train_epoch(s, task, TrainConfig(batch_size=64), generator=torch.Generator().manual_seed(1))
    assert _same(s, snap) and "shadow_loss" in m
    # the same steps without donation give bit-identical results
    g = torch.Generator().manual_seed(1)
    ref = s
    for xb, yb in task.batches("train", 64, generator=g):
        ref, _ = ef.train_step(ref, xb, yb)
    assert all(torch.equal(ref.params_flat[k], out.params_flat[k]) for k in ref.params_flat)
    assert all(torch.equal(ref.opt_flat[k], out.opt_flat[k]) for k in ref.opt_flat)


def test_host_without_slots_trains(generator):
    def init_fn(g):
        w, b = ef.hosts._linear_init(3, 4, g)
        return {"lin.weight": w, "lin.bias": b}, {}

    host = ef.Host("bare", init_fn, lambda flat, x, slot, train: (F.linear(x, flat["lin.weight"], flat["lin.bias"]), {}),
                   lambda shapes: ())
    s = ef.init(host, generator=generator)
    x, y = torch.randn(8, 4, generator=generator), torch.randint(0, 3, (8,), generator=generator)
    s2, m = ef.train_step(s, x, y)
    assert ef.apply(s2, x).shape == (8, 3) and ef.legal_actions(s2) == {}


def test_stacked_hosts_with_different_step_counts(generator):
    """Hosts stacked after different numbers of steps keep their own Adam bias correction."""
    x, y = _data()
    a = ef.init(MLP, generator=torch.Generator().manual_seed(1))
    b = ef.train_step(ef.train_step(ef.init(MLP, generator=torch.Generator().manual_seed(2)), x, y)[0], x, y)[0]
    stacked, _ = ef.train_step(ef.stack([a, b]), x.expand(2, *x.shape), y.expand(2, *y.shape))
    for got, s in zip(ef.unstack(stacked), (a, b)):
        want, _ = ef.train_step(s, x, y)
        for k in want.params_flat:
            torch.testing.assert_close(got.params_flat[k], want.params_flat[k], rtol=1e-5, atol=1e-6)
        assert torch.equal(got.opt_flat[("step", "host", "fc1", "weight")], want.opt_flat[("step", "host", "fc1", "weight")])


def test_width_merge_refuses_to_break_a_seed_built_for_the_old_width(generator):
    x, y = _data()
    s = _grown(MLP, "fc1", "width_k4", generator, x, y, steps=1)
    s = ef.germinate(s, "fc2", "lora_r4", generator=generator)
    assert ef.Op.FOSSILIZE not in ef.legal_actions(s)["fc1"]["ops"]
    with pytest.raises(ef.GraftError, match="Fossilize or prune the seed at 'fc2' first"):
        ef.fossilize(s, "fc1", force=True)  # force skips the gates, never this check
    f = ef.fossilize(ef.prune(s, "fc2"), "fc1", force=True)
    assert f.params["host", "fc2", "weight"].shape == (10, 20)


def test_stacked_sgd_momentum_matches_single_hosts(generator):
    x, y = _data()
    opt = ef.optim.sgd(0.05, momentum=0.9)
    states = [ef.init(MLP, optimizer=opt, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    st = ef.stack(states)
    for _ in range(3):
        st, _ = ef.train_step(st, x.expand(2, *x.shape), y.expand(2, *y.shape))
        states = [ef.train_step(s, x, y)[0] for s in states]
    for a, b in zip(ef.unstack(st), states):
        for k in a.params_flat:
            torch.testing.assert_close(a.params_flat[k], b.params_flat[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(ef.GraftError, match="optimizer"):
        ef.stack([ef.init(MLP, optimizer=opt), ef.init(MLP, optimizer=ef.optim.adam(0.5))])


def test_wrap_orders_slots_as_the_forward_reaches_them_and_rejects_clashing_names():
    x, _ = _data()
    net = nn.Sequential(nn.Linear(40, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 10))
    host = ef.wrap(net, x, slots=[nn.Linear, nn.BatchNorm1d])
    assert [s.name for s in host.slots()] == ["input", "0", "1", "3"]

    class Clash(nn.Module):
        def __init__(self):
            super().__init__()
            self.input = nn.Linear(40, 10)

        def forward(self, x):
            return self.input(x)

    with pytest.raises(ef.HostError, match="already has"):
        ef.wrap(Clash(), x, slots=["input"])

    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(40, 10), nn.Linear(40, 10)

        def forward(self, x):
            return self.a(x)

    with pytest.raises(ef.HostError, match="never ran"):
        ef.wrap(Unused(), x, slots=[nn.Linear])


def test_private_imports_find_the_catalogue():
    """Importing only a private core module (no `esper_fn.blueprints`) still resolves blueprint ids."""
    import subprocess
    import sys

    code = ("from esper_fn._state import init, germinate; from esper_fn._host import mlp; "
            "from esper_fn._apply import train_step; import torch; "
            "s = germinate(init(mlp((40, 16, 10))), 'input', 'conv1d_k5'); "
            "s, m = train_step(s, torch.randn(8, 40), torch.randint(0, 10, (8,))); print(s.blueprints[0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "conv1d_k5@1.0.0"
