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
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from . import _blueprint as bpm
from ._apply import apply, make_plan, make_slot_fn, slot_inputs
from ._errors import SculptError
from ._host import Host
from ._lifecycle import LIVE_STAGES, Stage
from ._state import Key, State, derive

__all__ = ["CRITERIA", "SculptReport", "Target", "TargetReport", "host_units", "sculpt", "sculptable"]

CRITERIA: tuple[str, ...] = ("contribution", "magnitude")
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
            members = [(f"{s.layer}.weight", 0, 1, "in"), bias, (f"{s.consumer_layer}.weight", 1, 1, "out")]
        elif s in convs:
            i = convs.index(s)
            if i + 1 < len(convs):
                consumer, block = convs[i + 1].layer, 1
            else:
                consumer = "fc"
                block = shapes["fc.weight"][1] // shapes[f"{s.layer}.weight"][0]
            members = [(f"{s.layer}.weight", 0, 1, "in"), bias, (f"{consumer}.weight", 1, block, "out")]
        else:
            continue
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
        j = state.index(other.name)
        bp_other = state.blueprints[j]
        if other.layer == consumer and bp_other is not None and bpm.registry()[bp_other].meta.layer_types is not None:
            return (f"layer {spec.layer!r} at slot {slot!r} feeds layer {consumer!r}, and slot {other.name!r} holds "
                    f"{bp_other}, which reads that layer's input and was built for its width: fossilize or prune "
                    f"the seed at {other.name!r} first")
    return "host", spec.layer, (tuple((("host", *n.split(".")), d, b, r) for n, d, b, r in members),)


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
        counts = {state.params_flat[k].shape[d] // b for k, d, b, _ in g}
        if len(counts) != 1:
            raise SculptError(f"sculpt {slot!r}: the tensors of one unit group disagree on its unit count {sorted(counts)}"
                              f" ({[('/'.join(k), d) for k, d, _, _ in g]}); the state is inconsistent.")
        n = counts.pop()
        units.append(n)
        costs.append(sum(state.params_flat[k].numel() // n for k, _, _, _ in g))
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

    Returns:
        ``(new_state, report)``.

    Raises:
        SculptError: a stacked state; an unknown slot; a slot with nothing sculptable (a live seed,
            a seed whose blueprint declares no units, the output layer, a layer whose width another
            seed reads); an unknown criterion, or "contribution" without data; keep out of range
            (not in (0, 1], more units than a group has, or fewer parameters than the targets can
            reach).
    """
    _single(state)
    if by not in CRITERIA:
        raise SculptError(f"sculpt: unknown criterion by={by!r}; choose one of {list(CRITERIA)}.")
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
    removed = _choose(state, targets, keep, by, x)
    new = _remove(state, targets, removed)
    report = _report(state, new, targets, removed, keep, by, x, y)
    return new, report


# --- choosing units --------------------------------------------------------------------------------


def _zeroed(params: dict[Key, Tensor], targets: Sequence[Target], removed: Mapping[tuple[int, int], set[int]]
            ) -> dict[Key, Tensor]:
    """`params` with the outgoing weights of the removed units zeroed (the same function as removing them)."""
    out = dict(params)
    for (t, g), units in removed.items():
        if not units:
            continue
        for key, dim, block, role in targets[t].groups[g]:
            if role != "out":
                continue
            idx = _indices(sorted(units), block, out[key].device)
            out[key] = out[key].index_fill(dim, idx, 0.0)
    return out


def _indices(units: Sequence[int], block: int, device) -> Tensor:
    u = torch.as_tensor(list(units), dtype=torch.int64, device=device)
    return (u[:, None] * block + torch.arange(block, device=device)).flatten()


def _divergence(state: State, params: dict[Key, Tensor], x: Tensor, logp0: Tensor) -> float:
    logp = torch.log_softmax(apply(state.replace(params_flat=params), x), -1)
    return float((logp0.exp() * (logp0 - logp)).sum(-1).mean())


def _choose(state: State, targets: Sequence[Target], keep, by: str, x: Tensor | None) -> dict[tuple[int, int], set[int]]:
    """The units to remove: ``{(target index, group index): {unit, ...}}``."""
    removed: dict[tuple[int, int], set[int]] = {(t, g): set() for t, tg in enumerate(targets) for g in range(len(tg.units))}
    count = {k: targets[k[0]].units[k[1]] for k in removed}
    cost = {k: targets[k[0]].unit_params[k[1]] for k in removed}
    if isinstance(keep, int):
        need = {k: max(0, count[k] - keep) for k in removed}
        budget = None
    else:
        need = None
        budget = math.floor(keep * state.num_params())
    left = state.num_params()

    def open_groups():
        if need is not None:
            return [k for k in removed if len(removed[k]) < need[k]]
        return [k for k in removed if count[k] - len(removed[k]) > 1] if left > budget else []

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
                       key=lambda ku: (norms[ku[0]][ku[1]] / cost[ku[0]], ku))
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
                    d = _divergence(state, _zeroed(state.params_flat, targets, trial), x, logp0)
                    score = (d - base) / cost[k] if need is None else d
                    if best is None or score < best[0]:
                        best = (score, d, k, u)
            _, base, k, u = best
            removed[k].add(u)
            left -= cost[k]
    return removed


# --- removing them ---------------------------------------------------------------------------------


def _remove(state: State, targets: Sequence[Target], removed: Mapping[tuple[int, int], set[int]]) -> State:
    """A new state without the removed units: parameters and every optimizer moment sliced alike."""
    slices: dict[Key, list[tuple[int, Tensor]]] = {}
    for (t, g), units in removed.items():
        if not units:
            continue
        n = targets[t].units[g]
        kept = [u for u in range(n) if u not in units]
        for key, dim, block, _ in targets[t].groups[g]:
            slices.setdefault(key, []).append((dim, _indices(kept, block, state.params_flat[key].device)))
    if not slices:
        return derive(state, _keep_cache=True)

    def cut(t: Tensor, key: Key) -> Tensor:
        for dim, idx in slices[key]:
            t = t.index_select(dim, idx)
        return t

    params = {k: cut(v, k) if k in slices else v for k, v in state.params_flat.items()}
    opt = {}
    for k, v in state.opt_flat.items():
        pk = k[1:]
        opt[k] = cut(v, pk) if pk in slices and v.shape == state.params_flat[pk].shape else v
    return derive(state, params_flat=params, opt_flat=opt, sculpts=state.sculpts + 1)


# --- the report ------------------------------------------------------------------------------------


def _report(state: State, new: State, targets: Sequence[Target], removed, keep, by: str, x, y) -> SculptReport:
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
                      logit_bound=_logit_bound(state, targets, removed, x))
        if y is not None:
            fields.update(accuracy_before=float((before.argmax(-1) == y).float().mean()),
                          accuracy_after=float((after.argmax(-1) == y).float().mean()))
    return SculptReport(**fields)


def _logit_bound(state: State, targets: Sequence[Target], removed, x: Tensor) -> float | None:
    """``max_x sum_j max|a_j(x)| * max_o sum |W[o, j-block]|`` over the removed units j, when every one is
    a host unit of a built-in host whose consumer is the output layer with no live seed after it."""
    if state.host.config.get("kind") not in ("mlp", "cnn1d", "cnn2d"):
        return None
    last = state.slot_specs()[-1]
    consumers: dict[str, list] = {}
    for (t, g), units in removed.items():
        if not units:
            continue
        tg = targets[t]
        key, dim, block, _ = next(m for m in tg.groups[g] if m[3] == "out")
        if tg.kind != "host" or ".".join(key[1:-1]) != last.layer:
            return None
        consumers.setdefault(last.name, []).append((state.params_flat[key], block, sorted(units)))
    if not consumers:
        return 0.0
    if state.blueprints[state.index(last.name)] is not None and state.stage(last.name) != Stage.DORMANT:
        return None
    x_in = _consumer_input(state, x, last.name)  # [B, in_features]: the removed units' activations
    total = torch.zeros(x_in.shape[0], dtype=x_in.dtype)
    for w, block, units in consumers[last.name]:
        for u in units:
            a = x_in[:, u * block:(u + 1) * block].abs().amax(-1)  # [B]
            total = total + a * w[:, u * block:(u + 1) * block].abs().sum(-1).max()
    return float(total.max())


def _consumer_input(state: State, x: Tensor, slot: str) -> Tensor:
    """The input of the layer `slot` follows, on batch `x` (eval forward)."""
    plan = make_plan(state)
    host_flat, seeds, alphas = slot_inputs(state, plan, state.params_flat, plan.live)
    inner = make_slot_fn(plan.live, seeds, alphas, False, [], {})
    seen: dict[str, Tensor] = {}

    def spy(name: str, h: Tensor, x_in: Tensor | None = None) -> Tensor:
        if name == slot:
            seen[name] = x_in
        return inner(name, h, x_in)

    state.host.forward_fn(host_flat, x, spy, False)
    return seen[slot]
