"""Mixture-of-experts seeds: a top-2 router over 4 expert MLPs, on "vector" and "sequence" slots.

- ``moe_top2_gelu`` / ``moe_top2_swiglu``: GELU or SwiGLU experts (hidden = max(4, d / 2)), balanced
  by the Switch-Transformer auxiliary loss ``n_experts * sum_i f_i * P_i`` returned as
  ``SeedOut.aux_loss`` (f_i: fraction of the top-2 assignments that go to expert i, P_i: mean router
  probability of expert i, over every token of the batch). It is 1 when the router probabilities are
  uniform (perfect balance) and grows as the router concentrates the load.
- ``moe_top2_ema``: GELU experts balanced without an auxiliary loss: a per-expert bias buffer is added
  to the router logits *for selection only* (the gate weights come from the unbiased logits) and is
  nudged after every training forward towards the under-loaded experts, from an EMA of expert load
  (buffers ``bias`` and ``load_ema``, returned through ``SeedOut.buffers``).

Dispatch is dense and vectorised: every expert runs on every token and the outputs are combined with
the top-2 gate weights (zero for the two experts a token did not choose). At these sizes that is
cheaper than gathering tokens per expert, it has no data-dependent shapes or Python control flow, so
it runs under `torch.vmap` (stacked hosts), and `flops` counts this dense cost. Each expert's output
layer is zero-initialised, so the delta is 0 at germination.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._blueprint import Blueprint, BlueprintMeta, SeedOut, register
from ._common import uniform

FEATURE_KINDS = ("vector", "sequence")
N_EXPERTS = 4
TOP_K = 2


def _hidden(spec) -> int:
    return max(4, spec.features // 2)


def _tokens(spec) -> int:
    return spec.shape[0] if spec.kind == "sequence" else 1


def _route(logits: Tensor, select: Tensor) -> tuple[Tensor, Tensor]:
    """Top-2 routing. Returns (gates, mask), both [..., E]: gates hold the softmax of the two chosen
    logits (zero elsewhere), mask is 1 where an expert was chosen. `select` ranks the experts."""
    idx = select.topk(TOP_K, dim=-1).indices
    gates = torch.zeros_like(logits).scatter(-1, idx, torch.softmax(logits.gather(-1, idx), dim=-1))
    mask = torch.zeros_like(logits).scatter(-1, idx, 1.0)
    return gates, mask


def _load(mask: Tensor) -> Tensor:
    """Fraction of the top-2 assignments that went to each expert, over all tokens ([E], sums to 1)."""
    return mask.reshape(-1, mask.shape[-1]).mean(0) / TOP_K


def aux_loss(logits: Tensor, mask: Tensor) -> Tensor:
    """Switch-Transformer load-balancing loss ``E * sum_i f_i * P_i`` (1 at uniform router probabilities)."""
    probs = torch.softmax(logits, dim=-1).reshape(-1, logits.shape[-1])
    return logits.shape[-1] * (_load(mask).detach() * probs.mean(0)).sum()


def _gelu_experts(g, d, k):
    return {"w1": uniform((N_EXPERTS, k, d), d, g), "b1": uniform((N_EXPERTS, k), d, g),
            "w2": torch.zeros(N_EXPERTS, d, k), "b2": torch.zeros(N_EXPERTS, d)}


def _run_gelu(p, h):
    """Every expert on every token: [..., d] -> [..., E, d]."""
    z = F.gelu(torch.einsum("...d,ekd->...ek", h, p["w1"]) + p["b1"])
    return torch.einsum("...ek,edk->...ed", z, p["w2"]) + p["b2"]


def _run_swiglu(p, h):
    z = F.silu(torch.einsum("...d,ekd->...ek", h, p["w_gate"])) * torch.einsum("...d,ekd->...ek", h, p["w_up"])
    return torch.einsum("...ek,edk->...ed", z, p["w_down"])


def _combine(gates: Tensor, out: Tensor) -> Tensor:
    return torch.einsum("...e,...ed->...d", gates, out)


def _moe_aux(expert: str) -> Blueprint:
    def init(spec, g):
        d, k = spec.features, _hidden(spec)
        p = {"router": uniform((N_EXPERTS, d), d, g)}
        if expert == "gelu":
            p.update(_gelu_experts(g, d, k))
        else:
            p.update({"w_gate": uniform((N_EXPERTS, k, d), d, g), "w_up": uniform((N_EXPERTS, k, d), d, g),
                      "w_down": torch.zeros(N_EXPERTS, d, k)})
        return p, {}

    def apply(p, h, x_in, spec, train):
        logits = F.linear(h, p["router"])
        gates, mask = _route(logits, logits)
        out = _run_gelu(p, h) if expert == "gelu" else _run_swiglu(p, h)
        return SeedOut(_combine(gates, out), aux_loss(logits, mask))

    def count(spec):
        d, k = spec.features, _hidden(spec)
        per = 2 * k * d + k + d if expert == "gelu" else 3 * k * d
        return N_EXPERTS * (d + per)

    def flops(spec):
        d, k = spec.features, _hidden(spec)
        per = 2 * k * d if expert == "gelu" else 3 * k * d
        return _tokens(spec) * N_EXPERTS * (d + per + d)

    act = "GELU" if expert == "gelu" else "SwiGLU"
    meta = BlueprintMeta(
        name=f"moe_top2_{expert}", version="1.0.0", slot_kinds=FEATURE_KINDS, risk_score=0.35,
        description=f"residual top-2 mixture of {N_EXPERTS} {act} experts (hidden = max(4, d/2), output layers "
                    "zero-initialised) with the Switch load-balancing aux loss; dense dispatch",
        hyperparams={"experts": N_EXPERTS, "top_k": TOP_K, "hidden_ratio": 0.5},
    )
    return Blueprint(meta, init, apply, count, flops)


def _moe_ema(momentum: float = 0.9, rate: float = 0.05) -> Blueprint:
    """Aux-loss-free balancing: ``bias += rate * (1/E - load_ema) * E`` after each training forward,
    with ``load_ema = momentum * load_ema + (1 - momentum) * load``. Selection ranks
    ``logits + bias``; the gate weights use the unbiased logits."""

    def init(spec, g):
        d, k = spec.features, _hidden(spec)
        p = {"router": uniform((N_EXPERTS, d), d, g)}
        p.update(_gelu_experts(g, d, k))
        return p, {"bias": torch.zeros(N_EXPERTS), "load_ema": torch.full((N_EXPERTS,), 1.0 / N_EXPERTS)}

    def apply(p, h, x_in, spec, train):
        logits = F.linear(h, p["router"])
        gates, mask = _route(logits, logits.detach() + p["bias"])
        delta = _combine(gates, _run_gelu(p, h))
        if not train:
            return delta
        load_ema = momentum * p["load_ema"] + (1 - momentum) * _load(mask).detach()
        bias = p["bias"] + rate * (1.0 / N_EXPERTS - load_ema) * N_EXPERTS
        return SeedOut(delta, None, {"bias": bias, "load_ema": load_ema})

    def count(spec):
        d, k = spec.features, _hidden(spec)
        return N_EXPERTS * (d + 2 * k * d + k + d)

    def flops(spec):
        d, k = spec.features, _hidden(spec)
        return _tokens(spec) * N_EXPERTS * (d + 2 * k * d + d)

    meta = BlueprintMeta(
        name="moe_top2_ema", version="1.0.0", slot_kinds=FEATURE_KINDS, risk_score=0.35,
        description=f"residual top-2 mixture of {N_EXPERTS} GELU experts balanced by an EMA-driven selection bias "
                    "(no aux loss); dense dispatch",
        hyperparams={"experts": N_EXPERTS, "top_k": TOP_K, "hidden_ratio": 0.5, "momentum": momentum, "rate": rate},
    )
    return Blueprint(meta, init, apply, count, flops)


for _bp in (_moe_aux("gelu"), _moe_aux("swiglu"), _moe_ema()):
    register(_bp)
