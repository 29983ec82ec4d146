"""Normalisation, diagnostic and sharded seeds.

- ``rmsnorm``: a gated RMSNorm, ``delta = gate * (rmsnorm(h) * w - h)`` with ``gate`` (per feature)
  initialised to 0 and ``w`` to 1: exactly zero at germination, and ``gate`` gets a gradient at once
  (``rmsnorm(h) - h`` is not 0), so the seed learns to normalise as much as helps.
- ``activation_tap``: no parameters, delta exactly 0; keeps EMA activation statistics of the slot in
  buffers (per-feature ``mean`` and ``var``, and ``dead``: the fraction of slot entries with
  ``|h| < 1e-6``), updated by training forwards only.
- ``grad_clamp``: no parameters, delta exactly 0 in the forward; in the backward the gradient that
  flows through the slot is clamped elementwise to [-c, c] (c = 1, kept in a 0-d buffer ``clamp``)
  once blended in; at alpha < 1 the slot passes ``(1 - alpha) * g + clamp(alpha * g, -c, c)``.
- ``allreduce_shard@2.0.0`` (needs "distributed": an initialised `torch.distributed` process group;
  falls back to ``mlp_gelu@1.0.0``): the ``mlp_gelu`` block (same parameter names and shapes) run
  tensor-parallel over the ranks of the default process group. Rank r of W computes only its shard
  of the hidden units (rows ``[r * k // W, (r + 1) * k // W)`` of ``w1``/``b1``, the matching columns of
  ``w2``), and `torch.distributed.all_reduce` sums the partial outputs, so every rank gets the full
  delta. The gradient through the sum is the identity (Megatron's row-parallel rule): every rank
  must feed the same batch and compute the same loss, so each rank trains only its own shard and the
  seed's full weights are the ranks' shards together. With one rank it equals ``mlp_gelu``. Any
  backend works (gloo on CPU, NCCL on GPU). Version 1.0.0 summed shards on one device, ran no
  collective, and was removed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .._blueprint import Blueprint, BlueprintMeta, SeedOut, register
from .._errors import CapabilityError
from ._common import uniform

FEATURE_KINDS = ("vector", "sequence")
ALL_KINDS = ("vector", "conv1d", "conv2d", "sequence")


def _tokens(spec) -> int:
    return spec.shape[0] if spec.kind == "sequence" else 1


def _numel(spec) -> int:
    n = 1
    for s in spec.shape:
        n *= s
    return n


# --- gated RMSNorm -------------------------------------------------------------------------------


def _rmsnorm(eps: float = 1e-6) -> Blueprint:
    def init(spec, g):
        d = spec.features
        return {"gate": torch.zeros(d), "w": torch.ones(d)}, {}

    def apply(p, h, x_in, spec, train):
        r = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return p["gate"] * (r * p["w"] - h)

    meta = BlueprintMeta(
        name="rmsnorm", version="1.0.0", slot_kinds=FEATURE_KINDS, risk_score=0.1,
        description="gated RMSNorm: delta = gate * (rmsnorm(h) * w - h), gate zero-initialised, w one-initialised",
        hyperparams={"eps": eps},
    )
    return Blueprint(meta, init, apply, lambda s: 2 * s.features, lambda s: 4 * s.features * _tokens(s))


# --- activation statistics tap ---------------------------------------------------------------------


_FEATURE_DIM = {"vector": -1, "sequence": -1, "conv1d": -2, "conv2d": -3}


def _activation_tap(momentum: float = 0.1, dead_below: float = 1e-6) -> Blueprint:
    """EMA statistics with BatchNorm-style momentum: ``stat = (1 - momentum) * stat + momentum * batch``."""

    def init(spec, g):
        c = spec.features
        return {}, {"mean": torch.zeros(c), "var": torch.ones(c), "dead": torch.zeros(())}

    def apply(p, h, x_in, spec, train):
        delta = torch.zeros_like(h)
        if not train:
            return delta
        z = h.detach().movedim(_FEATURE_DIM[spec.kind], -1)
        z = z.reshape(-1, z.shape[-1])
        mean = z.mean(0)
        var = (z - mean).pow(2).mean(0)
        dead = (z.abs() < dead_below).to(h.dtype).mean()
        m = momentum
        return SeedOut(delta, None, {"mean": (1 - m) * p["mean"] + m * mean, "var": (1 - m) * p["var"] + m * var,
                                     "dead": (1 - m) * p["dead"] + m * dead})

    meta = BlueprintMeta(
        name="activation_tap", version="1.0.0", slot_kinds=ALL_KINDS, risk_score=0.0,
        description="diagnostic tap: delta 0, EMA per-feature mean/var and dead fraction (|h| < 1e-6) in buffers",
        hyperparams={"momentum": momentum, "dead_below": dead_below},
    )
    return Blueprint(meta, init, apply, lambda s: 0, lambda s: 3 * _numel(s))


# --- gradient clamp --------------------------------------------------------------------------------


class _ClampGrad(torch.autograd.Function):
    """Identity in the forward; clamps the incoming gradient to [-c, c] in the backward (vmap-able)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(h: Tensor, c: Tensor) -> Tensor:
        return h.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, g: Tensor):
        (c,) = ctx.saved_tensors
        return torch.minimum(torch.maximum(g, -c), c), None


