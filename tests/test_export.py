"""`export(state)` is an ordinary module of standard layers whose output equals `apply(state, x)`: on
wrapped attention models with gradients on or off, on every built-in host, through pickle,
`torch.save`, `torch.jit.trace`, `torch.export` and a second `wrap`.

`nn.MultiheadAttention` (inside `nn.TransformerEncoderLayer`) has a fused eval-mode "fast path" that
it takes only when no input requires grad: `apply` (plain tensors) took it and the export
(`nn.Parameter`s) did not once gradients were enabled, so the two differed by ~1e-6. The wrapped
forward now always runs the composite path, in both.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import esper_fn as ef

B, T, D = 64, 16, 32


def _encoder() -> nn.Module:
    torch.manual_seed(0)  # the module's own init; esper_fn never touches the global RNG
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(d_model=D, nhead=4, batch_first=True), num_layers=2)


def _grown(slot: str, bid: str) -> tuple[ef.State, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, D, generator=g) * 4
    target = torch.randn(B, T, D, generator=g)
    host = ef.wrap(_encoder(), x[:2], slots=[nn.TransformerEncoderLayer, nn.MultiheadAttention])
    s = ef.germinate(ef.init(host), slot, bid, generator=torch.Generator().manual_seed(1), tempo=1)
    s = ef.tick(ef.advance(ef.advance(s, slot), slot))
    assert float(s.slots["alpha"][s.index(slot)]) == 1.0
    for _ in range(3):
        s, _ = ef.train_step(s, x, target, loss_fn=nn.functional.mse_loss)
    assert (ef.apply(s, x) - ef.apply(ef.prune(s, slot), x)).abs().max() > 1e-4  # the seed matters
    return s, x


@pytest.mark.parametrize("slot,bid", [
    ("layers_0", "attention_mhsa"),
    ("layers_1", "mlp_gelu"),
    ("layers_0_self_attn", "swiglu"),
])
def test_export_equals_apply_on_a_wrapped_transformer_encoder(slot, bid):
    s, x = _grown(slot, bid)
    exported = ef.export(s)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            got, want = exported(x), ef.apply(s, x)
        diff = float((got - want).detach().abs().max())
        assert diff <= 1e-6, (grad, diff)
        # Both run the same composite attention path: the same operations on the same values.
        assert torch.equal(got.detach(), want), (grad, diff)
    with torch.enable_grad():  # the export is a trainable module
        exported.train()
        loss = exported(x).square().mean()
        loss.backward()
        assert all(p.grad is not None for p in exported.parameters())


def test_wrapped_attention_leaves_the_global_fast_path_setting_alone():
    s, x = _grown("layers_0", "attention_mhsa")
    assert torch.backends.mha.get_fastpath_enabled()
    ef.apply(s, x)
    ef.export(s)(x)
    assert torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        ef.apply(s, x)
        assert not torch.backends.mha.get_fastpath_enabled()
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


# --- the export is an ordinary module of standard layers ----------------------------------------------

import io  # noqa: E402
import pickle  # noqa: E402
from collections import OrderedDict  # noqa: E402

from esper_fn.blueprints import Blueprint  # noqa: E402

CASES = {
    "mlp": (lambda: ef.hosts.preset("mlp-impaired"), (40,),
            [("input", "conv1d_k5"), ("fc1", "lora_r4"), ("fc2", "mlp_gelu")]),
    "cnn1d": (lambda: ef.hosts.preset("cnn-impaired"), (40,),
              [("conv1", "conv1d_dwsep"), ("conv2", "conv1d_bottleneck"), ("fc", "ia3")]),
    "cnn2d": (lambda: ef.hosts.preset("cnn2d-w4", input_shape=(1, 12, 12), n_classes=10), (1, 12, 12),
              [("input", "conv2d_k3"), ("conv1", "conv2d_dwsep"), ("conv2", "conv2d_bottleneck")]),
    "transformer": (lambda: ef.hosts.transformer(seq_len=12, d_model=16, n_heads=2, n_layers=2), (12,),
                    [("input", "swiglu"), ("block1", "attention_mhsa"), ("block2", "mlp_gelu")]),
}


def _live(host, shape, seeds, *, fossilize=(), steps=3):
    """A state with every seed of `seeds` live (blended to alpha 1, trained a few steps)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, *shape, generator=g), torch.randint(0, 10, (16,), generator=g)
    s = ef.init(host, generator=g)
    for slot, bid in seeds:
        s = ef.germinate(s, slot, bid, generator=g, tempo=1)
        s = ef.tick(ef.advance(ef.advance(s, slot), slot))
    for _ in range(steps):
        s, _ = ef.train_step(s, x, y)
    for slot in fossilize:
        s = ef.fossilize(ef.advance(s, slot), slot, force=True)
    return s, x, y


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.filterwarnings("ignore:`torch.jit.trace.*` is deprecated:DeprecationWarning")  # the round trip under test
def test_the_export_is_standard_layers_that_pickle_trace_and_export(case):
    make, shape, seeds = CASES[case]
    s, x, _ = _live(make(), shape, seeds)
    rng = torch.get_rng_state()
    net = ef.export(s)
    assert torch.equal(torch.get_rng_state(), rng)  # built on the meta device: no draw from the global RNG
    want = ef.apply(s, x)
    assert torch.equal(net(x), want)  # the same operations on the same values
    grafts = {type(m.layer).__name__ for m in net.modules() if isinstance(m, ef.Graft)}
    assert len([m for m in net.modules() if isinstance(m, ef.Graft)]) == len(seeds), grafts
    text = repr(net)
    assert "Module()" not in text and ("Linear(" in text or "Conv" in text)
    for m in net.modules():  # only torch.nn layers and esper_fn's module-level classes
        assert type(m).__module__.startswith(("torch.nn.", "esper_fn._modules", "esper_fn._export")), type(m)
    assert torch.equal(pickle.loads(pickle.dumps(net))(x), want)
    buf = io.BytesIO()
    torch.save(net, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), want)
    traced = torch.jit.trace(net, x)
    torch.testing.assert_close(traced(x), want, rtol=1e-5, atol=1e-6)  # tracing may reorder a reduction
    program = torch.export.export(net, (x,))
    torch.testing.assert_close(program.module()(x), want, rtol=1e-5, atol=1e-6)


