"""`export(state)(x)` equals `apply(state, x)` on wrapped attention models, with gradients on or off.

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
