"""The blueprint catalogue: every registered blueprint on every test-host slot where it fits.

Generic contract (iterating `esper_fn.blueprints.registry()`, so new blueprints are covered):
zero delta at germination, honest `param_count` and `flops`, the seed learns, export == apply, prune
restores the host exactly, fossilize preserves the function, stacked (vmapped) hosts equal per-host
runs. Targeted tests cover the router aux loss, the EMA balancer, the activation tap, the gradient
clamp, capability masking, the designs that need a capability (a real all-reduce over a process
group, the FlashAttention kernel), misfits and malformed metadata.

Test tensors live on the CPU, so designs that need "cuda" run only in their dedicated test; designs
that need "distributed" run inside a real single-process gloo group.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import tempfile

import pydantic
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import esper_fn as ef
from esper_fn import Stage
from esper_fn._host import identity_slot
from esper_fn.blueprints import Blueprint, BlueprintMeta, SeedOut

B = 16



def _conv2d_net() -> nn.Module:
    torch.manual_seed(0)  # the module's own init; esper_fn never touches the global RNG
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def _make_hosts():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (B,), generator=g)
    x40 = torch.randn(B, 40, generator=g)
    return {
        "mlp": (ef.hosts.mlp((40, 16, 10)), x40, y),
        "cnn": (ef.hosts.cnn1d(), x40, y),
        "trf": (ef.hosts.transformer(seq_len=8, d_model=16, n_heads=2, n_layers=1),
                torch.randn(B, 8, generator=g), y),
        "c2d": (ef.wrap(_conv2d_net(), torch.zeros(2, 1, 6, 6), slots=[nn.Conv2d]),
                torch.randn(B, 1, 6, 6, generator=g), y),
    }


HOSTS = _make_hosts()
REGISTRY = ef.blueprints.registry()


def _available(bp: Blueprint) -> bool:
    """Whether a state can hold `bp` here (its capabilities are present, or it has a fallback)."""
    try:
        ef.blueprints.get(bp)
    except ef.CapabilityError:
        return False
    return True


def _cases(*, available_only: bool):
    out = []
    for hname, (host, _, _) in HOSTS.items():
        for spec in host.slots():
            for bid, bp in REGISTRY.items():
                if not bp.fits(spec) or (available_only and not _available(bp)):
                    continue
                if "cuda" in bp.meta.requires_capability:
                    continue  # runs on CUDA tensors only: test_flash_attention_kernel_or_fallback
                out.append(pytest.param(hname, spec.name, bid, id=f"{hname}-{spec.name}-{bp.meta.name}"))
    return out


def _init(hname, optimizer=None):
    host, x, y = HOSTS[hname]
    return ef.init(host, optimizer=optimizer, generator=torch.Generator().manual_seed(0)), x, y


def _host_only(state: ef.State, x: torch.Tensor) -> torch.Tensor:
    """The host's forward with the state's host weights and no seed at all."""
    flat = {".".join(k[1:]): v for k, v in state.params_flat.items() if k[0] == "host"}
    flat.update({".".join(k[1:]): v for k, v in state.buffers_flat.items() if k[0] == "host"})
    return state.host.forward_fn(flat, x, identity_slot, False)[0]


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max())


def _delta(out):
    return out.delta if isinstance(out, SeedOut) else out


# --- metadata -------------------------------------------------------------------------------------


def test_catalogue_is_complete():
    names = {bp.meta.name for bp in REGISTRY.values()}
    assert {
        "conv1d_k5", "conv1d_k3", "conv1d_dwsep", "conv1d_bottleneck", "conv2d_k3", "conv2d_dwsep",
        "conv2d_bottleneck", "attention_mhsa", "attention_split_qkv", "rmsnorm", "moe_top2_gelu",
        "moe_top2_swiglu", "moe_top2_ema", "activation_tap", "grad_clamp", "flash_attention", "attention_int8_kv",
        "allreduce_shard", "mlp_gelu", "swiglu", "lora_r8", "ia3", "width_k4",
    } <= names
    # Designs that claimed what they did not do are gone (renamed, or a new major version).
    assert not {"flash_attention@1.0.0", "kv_cache_int8@1.0.0", "allreduce_shard@1.0.0"} & set(REGISTRY)
    assert "kv_cache_int8" not in names
    changed = {"flash_attention": "2.0.0", "allreduce_shard": "2.0.0"}
    for bid, bp in REGISTRY.items():
        assert bid == bp.id and bp.meta.version == changed.get(bp.meta.name, "1.0.0"), bid
        assert bp.meta.description.strip() and 0.0 <= bp.meta.risk_score <= 1.0, bid
        if bp.meta.fallback is not None:
            fb = REGISTRY[bp.meta.fallback]
            assert not fb.meta.requires_capability and set(fb.meta.slot_kinds) >= set(bp.meta.slot_kinds), bid


def test_every_slot_kind_has_blueprints():
    kinds = {spec.kind for host, _, _ in HOSTS.values() for spec in host.slots()}
    assert kinds == {"vector", "conv1d", "conv2d", "sequence"}
    for kind in kinds:
        assert sum(kind in bp.meta.slot_kinds for bp in REGISTRY.values()) >= 3, kind


# --- the pure (init, apply) contract, GPU-only designs included ---------------------------------


def _slot_inputs(spec, g, batch=B):
    h = torch.randn(batch, *spec.shape, generator=g)
    x_in = None if spec.in_shape is None else torch.randn(batch, *spec.in_shape, generator=g)
    return h, x_in


@pytest.mark.parametrize("hname,slot,bid", _cases(available_only=False))
def test_pure_contract(hname, slot, bid):
    """On the design itself (not its fallback): zero delta at init, honest counts, a gradient, vmap."""
    group = _process_group() if "distributed" in REGISTRY[bid].meta.requires_capability else contextlib.nullcontext()
    with group:
        _pure_contract(hname, slot, bid)


def _pure_contract(hname, slot, bid):
    bp = REGISTRY[bid]
    spec = HOSTS[hname][0].slot(slot)
    g = torch.Generator().manual_seed(0)
    p, b = bp.init(spec, g)
    assert not set(p) & set(b)
    assert sum(v.numel() for v in p.values()) == bp.param_count(spec)
    n_flops = bp.flops(spec)
    assert isinstance(n_flops, int) and n_flops >= 0
    h, x_in = _slot_inputs(spec, g)
    out_shape = (B, spec.consumer_out) if bp.meta.target == "consumer" else h.shape

    for train in (False, True):
        out = bp.apply({**p, **b}, h, x_in, spec, train)
        d = _delta(out)
        assert d.shape == out_shape and d.dtype == h.dtype
        assert d.abs().max() <= 1e-6, (bid, train)
        if isinstance(out, SeedOut) and out.buffers is not None:
            assert set(out.buffers) == set(b) and all(out.buffers[k].shape == b[k].shape for k in b)

    # Honest flops: multiply-adds of the matmuls/convs actually run, per sample (elementwise ops are
    # not counted by FlopCounterMode; designs made only of those are checked by param_count alone).
    with FlopCounterMode(display=False) as fc:
        bp.apply({**p, **b}, h, x_in, spec, False)
    measured = fc.get_total_flops() / 2 / B
    if measured > 0:
        assert 0.8 * measured <= n_flops <= 1.25 * measured + 4 * sum(spec.shape), (n_flops, measured)

    # Learnable designs get a gradient at init although their delta is zero.
    if p:
        leaves = {k: v.clone().requires_grad_() for k, v in p.items()}
        r = torch.randn(out_shape, generator=g)
        out = bp.apply({**leaves, **b}, h, x_in, spec, True)
        loss = (_delta(out) * r).sum()
        if isinstance(out, SeedOut) and out.aux_loss is not None:
            loss = loss + out.aux_loss
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        assert any(gr is not None and gr.abs().max() > 0 for gr in grads), bid

    # vmap over two perturbed copies equals the per-copy calls (delta, aux loss, buffers).
    ps = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in p.items()} for _ in range(2)]
    hs = [_slot_inputs(spec, g, batch=4) for _ in range(2)]

    def one(pp, hh, xx):
        out = bp.apply({**pp, **b}, hh, xx, spec, True)
        if not isinstance(out, SeedOut):
            return out, torch.zeros(()), {}
        aux = out.aux_loss if out.aux_loss is not None else torch.zeros(())
        return out.delta, aux, (out.buffers or {})

    stacked_p = {k: torch.stack([q[k] for q in ps]) for k in p}
    stacked_h = torch.stack([hh for hh, _ in hs])
    stacked_x = None if spec.in_shape is None else torch.stack([xx for _, xx in hs])
    vd, va, vb = torch.vmap(one, in_dims=(0, 0, None if stacked_x is None else 0))(stacked_p, stacked_h, stacked_x)
    for j in range(2):
        d, a, bb = one(ps[j], *hs[j])
        assert _maxdiff(vd[j], d) <= 1e-5 and _maxdiff(va[j], a) <= 1e-6, bid
        assert all(_maxdiff(vb[k][j], bb[k]) <= 1e-6 for k in bb)


# --- the lifecycle in a state --------------------------------------------------------------------


@pytest.mark.parametrize("hname,slot,bid", _cases(available_only=True))
def test_lifecycle(hname, slot, bid):
    s0, x, y = _init(hname)
    base = ef.apply(s0, x)
    bp = ef.blueprints.get(bid)  # the design itself, or its fallback where a capability is missing
    g = torch.Generator().manual_seed(1)
    s = ef.germinate(s0, slot, bid, generator=g, tempo=1)
    assert s.blueprints[s.index(slot)] == bp.id
    spec = s.spec(slot)
    seed_init = {k: v.clone() for k, v in s.seed_params(slot).items()}
    assert sum(v.numel() for v in seed_init.values()) == bp.param_count(spec)

    # Germination never changes the function, even with the fresh seed fully blended in.
    full = ef.advance(ef.advance(ef.advance(s, slot), slot), slot, force=True)
    assert full.stage(slot) == Stage.HOLDING and float(full.slots["alpha"][full.index(slot)]) == 1.0
    assert _maxdiff(ef.apply(full, x), base) <= 1e-6
    assert torch.equal(ef.apply(ef.prune(full, slot), x), base)

    # Blend (alpha 1 after one tick at tempo 1) and train: the seed learns.
    s = ef.tick(ef.advance(ef.advance(s, slot), slot))
    assert s.stage(slot) == Stage.BLENDING and float(s.slots["alpha"][s.index(slot)]) == 1.0
    for _ in range(3):
        s, metrics = ef.train_step(s, x, y)
        assert torch.isfinite(metrics["loss"])
    out = ef.apply(s, x)
    host_only = _host_only(s, x)
    if bp.param_count(spec) > 0:
        assert any(not torch.equal(v, seed_init[k]) for k, v in s.seed_params(slot).items()), bid
        assert _maxdiff(out, host_only) > 1e-6, f"{bid} at {slot}: the seed did not learn a non-zero delta"
    else:
        assert torch.equal(out, host_only)

    # Export equals apply; prune restores the host exactly; fossilize preserves the function.
    assert _maxdiff(ef.export(s)(x), out) <= 1e-6
    pruned = ef.prune(s, slot)
    assert not pruned.seed_params(slot) and not any(k[:2] == ("seeds", slot) for k in pruned.buffers_flat)
    assert torch.equal(ef.apply(pruned, x), host_only)
    held = ef.advance(s, slot)
    fossil = ef.fossilize(held, slot, force=True)  # the fold is under test, not the contribution gate
    assert _maxdiff(ef.apply(fossil, x), ef.apply(held, x)) <= 1e-5
    assert fossil.stage(slot) == (Stage.DORMANT if bp.meta.mergeable else Stage.FOSSILIZED)


def _perturbed(s: ef.State, slot: str, seed: int) -> ef.State:
    g = torch.Generator().manual_seed(seed)
    params = {k: (v + 0.1 * torch.randn(v.shape, generator=g) if k[:2] == ("seeds", slot) else v)
              for k, v in s.params_flat.items()}
    return dataclasses.replace(s, params_flat=params, _cache={})


@pytest.mark.parametrize("hname,slot,bid", _cases(available_only=True))
def test_stacked_hosts_match_per_host(hname, slot, bid):
    """`stack([a, b])` runs every seed under vmap: apply and train_step equal the per-host runs."""
    s0, x, y = _init(hname, optimizer=ef.optim.sgd(0.1))
    s = ef.germinate(s0, slot, bid, generator=torch.Generator().manual_seed(1), tempo=1)
    s = ef.tick(ef.advance(ef.advance(s, slot), slot))
    a, b = _perturbed(s, slot, 1), _perturbed(s, slot, 2)
    st = ef.stack([a, b])
    xs, ys = x.expand(2, *x.shape), y.expand(2, *y.shape)
    out = ef.apply(st, xs)
    assert _maxdiff(out[0], ef.apply(a, x)) <= 1e-6 and _maxdiff(out[1], ef.apply(b, x)) <= 1e-6

    st2, m = ef.train_step(st, xs, ys)
    for j, single in enumerate((a, b)):
        s2, ms = ef.train_step(single, x, y)
        assert _maxdiff(m["loss"][j], ms["loss"]) <= 1e-5
        for k, v in s2.params_flat.items():
            assert _maxdiff(st2.params_flat[k][j], v) <= 1e-5, k
        for k, v in s2.buffers_flat.items():
            assert _maxdiff(st2.buffers_flat[k][j], v) <= 1e-5, k


# --- router aux loss and the EMA balancer --------------------------------------------------------

VEC = ef.SlotSpec("v", "vector", (16,))
SEQ = ef.SlotSpec("s", "sequence", (8, 16))


@pytest.mark.parametrize("name", ["moe_top2_gelu", "moe_top2_swiglu"])
def test_router_aux_loss(name):
    bp = ef.blueprints.get(name)
    g = torch.Generator().manual_seed(0)
    p, _ = bp.init(SEQ, g)
    h = torch.randn(32, 8, 16, generator=g)
    # Uniform router probabilities (perfect balance): the loss sits at its minimum, 1.
    uniform = bp.apply({**p, "router": torch.zeros_like(p["router"])}, h, None, SEQ, True)
    assert isinstance(uniform, SeedOut) and uniform.aux_loss.shape == ()
    assert abs(float(uniform.aux_loss) - 1.0) <= 1e-6
    # A random router is near balance: the loss stays close to (and here above) 1.
    rand = float(bp.apply(p, h, None, SEQ, True).aux_loss)
    assert 1.0 - 1e-6 <= rand < 1.5
    # Forcing every token to experts 0 and 1 doubles it (f = P = (1/2, 1/2, 0, 0)).
    hp = h.abs() + 1
    skew = torch.zeros_like(p["router"])
    skew[:2], skew[2:] = 0.1, -0.1
    unbalanced = float(bp.apply({**p, "router": skew}, hp, None, SEQ, True).aux_loss)
    assert unbalanced > rand and unbalanced > 1.9
    # The loss pushes the router towards balance: a gradient step on it lowers it.
    r = skew.clone().requires_grad_()
    (grad,) = torch.autograd.grad(bp.apply({**p, "router": r}, hp, None, SEQ, True).aux_loss, [r])
    assert grad.abs().max() > 0
    lower = float(bp.apply({**p, "router": skew - 10.0 * grad}, hp, None, SEQ, True).aux_loss)
    assert lower < unbalanced


def test_aux_loss_reaches_the_training_loss():
    s0, x, y = _init("mlp")
    s = ef.tick(ef.advance(ef.advance(ef.germinate(s0, "fc1", "moe_top2_gelu", tempo=1), "fc1"), "fc1"))
    s1, m1 = ef.train_step(s, x, y, aux_weight=0.0)
    s2, m2 = ef.train_step(s, x, y, aux_weight=10.0)
    # Same live loss; the aux term changes the router update.
    assert torch.equal(m1["loss"], m2["loss"])
    assert not torch.equal(s1.params_flat[("seeds", "fc1", "router")], s2.params_flat[("seeds", "fc1", "router")])


def test_ema_balancer_buffers():
    bp = ef.blueprints.get("moe_top2_ema")
    g = torch.Generator().manual_seed(0)
    p, b = bp.init(VEC, g)
    assert set(b) == {"bias", "load_ema"}
    h = torch.randn(64, 16, generator=g).abs() + 1
    skew = torch.zeros_like(p["router"])
    skew[0] = 0.1
    skew[1] = 0.05
    p = {**p, "router": skew}
    # Eval forwards return no buffers; training forwards return updated ones.
    assert not isinstance(bp.apply({**p, **b}, h, None, VEC, False), SeedOut)
    out = bp.apply({**p, **b}, h, None, VEC, True)
    assert out.aux_loss is None and set(out.buffers) == {"bias", "load_ema"}
    assert not torch.equal(out.buffers["bias"], b["bias"])
    # The router prefers experts 0 and 1; feeding the buffers back rebalances the selection.
    buf = b
    first_load = None
    for _ in range(300):
        out = bp.apply({**p, **buf}, h, None, VEC, True)
        buf = out.buffers
        first_load = buf["load_ema"] if first_load is None else first_load
    assert float(buf["bias"][0]) < 0 < float(buf["bias"][3])
    _, mask = _selection(bp, p, buf, h)
    assert float(mask.mean(0).max()) / 2 < 0.4  # from 0.5 (experts 0 and 1 took every token)

    # In a state: a training step moves the buffers, eval (apply, export) leaves them alone.
    s0, x, y = _init("mlp")
    s = ef.tick(ef.advance(ef.advance(ef.germinate(s0, "fc1", "moe_top2_ema", tempo=1), "fc1"), "fc1"))
    before = {k: v.clone() for k, v in s.buffers_flat.items()}
    ef.apply(s, x)
    ef.apply(s, x, train=True)
    ef.export(s)(x)
    assert all(torch.equal(s.buffers_flat[k], v) for k, v in before.items())
    s1, _ = ef.train_step(s, x, y)
    key = ("seeds", "fc1", "load_ema")
    assert not torch.equal(s1.buffers_flat[key], before[key])
    assert not torch.equal(s1.buffers_flat[("seeds", "fc1", "bias")], before[("seeds", "fc1", "bias")])
    assert abs(float(s1.buffers_flat[key].sum()) - 1.0) <= 1e-5


def _selection(bp, p, buf, h):
    from esper_fn.blueprints._moe import _route

    logits = torch.nn.functional.linear(h, p["router"])
    return _route(logits, logits + buf["bias"])


# --- the no-parameter seeds ----------------------------------------------------------------------


def test_activation_tap_statistics():
    bp = ef.blueprints.get("activation_tap")
    spec = ef.SlotSpec("c", "conv1d", (3, 10))
    p, b = bp.init(spec, None)
    assert p == {} and bp.param_count(spec) == 0
    g = torch.Generator().manual_seed(0)
    h = torch.randn(32, 3, 10, generator=g) * torch.tensor([1.0, 2.0, 0.5]).view(3, 1) + torch.tensor(
        [0.0, 3.0, -1.0]).view(3, 1)
    h[:, 2, :5] = 0.0  # half of channel 2 is dead: 1/6 of all entries
    assert torch.equal(bp.apply(b, h, None, spec, False), torch.zeros_like(h))
    buf = b
    for _ in range(200):
        out = bp.apply(buf, h, None, spec, True)
        assert torch.equal(out.delta, torch.zeros_like(h))
        buf = out.buffers
    per_channel = h.transpose(0, 1).reshape(3, -1)
    assert torch.allclose(buf["mean"], per_channel.mean(1), atol=1e-5)
    assert torch.allclose(buf["var"], per_channel.var(1, unbiased=False), atol=1e-4)
    assert abs(float(buf["dead"]) - 1 / 6) <= 1e-5

    # In a state: statistics of the ReLU-fed conv slot, updated by training, the output unchanged.
    s0, x, y = _init("cnn")
    s = ef.tick(ef.advance(ef.advance(ef.germinate(s0, "conv2", "activation_tap", tempo=1), "conv2"), "conv2"))
    assert torch.equal(ef.apply(s, x), ef.apply(s0, x))
    s1, _ = ef.train_step(s, x, y)
    mean = s1.buffers_flat[("seeds", "conv2", "mean")]
    assert mean.shape == (4,) and not torch.equal(mean, torch.zeros(4))
    assert 0.0 <= float(s1.buffers_flat[("seeds", "conv2", "dead")]) <= 1.0


def test_grad_clamp_clamps_gradients():
    bp = ef.blueprints.get("grad_clamp")
    spec = ef.SlotSpec("v", "vector", (6,))
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 6, generator=g).requires_grad_()
    w = torch.randn(5, 6, generator=g) * 4  # upstream gradient, many entries beyond [-1, 1]
    assert (w.abs() > 1).any()
    _, b = bp.init(spec, None)
    assert bp.param_count(spec) == 0 and float(b["clamp"]) == 1.0
    delta = bp.apply(b, h, None, spec, True)
    assert torch.equal(delta, torch.zeros_like(h))
    for alpha in (0.0, 0.5, 1.0):
        (with_seed,) = torch.autograd.grad(((h + alpha * bp.apply(b, h, None, spec, True)) * w).sum(), [h])
        (without,) = torch.autograd.grad((h * w).sum(), [h])
        assert torch.equal(without, w)
        assert torch.allclose(with_seed, (1 - alpha) * w + (alpha * w).clamp(-1, 1))
    # Under vmap (stacked hosts, one bound per host) too.
    hs = torch.randn(2, 5, 6, generator=g).requires_grad_()
    ws = torch.randn(2, 5, 6, generator=g) * 4
    cs = torch.tensor([1.0, 0.5])
    ys = torch.vmap(lambda hh, cc: hh + bp.apply({"clamp": cc}, hh, None, spec, True))(hs, cs)
    (gs,) = torch.autograd.grad((ys * ws).sum(), [hs])
    assert torch.equal(gs[1], ws[1].clamp(-0.5, 0.5))
    assert torch.equal(gs[0], ws[0].clamp(-1, 1))

    # In a state at alpha 1: the host's gradient below the slot is that of the clamped slot gradient.
    s0, x, y = _init("mlp", optimizer=ef.optim.sgd(1.0))
    s = ef.advance(ef.advance(ef.advance(ef.germinate(s0, "fc1", "grad_clamp"), "fc1"), "fc1"), "fc1", force=True)
    big = lambda out, t: 1e3 * torch.nn.functional.cross_entropy(out, t)  # noqa: E731
    plain, _ = ef.train_step(s0, x, y, loss_fn=big)
    clamped, _ = ef.train_step(s, x, y, loss_fn=big)
    k = ("host", "fc1", "bias")
    step_plain = (plain.params_flat[k] - s0.params_flat[k]).abs()
    step_clamped = (clamped.params_flat[k] - s.params_flat[k]).abs()
    assert step_clamped.max() <= B * 1.0 + 1e-4 < step_plain.max()  # B samples, each clamped to 1


# --- designs that need a capability ----------------------------------------------------------------

NO_CAPS = frozenset()
SEQ64 = ef.SlotSpec("s", "sequence", (16, 64))


def test_capability_masking_and_fallbacks():
    s0, _, _ = _init("trf")
    legal = ef.legal_actions(s0, capabilities=NO_CAPS)["input"]["blueprints"]
    assert {"attention_mhsa@1.0.0", "attention_split_qkv@1.0.0", "attention_int8_kv@1.0.0"} <= set(legal)
    # a design whose capability is absent is masked out (its fallback is offered under its own id)
    assert "flash_attention@2.0.0" not in legal and "allreduce_shard@2.0.0" not in legal
    with_caps = ef.legal_actions(s0, capabilities=frozenset({"cuda", "flash_attention", "distributed"}))
    assert {"flash_attention@2.0.0", "allreduce_shard@2.0.0"} <= set(with_caps["input"]["blueprints"])

    get = ef.blueprints.get
    assert get("flash_attention", capabilities=NO_CAPS).id == "attention_mhsa@1.0.0"
    assert get("flash_attention", capabilities=frozenset({"cuda"})).id == "attention_mhsa@1.0.0"  # not sm80+
    assert get("flash_attention", capabilities=frozenset({"cuda", "flash_attention"})).id == "flash_attention@2.0.0"
    assert get("allreduce_shard", capabilities=NO_CAPS).id == "mlp_gelu@1.0.0"
    assert get("allreduce_shard", capabilities=frozenset({"cuda"})).id == "mlp_gelu@1.0.0"  # a GPU is no group
    assert get("allreduce_shard", capabilities=frozenset({"distributed"})).id == "allreduce_shard@2.0.0"
    # Quantisation-aware attention is pure PyTorch: it needs nothing and runs everywhere.
    assert get("attention_int8_kv", capabilities=NO_CAPS).id == "attention_int8_kv@1.0.0"
    for bp in REGISTRY.values():
        assert set(bp.meta.requires_capability) <= {"cuda", "flash_attention", "distributed"}, bp.id


def _perturbed_init(bp: Blueprint, spec, g: torch.Generator) -> dict[str, torch.Tensor]:
    p, _ = bp.init(spec, g)
    return {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in p.items()}


FLASH_MODE = "cuda_flash_kernel" if {"cuda", "flash_attention"} <= ef.blueprints.available_capabilities() \
    else "fallback_without_cuda"


@pytest.mark.device  # `make test-gpu` runs the kernel path
@pytest.mark.parametrize("mode", [FLASH_MODE])
def test_flash_attention_kernel_or_fallback(mode):
    """`flash_attention` runs the FlashAttention kernel and nothing else. With CUDA (sm80+) the kernel is
    what runs; elsewhere `get` and `germinate` resolve it to attention_mhsa. On CPU tensors the design
    itself refuses to run rather than compute some other attention."""
    flash, mhsa = REGISTRY["flash_attention@2.0.0"], REGISTRY["attention_mhsa@1.0.0"]
    g = torch.Generator().manual_seed(0)
    p = _perturbed_init(flash, SEQ64, g)
    h = torch.randn(4, *SEQ64.shape, generator=g)
    with pytest.raises(ef.CapabilityError, match="CUDA tensors"):
        flash.apply(p, h, None, SEQ64, False)
    if mode == "fallback_without_cuda":
        assert ef.blueprints.get("flash_attention").id == "attention_mhsa@1.0.0"
        s0 = ef.init(ef.hosts.transformer(seq_len=8, d_model=32, n_heads=4, n_layers=1))
        assert flash.fits(s0.spec("input"))
        s = ef.germinate(s0, "input", "flash_attention")
        assert s.blueprints[s.index("input")] == "attention_mhsa@1.0.0"
    else:
        assert ef.blueprints.get("flash_attention").id == "flash_attention@2.0.0"
        pc = {k: v.cuda().requires_grad_() for k, v in p.items()}
        hc = h.cuda()
        # acc_events: with CUDA present the profiler otherwise warns that it clears events per cycle
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], acc_events=True) as prof:
            got = flash.apply(pc, hc, None, SEQ64, True)
        attention_ops = {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key}
        assert any("flash" in k for k in attention_ops), attention_ops
        assert not any(w in k for k in attention_ops for w in ("efficient", "cudnn", "math")), attention_ops
        want = mhsa.apply({k: v.detach() for k, v in pc.items()}, hc, None, SEQ64, False)
        assert got.dtype == torch.float32 and got.is_cuda
        assert 0 < float(want.abs().max()) and _maxdiff(got, want) <= 2e-2 * float(want.abs().max())
        grads = torch.autograd.grad(got.square().sum(), list(pc.values()))
        assert all(float(gr.abs().max()) > 0 for gr in grads)


def test_flash_attention_fits_only_head_sizes_the_kernel_takes():
    flash = REGISTRY["flash_attention@2.0.0"]
    assert flash.fits(SEQ64) and flash.fits(ef.SlotSpec("s", "sequence", (4, 1024)))  # 4 heads of 256
    assert "head sizes up to 256" in flash.misfit(ef.SlotSpec("s", "sequence", (4, 1028)))


@contextlib.contextmanager
def _process_group(rank: int = 0, world: int = 1, store: str | None = None):
    """A real gloo process group (default: rank 0 of 1, a fresh file store), destroyed on exit."""
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"file://{store or d + '/store'}")
        try:
            yield
        finally:
            dist.destroy_process_group()


def test_allreduce_shard_needs_a_process_group():
    bp = REGISTRY["allreduce_shard@2.0.0"]
    assert bp.meta.requires_capability == ("distributed",) and bp.meta.fallback == "mlp_gelu@1.0.0"
    p, _ = bp.init(VEC, torch.Generator().manual_seed(0))
    assert not dist.is_initialized()
    with pytest.raises(ef.CapabilityError, match="init_process_group"):
        bp.apply(p, torch.randn(4, 16), None, VEC, False)


@pytest.mark.parametrize("spec", [VEC, SEQ], ids=["vector", "sequence"])
def test_allreduce_shard_sums_through_a_real_all_reduce(spec, monkeypatch):
    """One rank of a real gloo group: the mlp_gelu function, and torch.distributed.all_reduce really runs."""
    bp, fb = REGISTRY["allreduce_shard@2.0.0"], REGISTRY["mlp_gelu@1.0.0"]
    g = torch.Generator().manual_seed(0)
    p = _perturbed_init(bp, spec, g)
    assert {k: v.shape for k, v in p.items()} == {k: v.shape for k, v in fb.init(spec, None)[0].items()}
    h = torch.randn(4, *spec.shape, generator=g)
    reduced = []
    real_all_reduce = dist.all_reduce

    def spy(t, *args, **kwargs):
        reduced.append(tuple(t.shape))
        return real_all_reduce(t, *args, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", spy)
    with _process_group():
        got = bp.apply(p, h, None, spec, False)
    want = fb.apply(p, h, None, spec, False)
    assert reduced == [tuple(h.shape)]
    assert 0 < float(want.abs().max()) and _maxdiff(got, want) <= 1e-6


def _shard_inputs():
    g = torch.Generator().manual_seed(0)
    p = _perturbed_init(REGISTRY["allreduce_shard@2.0.0"], SEQ, g)
    h = torch.randn(4, *SEQ.shape, generator=g)
    return p, h, torch.randn(4, *SEQ.shape, generator=g)


# One rank of a 2-process gloo group, run as `python -c` (importing only torch and esper_fn keeps the
# start cheap): the same inputs on both ranks, as tensor parallelism needs.
_RANK_SCRIPT = """
import sys
import torch
import torch.distributed as dist
import esper_fn as ef
import esper_fn.blueprints

