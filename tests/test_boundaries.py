"""The library's boundary: wrapped hosts drawn from a generator, one rule for the blueprints offered
at a slot, donated states that cannot be reused, and batches checked against the host's input."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import esper_fn as ef
from esper_fn.training import evaluate, telemetry


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- item 6: init(host, generator=...) re-initialises a wrapped host ------------------------------------


def _mixed_net() -> nn.Module:
    torch.manual_seed(123)  # the module's own weights; `init` with a generator must not reuse them
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 5 * 5, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 4))


def test_init_with_a_generator_redraws_a_wrapped_host():
    net = _mixed_net()
    x = torch.randn(6, 1, 5, 5, generator=_gen(0))
    with torch.no_grad():  # the module has trained BatchNorm statistics: a fresh init resets them
        net.train()(x * 3 + 1)
    host = ef.wrap(net, x, slots=[nn.Linear])
    own = ef.init(host)
    for name, p in net.named_parameters():  # no generator: the module's weights, exactly
        assert torch.equal(own.params_flat[("host", *name.split("."))], p.detach())
    a, a2, b = ef.init(host, generator=_gen(1)), ef.init(host, generator=_gen(1)), ef.init(host, generator=_gen(2))
    for k in a.params_flat:
        assert torch.equal(a.params_flat[k], a2.params_flat[k])  # deterministic given the generator
    conv_w, lin_w = ("host", "0", "weight"), ("host", "4", "weight")
    for k in (conv_w, ("host", "0", "bias"), lin_w, ("host", "4", "bias"), ("host", "7", "weight")):
        assert not torch.equal(a.params_flat[k], b.params_flat[k]), k  # a seed sweep draws new weights
        assert not torch.equal(a.params_flat[k], own.params_flat[k]), k
    assert not torch.equal(ef.apply(a, x), ef.apply(b, x))
    # each layer's own reset rule: kaiming-uniform(a=sqrt(5)) weights and U(+-1/sqrt(fan_in)) biases,
    # norms at 1 / 0 and BatchNorm statistics reset
    for k, fan_in in ((conv_w, 1 * 3 * 3), (("host", "0", "bias"), 9), (lin_w, 75), (("host", "4", "bias"), 75)):
        assert a.params_flat[k].abs().max() <= 1 / math.sqrt(fan_in)
    for k, v in ((("host", "1", "weight"), 1.0), (("host", "1", "bias"), 0.0), (("host", "5", "weight"), 1.0),
                 (("host", "5", "bias"), 0.0)):
        assert torch.equal(a.params_flat[k], torch.full_like(a.params_flat[k], v)), k
    assert torch.equal(a.buffers_flat[("host", "1", "running_mean")], torch.zeros(3))
    assert torch.equal(a.buffers_flat[("host", "1", "running_var")], torch.ones(3))
    assert not torch.equal(own.buffers_flat[("host", "1", "running_var")], torch.ones(3))


def test_the_reset_rules_are_torchs_drawn_from_the_generator_in_parameter_order():
    x = torch.randn(4, 6)
    host = ef.wrap(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)), x)
    s = ef.init(host, generator=_gen(7))
    g, want = _gen(7), {}
    for name, (o, i) in (("0", (5, 6)), ("2", (2, 5))):
        w = torch.empty(o, i)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=g)
        b = torch.empty(o).uniform_(-1 / math.sqrt(i), 1 / math.sqrt(i), generator=g)
        want[name] = (w, b)
    for name, (w, b) in want.items():
        assert torch.equal(s.params_flat[("host", name, "weight")], w)
        assert torch.equal(s.params_flat[("host", name, "bias")], b)


def test_embeddings_and_attention_are_redrawn_too():
    T = 5

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 8, padding_idx=0)
            self.att = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, tokens):
            h = self.emb(tokens)
            return self.head(self.att(h, h, h, need_weights=False)[0].mean(1))

    tokens = torch.randint(0, 11, (4, T), generator=_gen(0))
    host = ef.wrap(Seq(), tokens, slots=[nn.MultiheadAttention])
    a, b = ef.init(host, generator=_gen(1)), ef.init(host, generator=_gen(2))
    assert not torch.equal(a.params_flat[("host", "emb", "weight")], b.params_flat[("host", "emb", "weight")])
    assert torch.equal(a.params_flat[("host", "emb", "weight")][0], torch.zeros(8))  # the padding row
    assert not torch.equal(a.params_flat[("host", "att", "in_proj_weight")],
                           b.params_flat[("host", "att", "in_proj_weight")])
    assert torch.equal(a.params_flat[("host", "att", "in_proj_bias")], torch.zeros(24))
    assert torch.equal(a.params_flat[("host", "att", "out_proj", "bias")], torch.zeros(8))


def test_a_parameter_without_a_reset_rule_refuses_the_generator():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)
            self.scale = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return self.lin(x) * self.scale

    host = ef.wrap(Scaled(), torch.randn(2, 4))
    with pytest.raises(ef.HostError) as e:
        ef.init(host, generator=_gen(0))
    msg = str(e.value)
    assert "'scale'" in msg and "Scaled" in msg and "without a generator" in msg
    s = ef.init(host)  # the module's own weights still work
    assert torch.equal(s.params_flat[("host", "scale")], torch.ones(3))
    assert host.slots()[0].name == "input"  # shape queries never need a generator


# --- item 7: one rule decides which blueprints a slot offers ----------------------------------------------


def test_the_blueprint_error_offers_exactly_what_legal_actions_offers():
    s = ef.init(ef.hosts.mlp((40, 16, 10)), generator=_gen(0))
    with pytest.raises(ef.BlueprintError) as e:
        ef.germinate(s, "fc1", "attention_mhsa")  # a sequence design at a vector slot
    offered = re.search(r"Blueprints that fit 'fc1': \[(.*?)\]", str(e.value)).group(1)
    listed = [b.strip().strip("'") for b in offered.split(",")]
    assert listed == list(ef.legal_actions(s)["fc1"]["blueprints"])
    assert "allreduce_shard@2.0.0" not in listed and "mlp_gelu@1.0.0" in listed
    assert ef.blueprints.offered(s.spec("fc1")) == tuple(listed)
    every = ef.blueprints.offered(s.spec("fc1"), capabilities=frozenset({"distributed"}))
    assert "allreduce_shard@2.0.0" in every
    assert every == ef.legal_actions(s, capabilities=frozenset({"distributed"}))["fc1"]["blueprints"]


# --- item 8: a donated state cannot be used again ----------------------------------------------------------


def test_reusing_a_donated_state_raises():
    g = _gen(0)
    x, y = torch.randn(16, 40, generator=g), torch.randint(0, 10, (16,), generator=g)
    s0 = ef.init(ef.hosts.mlp((40, 16, 10)), generator=g)
    s1, _ = ef.train_step(s0, x, y)
    before = {k: v.clone() for k, v in s1.params_flat.items()}
    s2, _ = ef.train_step(s1, x, y, donate=True)  # s1's fresh tensors are updated in place
    assert any(not torch.equal(before[k], s1.params_flat[k]) for k in before)  # what reuse would train from
    for reuse in (lambda: ef.train_step(s1, x, y), lambda: ef.apply(s1, x), lambda: ef.tick(s1),
                  lambda: ef.germinate(s1, "fc1", "mlp_gelu", generator=g), lambda: ef.state_to_tensors(s1),
                  lambda: ef.train_step(s1, x, y, donate=True), lambda: evaluate(s1, x, y),
                  lambda: s1.replace(), lambda: ef.stack([s1, s1])):
        with pytest.raises(ef.DonatedStateError, match="donate=True") as e:
            reuse()
        assert isinstance(e.value, RuntimeError)
    s3, _ = ef.train_step(s2, x, y)  # the new state is fine
    assert torch.isfinite(ef.apply(s3, x)).all()
    # a donating call that gave nothing up (the caller's own state: nothing it holds is exclusive)
    # leaves it usable
    snap = ef.apply(s0, x)
    ef.train_step(s0, x, y, donate=True)
    assert torch.equal(ef.apply(s0, x), snap)


# --- item 9: batches are checked against the host's input ----------------------------------------------


def test_wrap_refuses_an_unbatched_example():
    net = nn.Sequential(nn.Linear(40, 16), nn.ReLU(), nn.Linear(16, 10))
    with pytest.raises(ef.HostError, match=r"\[40\].*must be a batch.*x\[None\]"):
        ef.wrap(net, torch.randn(40))
    ef.wrap(net, torch.randn(1, 40))


def test_a_float64_batch_into_a_float32_state_is_a_host_error():
    g = _gen(0)
    s = ef.init(ef.hosts.mlp((40, 16, 10)), generator=g)
    x, y = torch.randn(8, 40, generator=g), torch.randint(0, 10, (8,), generator=g)
    for call in (lambda: ef.apply(s, x.double()), lambda: ef.train_step(s, x.double(), y),
                 lambda: evaluate(s, x.double(), y), lambda: telemetry(s, (x.double(), y), {})):
        with pytest.raises(ef.HostError) as e:
            call()
        assert "float64" in str(e.value) and "float32" in str(e.value) and ".float()" in str(e.value)


def test_a_flat_batch_into_a_conv_host_is_a_host_error():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 26 * 26, 10))
    host = ef.wrap(net, torch.zeros(2, 1, 28, 28), slots=[nn.Conv2d])
    s = ef.init(host)
    flat = torch.zeros(4, 784)
    with pytest.raises(ef.HostError) as e:
        ef.train_step(s, flat, torch.zeros(4, dtype=torch.long))
    msg = str(e.value)
    assert "[4, 784]" in msg and "[B, 1, 28, 28]" in msg and "reshape" in msg
    assert ef.apply(s, flat.view(4, 1, 28, 28)).shape == (4, 10)
    # built-in hosts too: a [B, 40, 1] batch into the MLP, and stacked states see [N, B, ...]
    mlp = ef.init(ef.hosts.mlp((40, 16, 10)))
    with pytest.raises(ef.HostError, match=r"\[B, 40\].*\[3, 40, 1\]"):
        ef.apply(mlp, torch.zeros(3, 40, 1))
    stacked = ef.stack([mlp, mlp])
    assert ef.apply(stacked, torch.zeros(2, 3, 40)).shape == (2, 3, 10)
    with pytest.raises(ef.HostError, match=r"\[N, B, 40\]"):
        ef.apply(stacked, torch.zeros(2, 3, 41))


def test_the_transformer_takes_tokens_or_values():
    tok = ef.init(ef.hosts.transformer(seq_len=6, d_model=8, n_heads=2, n_layers=1, vocab_size=9))
    assert ef.apply(tok, torch.randint(0, 9, (3, 6))).shape == (3, 10)
    with pytest.raises(ef.HostError, match="int64"):
        ef.apply(tok, torch.zeros(3, 6))
    vals = ef.init(ef.hosts.transformer(seq_len=6, d_model=8, n_heads=2, n_layers=1))
    assert ef.apply(vals, torch.zeros(3, 6)).shape == ef.apply(vals, torch.zeros(3, 6, 1)).shape == (3, 10)
    with pytest.raises(ef.HostError, match=r"\[3, 7\]"):
        ef.apply(vals, torch.zeros(3, 7))
    assert F.cross_entropy(ef.apply(vals, torch.zeros(3, 6)), torch.zeros(3, dtype=torch.long)).isfinite()


def test_a_sweep_of_bad_inputs_raises_typed_errors_only():
    """Every bad input at the library's boundary is an EsperError of the matching kind, never a raw
    torch error (the whole sweep runs; each case names what it checks)."""
    g = _gen(0)
    mlp = ef.init(ef.hosts.mlp((40, 16, 10)), generator=g)
    cnn = ef.init(ef.hosts.cnn1d(), generator=g)
    x, y = torch.randn(8, 40, generator=g), torch.randint(0, 10, (8,), generator=g)
    holding = ef.advance(ef.advance(ef.advance(ef.germinate(mlp, "fc1", "mlp_gelu", generator=g, tempo=1), "fc1"),
                                    "fc1", force=True), "fc1", force=True)
    cases = {
        "wider samples": (ef.HostError, lambda: ef.apply(mlp, torch.zeros(8, 41))),
        "one unbatched sample": (ef.HostError, lambda: ef.apply(mlp, torch.zeros(40))),
        "float64 batch": (ef.HostError, lambda: ef.train_step(mlp, x.double(), y)),
        "integer batch": (ef.HostError, lambda: ef.train_step(mlp, x.long(), y)),
        "a list, not a tensor": (ef.HostError, lambda: ef.apply(mlp, x.tolist())),
        "channels added to a 1D CNN's signal": (ef.HostError, lambda: ef.apply(cnn, x[:, None, :])),
        "float64 into evaluate": (ef.HostError, lambda: evaluate(cnn, x.double(), y)),
        "shorter validation samples": (ef.HostError, lambda: telemetry(mlp, (x[:, :39], y), {})),
        "a stacked state without its host dimension": (ef.GraftError, lambda: ef.apply(ef.stack([mlp, mlp]), x)),
        "an unknown blueprint": (ef.BlueprintError, lambda: ef.germinate(mlp, "fc1", "lora_r3")),
        "an unknown slot": (ef.HostError, lambda: ef.germinate(mlp, "fc9", "lora_r4")),
        "fossilize without telemetry": (ef.MissingTelemetryError, lambda: ef.fossilize(holding, "fc1")),
        "a misspelled telemetry key": (ef.MissingTelemetryError,
                                       lambda: ef.fossilize(holding, "fc1", telemetry={"fc1/contrib": 1.0})),
    }
    for what, (kind, call) in cases.items():
        with pytest.raises(ef.EsperError) as e:
            call()
        assert isinstance(e.value, kind), (what, e.value)
        assert len(str(e.value)) > 40, (what, str(e.value))  # says what, why and how to fix
    with pytest.raises(ef.HostError, match=r"x\[None\]"):
        ef.apply(mlp, torch.zeros(40))
