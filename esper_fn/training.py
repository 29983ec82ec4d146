"""Tolaria: the functional training loop and its health telemetry.

`train_epoch` runs one epoch of `train_step`s and returns metrics as data; `evaluate` measures loss
and accuracy; `telemetry` computes the per-slot health signals a controller reads (definitions and
units in docs/telemetry.md). Nothing here prints or logs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from ._apply import _forward, _inputs, _make_slot_fn, _plan, train_step, trained_keys
from ._lifecycle import Stage
from ._state import State
from .tasks import Task

__all__ = ["TrainConfig", "contributions", "evaluate", "flops_per_sample", "telemetry", "train_epoch"]


class TrainConfig(BaseModel):
    """How one epoch trains.

    Attributes:
        batch_size: training mini-batch size.
        incubation: "shadow" (seeds in TRAINING learn in a shadow forward) or "none".
        aux_weight: weight of seeds' auxiliary losses.
        eval_batch_size: batch size for evaluation passes (memory only; results do not depend on it).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_size: int = Field(default=100, ge=1)
    incubation: Literal["shadow", "none"] = "shadow"
    aux_weight: float = Field(default=1e-2, ge=0)
    eval_batch_size: int = Field(default=2000, ge=1)


def train_epoch(
    state: State, task: Task, config: TrainConfig | None = None, *, generator: torch.Generator
) -> tuple[State, dict[str, float]]:
    """One pass over the training split.

    Args:
        state: a single (unstacked) state.
        task: the data; batches are drawn with `generator`.
        config: batch size and incubation mode.
        generator: orders the samples (advanced by one draw).

    Returns:
        ``(state, metrics)`` with "train_loss" and "train_accuracy" (running means over the epoch,
        measured on the live forward before each update), "shadow_loss" while seeds incubate, and
        "grad_norm/<group>" (root mean square over steps of the gradient norm) for "host" and each
        trained seed slot.
    """
    config = config or TrainConfig()
    keys = trained_keys(state, config.incubation)
    groups = ["host" if k[0] == "host" else k[1] for k in keys]
    losses, corrects, shadows, grad_sqs, sizes = [], [], [], [], []
    for step, (xb, yb) in enumerate(task.batches("train", config.batch_size, generator=generator)):
        # The caller's state is never donated; the intermediate states are ours alone.
        state, m = train_step(state, xb, yb, incubation=config.incubation, aux_weight=config.aux_weight,
                              grad_stats=True, with_output=True, donate=step > 0)
        losses.append(m["loss"])
        corrects.append((m["output"].argmax(-1) == yb).sum())
        if "shadow_loss" in m:
            shadows.append(m["shadow_loss"])
        grad_sqs.append(m["grad_sq"])
        sizes.append(len(yb))
    n = sum(sizes)
    w = torch.tensor(sizes, dtype=torch.float32)
    out = {"train_loss": float(torch.stack(losses) @ w) / n, "train_accuracy": float(torch.stack(corrects).sum()) / n}
    if shadows:
        out["shadow_loss"] = float(torch.stack(shadows) @ w) / n
    grad_sq = torch.stack(grad_sqs).mean(0) if grad_sqs else torch.zeros(len(keys))
    per_group: dict[str, float] = {}
    for g, v in zip(groups, grad_sq.tolist()):
        per_group[g] = per_group.get(g, 0.0) + v
    for g, v in per_group.items():
        out[f"grad_norm/{g}"] = math.sqrt(v)
    return state, out