rank, out = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", rank=rank, world_size=2, init_method="file://" + out + "/store")
try:
    p, h, r = torch.load(out + "/inputs.pt")
    spec = ef.SlotSpec("s", "sequence", tuple(h.shape[1:]))
    leaves = {k: v.clone().requires_grad_() for k, v in p.items()}
    y = ef.blueprints.registry()["allreduce_shard@2.0.0"].apply(leaves, h, None, spec, True)
    grads = torch.autograd.grad((y * r).sum(), list(leaves.values()))
    torch.save({"out": y.detach(), "grads": dict(zip(leaves, grads))}, f"{out}/rank{rank}.pt")
finally:
    dist.destroy_process_group()
"""


@pytest.mark.slow
def test_allreduce_shard_over_two_ranks(tmp_path):
    """Each of two processes computes half of the hidden units; the all-reduce gives both the full delta,
    and each rank's gradient covers its own shard (the ranks' gradients together are mlp_gelu's)."""
    from esper_fn.blueprints._misc import shard_bounds

    p, h, r = _shard_inputs()
    torch.save((p, h, r), tmp_path / "inputs.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, str(i), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    ranks = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]
    leaves = {k: v.clone().requires_grad_() for k, v in p.items()}
    want = REGISTRY["mlp_gelu@1.0.0"].apply(leaves, h, None, SEQ, True)
    want_grads = dict(zip(leaves, torch.autograd.grad((want * r).sum(), list(leaves.values()))))
    k = p["w1"].shape[0]
    for i, res in enumerate(ranks):
        assert _maxdiff(res["out"], want) <= 1e-5, i  # every rank has the full delta
        lo, hi = shard_bounds(k, i, 2)
        assert 0 < lo or hi < k
        own = torch.zeros(k, dtype=torch.bool)
        own[lo:hi] = True
        for name in ("w1", "b1"):
            assert res["grads"][name][own].abs().max() > 0 and not res["grads"][name][~own].any(), (i, name)
        assert res["grads"]["w2"][:, own].abs().max() > 0 and not res["grads"]["w2"][:, ~own].any(), i
        assert _maxdiff(res["grads"]["b2"], want_grads["b2"]) <= 1e-5, i
    for name in ("w1", "b1", "w2"):
        assert _maxdiff(ranks[0]["grads"][name] + ranks[1]["grads"][name], want_grads[name]) <= 1e-5, name


def test_attention_int8_kv_is_attention_on_int8_keys_and_values():
    """Same parameters as attention_mhsa; the same function up to int8 rounding of K and V."""
    bp, fb = REGISTRY["attention_int8_kv@1.0.0"], REGISTRY["attention_mhsa@1.0.0"]
    assert bp.meta.requires_capability == () and bp.meta.fallback is None
    g = torch.Generator().manual_seed(0)
    p = _perturbed_init(bp, SEQ, g)
    assert {k: v.shape for k, v in p.items()} == {k: v.shape for k, v in fb.init(SEQ, None)[0].items()}
    h = torch.randn(4, *SEQ.shape, generator=g)
    got, want = bp.apply(p, h, None, SEQ, False), fb.apply(p, h, None, SEQ, False)
    assert 0 < _maxdiff(got, want) <= 2e-2 * float(want.abs().max())


def test_int8_fake_quantisation():
    from esper_fn.blueprints._attention import _quant_int8

    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, 8, generator=g).requires_grad_()
    q = _quant_int8(z)
    scale = z.detach().abs().amax(-1, keepdim=True) / 127
    assert torch.allclose(q / scale, torch.round(q / scale), atol=1e-3)  # on the int8 grid
    assert float((q.detach() / scale).abs().max()) <= 127 + 1e-3
    assert _maxdiff(q, z) <= float(scale.max()) / 2 + 1e-6 and not torch.equal(q, z)
    (grad,) = torch.autograd.grad((q * 2).sum(), [z])
    assert torch.equal(grad, torch.full_like(z, 2.0))  # straight-through


