"""Tezzeret: the pure kernel equals the eager train step, kernels are keyed by structure and roles,
built only by `prepare` (never mid-epoch), the cache is bounded by bytes with LRU eviction, and
characterisation is measured, cached per machine and exposed on the command line.

Only `test_a_compiled_step_equals_the_eager_step` compiles (see its docstring); every other test
uses `KernelCache(compile=False)`, which holds the same pure step functions uncompiled."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import esper_fn as ef
from esper_fn import tezzeret as tz
from esper_fn.tasks import load
from esper_fn.training import TrainConfig
from esper_fn.training import train_epoch as eager_epoch


def _live(s, slot):
    """GERMINATED -> TRAINING -> BLENDING, and one tick (alpha > 0: the seed is in the live forward)."""
    return ef.tick(ef.advance(ef.advance(s, slot), slot, force=True))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((float((a[k].float() - b[k].float()).abs().max()) for k in a), default=0.0)


def _cases(g):
    mlp = ef.init(ef.hosts.preset("mlp-impaired"), generator=g)
    conv = ef.germinate(mlp, "input", "conv1d_k5", generator=g, tempo=3)
    incubating = ef.advance(conv, "input")  # TRAINING: the shadow forward trains the seed
    blending = _live(conv, "input")
    lora = ef.advance(ef.tick(ef.advance(ef.advance(ef.germinate(mlp, "fc1", "lora_r4", generator=g, tempo=1), "fc1"),
                                         "fc1", force=True)), "fc1")  # HOLDING
    cnn = _live(ef.germinate(ef.init(ef.hosts.preset("cnn-impaired"), generator=g), "conv1", "conv1d_k3",
                             generator=g), "conv1")
    bn = ef.wrap(nn.Sequential(nn.Linear(40, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 10)),
                 torch.randn(4, 40), slots=[nn.Linear])
    bn_state = _live(ef.germinate(ef.init(bn, optimizer=ef.optim.sgd(0.05, momentum=0.9), generator=g), "0",
                                  "mlp_gelu", generator=g), "0")
    adamw = ef.init(ef.hosts.preset("mlp-impaired"), optimizer=ef.optim.adamw({"host": 1e-2, "seeds": 3e-3}),
                    generator=g)
    adamw = _live(ef.germinate(adamw, "fc1", "mlp_gelu", generator=g), "fc1")
    return {
        "dormant": mlp, "incubating (shadow)": incubating, "blending": blending, "lora holding": lora,
        "cnn conv seed": cnn, "batchnorm host, sgd momentum": bn_state, "adamw, two lrs": adamw,
        "stacked, mixed stages (masks)": ef.stack([incubating, blending]),
        "stacked x3 blending": ef.stack([blending] * 3),
    }


@pytest.mark.parametrize("name", list(_cases(torch.Generator().manual_seed(0))))
def test_the_pure_kernel_equals_the_eager_step(name):
    g = torch.Generator().manual_seed(0)
    s = _cases(g)[name]
    before = {k: v.clone() for k, v in s.params_flat.items()}
    x = torch.randn(*s.batch, 16, 40, generator=g)
    y = torch.randint(0, 10, (*s.batch, 16), generator=g)
    kc = tz.KernelCache(compile=False)
    info = kc.prepare(s, x, y, grad_stats=True, with_output=True)
    assert info.compiled and info.cached and kc.stats.compiles == 1
    e = c = s
    for _ in range(4):
        e, me = ef.train_step(e, x, y, grad_stats=True, with_output=True)
        c, mc = kc.step(c, x, y, grad_stats=True, with_output=True)
        assert me.keys() == mc.keys()
        assert _max_diff(me, mc) < 1e-4
    assert _max_diff(e.params_flat, c.params_flat) < 1e-5
    assert _max_diff(e.opt_flat, c.opt_flat) < 1e-5
    assert _max_diff(e.buffers_flat, c.buffers_flat) < 1e-5
    assert torch.equal(e.slots["alpha"], c.slots["alpha"]) and e.blueprints == c.blueprints
    assert all(torch.equal(s.params_flat[k], v) for k, v in before.items())  # purity
    assert kc.stats.hits == 4 and kc.stats.misses == 0


def test_step_key_follows_structure_and_roles_not_values(generator):
    s = ef.germinate(ef.init(ef.hosts.preset("mlp-impaired"), generator=generator), "input", "conv1d_k5",
                     generator=generator, tempo=4)
    x, y = torch.randn(8, 40), torch.randint(0, 10, (8,))
    key = lambda st, **kw: tz.step_key(st, x, y, **kw)  # noqa: E731
    training = ef.advance(s, "input")
    blending0 = ef.advance(training, "input", force=True)  # alpha 0: still incubating
    blending1 = ef.tick(blending0)
    blending2 = ef.tick(blending1)  # alpha 0.5: same roles as at 0.25
    assert key(training) == key(blending0)  # the role (incubating) is what matters, not the stage
    assert key(blending0) != key(blending1) and key(blending1) == key(blending2)
    trained, _ = ef.train_step(blending1, x, y)
    assert key(trained) == key(blending1)  # new parameter values, same kernel
    assert key(s) != key(training)  # GERMINATED (idle) vs incubating
    assert key(ef.prune(training, "input")) == key(ef.init(s.host))  # pruned: the dormant host's kernel again
    assert key(blending1, grad_stats=True) != key(blending1)
    assert tz.step_key(blending1, x[:4], y[:4]) != key(blending1)  # batch shape
    with pytest.raises(ef.ConfigError, match="incubation"):
        key(s, incubation="bogus")


def test_step_never_compiles_a_missing_kernel(generator):
    s = ef.init(ef.hosts.preset("mlp-impaired"), generator=generator)
    x, y = torch.randn(8, 40, generator=generator), torch.randint(0, 10, (8,), generator=generator)
    kc = tz.KernelCache(compile=False)
    new, m = kc.step(s, x, y)
    ref, mr = ef.train_step(s, x, y)
    assert kc.stats.misses == 1 and kc.stats.compiles == 0 and len(kc) == 0
    assert _max_diff(new.params_flat, ref.params_flat) == 0.0 and torch.equal(m["loss"], mr["loss"])


def test_the_cache_is_bounded_by_bytes_and_evicts_least_recently_used(generator):
    mlp = ef.init(ef.hosts.preset("mlp-impaired"), generator=generator)
    states = {"a": mlp, "b": _live(ef.germinate(mlp, "input", "conv1d_k5", generator=generator), "input"),
              "c": _live(ef.germinate(mlp, "fc1", "mlp_gelu", generator=generator), "fc1"),
              "d": _live(ef.germinate(mlp, "fc1", "lora_r4", generator=generator), "fc1")}
    x, y = torch.randn(8, 40), torch.randint(0, 10, (8,))
    keys = {tz.step_key(s, x, y): name for name, s in states.items()}
    sizes = {"a": 40, "b": 30, "c": 30, "d": 150}
    kc = tz.KernelCache(max_bytes=100, compile=False, sizer=lambda k: sizes[keys[k]])
    kc.prepare(states["a"], x, y)
    kc.prepare(states["b"], x, y)
    kc.step(states["a"], x, y)  # a is now the most recently used
    info = kc.prepare(states["c"], x, y)  # 40 + 30 + 30 = 100: fits
    assert info.evicted == 0 and kc.stats.bytes == 100 and len(kc) == 3
    kc.step(states["b"], x, y)
    kc.step(states["c"], x, y)
    e = _live(ef.germinate(mlp, "fc2", "mlp_gelu", generator=generator), "fc2")
    keys[tz.step_key(e, x, y)] = "e"
    sizes["e"] = 35
    info = kc.prepare(e, x, y)  # 135 > 100: evict the least recently used (a), then 95 fits
    assert info.evicted == 1 and tz.step_key(states["a"], x, y) not in kc
    assert kc.stats.bytes == 95 and kc.stats.evictions == 1
    again = kc.prepare(states["b"], x, y)  # cached: no compile, counted as nothing new
    assert not again.compiled and kc.stats.compiles == 4
    info = kc.prepare(states["d"], x, y)  # alone bigger than the bound: built, used once, not kept
    assert info.compiled and not info.cached and info.bytes == 150
    assert len(kc) == 0 and kc.stats.evictions == 1 + 3 + 1
    kc.step(states["a"], x, y)
    st = kc.stats
    assert (st.hits, st.misses, st.compiles, st.entries, st.bytes, st.max_bytes) == (3, 1, 5, 0, 0, 100)
    with pytest.raises(ef.ConfigError):
        tz.KernelCache(max_bytes=0)


def test_the_measured_charge_is_positive_without_a_sizer(generator):
    s = ef.init(ef.hosts.preset("mlp-impaired"), generator=generator)
    kc = tz.KernelCache(compile=False)
    info = kc.prepare(s, torch.randn(8, 40), torch.randint(0, 10, (8,)))
    assert info.bytes >= 1 and kc.stats.bytes == info.bytes


@pytest.mark.slow
def test_train_epoch_prepares_at_epoch_start_and_matches_the_eager_epoch():
    """A growth schedule over six epochs: every structure or role change happens between epochs,
    so each epoch's steps all hit one kernel, prepared once at its start."""
    task = load("mnist1d", seed=0)
    g0 = torch.Generator().manual_seed(0)
    s0 = ef.init(ef.hosts.preset("mlp-impaired"), generator=g0)
    kc = tz.KernelCache(compile=False)
    cfg = TrainConfig()
    s_e = s_c = s0
    ge, gc_ = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    schedule = {1: lambda s: ef.germinate(s, "input", "conv1d_k5", generator=torch.Generator().manual_seed(2),
                                          tempo=2),
                2: lambda s: ef.advance(s, "input"), 3: lambda s: ef.advance(s, "input", force=True)}
    steps_per_epoch = task.num_batches("train", cfg.batch_size)
    for epoch in range(6):
        if epoch in schedule:
            s_e, s_c = schedule[epoch](s_e), schedule[epoch](s_c)
        compiles, hits = kc.stats.compiles, kc.stats.hits
        s_e, m_e = eager_epoch(s_e, task, cfg, generator=ge)
        s_c, m_c = eager_epoch(s_c, task, cfg, generator=gc_, kernels=kc)
        assert kc.stats.hits - hits == steps_per_epoch and kc.stats.misses == 0
        assert kc.stats.compiles - compiles <= 1
        assert m_e.keys() == m_c.keys(), (m_e.keys(), m_c.keys())
        for k in m_e:  # float32 rounding grows over 180 steps (a ReLU input near 0 flips): see the float64 test
            assert m_c[k] == pytest.approx(m_e[k], rel=2e-3, abs=1e-4), k
        s_e, s_c = ef.tick(s_e), ef.tick(s_c)
    # dormant; germinated (idle); incubating (epochs 2 and 3: BLENDING at alpha 0 incubates too); live x2
    assert kc.stats.compiles == 4
    assert _max_diff(s_e.params_flat, s_c.params_flat) < 2e-3


