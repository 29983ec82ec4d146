"""Tolaria: the functional training loop and its health telemetry.

`train_epoch` runs one epoch of `train_step`s and returns metrics as data; `evaluate` measures loss
and accuracy; `telemetry` computes the per-slot health signals a controller reads (definitions and
units in docs/telemetry.md). Nothing here prints or logs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from ._apply import INCUBATING, LIVE, slot_inputs, make_slot_fn, on_masks, make_plan, forward_pass, roles, train_step, trained_keys
from ._apply import check_batch
from ._errors import GraftError
from ._lifecycle import Stage
from ._state import State, partition, stack, unstack
from .tasks import Task

if TYPE_CHECKING:
    from .tezzeret import KernelCache

__all__ = ["TrainConfig", "contribution_stats", "contributions", "evaluate", "flops_per_sample", "grad_norms",
           "telemetry", "train_epoch", "train_epochs"]


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
    state: State, task: Task, config: TrainConfig | None = None, *, generator: torch.Generator,
    kernels: KernelCache | None = None,
) -> tuple[State, dict[str, float]]:
    """One pass over the training split.

    Args:
        state: a single (unstacked) state.
        task: the data; batches are drawn with `generator`.
        config: batch size and incubation mode.
        generator: orders the samples (advanced by one draw).
        kernels: opt-in compiled steps (`esper_fn.tezzeret.KernelCache`): the kernel for the
            state's structure is prepared (compiled if new) before the first batch, never mid-epoch.

    Returns:
        ``(state, metrics)`` with "train_loss" and "train_accuracy" (running means over the epoch,
        measured on the live forward before each update), "shadow_loss" while seeds incubate, and
        "grad_norm/<group>" (root mean square over steps of the gradient norm) for "host" and each
        trained seed slot.
    """
    if state.batch:
        raise GraftError(f"train_epoch takes a single state (got batch {state.batch}); for many hosts use "
                         "`train_epochs(unstack(state), ...)`, which gives each host its own data order.")
    return _epoch(state, task, config or TrainConfig(), [generator], kernels)[0]


def train_epochs(
    states: Sequence[State],
    tasks: Task | Sequence[Task],
    config: TrainConfig | None = None,
    *,
    generators: Sequence[torch.Generator],
    kernels: KernelCache | None = None,
) -> list[tuple[State, dict[str, float]]]:
    """One epoch for each of N hosts, batched: hosts of one structure and task train in one stacked
    call (`partition`), whatever their stages and alphas (eager groups of fewer than `MIN_STACK`
    hosts train one by one, which measures faster).

    Each host draws its data order from its own generator, exactly as `train_epoch` would, so the
    result equals N separate `train_epoch` calls (within float rounding of the vectorised kernels),
    and a host's batches never depend on what the other hosts do.

    Args:
        states: N single (unstacked) states.
        tasks: one task for all, or one per state (grouping uses task identity).
        config: batch size and incubation mode.
        generators: N generators, one per state (each advanced by one draw).
        kernels: opt-in compiled steps (`esper_fn.tezzeret.KernelCache`), one kernel per group
            structure, prepared before the group's first batch.

    Returns:
        ``[(state, metrics)]`` aligned with `states`; metrics as in `train_epoch`.
    """
    n = len(states)
    tasks = [tasks] * n if isinstance(tasks, Task) else list(tasks)
    if len(tasks) != n or len(generators) != n:
        raise GraftError(f"train_epochs: {n} states need {n} tasks and {n} generators, got {len(tasks)} and "
                         f"{len(generators)}.")
    config = config or TrainConfig()
    out: list = [None] * n
    for group in partition(states):
        by_task: dict[int, list[int]] = {}
        for j in group:
            by_task.setdefault(id(tasks[j]), []).append(j)
        for idx in by_task.values():
            if len(idx) < MIN_STACK and kernels is None:
                for j in idx:
                    out[j] = _epoch(states[j], tasks[j], config, [generators[j]])[0]
                continue
            st = states[idx[0]] if len(idx) == 1 else stack([states[j] for j in idx])
            for j, res in zip(idx, _epoch(st, tasks[idx[0]], config, [generators[j] for j in idx], kernels)):
                out[j] = res
    return out


MIN_STACK = 3
"""Eager groups of fewer hosts train one by one: measured on MNIST-1D mlp-impaired (one thread), two
stacked hosts train at 0.75-0.94x the speed of two separate calls (vmap's per-op cost outweighs the
batching), four at 1.4-1.7x, sixteen at 2-5x (docs/benchmarks.md)."""


def _epoch(state: State, task: Task, config: TrainConfig, generators: Sequence[torch.Generator],
           kernels: KernelCache | None = None):
    """One epoch of a single or stacked state; returns [(single state, metrics)] per host."""
    batched = bool(state.batch)
    x, y = task.split("train")
    n, bs = x.shape[0], config.batch_size
    if batched:
        # The same draw `Task.batches` makes, once per host: each host keeps its own data order.
        order = torch.stack([torch.randperm(n, generator=g) for g in generators]).to(x.device)
        xs, ys = x[order], y[order]  # one gather per epoch, on the data's device
        batches = ((xs[:, i:i + bs], ys[:, i:i + bs]) for i in range(0, n, bs))
    else:
        batches = task.batches("train", bs, generator=generators[0])
    keys = trained_keys(state, config.incubation)
    groups = ["host" if k[0] == "host" else k[1] for k in keys]
    losses, corrects, shadows, grad_sqs, sizes = [], [], [], [], []
    kw = dict(incubation=config.incubation, aux_weight=config.aux_weight, grad_stats=True, with_output=True)
    if kernels is not None:  # compile (if new) here, before the epoch, never in its middle
        batches = iter(batches)
        first = next(batches)
        kernels.prepare(state, *first, **kw)
        batches = itertools.chain([first], batches)
    for step, (xb, yb) in enumerate(batches):
        if kernels is not None:
            state, m = kernels.step(state, xb, yb, **kw)
        else:  # the caller's state is never donated; the intermediate states are ours alone
            state, m = train_step(state, xb, yb, **kw, donate=step > 0)
        losses.append(m["loss"])
        corrects.append((m["output"].argmax(-1) == yb).sum(-1))
        if "shadow_loss" in m:
            shadows.append(m["shadow_loss"])
        grad_sqs.append(m["grad_sq"])
        sizes.append(yb.shape[-1])
    # Everything above stayed on the device (no value was read per batch); the epoch's numbers come
    # back to the CPU here, in one transfer per quantity.
    dt = torch.promote_types(losses[0].dtype, torch.float32)  # sums of bfloat16 losses in float32
    w = torch.tensor(sizes, dtype=dt, device=losses[0].device)
    loss = ((torch.stack(losses, -1).to(dt) @ w) / n).cpu()  # [] or [N]
    acc = (torch.stack(corrects, -1).sum(-1).float() / n).cpu()
    shadow = ((torch.stack(shadows, -1).to(dt) @ w) / n).cpu() if shadows else None
    grad_sq = torch.stack(grad_sqs).mean(0).cpu() if grad_sqs else torch.zeros(len(keys))  # [K] or [N, K]
    hosts = unstack(state) if batched else [state]
    r = roles(state).reshape(len(hosts), -1).tolist() if state.slot_names else [[] for _ in hosts]
    slot_index = {name: i for i, name in enumerate(state.slot_names)}
    results = []
    for j, host_state in enumerate(hosts):
        trained = {LIVE, INCUBATING} if config.incubation == "shadow" else {LIVE}
        mine = {"host"} | {g for g in groups if g != "host" and r[j][slot_index[g]] in trained}
        out = {"train_loss": float(loss.reshape(-1)[j]), "train_accuracy": float(acc.reshape(-1)[j])}
        if shadow is not None and INCUBATING in r[j]:
            out["shadow_loss"] = float(shadow.reshape(-1)[j])
        per_group: dict[str, float] = {}
        row = grad_sq[j] if batched else grad_sq
        for g, v in zip(groups, row.tolist()):
            if g in mine:
                per_group[g] = per_group.get(g, 0.0) + v
        for g, v in per_group.items():
            out[f"grad_norm/{g}"] = math.sqrt(v)
        results.append((host_state, out))
    return results


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
def contributions(state: State, x: Tensor, y: Tensor, *, logits: Tensor | None = None
                  ) -> dict[str, float] | list[dict[str, float]]:
    """Counterfactual contribution of every seed in the live forward (BLENDING with alpha > 0,
    HOLDING, FOSSILIZED).

    The network as it is, then once per live seed the network without that seed (its alpha at 0:
    the seed is left out of the forward, so it costs nothing there); each forward covers every
    host of a stacked state (vmapped).

    Args:
        state: a single or stacked state.
        x, y: a batch ([B, ...], [B]); for a stacked state the same batch serves every host, or
            pass one per host ([N, B, ...], [N, B]).
        logits: the network's eval output on `x` if the caller has it (`telemetry` does), so the
            as-is forward is not run twice.

    Returns:
        ``{slot: accuracy with the seed - accuracy without it}`` in accuracy points [-1, 1]; for a
        stacked state, one such dict per host (each with the seeds live on that host).
        `contribution_stats` adds the standard error the fossilize gate reads.
    """
    stats = contribution_stats(state, x, y, logits=logits)
    rows = stats if state.batch else [stats]
    out = [{slot: v["contribution"] for slot, v in row.items()} for row in rows]
    return out if state.batch else out[0]


@torch.no_grad()
def contribution_stats(state: State, x: Tensor, y: Tensor, *, logits: Tensor | None = None
                       ) -> dict[str, dict[str, float]] | list[dict[str, dict[str, float]]]:
    """`contributions`, with the standard error of each: the evidence the fossilize gate reads.

    Per validation sample i, ``d_i = correct_i(with the seed) - correct_i(without it)`` is -1, 0 or
    +1; the contribution is their mean (the accuracy difference) and its standard error is
    ``stdev(d) / sqrt(B)`` (sample standard deviation, B - 1 in its denominator), the standard error
    of a paired difference. It is 0 where every sample changed the same way (or none did), and
    infinite for B < 2 (one sample is no evidence).

    Args:
        state, x, y, logits: as `contributions`.

    Returns:
        ``{slot: {"contribution": float, "se": float}}`` (one dict per host when stacked);
        "contribution" equals `contributions`'.
    """
    plan = make_plan(state)
    entries = plan.live
    nb = len(state.batch)
    if nb and y.dim() == 1:  # one batch for every host
        x, y = x.expand(*state.batch, *x.shape), y.expand(*state.batch, *y.shape)
    n_hosts = state.batch[0] if nb else 1
    if not entries:
        return [{} for _ in range(n_hosts)] if nb else {}

    def correct(out: Tensor) -> Tensor:
        return out.reshape(*y.shape, -1).argmax(-1) == y

    def accuracy(right: Tensor) -> Tensor:
        return right.float().mean(-1).reshape(n_hosts)

    if logits is None:
        logits = forward_pass(state, plan, entries, state.params_flat, x, False)[0]
    right = correct(logits)
    live = accuracy(right)
    n = y.shape[-1]
    r = roles(state).reshape(n_hosts, -1)
    out: list[dict[str, dict[str, float]]] = [{} for _ in range(n_hosts)]
    for name, entry in entries.items():
        without = {k: e for k, e in entries.items() if k != name}
        right_without = correct(forward_pass(state, plan, without, state.params_flat, x, False)[0])
        acc = accuracy(right_without)
        d = (right.double() - right_without.double()).reshape(n_hosts, n)  # paired per-sample differences
        se = (d.std(-1, correction=1) / math.sqrt(n)).tolist() if n > 1 else [math.inf] * n_hosts
        for h in range(n_hosts):
            if r[h, entry[2]] == LIVE:
                out[h][name] = {"contribution": float(live[h] - acc[h]), "se": float(se[h])}
    return out if nb else out[0]


def grad_norms(state: State, grad_sq: Tensor, incubation: str = "shadow") -> dict[str, float]:
    """The ``grad_norm/<group>`` train metrics (what the gradient gate reads) from a custom loop.

    Args:
        state: the single state the steps trained (its structure gives the trained keys).
        grad_sq: float32 [K], the "grad_sq" metric of ``train_step(..., grad_stats=True)``, aligned
            with `trained_keys(state, incubation)`; one step's, or the mean over an epoch's steps
            (then the result equals `train_epoch`'s: the root mean square over steps of the norm).
        incubation: the train steps' incubation mode.

    Returns:
        ``{"grad_norm/host": float, "grad_norm/<slot>": float, ...}`` for the host and every
        trained seed slot.
    """
    keys = trained_keys(state, incubation)
    if state.batch or tuple(grad_sq.shape) != (len(keys),):
        raise GraftError(f"grad_norms: a single state's {len(keys)} trained keys need grad_sq of shape "
                         f"[{len(keys)}], got {tuple(grad_sq.shape)} (batch {state.batch}); pass the \"grad_sq\" "
                         "metric of train_step(..., grad_stats=True) on this state (unstack a stacked one).")
    per_group: dict[str, float] = {}
    for k, v in zip(keys, grad_sq.tolist()):
        g = "host" if k[0] == "host" else k[1]
        per_group[g] = per_group.get(g, 0.0) + v
    return {f"grad_norm/{g}": math.sqrt(v) for g, v in per_group.items()}


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


_STATS = ("mean", "var", "saturation", "dead")


def _probe(state: State, x: Tensor):
    """One eval forward that returns the output and the slot statistics of `activation_stats`
    (one dict per host for a stacked state, with `x` shared by every host)."""
    plan = make_plan(state)
    specs = {s.name: s for s in state.host.slots(state._host_shapes())}
    names: list[str] = []

    def one(host_flat, seeds, alphas, on):
        live = make_slot_fn(plan.live, seeds, alphas, False, [], {}, on)
        rows: list[Tensor] = []
        names.clear()

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
        return y, (torch.stack(rows) if rows else x.new_zeros(0, 4))

    host_flat, seeds, alphas = slot_inputs(state, plan, state.params_flat, plan.live)
    if state.batch:
        y, stats = torch.vmap(one)(host_flat, seeds, alphas, on_masks(state, plan, plan.live))
        values = stats.tolist()
        return y, [{n: dict(zip(_STATS, v)) for n, v in zip(names, per)} for per in values]
    y, stats = one(host_flat, seeds, alphas, {})
    return y, {n: dict(zip(_STATS, v)) for n, v in zip(names, stats.tolist())}


def flops_per_sample(state: State, example: Tensor) -> int:
    """Floating-point operations of one forward on one sample, measured with
    `torch.utils.flop_counter.FlopCounterMode` (matmuls and convolutions; 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    plan = make_plan(state)
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
    state: State, task: Task | tuple[Tensor, Tensor],
    train_metrics: Mapping[str, float] | Sequence[Mapping[str, float]],
) -> dict[str, float] | list[dict[str, float]]:
    """Health signals for one epoch, as a flat dict of floats (see docs/telemetry.md).

    Keys: "val_loss", "val_accuracy", "params", "flops"; per slot ``<slot>/<signal>`` for the
    activation statistics; ``<layer>/weight_norm`` per host layer; "grad_norm/<group>" and
    ``<slot>/grad_ratio`` (seed / host gradient norm) copied from `train_metrics`; and
    ``<slot>/contribution`` with its standard error ``<slot>/contribution_se``
    (`contribution_stats`) for every live seed. The lifecycle gates read "grad_norm/<slot>",
    "<slot>/contribution" and "<slot>/contribution_se".

    Args:
        state: a single state, or a stacked one (all hosts measured in one vectorised pass).
        task: the data (its validation split is measured), or the validation tensors ``(x, y)``
            themselves (x float32 [B, *input_shape], y int64 [B]).
        train_metrics: the epoch's `train_epoch` metrics (or, from a loop of `train_step`s,
            `grad_norms`'s); one dict per host when stacked; ``{}`` for none.

    Returns:
        The dict, or one dict per host for a stacked state.
    """
    xv, yv = task.split("val") if isinstance(task, Task) else task
    check_batch(state, xv, shared=True)  # one validation batch serves every host
    nb = len(state.batch)
    rows = list(train_metrics) if nb else [train_metrics]
    n_hosts = state.batch[0] if nb else 1
    if len(rows) != n_hosts:
        raise GraftError(f"telemetry: {n_hosts} stacked hosts need {n_hosts} train-metrics dicts, got {len(rows)}.")
    with torch.no_grad():
        logits, stats = _probe(state, xv)  # one forward gives the accuracy and the slot statistics
        logits = logits.reshape(n_hosts, *logits.shape[-2:])
        val_loss = F.cross_entropy(logits.transpose(1, 2), yv.expand(n_hosts, -1), reduction="none").mean(-1)
        val_acc = (logits.argmax(-1) == yv).float().mean(-1)
        contrib = contribution_stats(state, xv, yv, logits=logits)
        norms = {".".join(k[1:-1]): v.reshape(n_hosts, -1).norm(dim=-1).tolist()
                 for k, v in state.params_flat.items() if k[0] == "host" and k[-1] == "weight"}
    stats = stats if nb else [stats]
    contrib = contrib if nb else [contrib]
    hosts = unstack(state) if nb else [state]
    n_params = float(state.num_params())
    out_rows = []
    for h, (host, m) in enumerate(zip(hosts, rows)):
        out: dict[str, float] = {"val_loss": float(val_loss[h]), "val_accuracy": float(val_acc[h])}
        for name, st in stats[h].items():
            for k, v in st.items():
                out[f"{name}/{k}"] = v
        for layer, v in norms.items():
            out[f"{layer}/weight_norm"] = v[h]
        host_g = m.get("grad_norm/host", 0.0)
        for k, v in m.items():
            if k.startswith("grad_norm/"):
                out[k] = v
                g = k.split("/", 1)[1]
                if g != "host":
                    out[f"{g}/grad_ratio"] = v / host_g if host_g > 0 else math.inf
        for slot, c in contrib[h].items():
            out[f"{slot}/contribution"] = c["contribution"]
            out[f"{slot}/contribution_se"] = c["se"]
        out["params"] = n_params
        out["flops"] = float(flops_per_sample(host, xv))
        out["seeds_live"] = float(sum(host.stage(n) in (Stage.TRAINING, Stage.BLENDING, Stage.HOLDING)
                                      for n in host.slot_names))
        out_rows.append(out)
    return out_rows if nb else out_rows[0]
