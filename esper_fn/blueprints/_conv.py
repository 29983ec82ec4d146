"""Convolutional seeds on signal slots: residual Conv1d blocks (plain ``conv1d_k5``/``conv1d_k3``,
depthwise-separable ``conv1d_dwsep``, bottleneck ``conv1d_bottleneck``). "vector" slots are read as
one-channel signals ([B, d] -> [B, 1, d]), so a conv seed on a host's input slot works on the raw
MNIST-1D signal. Every block's last conv is zero-initialised, so the delta is 0 at germination.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._blueprint import Blueprint, BlueprintMeta, register
from ._common import channels_first, conv_module, restore_layout, signal_shape, uniform

SIGNAL_KINDS = ("vector", "conv1d")


def _shifted_block(z: torch.Tensor, p: dict, kernel: int, dilation: int = 1) -> torch.Tensor:
    """``conv_k(relu(conv_k(z)))`` with 'same' padding (taps `dilation` apart), as matmuls over
    shifted slices (the same function as the `F.conv1d` pair, to float rounding).

    Used where the block's weights are per-host (vmapped over stacked hosts): there `F.conv1d`
    becomes a grouped convolution whose oneDNN backward is slower than separate calls, while these
    matmuls batch (8 stacked MNIST-1D hosts, forward + backward: ~2.3x faster, docs/benchmarks.md).
    The first conv multiplies the K shifted copies of the C-channel input ([B, L, C*K]) by its
    weights; the second computes every tap of every output channel in one matmul and sums the taps
    along their shifts, so the hidden activation is never copied K times.
    """
    pad = dilation * (kernel // 2)
    b, c, length = z.shape
    zp = F.pad(z, (pad, pad))
    cols = torch.stack([zp[..., j * dilation:j * dilation + length] for j in range(kernel)], -1)  # [B, C, L, K]
    cols = cols.permute(0, 2, 1, 3).reshape(b, length, c * kernel)
    hid = F.relu(cols @ p["w1"].reshape(p["w1"].shape[0], -1).t() + p["b1"])  # [B, L, hidden]
    taps = F.pad(hid, (0, 0, pad, pad)) @ p["w2"].permute(1, 0, 2).reshape(hid.shape[-1], -1)  # [B, L + 2p, C*K]
    taps = taps.reshape(b, length + 2 * pad, c, kernel)
    out = taps[:, 0:length, :, 0]
    for j in range(1, kernel):
        out = out + taps[:, j * dilation:j * dilation + length, :, j]
    return (out + p["b2"]).transpose(1, 2)  # [B, C, L]


def conv1d_block(kernel: int, hidden: int, dilation: int = 1) -> Blueprint:
    """``x + alpha * conv_k(relu(conv_k(x)))``: C -> hidden -> C channels, 'same' padding,
    second conv zero-initialised. On the MLP input slot (C = 1, k = 5, hidden 16): 177 parameters.
    With ``dilation`` d > 1 both convs space their taps d apart (receptive field ``2 d (k - 1) + 1``,
    same parameters); the catalogue's designs have d = 1, Karn's conv1d family varies it."""
    pad = dilation * (kernel // 2)
    reach = pad + 1  # the shortest signal whose every output sees a real sample at the farthest tap

    def init(spec, g):
        c, _ = signal_shape(spec)
        return {"w1": uniform((hidden, c, kernel), c * kernel, g), "b1": uniform((hidden,), c * kernel, g),
                "w2": torch.zeros(c, hidden, kernel), "b2": torch.zeros(c)}, {}

    def apply(p, h, x_in, spec, train):
        z = channels_first(h, spec.kind)
        if torch._C._functorch.is_batchedtensor(p["w1"]):  # per-host weights of stacked hosts
            return restore_layout(_shifted_block(z, p, kernel, dilation), spec.kind)
        z = F.conv1d(F.relu(F.conv1d(z, p["w1"], p["b1"], padding=pad, dilation=dilation)), p["w2"], p["b2"],
                     padding=pad, dilation=dilation)
        return restore_layout(z, spec.kind)

    def count(spec):
        c, _ = signal_shape(spec)
        return 2 * c * hidden * kernel + hidden + c

    def flops(spec):
        c, length = signal_shape(spec)
        return 2 * c * hidden * kernel * length

    dil = "" if dilation == 1 else f", dilation {dilation}"
    meta = BlueprintMeta(
        name=f"conv1d_k{kernel}", version="1.0.0", slot_kinds=SIGNAL_KINDS, risk_score=0.2,
        description=f"residual Conv1d block, kernel {kernel}{dil}, C -> {hidden} -> C channels, output conv "
                    "zero-initialised",
        hyperparams={"kernel": kernel, "hidden": hidden, **({"dilation": dilation} if dilation != 1 else {})},
    )

    def module(spec, t):  # conv_k(relu(conv_k(z))), 'same' padding
        return conv_module(spec, t, [("w1", "b1", pad, 1, dilation), "relu", ("w2", "b2", pad, 1, dilation)]), "h"

    return Blueprint(meta, init, apply, count, flops,
                     check=lambda s: None if signal_shape(s)[1] >= reach else "the signal is shorter than the kernel",
                     module=module,
                     units=((("w1", 0, "in"), ("b1", 0, "in"), ("w2", 1, "out"), ("b2", 0, "bias")),))


for _bp in (conv1d_block(5, 16), conv1d_block(3, 16)):
    register(_bp)


def conv1d_dwsep_block(kernel: int, dilation: int = 1) -> Blueprint:
    """``x + alpha * pw(relu(dw_k(x)))``: a depthwise conv (one k-tap filter per channel, 'same'
    padding, taps `dilation` apart) then a pointwise C -> C conv, zero-initialised. The depthwise
    filters are random, so the pointwise weights get a gradient from the first step (the block learns
    although its delta starts at 0). On a "vector" slot (C = 1) with k = 5: 8 parameters."""
    pad = dilation * (kernel // 2)

    def init(spec, g):
        c, _ = signal_shape(spec)
        return {"dw_w": uniform((c, 1, kernel), kernel, g), "dw_b": uniform((c,), kernel, g),
                "pw_w": torch.zeros(c, c, 1), "pw_b": torch.zeros(c)}, {}

    def apply(p, h, x_in, spec, train):
        c, _ = signal_shape(spec)
        z = channels_first(h, spec.kind)
        z = F.conv1d(F.relu(F.conv1d(z, p["dw_w"], p["dw_b"], padding=pad, groups=c, dilation=dilation)), p["pw_w"],
                     p["pw_b"])
        return restore_layout(z, spec.kind)

    def count(spec):
        c, _ = signal_shape(spec)
        return c * kernel + c + c * c + c

    def flops(spec):
        c, length = signal_shape(spec)
        return (c * kernel + c * c) * length

    dil = "" if dilation == 1 else f" dilation {dilation}"
    meta = BlueprintMeta(
        name="conv1d_dwsep", version="1.0.0", slot_kinds=SIGNAL_KINDS, risk_score=0.15,
        description=f"residual depthwise-separable Conv1d block: depthwise k{kernel}{dil}, ReLU, pointwise C -> C "
                    "zero-initialised",
        hyperparams={"kernel": kernel, **({"dilation": dilation} if dilation != 1 else {})},
    )

    def module(spec, t):  # pw(relu(dw_k(z))), the depthwise conv with one group per channel
        c, _ = signal_shape(spec)
        return conv_module(spec, t, [("dw_w", "dw_b", pad, c, dilation), "relu", ("pw_w", "pw_b", 0, 1)]), "h"

    return Blueprint(meta, init, apply, count, flops,
                     check=lambda s: None if signal_shape(s)[1] >= pad + 1 else "the signal is shorter than the kernel",
                     module=module)


def _conv1d_bottleneck(kernel: int) -> Blueprint:
    """``x + alpha * conv1x1(relu(conv_k(relu(conv1x1(x)))))``: C -> m -> m -> C channels with
    m = max(2, C // 2), last 1x1 conv zero-initialised. On a "vector" slot (C = 1, m = 2): 23 parameters."""
    pad = kernel // 2

    def mid(spec):
        return max(2, signal_shape(spec)[0] // 2)

    def init(spec, g):
        c, _ = signal_shape(spec)
        m = mid(spec)
        return {"w1": uniform((m, c, 1), c, g), "b1": uniform((m,), c, g),
                "w2": uniform((m, m, kernel), m * kernel, g), "b2": uniform((m,), m * kernel, g),
                "w3": torch.zeros(c, m, 1), "b3": torch.zeros(c)}, {}

    def apply(p, h, x_in, spec, train):
        z = channels_first(h, spec.kind)
        z = F.relu(F.conv1d(z, p["w1"], p["b1"]))
        z = F.relu(F.conv1d(z, p["w2"], p["b2"], padding=pad))
        return restore_layout(F.conv1d(z, p["w3"], p["b3"]), spec.kind)

    def count(spec):
        c, _ = signal_shape(spec)
        m = mid(spec)
        return 2 * c * m + m * m * kernel + 2 * m + c

    def flops(spec):
        c, length = signal_shape(spec)
        m = mid(spec)
        return (2 * c * m + m * m * kernel) * length

    meta = BlueprintMeta(
        name="conv1d_bottleneck", version="1.0.0", slot_kinds=SIGNAL_KINDS, risk_score=0.15,
        description=f"residual bottleneck Conv1d block: 1x1 C -> max(2, C/2), k{kernel}, 1x1 back to C "
                    "(zero-initialised), ReLU between",
        hyperparams={"kernel": kernel},
    )

    def module(spec, t):
        layers = [("w1", "b1", 0, 1), "relu", ("w2", "b2", pad, 1), "relu", ("w3", "b3", 0, 1)]
        return conv_module(spec, t, layers), "h"

    return Blueprint(meta, init, apply, count, flops,
                     check=lambda s: None if signal_shape(s)[1] >= kernel // 2 + 1 else "the signal is shorter than the kernel",
                     module=module,
                     units=((("w1", 0, "in"), ("b1", 0, "in"), ("w2", 1, "out"), ("b2", 0, "bias")),
                            (("w2", 0, "in"), ("b2", 0, "in"), ("w3", 1, "out"), ("b3", 0, "bias"))))


for _bp in (conv1d_dwsep_block(5), _conv1d_bottleneck(3)):
    register(_bp)