def test_an_export_is_wrapped_again_and_keeps_growing():
    make, shape, seeds = CASES["cnn2d"]
    s, x, y = _live(make(), shape, seeds[:2])
    net = ef.export(s)
    host = ef.wrap(net, x, slots=[nn.Conv2d])  # was: HostError "the module has no Conv2d submodule"
    s2 = ef.init(host)
    assert torch.equal(ef.apply(s2, x), net(x))
    assert {"conv1_layer", "conv2"} <= set(s2.slot_names)  # the grafted conv1 and the plain conv2
    slot = "conv2"
    s2 = ef.germinate(s2, slot, "conv2d_k3", generator=torch.Generator().manual_seed(5), tempo=1)
    s2 = ef.tick(ef.advance(ef.advance(s2, slot), slot))
    for _ in range(3):
        s2, m = ef.train_step(s2, x, y)
        assert torch.isfinite(m["loss"])
    assert not torch.equal(ef.apply(s2, x), net(x))  # it grew and learned
    again = ef.export(s2)
    assert torch.equal(again(x), ef.apply(s2, x))


def test_a_wrapped_module_exports_as_itself_with_its_seeds_grafted():
    torch.manual_seed(0)  # the module's own init
    module = nn.Sequential(OrderedDict(enc=nn.Sequential(nn.Linear(40, 32), nn.ReLU(), nn.BatchNorm1d(32)),
                                       head=nn.Linear(32, 10)))
    x = torch.randn(16, 40)
    s, x, _ = _live(ef.wrap(module, x, slots=[nn.Linear, nn.BatchNorm1d]), (40,),
                    [("input", "mlp_gelu_x0_5"), ("enc_0", "lora_r8"), ("enc_2", "rmsnorm")])
    net = ef.export(s)
    assert list(net._modules) == ["input", "net"]  # the input seed reads the input before the module
    assert isinstance(net.net.enc[0], ef.Graft) and isinstance(net.net.enc[0].layer, nn.Linear)
    assert isinstance(net.net.enc[2].seed, ef.SeedFn)  # RMSNorm is not a torch.nn layer: it runs its apply
    assert isinstance(net.net.enc[2].layer, nn.BatchNorm1d)
    assert torch.equal(net(x), ef.apply(s, x))
    assert torch.equal(pickle.loads(pickle.dumps(net))(x), ef.apply(s, x))
    net.train()
    net(x)  # BatchNorm updates its running statistics in place, as any module's does
    assert not torch.equal(net.net.enc[2].layer.running_mean, s.buffers["host", "enc", "2", "running_mean"])