# --- custom blueprints -----------------------------------------------------------------------------


def test_unregistered_custom_blueprint_runs_the_whole_lifecycle(monkeypatch):
    """A `Blueprint` object handed to `germinate` without `register` trains, exports, prunes and
    fossilizes like a catalogue design (it used to crash the next train_step with a KeyError)."""
    from esper_fn import _blueprint

    monkeypatch.setattr(_blueprint, "_REGISTRY", dict(_blueprint._REGISTRY))  # keep the catalogue as it was
    base = REGISTRY["mlp_gelu@1.0.0"]
    custom = Blueprint(base.meta.model_copy(update={"name": "my_residual_mlp"}), base.init, base.apply,
                       base.param_count, base.flops)
    assert custom.id not in ef.blueprints.registry()
    s0, x, y = _init("mlp")
    s = ef.germinate(s0, "fc1", custom, generator=torch.Generator().manual_seed(1), tempo=1)
    assert s.blueprints[s.index("fc1")] == "my_residual_mlp@1.0.0"
    s = ef.tick(ef.advance(ef.advance(s, "fc1"), "fc1"))
    for _ in range(3):
        s, metrics = ef.train_step(s, x, y)
        assert torch.isfinite(metrics["loss"])
    out = ef.apply(s, x)
    assert _maxdiff(out, _host_only(s, x)) > 1e-6  # the custom seed learned
    assert _maxdiff(ef.export(s)(x), out) <= 1e-6
    assert torch.equal(ef.apply(ef.prune(s, "fc1"), x), _host_only(s, x))
    held = ef.advance(s, "fc1")
    assert _maxdiff(ef.apply(ef.fossilize(held, "fc1", force=True), x), ef.apply(held, x)) <= 1e-5

    # Another design under an id that is taken is refused, not silently swapped in.
    other = Blueprint(custom.meta, base.init, lambda p, h, x_in, spec, train: h, base.param_count, base.flops)
    with pytest.raises(ef.BlueprintError, match="already registered"):
        ef.germinate(s0, "fc1", other)