def clamp_grad(h: Tensor, c: Tensor) -> Tensor:
    """``h`` in the forward; the gradient through it is clamped elementwise to [-c, c] (c: 0-d tensor)."""
    return _ClampGrad.apply(h, c)


def _grad_clamp(c: float = 1.0) -> Blueprint:
    """The bound lives in a 0-d buffer ``clamp`` (c), so it is visible in checkpoints and exports."""

    def init(spec, g):
        return {}, {"clamp": torch.tensor(float(c))}

    def apply(p, h, x_in, spec, train):
        # Value: h - h == 0 exactly. Gradient of h + alpha * delta w.r.t. h, for an upstream gradient g:
        # (1 - alpha) * g + clamp(alpha * g, -c, c), i.e. clamp(g, -c, c) once blended in (alpha 1).
        return clamp_grad(h, p["clamp"].to(h.dtype)) - h

    meta = BlueprintMeta(
        name="grad_clamp", version="1.0.0", slot_kinds=ALL_KINDS, risk_score=0.05,
        description=f"gradient clamp: delta 0 in the forward, the gradient through the slot clamped to [-{c:g}, {c:g}]",
        hyperparams={"clamp": c},
    )
    return Blueprint(meta, init, apply, lambda s: 0, lambda s: 0)


# --- tensor-parallel MLP (all-reduce shard) ------------------------------------------------------


class _AllReduceSum(torch.autograd.Function):
    """`torch.distributed.all_reduce` (sum over the default group) in the forward, identity in the
    backward: the output gradient is already the same on every rank (tensor parallelism)."""

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        out = x.clone()  # all_reduce works in place; the input stays untouched
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return g

    @staticmethod
    def vmap(info, in_dims, x):
        # The sum is elementwise, so a stacked tensor (vmapped hosts) is reduced in one collective.
        return _AllReduceSum.apply(x), in_dims[0]


def _require_group() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise CapabilityError(
            "allreduce_shard@2.0.0 sums its shards with torch.distributed.all_reduce, and no process group is "
            "initialised. Call torch.distributed.init_process_group(...) on every rank first (each rank feeding "
            "the same batch), or germinate mlp_gelu@1.0.0, which `esper_fn.blueprints.get` resolves it to where "
            "the 'distributed' capability is absent."
        )


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum `x` over the ranks of the default process group (differentiable: identity gradient).

    Raises:
        CapabilityError: no process group is initialised.
    """
    _require_group()
    return _AllReduceSum.apply(x)


def shard_bounds(k: int, rank: int, world: int) -> tuple[int, int]:
    """The hidden units ``[lo, hi)`` of `k` that rank `rank` of `world` computes."""
    return rank * k // world, (rank + 1) * k // world


def _allreduce_shard() -> Blueprint:
    def hidden(spec):
        return max(4, spec.features)  # as mlp_gelu@1.0.0 (ratio 1), whose parameters these are

    def init(spec, g):
        d, k = spec.features, hidden(spec)
        return {"w1": uniform((k, d), d, g), "b1": uniform((k,), d, g),
                "w2": torch.zeros(d, k), "b2": torch.zeros(d)}, {}

    def apply(p, h, x_in, spec, train):
        _require_group()
        lo, hi = shard_bounds(hidden(spec), dist.get_rank(), dist.get_world_size())
        partial = F.linear(F.gelu(F.linear(h, p["w1"][lo:hi], p["b1"][lo:hi])), p["w2"][:, lo:hi])
        return all_reduce_sum(partial) + p["b2"]

    def count(spec):
        d, k = spec.features, hidden(spec)
        return 2 * d * k + k + d

    meta = BlueprintMeta(
        name="allreduce_shard", version="2.0.0", slot_kinds=FEATURE_KINDS, risk_score=0.3,
        requires_capability=("distributed",), fallback="mlp_gelu@1.0.0",
        description="mlp_gelu run tensor-parallel: each rank of the process group computes its share of the hidden "
                    "units, torch.distributed.all_reduce sums them (same batch on every rank); falls back to mlp_gelu",
    )
    # Parameters and multiply-adds per sample of the whole block (all ranks together).
    return Blueprint(meta, init, apply, count, lambda s: count(s) * _tokens(s))


for _bp in (_rmsnorm(), _activation_tap(), _grad_clamp(), _allreduce_shard()):
    register(_bp)
