"""Host presets for the growth benchmark: the width families (mlp-w, cnn1d-w, cnn1d-shallow-w, cnn2d-w)
on every layout a task can have, the cnn2d builder, and the existing presets left bit-identical."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import esper_fn as ef

cnn1d_width_preset = ef.hosts.cnn1d_width_preset
cnn2d_width_preset = ef.hosts.cnn2d_width_preset
mlp_width_preset = ef.hosts.mlp_width_preset

# Sample layouts (see esper_fn.tasks): flat vector, univariate series, multivariate series
# [length, channels], image [channels, height, width].
SHAPES = {"vector": (64,), "series": (150,), "multi": (100, 6), "image": (1, 28, 28)}


def _x(shape, n=8, seed=0):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def _state(host, seed=0):
    return ef.init(host, optimizer=ef.optim.adam(1e-2), generator=torch.Generator().manual_seed(seed))


# --- the existing presets are unchanged --------------------------------------------------------------

# sha256 (first 16 hex) of each preset's initial parameters (generator seed 0), config, slot specs and
# name, computed from commit 4dfe8ee, before the width families were added. Runs, checkpoints and
# results of these presets depend on them staying bit-identical.
BASELINE = {
    ("mlp-impaired", (40,), 10): "363a9a54b06e154a", ("mlp-impaired", (64,), 10): "8e402fd074559860",
    ("mlp-impaired", (150,), 2): "ebf5397a1b6302c5", ("mlp-impaired-deep", (40,), 10): "00b0acc4a17b39d4",
    ("mlp-impaired-deep", (64,), 10): "91eba34a11807d0a", ("mlp-impaired-deep", (150,), 2): "a2eeded8ae5c84f1",
    ("mlp-paper", (40,), 10): "f67934e513a978e8", ("mlp-paper", (64,), 10): "75ea06b6f8188fba",
    ("mlp-paper", (150,), 2): "0098ab56e2e9ce67", ("cnn-impaired", (40,), 10): "6e06eb1dc2216309",
    ("cnn-impaired", (64,), 10): "c8c944fa3425bdc0", ("cnn-impaired", (150,), 2): "34cb79595cb29c91",
    ("cnn-paper", (40,), 10): "5450956c00ebe503", ("cnn-paper", (64,), 10): "78022f6564113abb",
    ("cnn-paper", (150,), 2): "65ce86886da892d6", ("transformer-small", (40,), 10): "985458fbb7102723",
    ("transformer-small", (40, 1), 10): "985458fbb7102723", ("mlp-impaired", (2,), 2): "1234941f96689b95",
}  # fmt: skip


@pytest.mark.parametrize("key", sorted(BASELINE), ids=lambda k: f"{k[0]}{k[1]}")
def test_existing_presets_are_bit_identical(key):
    name, shape, k = key
    h = ef.hosts.preset(name, input_shape=shape, n_classes=k)
    p, _ = h.init_fn(torch.Generator().manual_seed(0))
    m = hashlib.sha256()
    for pk in sorted(p):
        m.update(pk.encode())
        m.update(p[pk].numpy().tobytes())
    m.update(repr(sorted(h.config.items())).encode())
    m.update(repr(h.slots()).encode())
    m.update(h.name.encode())
    assert m.hexdigest()[:16] == BASELINE[key]


def test_width_families_on_flat_vectors_are_the_existing_architectures():
    # mlp-w16 is mlp-impaired's 40-16-10 and cnn1d-w4 is cnn-impaired: same parameters from the same generator
    for new, old in (("mlp-w16", "mlp-impaired"), ("cnn1d-w4", "cnn-impaired")):
        a, b = _state(ef.hosts.preset(new)), _state(ef.hosts.preset(old))
        assert list(a.params_flat) == list(b.params_flat)
        assert all(torch.equal(a.params_flat[k], b.params_flat[k]) for k in a.params_flat)
        x = _x((40,))
        assert torch.equal(ef.apply(a, x), ef.apply(b, x))


# --- the families' forwards equal the documented architectures -------------------------------------


def _load(module: nn.Module, state: ef.State, mapping: dict[str, str]) -> nn.Module:
    with torch.no_grad():
        for dst, src in mapping.items():
            module.get_parameter(dst).copy_(state.params_flat[("host", *src.split("."))])
    return module


@pytest.mark.parametrize("layout", list(SHAPES))
def test_mlp_width_forward_equals_flatten_then_linear(layout):
    shape = SHAPES[layout]
    s = _state(ef.hosts.preset("mlp-w8", input_shape=shape, n_classes=3))
    f = math.prod(shape)
    # a multivariate series [length, channels] is read channels-first, so it flattens channel by channel
    view = (lambda x: x.transpose(-1, -2)) if layout == "multi" else (lambda x: x)
    net = _load(nn.Sequential(nn.Flatten(), nn.Linear(f, 8), nn.ReLU(), nn.Linear(8, 3)), s,
                {"1.weight": "fc1.weight", "1.bias": "fc1.bias", "3.weight": "fc2.weight", "3.bias": "fc2.bias"})
    x = _x(shape)
    torch.testing.assert_close(ef.apply(s, x), net(view(x)), rtol=1e-5, atol=1e-6)
    assert s.num_params() == f * 8 + 8 + 8 * 3 + 3


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("layout", ["series", "multi"])
def test_cnn1d_width_forward_equals_convs_then_linear(layout, layers):
    shape = SHAPES[layout]
    c = shape[1] if len(shape) == 2 else 1
    s = _state(cnn1d_width_preset(4, layers=layers, input_shape=shape, n_classes=4))
    mods, mapping, ch, length = [], {}, c, shape[0]
    for i, k in enumerate((5, 3)[:layers]):
        mods += [nn.Conv1d(ch, 4, k, stride=2, padding=1), nn.ReLU()]
        mapping |= {f"{2 * i}.weight": f"conv{i + 1}.weight", f"{2 * i}.bias": f"conv{i + 1}.bias"}
        ch, length = 4, (length + 2 - k) // 2 + 1
    mods += [nn.Flatten(), nn.Linear(4 * length, 4)]
    mapping |= {f"{len(mods) - 1}.weight": "fc.weight", f"{len(mods) - 1}.bias": "fc.bias"}
    net = _load(nn.Sequential(*mods), s, mapping)
    x = _x(shape)
    xin = x.unsqueeze(1) if len(shape) == 1 else x.transpose(1, 2)
    torch.testing.assert_close(ef.apply(s, x), net(xin), rtol=1e-5, atol=1e-6)
    expected = 4 * (5 * c + 1) + (4 * (3 * 4 + 1) if layers == 2 else 0) + (4 * length + 1) * 4
    assert s.num_params() == expected


def test_cnn2d_forward_equals_convs_then_linear_and_counts_its_parameters():
    s = _state(cnn2d_width_preset(4))
    net = _load(
        nn.Sequential(nn.Conv2d(1, 4, 3, 2, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, 2, 1), nn.ReLU(), nn.Flatten(),
                      nn.Linear(196, 10)),
        s, {"0.weight": "conv1.weight", "0.bias": "conv1.bias", "2.weight": "conv2.weight", "2.bias": "conv2.bias",
            "5.weight": "fc.weight", "5.bias": "fc.bias"})
    x = _x((1, 28, 28))
    torch.testing.assert_close(ef.apply(s, x), net(x), rtol=1e-5, atol=1e-6)
    assert s.num_params() == 2158 == 4 * 10 + 4 * 37 + 197 * 10
    # a non-square, 3-channel image
    h = ef.hosts.cnn2d((3, 5), (3, 5), image_shape=(3, 9, 12), n_classes=2, padding=2)
    assert ef.apply(_state(h), _x((3, 9, 12))).shape == (8, 2)


def test_docstring_parameter_counts():
    cases = {
        ("mlp-w16", (40,), 10): 826, ("mlp-w16", (150,), 2): 2450, ("mlp-w16", (100, 6), 4): 9684,
        ("mlp-w16", (784,), 10): 12730, ("mlp-w16", (1, 28, 28), 10): 12730,
        ("cnn1d-w4", (40,), 10): 486, ("cnn1d-w4", (150,), 2): 374, ("cnn1d-w4", (100, 6), 4): 580,
        ("cnn1d-shallow-w4", (40,), 10): 794, ("cnn1d-shallow-w4", (150,), 2): 618,
        ("cnn2d-w4", (1, 28, 28), 10): 2158, ("cnn2d-w8", (1, 28, 28), 10): 4594,
        ("cnn2d-w16", (1, 28, 28), 10): 10330,
    }  # fmt: skip
    for (name, shape, k), n in cases.items():
        assert _state(ef.hosts.preset(name, input_shape=shape, n_classes=k)).num_params() == n, (name, shape)
    assert "2,450" in mlp_width_preset.__doc__ and "9,684" in mlp_width_preset.__doc__
    assert "374" in cnn1d_width_preset.__doc__ and "10,330" in cnn2d_width_preset.__doc__


# --- slots: kinds and shapes, so the catalogue's seeds attach --------------------------------------


def test_slot_specs_follow_the_layout():
    def kinds(host):
        return {s.name: (s.kind, s.shape) for s in host.slots()}

    assert kinds(ef.hosts.preset("mlp-w8", input_shape=(150,), n_classes=2))["input"] == ("vector", (150,))
    assert kinds(ef.hosts.preset("mlp-w8", input_shape=(100, 6), n_classes=4))["input"] == ("conv1d", (6, 100))
    assert kinds(ef.hosts.preset("mlp-w8", input_shape=(1, 28, 28)))["input"] == ("conv2d", (1, 28, 28))
    assert kinds(ef.hosts.preset("cnn1d-w4", input_shape=(100, 6), n_classes=4)) == {
        "input": ("conv1d", (6, 100)), "conv1": ("conv1d", (4, 49)), "conv2": ("conv1d", (4, 25)), "fc": ("vector", (4,))}
    assert kinds(ef.hosts.preset("cnn2d-w4")) == {
        "input": ("conv2d", (1, 28, 28)), "conv1": ("conv2d", (4, 14, 14)), "conv2": ("conv2d", (4, 7, 7)),
        "fc": ("vector", (10,))}
    spec = ef.hosts.preset("mlp-w8", input_shape=(1, 28, 28)).slot("fc1")
    assert (spec.consumer, spec.consumer_out, spec.activation) == ("fc2", 10, "relu")  # width growth applies
    assert ef.hosts.preset("cnn2d-w4").slot("conv2").in_shape == (4, 14, 14)
    # configs record the layout only where it is not a flat vector (checkpoints of old hosts stay valid)
    assert "input_shape" not in ef.hosts.preset("mlp-w8").config
    assert ef.hosts.preset("mlp-w8", input_shape=(100, 6), n_classes=4).config["input_shape"] == [100, 6]
    assert ef.hosts.preset("cnn1d-w4", input_shape=(100, 6), n_classes=4).config["in_channels"] == 6
    assert "in_channels" not in ef.hosts.preset("cnn1d-w4").config


# (preset, layout) -> {slot: blueprints that must fit there}: what the heuristics graft (conv1d_k3/k5 on
# signals, mlp_gelu on hidden vectors) and a conv2d seed on images.
MUST_FIT = {
    ("mlp-w4", "vector"): {"fc1": {"mlp_gelu", "lora_r4", "width_k4"}},
    ("mlp-w4", "series"): {"input": {"conv1d_k3", "conv1d_k5"}, "fc1": {"mlp_gelu"}},
    ("mlp-w4", "multi"): {"input": {"conv1d_k3", "conv1d_k5"}, "fc1": {"mlp_gelu"}},
    ("mlp-w4", "image"): {"input": {"conv2d_k3", "conv2d_dwsep"}, "fc1": {"mlp_gelu"}},
    ("cnn1d-w4", "series"): {"input": {"conv1d_k3", "conv1d_k5"}, "conv1": {"conv1d_k3", "conv1d_k5"}},
    ("cnn1d-w4", "multi"): {"input": {"conv1d_k3", "conv1d_k5"}, "conv2": {"conv1d_k3"}},
    ("cnn1d-shallow-w4", "multi"): {"input": {"conv1d_k5"}, "conv1": {"conv1d_k3", "conv1d_k5"}},
    ("cnn2d-w4", "image"): {"input": {"conv2d_k3"}, "conv1": {"conv2d_k3", "conv2d_bottleneck"}},
}


@pytest.mark.parametrize("key", list(MUST_FIT), ids=lambda k: f"{k[0]}-{k[1]}")
def test_germination_preserves_function_at_every_slot_and_prune_restores_it(key):
    name, layout = key
    shape = SHAPES[layout]
    s = _state(ef.hosts.preset(name, input_shape=shape, n_classes=3))
    x, y = _x(shape), torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(1))
    s, _ = ef.train_step(s, x, y)
    base = ef.apply(s, x)
    g = torch.Generator().manual_seed(2)
    fitted = {}
    for slot in s.slot_names:
        for bid, bp in ef.blueprints.registry().items():
            if not bp.fits(s.spec(slot)) or bp.meta.requires_capability:
                continue
            fitted.setdefault(slot, set()).add(bp.meta.name)
            grafted = ef.germinate(s, slot, bid, generator=g)
            assert torch.equal(ef.apply(grafted, x), base), (slot, bid)
            # at alpha 1 (HOLDING), where the whole seed output counts: it must be born silent
            held = ef.advance(ef.advance(ef.advance(grafted, slot), slot), slot, force=True)
            assert (ef.apply(held, x) - base).abs().max() <= 1e-6, (slot, bid)
            assert torch.equal(ef.apply(ef.prune(held, slot), x), base), (slot, bid)
    for slot, need in MUST_FIT[key].items():
        assert need <= fitted.get(slot, set()), (slot, need - fitted.get(slot, set()))


@pytest.mark.parametrize("name,layout,slot,bid", [("mlp-w4", "image", "input", "conv2d_k3"),
                                                  ("cnn2d-w4", "image", "conv1", "conv2d_k3"),
                                                  ("mlp-w4", "multi", "input", "conv1d_k5"),
                                                  ("cnn1d-w4", "multi", "conv1", "conv1d_k3")])
def test_seeded_hosts_train_blend_and_export(name, layout, slot, bid):
    shape = SHAPES[layout]
    s = _state(ef.hosts.preset(name, input_shape=shape, n_classes=3))
    x, y = _x(shape, n=16), torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(1))
    s = ef.advance(ef.germinate(s, slot, bid, generator=torch.Generator().manual_seed(3), tempo=2), slot)
    before = ef.apply(s, x)
    for _ in range(3):  # TRAINING: the seed learns, the live output is the host's
        s, m = ef.train_step(s, x, y)
        assert torch.isfinite(m["loss"])
    s = ef.tick(ef.advance(s, slot))  # BLENDING
    s, _ = ef.train_step(s, x, y)
    assert not torch.equal(ef.apply(s, x), before)
    torch.testing.assert_close(ef.export(s)(x), ef.apply(s, x), rtol=1e-5, atol=1e-6)


def test_stacked_width_hosts_match_single_hosts():
    # per-host conv seeds on a raw multichannel series and a raw image, vmapped over the stack
    for name, shape, bid in (("mlp-w4", (100, 6), "conv1d_k5"), ("cnn2d-w4", (1, 28, 28), "conv2d_k3")):
        host = ef.hosts.preset(name, input_shape=shape, n_classes=3)
        states = []
        for i in range(3):
            s = ef.germinate(_state(host, seed=i), "input", bid, generator=torch.Generator().manual_seed(10 + i))
            s = ef.advance(ef.advance(ef.advance(s, "input"), "input"), "input", force=True)
            s, _ = ef.train_step(s, _x(shape, seed=i), torch.zeros(8, dtype=torch.int64))  # seeds leave zero
            states.append(s)
        x = _x(shape)
        stacked = ef.apply(ef.stack(states), x.expand(3, *x.shape))
        for i, st in enumerate(states):
            torch.testing.assert_close(stacked[i], ef.apply(st, x), rtol=1e-5, atol=1e-6)


# --- errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,shape,msg", [
    ("cnn1d-w4", (1, 28, 28), r"1D CNN over series .*\(40,\).*\(1, 28, 28\).*cnn2d-w"),
    ("cnn1d-shallow-w8", (2,), r"cnn1d-shallow-w8.*\(40,\).*\(2,\).*reduces length 2"),
    ("cnn2d-w4", (40,), r"2D CNN over images .*\(1, 28, 28\).*\(40,\)"),
    ("cnn2d-w4", (100, 6), r"cnn2d-w4.*\(100, 6\)"),
    ("cnn2d-w8", (1, 1, 5), r"at least 2 x 2 pixels.*\(1, 1, 5\)"),
    ("mlp-w4", (2, 3, 4, 5), r"mlp-w4.*\(40,\).*\(2, 3, 4, 5\)"),
    ("mlp-impaired", (100, 6), r"mlp-impaired.*\(40,\).*\(100, 6\).*mlp-w16"),
    ("cnn-impaired", (100, 6), r"cnn-impaired.*\(40,\).*\(100, 6\).*cnn1d-w4"),
])  # fmt: skip
def test_a_host_that_cannot_take_the_shape_names_both(name, shape, msg):
    with pytest.raises(ef.HostError, match=msg):
        ef.hosts.preset(name, input_shape=shape, n_classes=3)


def test_builder_argument_errors():
    with pytest.raises(ef.HostError, match="width must be a positive int, got 0"):
        mlp_width_preset(0)
    with pytest.raises(ef.HostError, match="depth must be a positive int"):
        mlp_width_preset(4, depth=0)
    with pytest.raises(ef.HostError, match="layers must be a positive int"):
        cnn1d_width_preset(4, layers=0)
    with pytest.raises(ef.HostError, match=r"input_shape \(3, 4\) .* widths\[0\] = 10"):
        ef.hosts.mlp((10, 4, 2), input_shape=(3, 4))
    with pytest.raises(ef.HostError, match="in_channels"):
        ef.hosts.cnn1d(in_channels=0)
    with pytest.raises(ef.HostError, match=r"image_shape must be \(channels, height, width\)"):
        ef.hosts.cnn2d(image_shape=(28, 28))
    with pytest.raises(ef.HostError, match="one positive kernel per conv layer"):
        ef.hosts.cnn2d((4, 4), (3,))
    # a builder with another width or depth, not registered as a preset
    assert mlp_width_preset(12, depth=2, input_shape=(24,), n_classes=2).name == "mlp-d2-w12"
    assert cnn1d_width_preset(6, layers=3).name == "cnn1d-l3-w6"


def test_width_presets_are_registered_with_their_builders():
    presets = ef.hosts.hosts()
    for name in ("mlp-w4", "mlp-w64", "cnn1d-w8", "cnn1d-shallow-w16", "cnn2d-w8"):
        b = presets[name]
        assert b.keywords["name"] == name and b.func.__doc__
        assert ef.hosts.preset(name).name == name
    assert presets["cnn1d-shallow-w8"].keywords["layers"] == 1
    assert len(_state(presets["cnn2d-w4"]()).slot_names) == 4  # defaults: MNIST-5k images


def test_conv2d_function_is_pure_and_unchanged_by_slots():
    # the identity slot function gives the plain convolutional forward (no seed is computed)
    h = ef.hosts.cnn2d()
    p, _ = h.init_fn(torch.Generator().manual_seed(0))
    x = _x((1, 28, 28))
    z = F.relu(F.conv2d(x, p["conv1.weight"], p["conv1.bias"], stride=2, padding=1))
    z = F.relu(F.conv2d(z, p["conv2.weight"], p["conv2.bias"], stride=2, padding=1))
    want = F.linear(z.flatten(1), p["fc.weight"], p["fc.bias"])
    before = {k: v.clone() for k, v in p.items()}
    got, buffers = h.forward_fn(p, x, lambda name, t, x_in=None: t, False)
    assert torch.equal(got, want) and buffers == {}
    assert all(torch.equal(p[k], before[k]) for k in p)