# --- misfits and malformed metadata ----------------------------------------------------------------


@pytest.mark.parametrize("hname,slot,bid,why", [
    ("mlp", "fc1", "conv2d_k3", "fits slot kinds"),
    ("mlp", "fc1", "attention_mhsa", "'vector'"),
    ("c2d", "0", "rmsnorm", "'conv2d'"),
    ("cnn", "conv1", "moe_top2_gelu", "'conv1d'"),
    ("mlp", "input", "lora_r4", "needs a slot after a layer"),
])
def test_misfit_raises(hname, slot, bid, why):
    s0, _, _ = _init(hname)
    assert not ef.blueprints.get(bid).fits(s0.spec(slot))
    with pytest.raises(ef.BlueprintError, match="does not fit slot") as err:
        ef.germinate(s0, slot, bid)
    assert why in str(err.value)


def test_misfit_by_check():
    odd = ef.init(ef.hosts.transformer(seq_len=4, d_model=15, n_heads=3, n_layers=1))
    with pytest.raises(ef.BlueprintError, match="even feature size"):
        ef.germinate(odd, "input", "attention_split_qkv")
    ef.germinate(odd, "input", "attention_mhsa")  # heads = 1 fits any width
    narrow = ef.init(ef.hosts.mlp((40, 2, 10)))
    with pytest.raises(ef.BlueprintError, match="shorter than the kernel"):
        ef.germinate(narrow, "fc1", "conv1d_dwsep")


GOOD_META = {"name": "x_seed", "version": "1.0.0", "description": "d", "risk_score": 0.1, "slot_kinds": ("vector",)}


@pytest.mark.parametrize("bad", [
    {"colour": "red"},
    {"risk_score": 1.5},
    {"risk_score": -0.1},
    {"version": "1.0"},
    {"version": "v1.0.0"},
    {"name": "Bad-Name"},
    {"target": "elsewhere"},
])
def test_malformed_meta_raises(bad):
    BlueprintMeta(**GOOD_META)
    with pytest.raises(pydantic.ValidationError):
        BlueprintMeta(**{**GOOD_META, **bad})
