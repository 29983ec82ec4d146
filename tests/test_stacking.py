"""Stacked hosts that decide differently: per-host stages as data, partition, batched epochs and
telemetry, and the state-safety rules (ownership for donation, safe replace, read-only views)."""

import dataclasses

import pytest
import torch

import esper_fn as ef
from esper_fn import Stage
from esper_fn.tasks import load
from esper_fn.training import TrainConfig, contributions, telemetry, train_epoch, train_epochs

MLP = ef.hosts.mlp((40, 16, 10))


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 40, generator=g), torch.randint(0, 10, (n,), generator=g)


def _in_stage(stage: Stage, seed: int, slot="input", bid="conv1d_k5", ticks=1) -> ef.State:
    """A host with a seed at `slot` driven to `stage` (BLENDING after `ticks` ticks)."""
    s = ef.init(MLP, generator=torch.Generator().manual_seed(seed))
    s = ef.germinate(s, slot, bid, generator=torch.Generator().manual_seed(99), tempo=3)
    x, y = _data(seed=seed)
    path = {Stage.GERMINATED: 0, Stage.TRAINING: 1, Stage.BLENDING: 2, Stage.HOLDING: 3}[stage]
    for k in range(path):
        if k == 2:
            for _ in range(ticks):
                s = ef.tick(s)
        s = ef.advance(s, slot, force=True)
        s, _ = ef.train_step(s, x, y)  # moments differ per host
    if stage == Stage.BLENDING:
        for _ in range(ticks):
            s = ef.tick(s)
    return s


def _close(a: ef.State, b: ef.State):
    for flat in ("params_flat", "opt_flat", "buffers_flat"):
        fa, fb = getattr(a, flat), getattr(b, flat)
        assert list(fa) == list(fb)
        for k in fa:
            torch.testing.assert_close(fa[k], fb[k], rtol=1e-5, atol=1e-6, msg=f"{flat}{k}")
    assert torch.equal(a.slots["stage"], b.slots["stage"]) and torch.equal(a.slots["alpha"], b.slots["alpha"])


def _mixed_population():
    """Five hosts with a conv seed at the input, each in a different stage or alpha."""
    states = [
        _in_stage(Stage.GERMINATED, 0),
        _in_stage(Stage.TRAINING, 1),
        _in_stage(Stage.BLENDING, 2, ticks=0),  # alpha 0: still incubating
        _in_stage(Stage.BLENDING, 3, ticks=1),  # alpha 1/3: live
        _in_stage(Stage.HOLDING, 4),
    ]
    alphas = [float(s.slots["alpha"][0]) for s in states]
    assert alphas[2] == 0.0 and 0 < alphas[3] < 1 and alphas[4] == 1.0
    return states


@pytest.mark.parametrize("incubation", ["shadow", "none"])
def test_hosts_in_different_stages_stack_and_train_like_single_hosts(incubation):
    states = _mixed_population()
    assert len(ef.partition(states)) == 1  # one structure, five stages
    stacked = ef.stack(states)
    assert stacked.host_stages("input") == tuple(s.stage("input") for s in states)
    with pytest.raises(ef.GraftError, match="host_stages"):
        stacked.stage("input")
    x, y = _data(seed=7)
    xs, ys = x.expand(5, *x.shape), y.expand(5, *y.shape)
    for _ in range(3):
        stacked, m = ef.train_step(stacked, xs, ys, incubation=incubation)
        states = [ef.train_step(s, x, y, incubation=incubation)[0] for s in states]
    for a, b in zip(ef.unstack(stacked), states):
        _close(a, b)
    torch.testing.assert_close(ef.apply(stacked, xs), torch.stack([ef.apply(s, x) for s in states]),
                               rtol=1e-5, atol=1e-6)
    # the GERMINATED host's seed did not move, the HOLDING host's did
    before = _mixed_population()
    after = ef.unstack(stacked)
    for k, v in before[0].seed_params("input").items():
        assert torch.equal(after[0].seed_params("input")[k], v)
    assert any(not torch.equal(after[4].seed_params("input")[k], v) for k, v in before[4].seed_params("input").items())


