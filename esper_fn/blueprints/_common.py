"""Shared helpers for blueprint definitions."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from .. import _modules as M


def uniform(shape, fan_in: int, g: torch.Generator | None) -> Tensor:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)), the default init of nn.Linear / nn.Conv."""
    bound = 1 / math.sqrt(max(1, fan_in))
    return (torch.rand(*shape, generator=g) * 2 - 1) * bound


def channels_first(h: Tensor, kind: str) -> Tensor:
    """View a slot tensor as [..., C, L] for 1D convolutions ("vector" slots are one channel)."""
    return h.unsqueeze(-2) if kind == "vector" else h


def restore_layout(d: Tensor, kind: str) -> Tensor:
    return d.squeeze(-2) if kind == "vector" else d


def signal_shape(spec) -> tuple[int, int]:
    """(channels, length) of a slot read as a 1D signal."""
    if spec.kind == "vector":
        return 1, spec.shape[0]
    return spec.shape[0], spec.shape[1]


def conv_module(spec, t: Mapping[str, Tensor], layers: Sequence[tuple | str]) -> nn.Module:
    """A residual conv block's delta as `nn.Sequential` of `nn.Conv1d`/`nn.Conv2d` (by the weight's
    rank) and `nn.ReLU` ("relu"), stride 1: each conv ``(weight name, bias name, padding, groups)``
    takes its weights from `t`. A "vector" slot is viewed as one channel ([B, d] -> [B, 1, d]) and
    back, as `channels_first` and `restore_layout` do."""
    mods: dict[str, nn.Module] = {}
    if spec.kind == "vector":
        mods["to_channels"] = nn.Unflatten(-1, (1, spec.shape[0]))
    tensors = {}
    n = 0
    with M.on_meta():
        for item in layers:
            if item == "relu":
                mods[f"act{n}"] = nn.ReLU()
                continue
            w, b, pad, groups, *dil = item
            n += 1
            out_c, in_per_group, *k = t[w].shape
            conv = nn.Conv1d if len(k) == 1 else nn.Conv2d
            mods[f"conv{n}"] = conv(in_per_group * groups, out_c, tuple(k), padding=pad, groups=groups,
                                    dilation=dil[0] if dil else 1)
            tensors[f"conv{n}.weight"], tensors[f"conv{n}.bias"] = t[w], t[b]
    if spec.kind == "vector":
        mods["from_channels"] = nn.Flatten(-2, -1)
    return M.load(nn.Sequential(OrderedDict(mods)), tensors)
