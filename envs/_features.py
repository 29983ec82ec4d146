"""Observation features of `MorphogenesisEnv` (every one documented in docs/env.md).

Each function computes the features of one env row from its `State` and validation/training
telemetry as plain tensors; the env pads them to the env's fixed shapes. Every feature is
normalised to O(1) (the transform is named next to each feature name below).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from esper_fn import LIVE_STAGES, SlotSpec, Stage, State
from esper_fn import blueprints as bpm

__all__ = ["GLOBAL_FEATURES", "INSTANCE_FEATURES", "LAYER_FEATURES", "NODE_FEATURES", "SLOT_FEATURES", "graph_edges",
           "instance_row"]

KINDS = ("vector", "conv1d", "conv2d", "sequence", "other")
LAYER_TYPES = ("linear", "conv1d", "conv2d", "attention", "block", "norm", "other")

SLOT_FEATURES: tuple[str, ...] = (
    *(f"stage_{s.name.lower()}" for s in Stage),  # one-hot of the lifecycle stage
    "alpha",                    # blend weight in [0, 1]
    "epochs_in_stage",          # min(epochs / 10, 2)
    "tempo",                    # blending tempo / 10 (0 without a seed)
    "has_seed",                 # 1 if the slot holds seed parameters (live or fossilized)
    "seed_param_ratio",         # seed parameters / host parameters at reset, clipped to [0, 4]
    "seed_mergeable",           # 1 if the seed folds into the host when fossilized
    "seed_risk",                # the blueprint's risk_score in [0, 1]
    "contribution",             # clip(10 * contribution, -5, 5) (accuracy points; 0 if unmeasured)
    "contribution_measured",    # 1 where the contribution was measured this epoch
    "grad_ratio",               # clip(log10(seed grad norm / host grad norm), -4, 4) / 4
    "grad_ratio_measured",      # 1 where the seed trained this epoch
    "act_mean",                 # tanh(mean of the slot tensor)
    "act_var",                  # tanh(log1p(variance of the slot tensor))
    "act_saturation",           # fraction of |h| > 3, in [0, 1]
    "act_dead",                 # fraction of dead features, in [0, 1]
    *(f"kind_{k}" for k in KINDS),  # one-hot of the slot tensor layout
    "depth",                    # slot index / (slots - 1)
    "log_features",             # log2(feature or channel count) / 8
    "is_input",                 # 1 for the slot on the raw input (no layer before it)
    "is_output",                # 1 for the last slot (the output side)
)

LAYER_FEATURES: tuple[str, ...] = (
    *(f"layer_{t}" for t in LAYER_TYPES),  # one-hot of the layer type
    "log_params",               # log10(1 + parameters under the layer) / 5
    "weight_scale",             # tanh(mean over weight matrices of rms(W) * sqrt(fan_in)) (~0.52 at init)
    "log_in",                   # log2(1 + input feature/channel count) / 8
    "log_out",                  # log2(1 + output feature/channel count) / 8
)

NODE_FEATURES: tuple[str, ...] = ("is_layer", "is_slot", *LAYER_FEATURES, *SLOT_FEATURES)

GLOBAL_FEATURES: tuple[str, ...] = (
    "epoch_fraction",           # epochs done / max_epochs
    "budget_left",              # 1 - epoch_fraction
    "train_loss",               # train loss / log(n_classes)
    "train_accuracy",           # in [0, 1]
    "val_loss",                 # validation loss / log(n_classes)
    "val_accuracy",             # in [0, 1]
    "val_accuracy_delta",       # clip(10 * (acc_t - acc_{t-1}), -5, 5)
    "val_loss_delta",           # clip(10 * (loss_t - loss_{t-1}) / log(n_classes), -5, 5)
    "val_accuracy_trend",       # clip(10 * (acc_t - acc_{t-5}) / 5, -5, 5) (slope over 5 epochs)
    "val_accuracy_vs_best",     # clip(10 * (acc_t - best acc so far), -5, 0)
    "epochs_since_best",        # min(epochs since the best validation accuracy / 10, 2)
    "generalisation_gap",       # train accuracy - validation accuracy
    "log_param_ratio",          # log2(parameters / parameters at reset)
    "log_flop_ratio",           # log2(FLOPs per sample / FLOPs at reset)
    "log_host_params",          # log10(parameters at reset) / 5
    "chance",                   # 1 / n_classes
    "seeds_live",               # live seeds / slots
    "seeds_fossilized",         # seeds fossilized this episode / slots
    "seeds_germinated",         # seeds germinated this episode / slots
    "rollbacks",                # rollbacks / (max_rollbacks + 1)
    "shadow_loss",              # shadow (incubation) loss / log(n_classes); 0 when nothing incubates
    "host_grad_norm",           # tanh(log10(host gradient norm) / 2); 0 before training
)


INSTANCE_FEATURES: tuple[str, ...] = (
    "log_train_samples",        # log10(training samples) / 4
    "input_flat",               # 1 for samples of one dimension (a vector or a univariate series)
    "input_series",             # 1 for samples [length, channels] (a multivariate series)
    "input_image",              # 1 for samples [channels, height, width]
    "log_input_size",           # log10(elements per sample) / 4
    "log_classes",              # log2(classes) / 4
    "log_horizon",              # log10(the episode's epochs) / 3
    "epochs_left",              # log10(1 + epochs left) / 3
    "has_budget",               # 1 if the episode has a parameter budget
    "budget_room",              # (budget - parameters) / parameters at reset, clipped to [0, 4] (0 without one)
    "log_params0",              # log10(parameters at reset) / 5
)
"""What tells instances apart (the ``"instance"`` key): the data, the horizon, the budget."""


def instance_row(*, n_train: int, input_shape: Sequence[int], n_classes: int, epoch: int, max_epochs: int,
                 params: int, params0: int, param_budget: int | None) -> list[float]:
    """Instance features (`INSTANCE_FEATURES`) of one episode."""
    rank = len(input_shape)
    size = math.prod(input_shape)
    room = 0.0 if param_budget is None else _clip((param_budget - params) / params0, 0.0, 4.0)
    return [
        math.log10(max(n_train, 1)) / 4,
        float(rank == 1),
        float(rank == 2),
        float(rank == 3),
        math.log10(max(size, 1)) / 4,
        math.log2(max(n_classes, 2)) / 4,
        math.log10(max_epochs) / 3,
        math.log10(1 + max(max_epochs - epoch, 0)) / 3,
        float(param_budget is not None),
        room,
        math.log10(params0) / 5,
    ]


def _clip(x: float, lo: float, hi: float) -> float:
    if math.isnan(x):
        return 0.0
    return min(max(x, lo), hi)


def slot_rows(state: State, specs: Sequence[SlotSpec], metrics: Mapping[str, float], params0: int) -> list[list[float]]:
    """Per-slot features (`SLOT_FEATURES`) of one row, one list per slot in host order."""
    slots = state.slots
    stage = slots["stage"].tolist()
    alpha = slots["alpha"].tolist()
    epochs = slots["epochs"].tolist()
    tempo = slots["tempo"].tolist()
    S = len(state.slot_names)
    reg = bpm.registry()
    rows = []
    for i, (name, spec) in enumerate(zip(state.slot_names, specs)):
        st = Stage(stage[i])
        bid = state.blueprints[i]
        onehot = [0.0] * len(Stage)
        onehot[int(st)] = 1.0
        has_seed = bid is not None
        n_seed = sum(v.numel() for k, v in state.params_flat.items() if k[0] == "seeds" and k[1] == name)
        meta = reg[bid].meta if has_seed else None
        c = metrics.get(f"{name}/contribution")
        gr = metrics.get(f"{name}/grad_ratio")
        grv = 0.0
        if gr is not None:
            grv = 1.0 if math.isinf(gr) else _clip(math.log10(max(gr, 1e-12)), -4.0, 4.0) / 4
        kind = [0.0] * len(KINDS)
        kind[KINDS.index(spec.kind) if spec.kind in KINDS else len(KINDS) - 1] = 1.0
        rows.append([
            *onehot,
            float(alpha[i]),
            min(epochs[i] / 10, 2.0),
            tempo[i] / 10 if has_seed else 0.0,
            float(has_seed),
            _clip(n_seed / params0, 0.0, 4.0),
            float(meta.mergeable) if meta else 0.0,
            float(meta.risk_score) if meta else 0.0,
            _clip(10 * c, -5.0, 5.0) if c is not None else 0.0,
            float(c is not None),
            grv,
            float(gr is not None),
            math.tanh(_clip(metrics.get(f"{name}/mean", 0.0), -1e6, 1e6)),
            math.tanh(math.log1p(_clip(metrics.get(f"{name}/var", 0.0), 0.0, 1e12))),
            _clip(metrics.get(f"{name}/saturation", 0.0), 0.0, 1.0),
            _clip(metrics.get(f"{name}/dead", 0.0), 0.0, 1.0),
            *kind,
            i / (S - 1) if S > 1 else 0.0,
            math.log2(max(spec.features, 1)) / 8,
            float(spec.layer is None),
            float(i == S - 1),
        ])
    return rows


def _layer_row(state: State, spec: SlotSpec) -> list[float]:
    prefix = tuple(spec.layer.split("."))
    n = len(prefix)
    tensors = [v for k, v in state.params_flat.items() if k[0] == "host" and k[1:1 + n] == prefix]
    n_params = sum(v.numel() for v in tensors)
    scales = []
    for k, v in state.params_flat.items():
        if k[0] == "host" and k[1:1 + n] == prefix and k[-1] == "weight" and v.dim() >= 2:
            # rms(W) * sqrt(fan_in) = ||W|| * sqrt(fan_in / numel) = ||W|| / sqrt(out)
            scales.append(float(v.detach().norm()) / math.sqrt(v.shape[0]))
    scale = sum(scales) / len(scales) if scales else 0.0
    ltype = [0.0] * len(LAYER_TYPES)
    t = spec.layer_type if spec.layer_type in LAYER_TYPES else "other"
    ltype[LAYER_TYPES.index(t)] = 1.0
    fin = spec.in_shape[-1] if spec.kind in ("vector", "sequence") and spec.in_shape else (
        spec.in_shape[0] if spec.in_shape else 0)
    return [*ltype, math.log10(1 + n_params) / 5, math.tanh(_clip(scale, 0.0, 1e6)),
            math.log2(1 + fin) / 8, math.log2(1 + spec.features) / 8]


def graph_nodes(specs: Sequence[SlotSpec]) -> list[tuple[str, int]]:
    """Nodes of the layer/slot graph in forward order: ``("layer", slot index)`` for the layer a
    slot follows, then ``("slot", slot index)``."""
    nodes = []
    for i, spec in enumerate(specs):
        if spec.layer is not None:
            nodes.append(("layer", i))
        nodes.append(("slot", i))
    return nodes


def graph_edges(n_nodes: int) -> list[tuple[int, int]]:
    """Edges of the chain through the nodes in forward order, both directions (src, dst)."""
    fwd = [(j, j + 1) for j in range(n_nodes - 1)]
    return fwd + [(b, a) for a, b in fwd]


def node_rows(state: State, specs: Sequence[SlotSpec], slot_feats: list[list[float]]) -> list[list[float]]:
    """Node features (`NODE_FEATURES`) of one row, one list per node of `graph_nodes`."""
    zl, zs = [0.0] * len(LAYER_FEATURES), [0.0] * len(SLOT_FEATURES)
    out = []
    for kind, i in graph_nodes(specs):
        if kind == "layer":
            out.append([1.0, 0.0, *_layer_row(state, specs[i]), *zs])
        else:
            out.append([0.0, 1.0, *zl, *slot_feats[i]])
    return out


def global_row(*, epoch: int, max_epochs: int, metrics: Mapping[str, float], history: Sequence[Mapping[str, float]],
               n_classes: int, params: int, params0: int, flops: float, flops0: float, state: State,
               fossilized: int, germinated: int, rollbacks: int, max_rollbacks: int) -> list[float]:
    """Global features (`GLOBAL_FEATURES`) of one row.

    Args:
        history: validation metrics of the episode so far, oldest first, ending with the current
            epoch's (the reset evaluation first).
    """
    logc = math.log(n_classes) if n_classes > 1 else 1.0
    accs = [h["val_accuracy"] for h in history]
    losses = [h["val_loss"] for h in history]
    acc, loss = accs[-1], losses[-1]
    prev_acc = accs[-2] if len(accs) > 1 else acc
    prev_loss = losses[-2] if len(losses) > 1 else loss
    old_acc = accs[-6] if len(accs) > 5 else accs[0]
    span = min(5, len(accs) - 1)
    best = max(accs)
    since = len(accs) - 1 - max(j for j, a in enumerate(accs) if a == best)
    S = len(state.slot_names)
    live = sum(Stage(int(s)) in LIVE_STAGES for s in state.slots["stage"].tolist())
    g_host = metrics.get("grad_norm/host")
    return [
        epoch / max_epochs,
        1.0 - epoch / max_epochs,
        _clip(metrics.get("train_loss", loss) / logc, 0.0, 10.0),
        metrics.get("train_accuracy", acc),
        _clip(loss / logc, 0.0, 10.0),
        acc,
        _clip(10 * (acc - prev_acc), -5.0, 5.0),
        _clip(10 * (loss - prev_loss) / logc, -5.0, 5.0),
        _clip(10 * (acc - old_acc) / span, -5.0, 5.0) if span else 0.0,
        _clip(10 * (acc - best), -5.0, 0.0),
        min(since / 10, 2.0),
        metrics.get("train_accuracy", acc) - acc,
        math.log2(params / params0),
        math.log2(flops / flops0) if flops0 > 0 and flops > 0 else 0.0,
        math.log10(params0) / 5,
        1.0 / n_classes,
        live / S,
        fossilized / S,
        germinated / S,
        rollbacks / (max_rollbacks + 1),
        _clip(metrics.get("shadow_loss", 0.0) / logc, 0.0, 10.0),
        math.tanh(math.log10(max(g_host, 1e-12)) / 2) if g_host else 0.0,
    ]