def test_tick_is_per_host():
    states = _mixed_population() + [ef.prune(_in_stage(Stage.TRAINING, 5), "input")]
    states = [ef.stack(states[:5])]  # the pruned host has another structure
    for _ in range(3):
        states = [ef.tick(s) for s in states]
    ref = _mixed_population()
    for _ in range(3):
        ref = [ef.tick(s) for s in ref]
    for a, b in zip(ef.unstack(states[0]), ref):
        assert torch.equal(a.slots["alpha"], b.slots["alpha"]) and torch.equal(a.slots["stage"], b.slots["stage"])
        assert torch.equal(a.slots["epochs"], b.slots["epochs"])


def test_partition_moves_a_host_that_grafts():
    pop = [ef.init(MLP, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    assert ef.partition(pop) == [[0, 1, 2, 3]]
    pop[2] = ef.germinate(pop[2], "input", "conv1d_k5", generator=torch.Generator().manual_seed(0))
    pop[3] = ef.germinate(pop[3], "fc1", "mlp_gelu", generator=torch.Generator().manual_seed(0))
    assert ef.partition(pop) == [[0, 1], [2], [3]]
    pop[0] = ef.germinate(pop[0], "input", "conv1d_k5", generator=torch.Generator().manual_seed(1))
    pop[0] = ef.advance(pop[0], "input")  # stage differs from host 2's: still one structure
    assert ef.partition(pop) == [[0, 2], [1], [3]]
    pop[2] = ef.prune(pop[2], "input")
    assert ef.partition(pop) == [[0], [1, 2], [3]]
    with pytest.raises(ef.GraftError, match="stacked"):
        ef.partition([ef.stack(pop[1:3])])


def test_train_epochs_equals_separate_epochs_with_own_data_orders():
    task = load("spirals", seed=0)
    host = ef.hosts.mlp((2, 16, 2))

    def pop():
        out = []
        for i in range(7):  # groups of 4 (dormant) and 3 (seeded): both stacked (MIN_STACK = 3)
            s = ef.init(host, generator=torch.Generator().manual_seed(i))
            if i % 2:
                s = ef.advance(ef.germinate(s, "fc1", "mlp_gelu", generator=torch.Generator().manual_seed(0)), "fc1")
            if i == 3:
                s = ef.advance(s, "fc1", force=True)  # BLENDING at alpha 0 on one host, TRAINING on another
            out.append(s)
        return out

    cfg = TrainConfig(batch_size=128)
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(7)]  # noqa: E731
    g1, g2 = gens(), gens()
    batched = train_epochs(pop(), task, cfg, generators=g1)
    single = [train_epoch(s, task, cfg, generator=g) for s, g in zip(pop(), g2)]
    for (a, ma), (b, mb) in zip(batched, single):
        _close(a, b)
        assert set(ma) == set(mb)
        for k in ma:
            assert ma[k] == pytest.approx(mb[k], rel=1e-5, abs=1e-6), k
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(g1, g2))
    with pytest.raises(ef.GraftError, match="train_epochs"):
        train_epoch(ef.stack(pop()[::2]), task, cfg, generator=torch.Generator())


def test_contributions_and_telemetry_on_stacked_states_match_single_hosts():
    task = load("mnist1d", seed=0)
    states = _mixed_population()
    stacked = ef.stack(states)
    xv, yv = task.split("val")
    got = contributions(stacked, xv, yv)
    want = [contributions(s, xv, yv) for s in states]
    assert [set(d) for d in got] == [set(), set(), set(), {"input"}, {"input"}]
    for a, b in zip(got, want):
        assert a == pytest.approx(b, abs=1e-6)
    metrics = [{"grad_norm/host": 1.0, "grad_norm/input": 0.5}] * 5
    tel = telemetry(stacked, task, metrics)
    for a, s in zip(tel, states):
        b = telemetry(s, task, metrics[0])
        assert set(a) == set(b)
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)


def test_blending_at_alpha_zero_keeps_incubating_instead_of_drifting_on_momentum():
    """The first BLENDING epoch runs at alpha 0, where the live gradient of the seed is exactly 0: the
    seed learns there exactly as in TRAINING (shadow forward), rather than moving on old momentum."""
    training = _in_stage(Stage.TRAINING, 1)
    blending = ef.advance(training, "input", force=True)
    assert blending.stage("input") == Stage.BLENDING and float(blending.slots["alpha"][0]) == 0.0
    x, y = _data(seed=3)
    a, ma = ef.train_step(training, x, y)
    b, mb = ef.train_step(blending, x, y)
    assert "shadow_loss" in mb
    for k in a.params_flat:
        assert torch.equal(a.params_flat[k], b.params_flat[k]), k
    # without shadow incubation there is no signal at alpha 0, and the seed stays where it is
    c, _ = ef.train_step(blending, x, y, incubation="none")
    for k, v in blending.seed_params("input").items():
        assert torch.equal(c.seed_params("input")[k], v)
        assert torch.equal(c.opt_flat[("mu", "seeds", "input", k)], blending.opt_flat[("mu", "seeds", "input", k)])


