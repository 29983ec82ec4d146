"""Shared helpers for blueprint definitions."""

from __future__ import annotations

import math

import torch
from torch import Tensor


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