def _batched_logits(state: State, x: Tensor, batch_size: int) -> Tensor:
    from ._apply import apply

    if x.shape[0] <= batch_size:
        return apply(state, x)
    return torch.cat([apply(state, x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])


@torch.no_grad()
def evaluate(state: State, x: Tensor, y: Tensor, *, batch_size: int = 2000) -> dict[str, float]:
    """Loss and accuracy of the live network (eval mode).

    Args:
        x: inputs [N, ...]; y: int64 labels [N].

    Returns:
        {"loss": mean cross-entropy (nats), "accuracy": fraction correct in [0, 1]}.
    """
    logits = _batched_logits(state, x, batch_size)
    return {"loss": float(F.cross_entropy(logits, y)), "accuracy": float((logits.argmax(-1) == y).float().mean())}


@torch.no_grad()
def contributions(state: State, x: Tensor, y: Tensor) -> dict[str, float]:
    """Counterfactual contribution of every seed in the live forward (BLENDING, HOLDING, FOSSILIZED).

    All alpha configurations (as is, and each seed's alpha forced to 0) are evaluated in one
    batched pass (`torch.vmap` over the alpha vector).

    Returns:
        ``{slot: accuracy with the seed - accuracy without it}`` in accuracy points [−1, 1].
    """
    plan = _plan(state)
    entries = plan.live
    if not entries or state.batch:
        return {}
    host_flat, seeds, alphas = _inputs(state, plan, state.params_flat, entries)
    names = list(entries)
    base = torch.stack([alphas[n] for n in names])
    configs = base.expand(len(names) + 1, len(names)).clone()
    configs[1:].fill_diagonal_(0.0)

    def run(a):
        return _forward(state, plan, entries, host_flat, seeds, dict(zip(names, a.unbind(0))), x, False)[0]

    logits = torch.vmap(run)(configs)  # [K, N, C]
    acc = (logits.argmax(-1) == y).float().mean(-1)
    return {n: float(acc[0] - acc[j + 1]) for j, n in enumerate(names)}


@torch.no_grad()
def activation_stats(state: State, x: Tensor) -> dict[str, dict[str, float]]:
    """Statistics of every slot's tensor on a batch (after the live seeds, before the activation).

    Returns:
        ``{slot: {"mean", "var", "saturation", "dead"}}``: mean and variance over all elements;
        saturation = fraction of elements with |h| > 3 (where tanh/sigmoid saturate); dead =
        fraction of features (last dim of vectors/sequences, channels of convs) that are <= 0 for
        every sample (units a following ReLU never passes).
    """
    return _probe(state, x)[1]


def _probe(state: State, x: Tensor) -> tuple[Tensor, dict[str, dict[str, float]]]:
    """One eval forward that returns the output and the slot statistics of `activation_stats`."""
    plan = _plan(state)
    host_flat, seeds, alphas = _inputs(state, plan, state.params_flat, plan.live)
    live = _make_slot_fn(plan.live, seeds, alphas, False, [], {})
    specs = {s.name: s for s in state.host.slots(state._host_shapes())}
    names: list[str] = []
    rows: list[Tensor] = []

    def record(name, h, x_in=None):
        h = live(name, h, x_in)
        kind = specs[name].kind if name in specs else "vector"
        feat = 1 if kind in ("conv1d", "conv2d") else h.dim() - 1
        peak = h.amax(dim=tuple(d for d in range(h.dim()) if d != feat))
        var = h.var() if h.numel() > 1 else h.new_zeros(())
        rows.append(torch.stack([h.mean(), var, (h.abs() > 3).float().mean(), (peak <= 0).float().mean()]))
        names.append(name)
        return h

    y, _ = state.host.forward_fn(host_flat, x, record, False)
    values = torch.stack(rows).tolist() if rows else []
    return y, {n: dict(zip(("mean", "var", "saturation", "dead"), v)) for n, v in zip(names, values)}


def flops_per_sample(state: State, example: Tensor) -> int:
    """Floating-point operations of one forward on one sample, measured with
    `torch.utils.flop_counter.FlopCounterMode` (matmuls and convolutions; 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    plan = _plan(state)
    cache = state.host._plan_cache
    key = ("flops", tuple((n, state.blueprints[i]) for n, (_, _, i) in sorted(plan.live.items())),
           tuple((k, v.shape) for k, v in state.params_flat.items()))
    if key not in cache:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            from ._apply import apply

            apply(state, example[:1])
        cache[key] = int(counter.get_total_flops())
    return cache[key]


def telemetry(
    state: State, task: Task, train_metrics: Mapping[str, float]
) -> dict[str, float]:
    """Health signals for one epoch, as a flat dict of floats (see docs/telemetry.md).

    Keys: "val_loss", "val_accuracy", "params", "flops"; per slot ``<slot>/<signal>`` for the
    activation statistics; ``<layer>/weight_norm`` per host layer; "grad_norm/<group>" and
    ``<slot>/grad_ratio`` (seed / host gradient norm) copied from `train_metrics`; and
    ``<slot>/contribution`` for every live seed.
    """
    xv, yv = task.split("val")
    out: dict[str, float] = {}
    with torch.no_grad():
        logits, stats = _probe(state, xv)  # one forward gives the accuracy and the slot statistics
        out["val_loss"] = float(F.cross_entropy(logits, yv))
        out["val_accuracy"] = float((logits.argmax(-1) == yv).float().mean())
    for name, st in stats.items():
        for k, v in st.items():
            out[f"{name}/{k}"] = v
    layers: dict[str, float] = {}
    for k, v in state.params_flat.items():
        if k[0] == "host" and k[-1] == "weight":
            layers[".".join(k[1:-1])] = float(v.norm())
    for layer, v in layers.items():
        out[f"{layer}/weight_norm"] = v
    host_g = train_metrics.get("grad_norm/host", 0.0)
    for k, v in train_metrics.items():
        if k.startswith("grad_norm/"):
            out[k] = v
            g = k.split("/", 1)[1]
            if g != "host":
                out[f"{g}/grad_ratio"] = v / host_g if host_g > 0 else math.inf
    for slot, c in contributions(state, xv, yv).items():
        out[f"{slot}/contribution"] = c
    out["params"] = float(state.num_params())
    out["flops"] = float(flops_per_sample(state, xv))
    out["seeds_live"] = float(sum(state.stage(n) in (Stage.TRAINING, Stage.BLENDING, Stage.HOLDING) for n in state.slot_names))
    return out