def test_donation_never_touches_a_tensor_another_state_can_see():
    x, y = _data()
    parent, _ = ef.train_step(ef.init(MLP, generator=torch.Generator().manual_seed(0)), x, y)
    child = ef.germinate(parent, "fc1", "lora_r4", generator=torch.Generator().manual_seed(1))
    snap = {k: v.clone() for k, v in parent.params_flat.items()}
    ef.train_step(child, x, y, donate=True)
    assert all(torch.equal(parent.params_flat[k], v) for k, v in snap.items())
    # the parent lost its claim when the child was derived: donating it leaves the child intact
    snap_child = {k: v.clone() for k, v in child.params_flat.items()}
    ef.train_step(parent, x, y, donate=True)
    assert all(torch.equal(child.params_flat[k], v) for k, v in snap_child.items())
    # a dataclasses.replace copy shares every tensor: neither may donate
    fresh, _ = ef.train_step(child, x, y)
    twin = dataclasses.replace(fresh)
    snap_twin = {k: v.clone() for k, v in twin.params_flat.items()}
    ef.train_step(fresh, x, y, donate=True)
    assert all(torch.equal(twin.params_flat[k], v) for k, v in snap_twin.items())
    # a state nobody else sees is donated (updated in place): same storage before and after
    own, _ = ef.train_step(child, x, y)
    ptr = own.params_flat[("host", "fc1", "weight")].data_ptr()
    nxt, _ = ef.train_step(own, x, y, donate=True)
    assert nxt.params_flat[("host", "fc1", "weight")].data_ptr() == ptr


def test_replace_is_safe_and_views_are_read_only():
    s = _in_stage(Stage.HOLDING, 0)
    x, _ = _data()
    assert not torch.equal(ef.apply(s, x), ef.apply(ef.prune(s, "input"), x))
    slots = s.slots.clone()
    slots["stage"][0] = int(Stage.TRAINING)  # the seed leaves the live forward
    slots["alpha"][0] = 0.0
    for changed in (s.replace(slots=slots), dataclasses.replace(s, slots=slots)):
        torch.testing.assert_close(ef.apply(changed, x), ef.apply(ef.prune(s, "input"), x))
    with pytest.raises(RuntimeError, match="locked"):
        s.params["host", "fc1", "weight"] = torch.zeros(16, 40)
    with pytest.raises(RuntimeError, match="locked"):
        s.opt["mu", "host", "fc1", "weight"] = torch.zeros(16, 40)


def test_an_unregistered_blueprint_object_germinates_and_trains():
    base = ef.blueprints.get("mlp_gelu")
    meta = base.meta.model_copy(update={"name": "my_mlp_custom"})
    custom = ef.blueprints.Blueprint(meta, base.init, base.apply, base.param_count, base.flops)
    s = ef.germinate(ef.init(MLP), "fc1", custom, generator=torch.Generator().manual_seed(0))
    s = ef.advance(ef.advance(s, "fc1"), "fc1")
    s, m = ef.train_step(ef.tick(s), *_data())
    assert s.blueprints[1] == "my_mlp_custom@1.0.0" and torch.isfinite(m["loss"])
    clash = ef.blueprints.Blueprint(meta, base.init, base.apply, base.param_count, base.flops)
    with pytest.raises(ef.BlueprintError, match="already registered"):
        ef.germinate(ef.init(MLP), "fc1", clash)


def test_misfit_error_lists_what_fits_the_slot():
    with pytest.raises(ef.BlueprintError) as e:
        ef.germinate(ef.init(MLP), "fc2", "width_k4")
    msg = str(e.value)
    assert "Blueprints that fit 'fc2'" in msg and "lora_r4@1.0.0" in msg and "legal_actions" in msg
    assert "width_k4@1.0.0'," not in msg.split("fit 'fc2':")[1]