def test_a_live_width_growth_seed_is_folded_into_the_linears():
    s, x, _ = _live(ef.hosts.preset("mlp-impaired"), (40,), [("fc1", "width_k4")])
    net = ef.export(s)
    assert net.fc1.out_features == 20 and net.fc2.in_features == 20 and not any(
        isinstance(m, ef.Graft) for m in net.modules())
    torch.testing.assert_close(net(x), ef.apply(s, x), rtol=1e-5, atol=1e-6)  # one wider sum: float rounding
    blocked, _, _ = _live(ef.hosts.preset("mlp-impaired-deep"), (40,), [("fc1", "width_k4"), ("fc2", "lora_r4")])
    with pytest.raises(ef.GraftError, match="Fossilize or prune one"):
        ef.export(blocked)


@pytest.mark.device
def test_the_export_lives_on_the_states_device(device):
    s, x, _ = _live(ef.hosts.preset("mlp-impaired"), (40,), [("fc1", "lora_r4")])
    s = s.to(device)
    net = ef.export(s)
    assert {t.device.type for t in [*net.parameters(), *net.buffers()]} == {device.type}
    assert torch.equal(net(x.to(device)), ef.apply(s, x.to(device)))


def test_a_hand_made_host_exports_a_functional_grown_network():
    ref = ef.hosts.mlp((40, 16, 10))
    host = ef.Host("bare", ref.init_fn, ref.forward_fn, ref.slots_fn)  # no module_fn
    s, x, _ = _live(host, (40,), [("fc1", "mlp_gelu")])
    net = ef.export(s)
    assert isinstance(net, ef.GrownNetwork) and torch.equal(net(x), ef.apply(s, x))


def test_a_custom_blueprint_without_a_module_exports_as_seedfn():
    base = ef.blueprints.get("mlp_gelu")
    meta = base.meta.model_copy(update={"name": "my_export_mlp"})
    custom = Blueprint(meta, base.init, base.apply, base.param_count, base.flops)
    s, x, _ = _live(ef.hosts.preset("mlp-impaired"), (40,), [("fc1", custom)])
    net = ef.export(s)
    assert isinstance(net.fc1.seed, ef.SeedFn) and torch.equal(net(x), ef.apply(s, x))


@pytest.mark.parametrize("bid, dilation", [("karn_conv1d_k5_d2_c4@1.0.0", 2), ("karn_dwsep_k3_d4@1.0.0", 4)])
def test_a_dilated_karn_blueprint_exports_as_dilated_convs(bid, dilation):
    """Karn's dilated Conv1d blocks export as `nn.Conv1d` with the dilation (not the catalogue's d = 1)."""
    from esper_fn import karn

    karn.blueprint(bid)  # registered on first use
    host = ef.hosts.preset("mlp-impaired", input_shape=(40,), n_classes=10)
    s, x, _ = _live(host, (40,), [("input", bid)])
    net = ef.export(s)
    assert torch.equal(net(x), ef.apply(s, x))
    dilations = {m.dilation for m in net.modules() if isinstance(m, nn.Conv1d) and m.kernel_size[0] > 1}
    assert dilations == {(dilation,)}
