"""Feature-space seeds: residual MLP (GELU), residual SwiGLU, LoRA, IA3 and Net2Net width growth.

All act on the last dimension of "vector" ([B, d]) and "sequence" ([B, T, d]) slots.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .. import _modules as M
from .._blueprint import Blueprint, BlueprintMeta, register
from .._errors import GraftError
from .._host import ACTIVATIONS
from ._common import uniform

FEATURE_KINDS = ("vector", "sequence")


# --- residual MLP (GELU) --------------------------------------------------------------------------


def mlp_gelu_block(ratio: float, version: str = "1.0.0") -> Blueprint:
    def hidden(spec):
        return max(4, int(round(spec.features * ratio)))

    def init(spec, g):
        d, k = spec.features, hidden(spec)
        return {"w1": uniform((k, d), d, g), "b1": uniform((k,), d, g),
                "w2": torch.zeros(d, k), "b2": torch.zeros(d)}, {}

    def apply(p, h, x_in, spec, train):
        return F.linear(F.gelu(F.linear(h, p["w1"], p["b1"])), p["w2"], p["b2"])

    def count(spec):
        d, k = spec.features, hidden(spec)
        return 2 * d * k + k + d

    def module(spec, t):
        k, d = t["w1"].shape
        with M.on_meta():
            m = nn.Sequential(OrderedDict(fc1=nn.Linear(d, k), act=nn.GELU(), fc2=nn.Linear(k, d)))
        return M.load(m, {"fc1.weight": t["w1"], "fc1.bias": t["b1"], "fc2.weight": t["w2"], "fc2.bias": t["b2"]}), "h"

    name = "mlp_gelu" if ratio == 1 else f"mlp_gelu_x{ratio:g}".replace(".", "_")
    meta = BlueprintMeta(
        name=name, version=version, slot_kinds=FEATURE_KINDS, risk_score=0.2,
        description=f"residual 2-layer GELU MLP, hidden = {ratio:g} x features, output layer zero-initialised",
        hyperparams={"hidden_ratio": ratio},
    )
    return Blueprint(meta, init, apply, count, lambda s: count(s) * (s.shape[0] if s.kind == "sequence" else 1),
                     module=module,
                     units=((("w1", 0, "in"), ("b1", 0, "in"), ("w2", 1, "out"), ("b2", 0, "bias")),))


# --- residual SwiGLU ---------------------------------------------------------------------------


def _swiglu(ratio: float) -> Blueprint:
    def hidden(spec):
        return max(4, int(round(spec.features * ratio)))

    def init(spec, g):
        d, k = spec.features, hidden(spec)
        return {"w_gate": uniform((k, d), d, g), "w_up": uniform((k, d), d, g), "w_down": torch.zeros(d, k)}, {}

    def apply(p, h, x_in, spec, train):
        return F.linear(F.silu(F.linear(h, p["w_gate"])) * F.linear(h, p["w_up"]), p["w_down"])

    def count(spec):
        return 3 * spec.features * hidden(spec)

    def module(spec, t):
        k, d = t["w_gate"].shape
        with M.on_meta():
            m = M.SwiGLU(d, k)
        return M.load(m, {"gate.weight": t["w_gate"], "up.weight": t["w_up"], "down.weight": t["w_down"]}), "h"

    meta = BlueprintMeta(
        name="swiglu", version="1.0.0", slot_kinds=FEATURE_KINDS, risk_score=0.25,
        description=f"residual SwiGLU block, hidden = {ratio:g} x features, down projection zero-initialised",
        hyperparams={"hidden_ratio": ratio},
    )
    return Blueprint(meta, init, apply, count, lambda s: count(s) * (s.shape[0] if s.kind == "sequence" else 1),
                     module=module,
                     units=((("w_gate", 0, "in"), ("w_up", 0, "in"), ("w_down", 1, "out")),))


# --- LoRA ----------------------------------------------------------------------------------------


def lora_block(rank: int) -> Blueprint:
    def init(spec, g):
        d_in, d_out = spec.in_shape[-1], spec.features
        return {"A": uniform((rank, d_in), d_in, g), "B": torch.zeros(d_out, rank)}, {}

    def apply(p, h, x_in, spec, train):
        return F.linear(F.linear(x_in, p["A"]), p["B"])

    def merge(host, seed, spec, alpha):
        w = host[spec.layer + ".weight"]
        return {spec.layer + ".weight": w + alpha * (seed["B"] @ seed["A"])}

    def check(spec):
        if spec.in_shape is None:
            return "it needs the layer's input"
        if rank > min(spec.in_shape[-1], spec.features):
            return f"rank {rank} exceeds min(in, out) = {min(spec.in_shape[-1], spec.features)}"
        return None

    def count(spec):
        return rank * (spec.in_shape[-1] + spec.features)

    def module(spec, t):
        (r, d_in), d_out = t["A"].shape, t["B"].shape[0]
        with M.on_meta():
            m = nn.Sequential(OrderedDict(A=nn.Linear(d_in, r, bias=False), B=nn.Linear(r, d_out, bias=False)))
        return M.load(m, {"A.weight": t["A"], "B.weight": t["B"]}), "x_in"

    meta = BlueprintMeta(
        name=f"lora_r{rank}", version="1.0.0", slot_kinds=FEATURE_KINDS, layer_types=("linear",),
        mergeable=True, risk_score=0.1,
        description=f"LoRA adapter of rank {rank} on the preceding Linear (B zero-initialised); folds into W",
        hyperparams={"rank": rank},
    )
    return Blueprint(meta, init, apply, count,
                     lambda s: count(s) * (s.shape[0] if s.kind == "sequence" else 1), merge=merge, check=check,
                     module=module)


# --- IA3 -----------------------------------------------------------------------------------------


def _ia3() -> Blueprint:
    def init(spec, g):
        return {"scale": torch.zeros(spec.features)}, {}

    def apply(p, h, x_in, spec, train):
        return h * p["scale"]

    def merge(host, seed, spec, alpha):
        f = 1 + alpha * seed["scale"]
        out = {spec.layer + ".weight": host[spec.layer + ".weight"] * f.unsqueeze(-1)}
        if spec.layer + ".bias" in host:
            out[spec.layer + ".bias"] = host[spec.layer + ".bias"] * f
        return out

    meta = BlueprintMeta(
        name="ia3", version="1.0.0", slot_kinds=FEATURE_KINDS, layer_types=("linear",), mergeable=True,
        risk_score=0.05, description="IA3: learned per-feature rescaling of the preceding Linear; folds into W",
    )
    def module(spec, t):
        with M.on_meta():
            m = M.Scale(t["scale"].shape[0])
        return M.load(m, {"scale": t["scale"]}), "h"

    return Blueprint(meta, init, apply, lambda s: s.features,
                     lambda s: s.features * (s.shape[0] if s.kind == "sequence" else 1), merge=merge, module=module)


# --- Net2Net width growth ----------------------------------------------------------------------


def width_block(k: int) -> Blueprint:
    """k new hidden units between the slot's Linear and its consumer Linear.

    New units ``u = act(U x_in + c)`` feed the consumer through new columns ``V`` (zero at birth),
    so the delta lands at the consumer's output. Fossilizing appends U, c as rows of the producer
    and alpha * V as columns of the consumer: the host is then k units wider, exactly. The new
    units' Adam moments are appended to the host's; from then on they share the host leaf's step
    count, so their bias correction is the host's (close to 1 after a few hundred steps).
    """

    def init(spec, g):
        d_in = spec.in_shape[-1]
        return {"U": uniform((k, d_in), d_in, g), "c": uniform((k,), d_in, g),
                "V": torch.zeros(_consumer_out(spec), k)}, {}

    def apply(p, h, x_in, spec, train):
        return F.linear(ACTIVATIONS[spec.activation](F.linear(x_in, p["U"], p["c"])), p["V"])

    def merge(host, seed, spec, alpha):
        prod, cons = spec.layer, spec.consumer_layer
        if prod + ".bias" not in host:
            raise GraftError(f"width growth at {spec.name!r}: the producer Linear {prod!r} has no bias to extend.")
        return {
            prod + ".weight": torch.cat([host[prod + ".weight"], seed["U"]], dim=-2),
            prod + ".bias": torch.cat([host[prod + ".bias"], seed["c"]], dim=-1),
            cons + ".weight": torch.cat([host[cons + ".weight"], alpha * seed["V"]], dim=-1),
        }

    def merge_moment(host, seed, spec):
        prod, cons = spec.layer, spec.consumer_layer
        return {
            prod + ".weight": torch.cat([host[prod + ".weight"], seed["U"]], dim=-2),
            prod + ".bias": torch.cat([host[prod + ".bias"], seed["c"]], dim=-1),
            cons + ".weight": torch.cat([host[cons + ".weight"], seed["V"]], dim=-1),
        }

    def count(spec):
        return k * (spec.in_shape[-1] + 1 + _consumer_out(spec))

    meta = BlueprintMeta(
        name=f"width_k{k}", version="1.0.0", slot_kinds=("vector",), layer_types=("linear",), target="consumer",
        mergeable=True, risk_score=0.15,
        description=f"Net2Net-style width growth: {k} new hidden units, outgoing weights zero; merges into both Linears",
        hyperparams={"units": k},
    )
    return Blueprint(meta, init, apply, count, count, merge=merge, merge_moment=merge_moment,
                     check=lambda s: None if s.consumer_out else "the slot does not declare its consumer's width")


def _consumer_out(spec) -> int:
    return spec.consumer_out


for _bp in (
    mlp_gelu_block(1.0),
    mlp_gelu_block(0.5),
    _swiglu(1.0),
    *(lora_block(r) for r in (4, 8, 16, 32, 64)),
    _ia3(),
    width_block(4),
    width_block(16),
):
    register(_bp)