def test_in_float64_the_kernel_tracks_the_eager_step_over_an_epoch():
    """Same arithmetic, not just close: in float64 an incubating seed's 30 steps agree to 1e-12
    (measured 6e-16; float32 drifts to ~1e-5 where a ReLU input sits at 0). This caught a bias
    correction that cancelled in float32."""
    task = load("mnist1d", seed=0)
    s = ef.init(ef.hosts.preset("mlp-impaired"), generator=torch.Generator().manual_seed(0))
    s = ef.advance(ef.germinate(s, "input", "conv1d_k5", generator=torch.Generator().manual_seed(2)), "input")
    s = s.replace(params_flat={k: v.double() for k, v in s.params_flat.items()},
                  opt_flat={k: v if k[0] == "step" else v.double() for k, v in s.opt_flat.items()})
    batches = [(x.double(), y) for x, y in task.batches("train", 100, generator=torch.Generator().manual_seed(3))]
    kc = tz.KernelCache(compile=False)
    kc.prepare(s, *batches[0])
    e = c = s
    for x, y in batches:
        e, _ = ef.train_step(e, x, y)
        c, _ = kc.step(c, x, y)
    assert _max_diff(e.params_flat, c.params_flat) < 1e-12
    assert _max_diff(e.opt_flat, c.opt_flat) < 1e-12


