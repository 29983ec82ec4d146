"""Convolutional seeds on image slots ("conv2d", [B, C, H, W]): residual Conv2d blocks, plain
(``conv2d_k3``), depthwise-separable (``conv2d_dwsep``) and bottleneck (``conv2d_bottleneck``).

All use 'same' padding, so the delta has the slot's shape, and zero-initialise their last conv, so the
delta is 0 at germination while the earlier (random) convs give that last conv a gradient at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._blueprint import Blueprint, BlueprintMeta, register
from ._common import conv_module, uniform

IMAGE_KINDS = ("conv2d",)


def _image_shape(spec) -> tuple[int, int, int]:
    """(channels, height, width) of a "conv2d" slot."""
    c, h, w = spec.shape
    return c, h, w


def _conv2d_plain(kernel: int) -> Blueprint:
    """``x + alpha * conv_k(relu(conv_k(x)))``: C -> m -> C channels with m = max(4, C), second conv
    zero-initialised. On a one-channel input slot (m = 4, k = 3): 77 parameters."""
    pad = kernel // 2

    def hidden(spec):
        return max(4, spec.shape[0])

    def init(spec, g):
        c, m = spec.shape[0], hidden(spec)
        fan = c * kernel * kernel
        return {"w1": uniform((m, c, kernel, kernel), fan, g), "b1": uniform((m,), fan, g),
                "w2": torch.zeros(c, m, kernel, kernel), "b2": torch.zeros(c)}, {}

    def apply(p, h, x_in, spec, train):
        z = F.relu(F.conv2d(h, p["w1"], p["b1"], padding=pad))
        return F.conv2d(z, p["w2"], p["b2"], padding=pad)

    def count(spec):
        c, m = spec.shape[0], hidden(spec)
        return 2 * c * m * kernel * kernel + m + c

    def flops(spec):
        c, hh, ww = _image_shape(spec)
        return 2 * c * hidden(spec) * kernel * kernel * hh * ww

    meta = BlueprintMeta(
        name=f"conv2d_k{kernel}", version="1.0.0", slot_kinds=IMAGE_KINDS, risk_score=0.2,
        description=f"residual Conv2d block, kernel {kernel}x{kernel}, C -> max(4, C) -> C channels, output conv "
                    "zero-initialised",
        hyperparams={"kernel": kernel},
    )

    def module(spec, t):
        return conv_module(spec, t, [("w1", "b1", pad, 1), "relu", ("w2", "b2", pad, 1)]), "h"

    return Blueprint(meta, init, apply, count, flops, module=module,
                     units=((("w1", 0, "in"), ("b1", 0, "in"), ("w2", 1, "out"), ("b2", 0, "bias")),))


def _conv2d_dwsep(kernel: int) -> Blueprint:
    """``x + alpha * pw(relu(dw_k(x)))``: depthwise k x k conv (one filter per channel), ReLU,
    pointwise C -> C conv zero-initialised. On a one-channel slot with k = 3: 12 parameters."""
    pad = kernel // 2

    def init(spec, g):
        c = spec.shape[0]
        fan = kernel * kernel
        return {"dw_w": uniform((c, 1, kernel, kernel), fan, g), "dw_b": uniform((c,), fan, g),
                "pw_w": torch.zeros(c, c, 1, 1), "pw_b": torch.zeros(c)}, {}

    def apply(p, h, x_in, spec, train):
        c = spec.shape[0]
        z = F.relu(F.conv2d(h, p["dw_w"], p["dw_b"], padding=pad, groups=c))
        return F.conv2d(z, p["pw_w"], p["pw_b"])

    def count(spec):
        c = spec.shape[0]
        return c * kernel * kernel + c + c * c + c

    def flops(spec):
        c, hh, ww = _image_shape(spec)
        return (c * kernel * kernel + c * c) * hh * ww

    meta = BlueprintMeta(
        name="conv2d_dwsep", version="1.0.0", slot_kinds=IMAGE_KINDS, risk_score=0.15,
        description=f"residual depthwise-separable Conv2d block: depthwise {kernel}x{kernel}, ReLU, pointwise C -> C "
                    "zero-initialised",
        hyperparams={"kernel": kernel},
    )

    def module(spec, t):
        return conv_module(spec, t, [("dw_w", "dw_b", pad, spec.shape[0]), "relu", ("pw_w", "pw_b", 0, 1)]), "h"

    return Blueprint(meta, init, apply, count, flops, module=module)


def _conv2d_bottleneck(kernel: int) -> Blueprint:
    """``x + alpha * conv1x1(relu(conv_k(relu(conv1x1(x)))))``: C -> m -> m -> C channels with
    m = max(2, C // 2), last 1x1 conv zero-initialised."""
    pad = kernel // 2

    def mid(spec):
        return max(2, spec.shape[0] // 2)

    def init(spec, g):
        c, m = spec.shape[0], mid(spec)
        fan2 = m * kernel * kernel
        return {"w1": uniform((m, c, 1, 1), c, g), "b1": uniform((m,), c, g),
                "w2": uniform((m, m, kernel, kernel), fan2, g), "b2": uniform((m,), fan2, g),
                "w3": torch.zeros(c, m, 1, 1), "b3": torch.zeros(c)}, {}

    def apply(p, h, x_in, spec, train):
        z = F.relu(F.conv2d(h, p["w1"], p["b1"]))
        z = F.relu(F.conv2d(z, p["w2"], p["b2"], padding=pad))
        return F.conv2d(z, p["w3"], p["b3"])

    def count(spec):
        c, m = spec.shape[0], mid(spec)
        return 2 * c * m + m * m * kernel * kernel + 2 * m + c

    def flops(spec):
        c, hh, ww = _image_shape(spec)
        m = mid(spec)
        return (2 * c * m + m * m * kernel * kernel) * hh * ww

    meta = BlueprintMeta(
        name="conv2d_bottleneck", version="1.0.0", slot_kinds=IMAGE_KINDS, risk_score=0.15,
        description=f"residual bottleneck Conv2d block: 1x1 C -> max(2, C/2), {kernel}x{kernel}, 1x1 back to C "
                    "(zero-initialised), ReLU between",
        hyperparams={"kernel": kernel},
    )

    def module(spec, t):
        layers = [("w1", "b1", 0, 1), "relu", ("w2", "b2", pad, 1), "relu", ("w3", "b3", 0, 1)]
        return conv_module(spec, t, layers), "h"

    return Blueprint(meta, init, apply, count, flops, module=module,
                     units=((("w1", 0, "in"), ("b1", 0, "in"), ("w2", 1, "out"), ("b2", 0, "bias")),
                            (("w2", 0, "in"), ("b2", 0, "in"), ("w3", 1, "out"), ("b3", 0, "bias"))))


for _bp in (_conv2d_plain(3), _conv2d_dwsep(3), _conv2d_bottleneck(3)):
    register(_bp)