def test_fossilize_on_stacked_hosts_matches_single_hosts():
    x, y = _data()
    singles = []
    for i in range(3):
        s = _in_stage(Stage.HOLDING, i, slot="fc1", bid="lora_r4")
        singles.append(s)
    stacked = ef.fossilize(ef.stack(singles), "fc1", force=True)
    for a, b in zip(ef.unstack(stacked), singles):
        f = ef.fossilize(b, "fc1", force=True)
        assert a.stage("fc1") == Stage.DORMANT
        _close(a, f)
        torch.testing.assert_close(ef.apply(a, x), ef.apply(b, x), rtol=1e-5, atol=1e-5)
    conv = ef.fossilize(ef.stack(_mixed_population()[4:] * 2), "input", force=True)  # not mergeable
    assert conv.host_stages("input") == (Stage.FOSSILIZED, Stage.FOSSILIZED)


def test_slot_specs_follow_width_growth_and_live_stages_are_public():
    s = ef.init(MLP)
    assert [sp.name for sp in s.slot_specs()] == list(s.slot_names)
    assert s.slot_specs()[1].shape == (16,)
    grown = ef.germinate(s, "fc1", "width_k4", generator=torch.Generator().manual_seed(0))
    grown = ef.fossilize(ef.advance(ef.advance(ef.advance(grown, "fc1"), "fc1"), "fc1", force=True), "fc1", force=True)
    assert grown.slot_specs()[1].shape == (20,) and grown.slot_specs()[1] == grown.spec("fc1")
    assert ef.LIVE_STAGES == frozenset({Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING, Stage.HOLDING})


def _roles_pair(bid: str, first: str):
    """Host 0 with a `bid` seed at fc1 in stage `first` ("germinated" or "training"), host 1 with the
    same seed live at alpha 0.5."""
    out = []
    for j, kind in enumerate((first, "live")):
        s = ef.init(MLP, generator=torch.Generator().manual_seed(j))
        s = ef.germinate(s, "fc1", bid, generator=torch.Generator().manual_seed(9), tempo=2)
        if kind != "germinated":
            s = ef.advance(s, "fc1")
        if kind == "live":
            s = ef.tick(ef.advance(s, "fc1", force=True))
        out.append(s)
    return out


@pytest.mark.parametrize("bid", ["moe_top2_gelu", "moe_top2_ema", "activation_tap", "mlp_gelu"])
@pytest.mark.parametrize("first", ["germinated", "training"])
def test_a_seed_that_is_off_on_one_stacked_host_leaves_that_host_alone(bid, first):
    """Auxiliary losses, buffer updates and outputs of a seed reach only the hosts where it is on."""
    pair = _roles_pair(bid, first)
    x, y = _data(seed=5)
    stacked, _ = ef.train_step(ef.stack(pair), x.expand(2, *x.shape), y.expand(2, *y.shape))
    for got, s in zip(ef.unstack(stacked), pair):
        _close(got, ef.train_step(s, x, y)[0])


def test_a_diverged_incubating_seed_does_not_poison_its_host_in_a_stack():
    a, b = _roles_pair("mlp_gelu", "training")
    p = dict(a.params_flat)
    p[("seeds", "fc1", "w2")] = torch.full_like(p[("seeds", "fc1", "w2")], 3e38)  # its output overflows
    a = a.replace(params_flat=p)
    x, y = _data(seed=6)
    stacked, m = ef.train_step(ef.stack([a, b]), x.expand(2, *x.shape), y.expand(2, *y.shape))
    alone, m_alone = ef.train_step(a, x, y)
    assert torch.isfinite(m["loss"]).all()
    assert float(m["loss"][0]) == pytest.approx(float(m_alone["loss"]), rel=1e-6)
    host_a = ef.unstack(stacked)[0]
    for k, v in alone.params_flat.items():
        if k[0] == "host":
            torch.testing.assert_close(host_a.params_flat[k], v, rtol=1e-5, atol=1e-6)
    with pytest.raises(ef.GraftError, match=r"expand\(2"):
        ef.apply(ef.stack([a, b]), x)


