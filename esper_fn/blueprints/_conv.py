"""Convolutional seeds on signal slots: residual Conv1d blocks (plain, depthwise-separable,
bottleneck). "vector" slots are read as one-channel signals ([B, d] -> [B, 1, d]), so a conv seed on a
host's input slot works on the raw MNIST-1D signal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._blueprint import Blueprint, BlueprintMeta, register
from ._common import channels_first, restore_layout, signal_shape, uniform

SIGNAL_KINDS = ("vector", "conv1d")


def _conv1d_plain(kernel: int, hidden: int) -> Blueprint:
    """``x + alpha * conv_k(relu(conv_k(x)))``: C -> hidden -> C channels, 'same' padding,
    second conv zero-initialised. On the MLP input slot (C = 1, k = 5, hidden 16): 177 parameters."""
    pad = kernel // 2

    def init(spec, g):
        c, _ = signal_shape(spec)
        return {"w1": uniform((hidden, c, kernel), c * kernel, g), "b1": uniform((hidden,), c * kernel, g),
                "w2": torch.zeros(c, hidden, kernel), "b2": torch.zeros(c)}, {}

    def apply(p, h, x_in, spec, train):
        z = channels_first(h, spec.kind)
        z = F.conv1d(F.relu(F.conv1d(z, p["w1"], p["b1"], padding=pad)), p["w2"], p["b2"], padding=pad)
        return restore_layout(z, spec.kind)

    def count(spec):
        c, _ = signal_shape(spec)
        return 2 * c * hidden * kernel + hidden + c

    def flops(spec):
        c, length = signal_shape(spec)
        return 2 * c * hidden * kernel * length

    meta = BlueprintMeta(
        name=f"conv1d_k{kernel}", version="1.0.0", slot_kinds=SIGNAL_KINDS, risk_score=0.2,
        description=f"residual Conv1d block, kernel {kernel}, C -> {hidden} -> C channels, output conv zero-initialised",
        hyperparams={"kernel": kernel, "hidden": hidden},
    )
    return Blueprint(meta, init, apply, count, flops,
                     check=lambda s: None if signal_shape(s)[1] >= kernel // 2 + 1 else "the signal is shorter than the kernel")


for _bp in (_conv1d_plain(5, 16), _conv1d_plain(3, 16)):
    register(_bp)