# torch's inductor imports torch.utils.mkldnn, which uses a deprecated torch.jit API at import time
# (torch 2.13); the warning is torch's own and says nothing about this code.
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_a_compiled_step_equals_the_eager_step(generator):
    """The one test that runs torch.compile (cold compile ~10 s, tens of seconds on a loaded
    machine): the issue asks for compiled and eager parameters to agree, and only a real compile
    shows it. One tiny structure (mlp-impaired with a live conv seed, batch 16), compiled once."""
    s = _live(ef.germinate(ef.init(ef.hosts.preset("mlp-impaired"), generator=generator), "input", "conv1d_k5",
                           generator=generator), "input")
    x, y = torch.randn(16, 40, generator=generator), torch.randint(0, 10, (16,), generator=generator)
    kc = tz.KernelCache()
    info = kc.prepare(s, x, y)
    assert info.compiled and info.cached and info.seconds > 0 and info.bytes > 0
    e = c = s
    for _ in range(3):
        e, me = ef.train_step(e, x, y)
        c, mc = kc.step(c, x, y)
        assert float(mc["loss"]) == pytest.approx(float(me["loss"]), rel=1e-5, abs=1e-6)
    assert _max_diff(e.params_flat, c.params_flat) < 1e-5
    assert _max_diff(e.opt_flat, c.opt_flat) < 1e-5
    st = kc.stats
    assert (st.compiles, st.hits, st.misses, st.entries) == (1, 3, 0, 1)