def test_seed_counts_stay_per_host_through_stack_and_unstack():
    a = ef.germinate(ef.init(MLP), "fc1", "mlp_gelu", generator=torch.Generator().manual_seed(0))
    b = ef.init(MLP)
    assert (a.n_seeds, b.n_seeds) == (1, 0)
    a2, b2 = ef.unstack(ef.stack([ef.prune(a, "fc1"), b]))
    assert (a2.n_seeds, b2.n_seeds) == (1, 0)
    both = ef.germinate(ef.stack([ef.tick(ef.tick(ef.tick(ef.prune(a, "fc1")))), b]), "input", "conv1d_k5")
    assert both.slots["seed_id"][:, 0].tolist() == [1, 0]
    assert [s.n_seeds for s in ef.unstack(both)] == [2, 1]


def test_a_shallow_copy_cannot_be_corrupted_by_donation():
    import copy

    x, y = _data()
    s, _ = ef.train_step(ef.init(MLP), x, y)
    twin = copy.copy(s)
    snap = {k: v.clone() for k, v in twin.params_flat.items()}
    ef.train_step(s, x, y, donate=True)
    assert all(torch.equal(twin.params_flat[k], v) for k, v in snap.items())


def test_adam_on_a_non_contiguous_weight_matches_torch_optim():
    from torch import nn

    lin = nn.Linear(16, 10)
    with torch.no_grad():
        lin.weight = nn.Parameter(torch.randn(16, 10).t())  # a transposed view: not contiguous
    x, y = torch.randn(32, 16), torch.randint(0, 10, (32,))
    s = ef.init(ef.wrap(lin, x, slots=[]), optimizer=ef.optim.adam(1e-2))
    ref = __import__("copy").deepcopy(lin)
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    for _ in range(3):
        s, _ = ef.train_step(s, x, y)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ref(x), y).backward()
        opt.step()
    torch.testing.assert_close(s.params_flat[("host", "weight")], ref.weight.detach(), rtol=1e-5, atol=1e-6)


def test_stack_errors_name_the_difference_and_the_fix():
    a = ef.init(MLP)
    with pytest.raises(ef.GraftError, match=r"same host definition.*partition"):
        ef.stack([a, ef.init(ef.hosts.mlp((40, 16, 10)))])
    wide = ef.germinate(a, "fc1", "width_k4", generator=torch.Generator().manual_seed(0))
    wide = ef.fossilize(ef.advance(ef.advance(ef.advance(wide, "fc1"), "fc1"), "fc1", force=True), "fc1", force=True)
    with pytest.raises(ef.GraftError, match=r"parameter host/fc1/bias is \(20,\) in state 1 and \(16,\) in state 0"):
        ef.stack([a, wide])
    with pytest.raises(ef.GraftError, match="unstack"):
        ef.stack([ef.stack([a, a]), ef.stack([a, a])][:1] + [a])
    with pytest.raises(ef.GraftError, match=r"pass `unstack\(state\)`"):
        train_epochs([ef.stack([a, a])], load("spirals", seed=0), generators=[torch.Generator()])


def test_collective_seeds_are_offered_only_on_request(tmp_path):
    import torch.distributed as dist

    s = ef.init(MLP)
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path / 'pg'}")
    try:
        assert "distributed" in ef.blueprints.available_capabilities()
        default = ef.legal_actions(s)["fc1"]["blueprints"]
    finally:
        dist.destroy_process_group()
    assert "allreduce_shard@2.0.0" not in default
    asked = ef.legal_actions(s, capabilities=frozenset({"distributed"}))["fc1"]["blueprints"]
    assert "allreduce_shard@2.0.0" in asked


def test_train_epochs_stacks_groups_of_min_stack_hosts_and_more(monkeypatch):
    """Eager groups smaller than MIN_STACK train one by one (measured faster); larger ones stack."""
    import esper_fn.training as training

    task = load("spirals", seed=0)
    host = ef.hosts.mlp((2, 16, 2))
    dormant = [ef.init(host, generator=torch.Generator().manual_seed(i)) for i in range(training.MIN_STACK)]
    seeded = [ef.germinate(s, "fc1", "mlp_gelu", generator=torch.Generator().manual_seed(0))
              for s in dormant[:training.MIN_STACK - 1]]
    sizes = []
    real_stack = training.stack
    monkeypatch.setattr(training, "stack", lambda states: sizes.append(len(states)) or real_stack(states))
    states = dormant + seeded
    out = train_epochs(states, task, TrainConfig(batch_size=256),
                       generators=[torch.Generator().manual_seed(i) for i in range(len(states))])
    assert sizes == [training.MIN_STACK] and len(out) == len(states)
