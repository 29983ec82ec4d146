"""Emrakul: sculpting grown networks (removing committed structure).

`sculpt(state, target, keep=...)` removes hidden units of a fossilized seed, or of a host layer, and
returns a smaller state. A *unit* is one hidden feature between an elementwise nonlinearity and a
linear map: a hidden neuron of a Linear that another Linear reads through its activation (an MLP's
``fc1``, a wrapped ``nn.Sequential``'s Linear -> ReLU -> Linear), a channel of a built-in CNN's conv
layer (its weight rows and bias, and the next conv's input channels or the head's block of flattened
positions), or a hidden unit or channel that a seed's blueprint declares (`Blueprint.units`: the
residual MLP and SwiGLU blocks, the plain and bottleneck conv blocks). Removing unit ``j`` drops its
producing rows and bias entries and its consuming columns, in the parameters and in every optimizer
moment (Adam's ``mu`` and ``nu``; the per-leaf step counts are kept), so training continues where it
was. The function changes by exactly the unit's term in the consumer's output.

Which units go:

* ``by="contribution"`` (default) measures it on a batch: removing units one at a time, greedily, the
  one whose removal adds the least divergence between the network's class probabilities and the
  unsculpted network's (mean KL over the batch) per parameter it frees, re-measured after every
  removal (each candidate is measured by zeroing its outgoing weights, which computes the same
  function as removing it);
* ``by="magnitude"`` needs no data: the L2 norm of the unit's outgoing weights, per parameter freed.

What is sculptable at a slot (`sculptable`): the slot's fossilized seed if it holds one (a
non-mergeable seed kept as structure; mergeable seeds fold into the host's weights when they
fossilize, so sculpting the host layer covers them), else the host layer the slot follows. A live
seed (GERMINATED to HOLDING) is refused: it is not committed yet (fossilize or prune it first). A host
layer is refused while its own slot holds a seed (which reads the layer's width) or the slot after
its consumer holds one that reads the consumer's input (LoRA, IA3, width growth).

The report (`SculptReport`) carries the parameters before and after, the units removed per target,
and, given data, the measured change of function (max and mean |delta logits|, accuracy before and
after) and an a-priori bound on max |delta logits| where one is cheap: when every removed unit is a
host unit feeding the output layer directly, ``sum_j max|a_j| * max_o sum |W[o, j]|`` over the removed
units j (activations a_j measured on the batch, W the output layer's columns of unit j).

Sculpted states train, stack, checkpoint (`esper_fn.state_from_tensors` accepts host unit groups and
fossilized seeds' unit groups that are smaller than at init, consistently across their tensors) and
export (`esper_fn.export`) like any other.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from . import _blueprint as bpm
from ._apply import apply, make_plan, make_slot_fn, slot_inputs
from ._errors import SculptError
from ._host import Host
from ._lifecycle import LIVE_STAGES, Stage
from ._state import Key, State, derive
from .events import Sculpted

__all__ = ["ALLOCATIONS", "CRITERIA", "SculptReport", "Target", "TargetReport", "host_units", "sculpt", "sculptable"]

CRITERIA: tuple[str, ...] = ("contribution", "magnitude")
ALLOCATIONS: tuple[str, ...] = ("greedy", "even")
"""How a float keep spreads the removals over unit groups: "greedy" takes the least important unit
per freed parameter anywhere; "even" removes the same fraction of every group (its least important
units), as structured pruning does."""
"""How `sculpt` ranks units: measured on data, or by the norm of their outgoing weights."""

Member = tuple[str, int, int, str]
"""One tensor of a unit group: (dotted parameter name, dim, block, role). Unit ``u`` is the indices
``[u * block, (u + 1) * block)`` along ``dim``; role "in" (producing rows, bias) or "out" (consuming
columns)."""


def host_units(host: Host, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[Member, ...]]:
    """The host layers whose units Emrakul can remove, for the given parameter shapes.

    The one rule for host unit groups (`sculpt` and checkpoint verification both read it):

    * a slot with a consumer Linear (an MLP's hidden layers; a wrapped ``nn.Sequential``'s Linear ->
      elementwise activation -> Linear): the layer's weight rows and bias, the consumer's weight
      columns;
    * a conv layer of a built-in CNN (``cnn1d``, ``cnn2d``: conv -> ReLU -> conv ... -> flatten -> fc):
      the conv's output channels (weight rows, bias) and the next conv's input channels, or for the
      last conv the head's columns, one block of flattened positions per channel.

    Args:
        host: the host.
        shapes: ``{dotted parameter name: shape}`` of the host's current parameters.

    Returns:
        ``{slot name: ((dotted name, dim, block, role), ...)}``.
    """
    specs = host.slots(shapes)
    kind = host.config.get("kind")
    convs = [s for s in specs if s.layer_type in ("conv1d", "conv2d")] if kind in ("cnn1d", "cnn2d") else []
    out: dict[str, tuple[Member, ...]] = {}
    for s in specs:
        if s.layer is None:
            continue
        bias = (f"{s.layer}.bias", 0, 1, "in") if f"{s.layer}.bias" in shapes else None
        if s.consumer_layer is not None:
            consumer, block = s.consumer_layer, 1
        elif s in convs:
            i = convs.index(s)
            if i + 1 < len(convs):
                consumer, block = convs[i + 1].layer, 1
            else:
                consumer = "fc"
                block = shapes["fc.weight"][1] // shapes[f"{s.layer}.weight"][0]
        else:
            continue
        members = [(f"{s.layer}.weight", 0, 1, "in"), bias, (f"{consumer}.weight", 1, block, "out"),
                   (f"{consumer}.bias", 0, 1, "bias") if f"{consumer}.bias" in shapes else None]
        out[s.name] = tuple(m for m in members if m is not None)
    return out


@dataclass(frozen=True)
class Target:
    """What sculpting one slot would shrink.

    Attributes:
        slot: the slot that names it.
        kind: "seed" (the slot's fossilized seed) or "host" (the layer the slot follows).
        name: the seed's blueprint id, or the host layer's path.
        groups: per unit group, its tensors as ``(parameter key, dim, block, role)``.
        units: the unit count of each group.
        unit_params: the parameters one unit of each group holds (what removing it frees).
    """

    slot: str
    kind: str
    name: str
    groups: tuple[tuple[tuple[Key, int, int, str], ...], ...]
    units: tuple[int, ...]
    unit_params: tuple[int, ...]


def _groups_of(state: State, slot: str) -> tuple[str, str, tuple] | str:
    """(kind, name, groups) of what sculpting `slot` would shrink, or why nothing can be."""
    i = state.index(slot)
    stage = state.stage(slot)
    bid = state.blueprints[i]
    if stage in LIVE_STAGES:
        return (f"slot {slot!r} holds a live seed ({bid}, {stage.name}); sculpting removes committed structure only: "
                "fossilize the seed first (or prune it)")
    if stage == Stage.FOSSILIZED:
        bp = bpm.registry()[bid]
        if not bp.units:
            return (f"slot {slot!r} holds fossilized seed {bid}, whose blueprint declares no hidden units Emrakul can "
                    "remove (`Blueprint.units` is empty)")
        return "seed", bid, tuple(tuple((("seeds", slot, n), d, 1, r) for n, d, r in g) for g in bp.units)
    shapes = state._host_shapes()
    layers = host_units(state.host, shapes)
    spec = state.spec(slot)
    if slot not in layers:
        what = "the network's input" if spec.layer is None else f"layer {spec.layer!r}"
        return (f"slot {slot!r} holds no seed and follows {what}, which has no hidden units Emrakul can remove (units "
                "are read by a linear layer through an elementwise activation: an MLP's hidden layers, a built-in "
                "CNN's convs)")
    members = layers[slot]
    consumer = next(m[0].rsplit(".", 1)[0] for m in members if m[3] == "out")
    for other in state.slot_specs():
        bp_other = state.blueprints[state.index(other.name)]
        if other.layer == consumer and bp_other is not None and _reads_input_width(bpm.registry()[bp_other], other):
            return (f"layer {spec.layer!r} at slot {slot!r} feeds layer {consumer!r}, and slot {other.name!r} holds "
                    f"{bp_other}, which reads that layer's input and was built for its width: fossilize or prune "
                    f"the seed at {other.name!r} first")
    return "host", spec.layer, (tuple((("host", *n.split(".")), d, b, r) for n, d, b, r in members),)


def _reads_input_width(bp: bpm.Blueprint, spec) -> bool:
    """Whether a seed at `spec` has tensors sized by the input width of the layer its slot follows
    (LoRA, width growth), found by building it for a narrower input."""
    if spec.in_shape is None:
        return False
    narrower = replace(spec, in_shape=(*spec.in_shape[:-1], max(1, spec.in_shape[-1] - 1)) if len(spec.in_shape) == 1
                       else (max(1, spec.in_shape[0] - 1), *spec.in_shape[1:]))
    if bp.misfit(narrower) is not None:
        return True
    g = torch.Generator().manual_seed(0)
    shapes = lambda s: {k: tuple(v.shape) for d in bp.init(s, g) for k, v in d.items()}  # noqa: E731
    return shapes(spec) != shapes(narrower)


def _target(state: State, slot: str) -> Target:
    if slot not in state.slot_names:
        raise SculptError(f"sculpt: host {state.host.name!r} has no slot {slot!r}; its slots are "
                          f"{list(state.slot_names)} (sculptable now: {sorted(sculptable(state))}).")
    got = _groups_of(state, slot)
    if isinstance(got, str):
        raise SculptError(f"sculpt {slot!r}: {got}. Sculptable now: {sorted(sculptable(state)) or 'nothing'} "
                          "(`esper_fn.sculptable(state)`).")
    kind, name, groups = got
    units, costs = [], []
    for g in groups:
        cut = [(k, d, b) for k, d, b, r in g if r != "bias"]
        counts = {state.params_flat[k].shape[d] // b for k, d, b in cut}
        if len(counts) != 1:
            raise SculptError(f"sculpt {slot!r}: the tensors of one unit group disagree on its unit count {sorted(counts)}"
                              f" ({[('/'.join(k), d) for k, d, _ in cut]}); the state is inconsistent.")
        n = counts.pop()
        units.append(n)
        costs.append(sum(state.params_flat[k].numel() // n for k, _, _ in cut))
    return Target(slot, kind, name, groups, tuple(units), tuple(costs))


def sculptable(state: State) -> dict[str, Target]:
    """What `sculpt` can shrink now: per slot, its fossilized seed or its host layer (see the module
    docstring); slots where nothing can be sculpted are absent.

    Args:
        state: a single (unstacked) state.

    Raises:
        SculptError: `state` is stacked.
    """
    _single(state)
    out = {}
    for s in state.slot_names:
        if not isinstance(_groups_of(state, s), str):
            out[s] = _target(state, s)
    return out


class TargetReport(BaseModel):
    """What a sculpt did to one target.

    Attributes:
        slot: the slot naming it; kind: "seed" or "host"; name: blueprint id or layer path.
        units_before, units_after: unit count per group.
        params_removed: parameters freed there.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    slot: str
    kind: str
    name: str
    units_before: list[int]
    units_after: list[int]
    params_removed: int


class SculptReport(BaseModel):
    """What `sculpt` did and how much the function changed.

    Attributes:
        by: the criterion ("contribution" or "magnitude"); keep: as asked.
        allocate: how the removals were spread over unit groups ("greedy" or "even").
        params_before, params_after: the network's parameters.
        units_removed: units removed over every target.
        targets: per target, units before and after.
        samples: the batch the change was measured on (0: no data given).
        max_abs_dlogits, mean_abs_dlogits: max and mean |output change| over that batch.
        accuracy_before, accuracy_after: accuracy on that batch (labels given).
        logit_bound: an a-priori upper bound on max |delta logits| over the batch, where cheap (every
            removed unit a host unit feeding the output layer directly), else None.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    by: str
    keep: float | int
    allocate: str = "greedy"
    params_before: int
    params_after: int
    units_removed: int
    targets: list[TargetReport]
    samples: int = 0
    max_abs_dlogits: float | None = None
    mean_abs_dlogits: float | None = None
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    logit_bound: float | None = Field(default=None, ge=0)

    @property
    def accuracy_change(self) -> float | None:
        """accuracy_after - accuracy_before, or None without labels."""
        if self.accuracy_before is None or self.accuracy_after is None:
            return None
        return self.accuracy_after - self.accuracy_before

    def event(self, run_id: str, epoch: int) -> Sculpted:
        """This sculpt as the run log's `esper_fn.events.Sculpted` event (measured on the validation
        split, as the growth step and `esper-fn sculpt` measure it)."""
        return Sculpted(run_id=run_id, epoch=epoch, slot=self.targets[0].slot if len(self.targets) == 1 else None,
                        keep=self.keep, by=self.by, params_before=self.params_before, params_after=self.params_after,
                        units={t.slot: t.units_after for t in self.targets}, units_removed=self.units_removed,
                        val_accuracy_before=self.accuracy_before, val_accuracy_after=self.accuracy_after,
                        max_abs_dlogits=self.max_abs_dlogits)


def _single(state: State) -> None:
    if state.batch:
        raise SculptError(f"sculpt: the state is stacked (batch {state.batch}); sculpting changes shapes, so it works on "
                          "one host at a time: `esper_fn.unstack(state)`, sculpt, and partition/stack again.")


def _check_keep(keep, targets: Sequence[Target], params: int) -> None:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise SculptError(f"sculpt: keep must be a float in (0, 1] (the fraction of the network's parameters to keep) "
                          f"or an int >= 1 (units to keep per unit group), got {keep!r}.")
    if isinstance(keep, int):
        most = max(max(t.units) for t in targets)
        if not 1 <= keep <= most:
            raise SculptError(f"sculpt: keep={keep} units is out of range: the targets' unit groups hold "
                              f"{ {t.slot: list(t.units) for t in targets} } units; keep between 1 and {most} "
                              "(or pass a float fraction of the network's parameters).")
        return
    if not (0.0 < keep <= 1.0) or math.isnan(keep):
        raise SculptError(f"sculpt: keep={keep} is out of range: a float keep is the fraction of the network's "
                          f"parameters to keep, in (0, 1] (1.0 keeps everything); pass e.g. 0.8.")
    floor = params - sum((n - 1) * c for t in targets for n, c in zip(t.units, t.unit_params))
    if floor > math.floor(keep * params):
        raise SculptError(f"sculpt: keep={keep} asks for at most {math.floor(keep * params)} of {params} parameters, but "
                          f"removing every unit but one per group of {[t.slot for t in targets]} leaves {floor}; the "
                          f"smallest keep these targets allow is {math.ceil(floor / params * 1000) / 1000}.")


def sculpt(
    state: State,
    target: str | Sequence[str] | None = None,
    *,
    keep: float | int,
    by: str = "contribution",
    data: tuple[Tensor, Tensor] | Tensor | None = None,
    allocate: str = "greedy",
) -> tuple[State, SculptReport]:
    """Remove hidden units of fossilized seeds or host layers; a smaller state and a report.

    Pure: `state` is untouched; the new state's remaining tensors are copies.

    Args:
        state: a single (unstacked) state.
        target: a slot name (its fossilized seed, or the layer it follows: `sculptable`), a list of
            them, or None for everything sculptable now.
        keep: a float in (0, 1]: shrink the network to at most ``floor(keep x`` its parameters``)``,
            removing units from the targets, lowest importance per freed parameter first (never a
            group's last unit); 1.0 removes nothing. An int >= 1: the units to keep in each unit
            group of the targets (a group with fewer keeps all of its units).
        by: "contribution" (measured on `data`) or "magnitude" (outgoing weight norms; no data).
        data: ``(x, y)`` (or ``x`` alone): the batch contributions are measured on, and the
            function change reported on (e.g. the validation split). x: float32 ``[B, *sample]``;
            y: int64 ``[B]`` class labels (for the accuracies).
        allocate: with a float keep, "greedy" (the least important unit per freed parameter
            anywhere, one at a time) or "even" (the same fraction of every unit group, each group's
            least important units first); see `ALLOCATIONS`.

    Returns:
        ``(new_state, report)``.

    Raises:
        SculptError: a stacked state; an unknown slot; a slot with nothing sculptable (a live seed,
            a seed whose blueprint declares no units, the output layer, a layer whose width another
            seed reads); an unknown criterion or allocation, or "contribution" without data; keep out of range
            (not in (0, 1], more units than a group has, or fewer parameters than the targets can
            reach).
    """
    _single(state)
    if by not in CRITERIA:
        raise SculptError(f"sculpt: unknown criterion by={by!r}; choose one of {list(CRITERIA)}.")
    if allocate not in ALLOCATIONS:
        raise SculptError(f"sculpt: unknown allocation allocate={allocate!r}; choose one of {list(ALLOCATIONS)}.")
    x, y = (data if isinstance(data, tuple) else (data, None))
    if by == "contribution" and x is None:
        raise SculptError("sculpt: by='contribution' measures each unit on a batch: pass data=(x, y) (e.g. the "
                          "validation split), or use by='magnitude', which needs none.")
    if target is None:
        targets = list(sculptable(state).values())
        if not targets:
            raise SculptError("sculpt: nothing in this state can be sculpted now (no fossilized seed with units, no host "
                              "layer with hidden units free of seeds); see `esper_fn.sculptable(state)`.")
    else:
        names = [target] if isinstance(target, str) else list(target)
        if not names or len(set(names)) != len(names):
            raise SculptError(f"sculpt: target must name distinct slots, got {target!r}.")
        targets = [_target(state, s) for s in names]
    params0 = state.num_params()
    _check_keep(keep, targets, params0)
    terms = {} if x is None else _mean_terms(state, targets, x)
    removed = _choose(state, targets, keep, by, x, terms, allocate)
    new = _remove(state, targets, removed, terms)
    report = _report(state, new, targets, removed, keep, by, x, y, terms).model_copy(update={"allocate": allocate})
    return new, report


# --- choosing units --------------------------------------------------------------------------------

Removed = dict[tuple[int, int], set[int]]
"""The units chosen for removal: ``{(target index, group index): {unit, ...}}``."""


def _indices(units: Sequence[int], block: int, device) -> Tensor:
    u = torch.as_tensor(list(units), dtype=torch.int64, device=device)
    return (u[:, None] * block + torch.arange(block, device=device)).flatten()


def _mean_terms(state: State, targets: Sequence[Target], x: Tensor) -> dict[tuple[int, int], Tensor]:
    """Per unit group with a consumer bias: the mean contribution of each unit to each output of its
    consumer over the batch (and the output positions), ``[out, units]``.

    The consumer's output is linear in its weight W, so ``sum(W * dY/dW)`` over a unit's slice, with
    Y the consumer's output summed over the batch and positions, is the unit's total contribution;
    divided by the number of (sample, position) pairs it is its mean contribution.
    """
    wanted = {(t, g): tg for t, target in enumerate(targets) for g, tg in enumerate(target.groups)
              if any(r == "bias" for _, _, _, r in tg)}
    if not wanted:
        return {}
    host_consumers: dict[str, list[tuple[int, int]]] = {}
    seed_slots: dict[str, list[tuple[int, int]]] = {}
    out_key = {k: next(m for m in tg if m[3] == "out") for k, tg in wanted.items()}
    layer_slot = {s.layer: s.name for s in state.slot_specs() if s.layer is not None}
    for k in wanted:
        tg = targets[k[0]]
        if tg.kind == "host":
            host_consumers.setdefault(layer_slot[".".join(out_key[k][0][1:-1])], []).append(k)
        else:
            seed_slots.setdefault(tg.slot, []).append(k)
    with torch.enable_grad():
        leaves = {out_key[k][0]: state.params_flat[out_key[k][0]].detach().requires_grad_(True) for k in wanted}
        params = {**state.params_flat, **{key: v for key, v in leaves.items() if key[0] == "host"}}
        seen = _spy(state, params, x, set(host_consumers) | set(seed_slots))
        ys: list[Tensor] = []
        size: dict[tuple[int, int], int] = {}  # elements of the consumer's output
        for slot, ks in host_consumers.items():
            ys.append(seen[slot][0].sum())
            size.update({k: seen[slot][0].numel() for k in ks})
        plan = make_plan(state)
        for slot, ks in seed_slots.items():
            bp, spec, _ = plan.live[slot]
            p = {key[2]: leaves.get(key, v) for key, v in state.params_flat.items()
                 if key[0] == "seeds" and key[1] == slot}
            p.update({key[2]: v for key, v in state.buffers_flat.items() if key[0] == "seeds" and key[1] == slot})
            h, x_in = seen[slot]
            out = bp.apply(p, h.detach(), None if x_in is None else x_in.detach(), spec, False)
            out = out.delta if isinstance(out, bpm.SeedOut) else out
            ys.append(out.sum())
            size.update({k: out.numel() for k in ks})
        grads = dict(zip(leaves, torch.autograd.grad(sum(ys), list(leaves.values()), allow_unused=True)))
    terms = {}
    for k, tg in wanted.items():
        key, dim, block, _ = out_key[k]
        bias_key = next(m[0] for m in tg if m[3] == "bias")
        w, gw = state.params_flat[key].detach(), grads[key]
        per = (w * (torch.zeros_like(w) if gw is None else gw)).movedim(dim, 1)  # [out, in, ...]
        per = per.reshape(per.shape[0], targets[k[0]].units[k[1]], -1).sum(-1)  # [out, units]
        terms[k] = per * (state.params_flat[bias_key].numel() / size[k])  # / (samples x positions)
    return terms


def _spy(state: State, params: Mapping[Key, Tensor], x: Tensor, slots: set[str]) -> dict[str, tuple[Tensor, Tensor]]:
    """An eval forward of `state` with `params`, recording ``(h, x_in)`` at `slots` (h: the output of
    the layer the slot follows, before its seed; x_in: that layer's input)."""
    plan = make_plan(state)
    host_flat, seeds, alphas = slot_inputs(state, plan, params, plan.live)
    inner = make_slot_fn(plan.live, seeds, alphas, False, [], {})
    seen: dict[str, tuple[Tensor, Tensor]] = {}

    def spy(name: str, h: Tensor, x_in: Tensor | None = None) -> Tensor:
        if name in slots:
            seen[name] = (h, x_in)
        return inner(name, h, x_in)

    state.host.forward_fn(host_flat, x, spy, False)
    return seen


def _without(params: Mapping[Key, Tensor], targets: Sequence[Target], removed: Removed,
             terms: Mapping[tuple[int, int], Tensor]) -> dict[Key, Tensor]:
    """`params` computing what the network computes once the removed units are gone: their outgoing
    weights zeroed and, where measured, their mean contribution added to the consumer's bias."""
    out = dict(params)
    for (t, g), units in removed.items():
        if not units:
            continue
        for key, dim, block, role in targets[t].groups[g]:
            if role == "out":
                out[key] = out[key].index_fill(dim, _indices(sorted(units), block, out[key].device), 0.0)
            elif role == "bias" and (t, g) in terms:
                out[key] = out[key] + terms[(t, g)][:, sorted(units)].sum(-1).to(out[key].dtype)
    return out


def _divergence(state: State, params: dict[Key, Tensor], x: Tensor, logp0: Tensor) -> float:
    logp = torch.log_softmax(apply(state.replace(params_flat=params), x), -1)
    return float((logp0.exp() * (logp0 - logp)).sum(-1).mean())


def _choose(state: State, targets: Sequence[Target], keep, by: str, x: Tensor | None,
            terms: Mapping[tuple[int, int], Tensor], allocate: str = "greedy") -> Removed:
    """The units to remove (see `sculpt`)."""
    removed: Removed = {(t, g): set() for t, tg in enumerate(targets) for g in range(len(tg.units))}
    count = {k: targets[k[0]].units[k[1]] for k in removed}
    cost = {k: targets[k[0]].unit_params[k[1]] for k in removed}
    need = {k: max(0, count[k] - keep) for k in removed} if isinstance(keep, int) else None
    budget = None if need is not None else math.floor(keep * state.num_params())
    left = state.num_params()

    def open_groups():
        if need is not None:
            return [k for k in removed if len(removed[k]) < need[k]]
        ks = [k for k in removed if count[k] - len(removed[k]) > 1] if left > budget else []
        if allocate == "even" and ks:  # only the groups with the smallest fraction removed so far
            least = min(len(removed[k]) / count[k] for k in ks)
            ks = [k for k in ks if len(removed[k]) / count[k] <= least]
        return ks

    if by == "magnitude":
        norms = {}
        for k in removed:
            sq = 0.0
            for key, dim, block, role in targets[k[0]].groups[k[1]]:
                if role == "out":
                    w = state.params_flat[key].detach().movedim(dim, 0)
                    sq = sq + w.reshape(count[k], block, -1).pow(2).sum((1, 2))
            norms[k] = sq.sqrt().tolist()
        while groups := open_groups():
            k, u = min(((k, u) for k in groups for u in range(count[k]) if u not in removed[k]),
                       key=lambda ku: (norms[ku[0]][ku[1]] / (cost[ku[0]] if need is not None
                                                              else min(cost[ku[0]], left - budget)), ku))
            removed[k].add(u)
            left -= cost[k]
        return removed
    with torch.no_grad():
        logp0 = torch.log_softmax(apply(state, x), -1)
        base = 0.0
        while groups := open_groups():
            best = None
            for k in groups:
                for u in range(count[k]):
                    if u in removed[k]:
                        continue
                    trial = {**removed, k: removed[k] | {u}}
                    d = _divergence(state, _without(state.params_flat, targets, trial, terms), x, logp0)
                    # per parameter freed, counting no more than the budget still needs
                    score = (d - base) / min(cost[k], left - budget) if need is None else d
                    if best is None or score < best[0]:
                        best = (score, d, k, u)
            _, base, k, u = best
            removed[k].add(u)
            left -= cost[k]
    return removed


# --- removing them ---------------------------------------------------------------------------------


def _remove(state: State, targets: Sequence[Target], removed: Removed,
            terms: Mapping[tuple[int, int], Tensor]) -> State:
    """A new state without the removed units: parameters and every optimizer moment cut alike, the
    consumers' biases compensated (`_without`)."""
    slices: dict[Key, list[tuple[int, Tensor]]] = {}
    for (t, g), units in removed.items():
        if not units:
            continue
        n = targets[t].units[g]
        kept = [u for u in range(n) if u not in units]
        for key, dim, block, role in targets[t].groups[g]:
            if role != "bias":
                slices.setdefault(key, []).append((dim, _indices(kept, block, state.params_flat[key].device)))
    if not slices:
        return derive(state, _keep_cache=True)

    def cut(t: Tensor, key: Key) -> Tensor:
        for dim, idx in slices.get(key, ()):
            t = t.index_select(dim, idx)
        return t

    compensated = _without(state.params_flat, targets, removed, terms)
    params = {k: cut(compensated[k], k) if k in slices else compensated[k] for k in state.params_flat}
    opt = {}
    for k, v in state.opt_flat.items():
        pk = k[1:]
        opt[k] = cut(v, pk) if pk in slices and v.shape == state.params_flat[pk].shape else v
    return derive(state, params_flat=params, opt_flat=opt, sculpts=state.sculpts + 1)


# --- the report ------------------------------------------------------------------------------------


def _report(state: State, new: State, targets: Sequence[Target], removed: Removed, keep, by: str, x, y,
            terms: Mapping[tuple[int, int], Tensor]) -> SculptReport:
    per = []
    for t, tg in enumerate(targets):
        gone = [len(removed[(t, g)]) for g in range(len(tg.units))]
        per.append(TargetReport(slot=tg.slot, kind=tg.kind, name=tg.name, units_before=list(tg.units),
                                units_after=[n - r for n, r in zip(tg.units, gone)],
                                params_removed=sum(r * c for r, c in zip(gone, tg.unit_params))))
    fields = dict(by=by, keep=keep, params_before=state.num_params(), params_after=new.num_params(),
                  units_removed=sum(len(v) for v in removed.values()), targets=per)
    if x is None:
        return SculptReport(**fields)
    with torch.no_grad():
        before, after = apply(state, x), apply(new, x)
        diff = (after - before).abs()
        fields.update(samples=int(x.shape[0]), max_abs_dlogits=float(diff.max()), mean_abs_dlogits=float(diff.mean()),
                      logit_bound=_logit_bound(state, targets, removed, x, terms))
        if y is not None:
            fields.update(accuracy_before=float((before.argmax(-1) == y).float().mean()),
                          accuracy_after=float((after.argmax(-1) == y).float().mean()))
    return SculptReport(**fields)


def _logit_bound(state: State, targets: Sequence[Target], removed: Removed, x: Tensor,
                 terms: Mapping[tuple[int, int], Tensor]) -> float | None:
    """An upper bound on max |delta logits| over the batch, where every removed unit is a host unit of
    a built-in host feeding the output layer directly (no live seed after it), else None.

    The output changes by ``-sum_j W_j (a_j - c_j)`` with W_j the output layer's columns of unit j,
    a_j its activations (the output layer's input) and c_j what compensation put back (the batch
    mean, or 0), so ``|delta logit_o| <= sum_j max|a_j - c_j| * sum |W[o, j]|``.
    """
    if state.host.config.get("kind") not in ("mlp", "cnn1d", "cnn2d"):
        return None
    last = state.slot_specs()[-1]
    parts = []
    for (t, g), units in removed.items():
        if not units:
            continue
        tg = targets[t]
        key, _, block, _ = next(m for m in tg.groups[g] if m[3] == "out")
        if tg.kind != "host" or ".".join(key[1:-1]) != last.layer:
            return None
        parts.append((state.params_flat[key], block, sorted(units), (t, g) in terms))
    if not parts:
        return 0.0
    if state.stage(last.name) in (Stage.BLENDING, Stage.HOLDING, Stage.FOSSILIZED):
        return None
    with torch.no_grad():
        a = _spy(state, state.params_flat, x, {last.name})[last.name][1]  # [B, in]: the units' activations
        total = torch.zeros(a.shape[0], dtype=a.dtype, device=a.device)
        for w, block, units, centred in parts:
            for u in units:
                au = a[:, u * block:(u + 1) * block]
                if centred:
                    au = au - au.mean(0)
                total = total + au.abs().amax(-1) * w[:, u * block:(u + 1) * block].abs().sum(-1).max()
    return float(total.max())