# ----------------------------------------------------------------------------- characterisation


def test_characterise_measures_and_caches_per_machine(tmp_path, generator):
    spec = ef.hosts.preset("mlp-impaired").slots()[0]  # "input", [40]
    c = tz.characterise("conv1d_k5", spec, host="mlp-impaired", batch_size=8, repeats=3, cache_dir=tmp_path)
    assert (c.blueprint, c.slot, c.slot_shape, c.param_delta, c.flops_declared) == (
        "conv1d_k5@1.0.0", "input", [40], 177, 6400)
    assert c.flop_delta == 2 * 6400  # two convolutions: 2 FLOPs per multiply-add
    assert c.forward_ms > 0 and c.expected_latency_ms > c.forward_ms and not c.cached
    assert c.torch_version == torch.__version__ and c.threads == torch.get_num_threads()
    again = tz.characterise("conv1d_k5", spec, batch_size=8, repeats=3, cache_dir=tmp_path)
    assert again.cached and again.expected_latency_ms == c.expected_latency_ms
    path = tz.cache_path(tmp_path)
    assert path.parent == tmp_path / "tezzeret" and path.name.startswith("characterisation-")
    data = json.loads(path.read_text())
    assert data["machine"]["torch"] == torch.__version__ and len(data["entries"]) == 1
    fresh = tz.characterise("conv1d_k5", spec, batch_size=8, repeats=3, refresh=True, cache_dir=tmp_path)
    assert not fresh.cached
    ia3 = tz.characterise("ia3", ef.hosts.preset("mlp-impaired").slots()[1], batch_size=8, repeats=3,
                          cache_dir=tmp_path)
    assert ia3.param_delta == 16 and ia3.flop_delta == 0  # elementwise only: not counted
    with pytest.raises(ef.BlueprintError, match="does not fit"):
        tz.characterise("lora_r4", spec, batch_size=8, repeats=3, cache_dir=tmp_path)
    s = _live(ef.germinate(ef.init(ef.hosts.preset("mlp-impaired"), generator=generator), "input", "conv1d_k5",
                           generator=generator), "input")
    costs = tz.seed_costs(s, batch_size=8, repeats=3, cache_dir=tmp_path)
    assert list(costs) == ["input"] and costs["input"].cached and costs["input"].param_delta == 177


def test_a_damaged_cache_file_is_measured_again(tmp_path):
    spec = ef.hosts.preset("mlp-impaired").slots()[0]
    path = tz.cache_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    c = tz.characterise("conv1d_dwsep", spec, batch_size=4, repeats=2, cache_dir=tmp_path)
    assert not c.cached and json.loads(path.read_text())["entries"]


