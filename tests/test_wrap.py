"""`wrap` records what each slot carries: its dtype decides whether a seed can attach there.

A seed adds a floating-point delta, so a slot on integer tokens (the input of a model that starts
with `nn.Embedding`) must offer no blueprint and refuse germination with a typed error, while the
slots after the embedding work as usual. Checkpoints do not store slot specs: they are derived from
the host, so a restored state has the same specs (dtypes included).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import esper_fn as ef
from esper_fn import Op, Stage
from esper_fn._serialize import state_from_tensors, state_to_tensors
from esper_fn.checkpoint import CheckpointManager

VOCAB, T, D, CLASSES, B = 20, 5, 8, 4, 16


def _token_model() -> nn.Module:
    torch.manual_seed(0)  # the module's own init; esper_fn never touches the global RNG
    return nn.Sequential(nn.Embedding(VOCAB, D), nn.Flatten(), nn.Linear(T * D, CLASSES))


def _token_host() -> ef.Host:
    # Slots: "input" (int64 tokens), "0" after the embedding ([B, T, D] floats), "2" after the Linear.
    return ef.wrap(_token_model(), torch.zeros(2, T, dtype=torch.long), slots=["0", nn.Linear])


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (B, T), generator=g), torch.randint(0, CLASSES, (B,), generator=g)


def _blend_in(state: ef.State, slot: str, bid: str) -> ef.State:
    s = ef.germinate(state, slot, bid, generator=torch.Generator().manual_seed(1), tempo=1)
    s = ef.tick(ef.advance(ef.advance(s, slot), slot))
    assert s.stage(slot) == Stage.BLENDING and float(s.slots["alpha"][s.index(slot)]) == 1.0
    return s


def test_wrap_records_slot_dtypes():
    specs = {s.name: s for s in _token_host().slots()}
    assert list(specs) == ["input", "0", "2"]
    assert specs["input"].dtype == torch.int64
    assert specs["0"].dtype == torch.float32 and specs["0"].kind == "sequence" and specs["0"].shape == (T, D)
    assert specs["2"].dtype == torch.float32

    torch.manual_seed(0)
    double = ef.wrap(nn.Sequential(nn.Linear(6, 3)).double(), torch.zeros(2, 6, dtype=torch.float64))
    assert {s.name: s.dtype for s in double.slots()} == {"input": torch.float64, "0": torch.float64}


def test_builtin_hosts_have_float_slots():
    for host in (ef.hosts.mlp((40, 16, 10)), ef.hosts.cnn1d(),
                 ef.hosts.transformer(seq_len=6, d_model=16, n_heads=2, n_layers=1, vocab_size=VOCAB)):
        assert all(s.dtype == torch.float32 for s in host.slots()), host.name
    # The token transformer's input slot follows its embedding: it carries floats and offers seeds.
    tok = ef.init(ef.hosts.transformer(seq_len=6, d_model=16, n_heads=2, n_layers=1, vocab_size=VOCAB))
    assert "attention_mhsa@1.0.0" in ef.legal_actions(tok)["input"]["blueprints"]


def test_integer_token_slot_offers_no_blueprint():
    s0 = ef.init(_token_host())
    legal = ef.legal_actions(s0)
    assert legal["input"]["blueprints"] == () and Op.GERMINATE not in legal["input"]["ops"]
    # The float slots after the embedding and after the Linear still offer their blueprints.
    assert "attention_mhsa@1.0.0" in legal["0"]["blueprints"] and Op.GERMINATE in legal["0"]["ops"]
    assert "mlp_gelu@1.0.0" in legal["2"]["blueprints"]

    spec = s0.spec("input")
    for bid, bp in ef.blueprints.registry().items():
        why = bp.misfit(spec)
        assert why is not None and why.startswith("slot 'input' carries int64 tokens"), bid


@pytest.mark.parametrize("bid", ["activation_tap", "mlp_gelu", "conv1d_k5", "rmsnorm", "grad_clamp"])
def test_germinate_on_integer_tokens_raises(bid):
    s0 = ef.init(_token_host())
    with pytest.raises(ef.BlueprintError, match="carries int64 tokens; seeds add a float delta"):
        ef.germinate(s0, "input", bid)


def test_float_slots_of_a_token_model_grow():
    s0 = ef.init(_token_host())
    x, y = _data()
    base = ef.apply(s0, x)
    s = _blend_in(_blend_in(s0, "0", "attention_mhsa"), "2", "mlp_gelu")
    assert (ef.apply(s, x) - base).abs().max() <= 1e-6  # zero delta at birth, fully blended in
    for _ in range(3):
        s, metrics = ef.train_step(s, x, y)
        assert torch.isfinite(metrics["loss"])
    for slot in ("0", "2"):
        pruned = ef.prune(s, slot)
        assert (ef.apply(s, x) - ef.apply(pruned, x)).abs().max() > 1e-6, f"the seed at {slot!r} learned nothing"
    assert (ef.export(s)(x) - ef.apply(s, x)).detach().abs().max() <= 1e-6


def test_checkpoint_round_trip_keeps_slot_dtypes(tmp_path):
    """Slot specs are derived from the host, never stored: a restored state has the same ones."""
    host = _token_host()
    x, y = _data()
    s = _blend_in(ef.init(host), "2", "mlp_gelu")
    s, _ = ef.train_step(s, x, y)
    tensors, meta = state_to_tensors(s)
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, tensors, {"state": meta})
    loaded, loaded_meta = mgr.restore(1)
    r = state_from_tensors(host, loaded, loaded_meta["state"])
    assert [r.spec(n) for n in r.slot_names] == [s.spec(n) for n in s.slot_names]
    assert r.spec("input").dtype == torch.int64
    assert torch.equal(ef.apply(r, x), ef.apply(s, x))
    assert ef.legal_actions(r) == ef.legal_actions(s)
    with pytest.raises(ef.BlueprintError, match="carries int64 tokens"):
        ef.germinate(r, "input", "mlp_gelu")