@pytest.mark.slow
def test_blueprints_measure_command(tmp_path):
    cmd = [sys.executable, "-m", "esper_fn.cli", "blueprints", "--measure", "--host", "mlp-impaired",
           "--batch-size", "8", "--repeats", "2", "--cache-dir", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "param_delta" in r.stdout and "expected_latency_ms" in r.stdout
    assert "conv1d_k5@1.0.0" in r.stdout and "mlp-impaired:input [40]" in r.stdout and "lora_r4@1.0.0" in r.stdout
    r2 = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    rows = [line for line in r2.stdout.splitlines() if "@" in line]
    assert rows and all(line.rstrip().endswith("yes") for line in rows)  # every row from the cache now


def test_no_pickle_in_urza_or_tezzeret():
    root = Path(ef.__file__).parent
    for name in ("urza.py", "tezzeret.py"):
        src = (root / name).read_text()
        for banned in ("import pickle", "from pickle", " torch.load(", " torch.save(", "cloudpickle", "import dill"):
            assert banned not in src, (name, banned)


def test_loss_functions_other_than_cross_entropy(generator):
    s = ef.stack([_live(ef.germinate(ef.init(ef.hosts.preset("mlp-impaired"), generator=generator), "input",
                                     "conv1d_k5", generator=generator), "input")] * 2)
    x, y = torch.randn(2, 8, 40, generator=generator), torch.randint(0, 10, (2, 8), generator=generator)

    def nll(o, t):
        return F.nll_loss(F.log_softmax(o, -1), t)

    kc = tz.KernelCache(compile=False)
    kc.prepare(s, x, y, loss_fn=nll)
    c, _ = kc.step(s, x, y, loss_fn=nll)
    e, _ = ef.train_step(s, x, y, loss_fn=nll)
    assert _max_diff(e.params_flat, c.params_flat) < 1e-5 and kc.stats.hits == 1


@pytest.mark.parametrize("c_in,c_out,k,groups,pad,stride", [
    (1, 16, 5, 1, 2, 1), (16, 1, 5, 1, 2, 1), (4, 8, 3, 2, 1, 1), (32, 64, 5, 16, 0, 1), (3, 6, 3, 3, 2, 1),
    (1, 4, 5, 1, 1, 2), (4, 4, 3, 1, 1, 2), (8, 8, 3, 4, 0, 3)])  # the cnn hosts' convs: stride 2
def test_the_conv_lowering_equals_torch_convolution(c_in, c_out, k, groups, pad, stride, generator):
    """The loop lowering the compiled kernels use (`conv="loops"`), run eagerly: forward and all three
    gradients equal `F.conv1d` and its autograd backward."""
    x = torch.randn(7, c_in, 19, generator=generator, requires_grad=True)
    w = torch.randn(c_out, c_in // groups, k, generator=generator, requires_grad=True)
    bias = torch.randn(c_out, generator=generator, requires_grad=True)
    ref = F.conv1d(x, w, bias, stride=stride, padding=pad, groups=groups)
    out = tz._conv1d_as_loops(x, w, bias, [stride], [pad], [1], False, [0], groups)
    assert torch.allclose(out, ref, atol=1e-5)
    go = torch.randn(ref.shape, generator=generator)
    gx, gw, gb = torch.autograd.grad(ref, (x, w, bias), go)
    lx, lw, lb = tz._conv1d_backward_as_loops(go, x.detach(), w.detach(), [c_out], [stride], [pad], [1], False,
                                              [0], groups, [True, True, True])
    assert torch.allclose(lx, gx, atol=1e-4) and torch.allclose(lw, gw, atol=1e-4) and torch.allclose(lb, gb, atol=1e-4)
    assert tz._conv1d_as_loops(x, w, bias, [1], [pad], [2], False, [0], groups) is NotImplemented  # dilated: library
    assert tz._conv1d_as_loops(x, w[..., None], bias, [1, 1], [pad, pad], [1, 1], False, [0, 0], groups) \
        is NotImplemented  # 2-D



def test_train_epochs_runs_each_stacked_group_through_its_kernel():
    """`train_epochs(..., kernels=)`: one kernel per group, prepared before the group's epoch; results
    equal the eager batched epoch (compile=False builds the same pure kernel without the compiler)."""
    from esper_fn.training import train_epochs

    task = load("spirals", seed=0)
    host = ef.hosts.mlp((2, 16, 2))

    def pop():
        out = []
        for i in range(4):
            s = ef.init(host, generator=torch.Generator().manual_seed(i))
            if i >= 2:
                s = ef.advance(ef.germinate(s, "fc1", "mlp_gelu", generator=torch.Generator().manual_seed(0)), "fc1")
            if i == 3:
                s = ef.tick(ef.advance(s, "fc1", force=True))  # live on one host, incubating on the other
            out.append(s)
        return out

    cfg = TrainConfig(batch_size=100)
    kc = tz.KernelCache(compile=False)
    gens = lambda: [torch.Generator().manual_seed(10 + i) for i in range(4)]  # noqa: E731
    with_k = train_epochs(pop(), task, cfg, generators=gens(), kernels=kc)
    eager = train_epochs(pop(), task, cfg, generators=gens())
    assert kc.stats.compiles == 2 and kc.stats.misses == 0
    assert kc.stats.hits == 2 * task.num_batches("train", 100)
    for (a, ma), (b, mb) in zip(with_k, eager):
        assert _max_diff(a.params_flat, b.params_flat) < 1e-4
        assert ma.keys() == mb.keys()
