"""A `State` as a flat map of named tensors plus JSON metadata (for safetensors checkpoints).

`state_to_tensors` flattens a state; `state_from_tensors` rebuilds it and verifies every tensor
against the state it restores into before returning anything: the key set (host parameters and
buffers, seed parameters and buffers, every optimizer mirror, the slot records), each tensor's shape
and dtype, the slot records' values, and that no parameter, buffer or optimizer moment holds a NaN or
an infinity. What is expected is derived from the host and the blueprints, never from the
checkpoint itself:

* host parameters and buffers: the host's freshly initialised ones (same keys, dtypes and shapes).
  Two operations change the width of a host unit group (`esper_fn.emrakul.host_units`: a layer's
  output units and its consumer's input, together): width growth (a fossilized Net2Net seed) widens
  a Linear and its consumer, and is accepted when the state has grafted a seed (``n_seeds > 0``);
  sculpting (`esper_fn.sculpt`) removes units, and is accepted when the state records a sculpt
  (``sculpts > 0``). Either way the change must be the same number of units on every tensor of
  the group, leaving at least one;
* seed parameters and buffers: what the slot's blueprint initialises at that slot; a FOSSILIZED
  seed's unit groups (`Blueprint.units`) may be smaller when the state records a sculpt;
* optimizer mirrors: one leaf per parameter and mirror (`esper_fn.optim.zero_leaf`'s shapes).
"""

from __future__ import annotations

import json
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from tensordict import TensorDict
from torch import Tensor

from . import _blueprint as bpm
from ._errors import BlueprintError, CheckpointError, NonFiniteCheckpointError
from ._host import Host
from ._lifecycle import CURVES, SEEDED_STAGES, Stage
from ._state import SLOT_FIELDS, State, check_not_donated, place, placement
from .emrakul import host_units
from .optim import Optimizer, zero_leaf

__all__ = ["state_from_tensors", "state_to_tensors"]

_SEP = "/"

SLOT_DTYPES: dict[str, torch.dtype] = {
    "stage": torch.int64, "alpha": torch.float32, "curve": torch.int64, "tempo": torch.int64,
    "epochs": torch.int64, "seed_id": torch.int64,
}  # fmt: skip
"""dtype of every slot-record field (`State.slots`), one entry per `SLOT_FIELDS`."""


def state_to_tensors(state: State) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Flatten a state into ``{"params/host/fc1/weight": tensor, ...}`` and JSON-able metadata.

    Args:
        state: a single (unstacked) state.

    Returns:
        ``(tensors, metadata)``: tensors keyed ``params/<key>``, ``buffers/<key>``,
        ``opt/<mirror>/<key>`` and ``slots/<field>`` (the state's own tensors, not copies), in the
        state's key order; metadata holds the host name and config, the optimizer, the slot names,
        blueprints, seed count and the key order of every tree (and "dtype" for a state cast to a
        floating-point dtype other than its host's, e.g. a built-in host in float64). `state_from_tensors` inverts it. The tensors stay
        where the state lives; `CheckpointManager.save` copies them to the CPU.

    Raises:
        CheckpointError: the state is stacked, or a key contains "/".
        DonatedStateError: the state's tensors were donated to a `train_step`.
    """
    if state.batch:
        raise CheckpointError("state_to_tensors: unstack a stacked state first (`esper_fn.unstack`).")
    check_not_donated(state, "state_to_tensors")
    out: dict[str, Tensor] = {}
    for prefix, flat in (("params", state.params_flat), ("buffers", state.buffers_flat), ("opt", state.opt_flat)):
        for k, v in flat.items():
            if any(_SEP in part for part in k):
                raise CheckpointError(f"key {k} contains {_SEP!r}; slot and parameter names may not.")
            out[_SEP.join((prefix, *k))] = v
    for name in state.slots.keys():
        out[f"slots{_SEP}{name}"] = state.slots[name]
    meta = {
        "host": state.host.name,
        "host_config": dict(state.host.config),
        "optimizer": {"name": state.optimizer.name, "lr": dict(state.optimizer.lr),
                      "mirrors": list(state.optimizer.mirrors), "hyper": dict(state.optimizer.hyper)},
        "slot_names": list(state.slot_names),
        "blueprints": list(state.blueprints),
        "n_seeds": state.n_seeds,
        "sculpts": state.sculpts,
        "param_keys": [list(k) for k in state.params_flat],
        "buffer_keys": [list(k) for k in state.buffers_flat],
        "opt_keys": [list(k) for k in state.opt_flat],
    }
    if state.dtype != placement(state.host.init_like()[0])[1]:  # a cast state (`init(dtype=)`, `State.to`)
        meta["dtype"] = str(state.dtype).removeprefix("torch.")
    return out, meta


# --- the metadata, as `state_to_tensors` writes it (strict: nothing is coerced) ------------------


class _OptimizerMeta(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: Literal["adam", "adamw", "sgd"]
    lr: dict[str, int | float]
    mirrors: list[str]
    hyper: dict[str, bool | int | float]


class _StateMeta(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    host: str
    host_config: dict[str, Any]
    optimizer: _OptimizerMeta
    slot_names: list[str]
    blueprints: list[str | None]
    n_seeds: int
    sculpts: int = 0
    param_keys: list[list[str]]
    buffer_keys: list[list[str]]
    opt_keys: list[list[str]]
    dtype: Literal["float64", "float32", "float16", "bfloat16"] | None = None


# The optimizer constructors' hyperparameters and mirrors (esper_fn.optim.adam / adamw / sgd).
_HYPER = {"adam": ("beta1", "beta2", "eps", "weight_decay"), "adamw": ("beta1", "beta2", "eps", "weight_decay"),
          "sgd": ("momentum", "weight_decay", "nesterov")}


def state_from_tensors(
    host: Host, tensors: dict[str, Tensor], meta: dict[str, Any], *, source: str = "checkpoint"
) -> State:
    """Rebuild a state saved by `state_to_tensors` (key order included, so resumes are bit-exact),
    after verifying every tensor against the state it restores into.

    Args:
        host: the host the state was made with (same module, layer sizes and dtypes).
        tensors: ``{key: tensor}`` as `state_to_tensors` returned them (e.g. from
            `esper_fn.checkpoint.CheckpointManager.restore`, with any prefix removed).
        meta: the metadata `state_to_tensors` returned.
        source: where the tensors come from, for error messages (e.g. a checkpoint directory).

    Returns:
        The state; its tensors are the given ones (not copied).

    Raises:
        CheckpointError: the metadata is malformed; the host or optimizer differ from the
            checkpoint's; a tensor is missing or unexpected, or its shape or dtype differs from the
            one the host and blueprints give it; a blueprint is not registered; a slot record holds
            an impossible value. The message names the tensor, what was expected and what was found.
        NonFiniteCheckpointError: a parameter, buffer or optimizer moment holds a NaN or an
            infinity (``err.key`` names it). Restore an earlier checkpoint instead.
    """
    m = _parse_meta(meta, source)
    if m.host != host.name or m.host_config != _jsonable(host.config):
        raise CheckpointError(
            f"{source} was written for host {m.host!r} ({m.host_config}); "
            f"restoring into {host.name!r} ({dict(host.config)}). Pass the host the run was made with."
        )
    optimizer = _optimizer(m.optimizer, source)
    listed = {"params": m.param_keys, "buffers": m.buffer_keys, "opt": m.opt_keys}
    names: dict[str, list[tuple[str, ...]]] = {}
    for prefix, keys in listed.items():
        seen = set()
        for k in keys:
            if not k or tuple(k) in seen:
                raise CheckpointError(f"{source}: metadata {prefix}_keys lists {k!r} {'twice' if k else ''}; "
                                      "the metadata was edited or damaged. Restore another checkpoint.")
            seen.add(tuple(k))
        names[prefix] = [tuple(k) for k in keys]
    wanted = [_SEP.join((p, *k)) for p, keys in names.items() for k in keys]
    wanted += [f"slots{_SEP}{f}" for f in SLOT_FIELDS]
    missing = [k for k in wanted if k not in tensors]
    if missing:
        raise CheckpointError(f"{source} lacks tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} that "
                              "its metadata lists. The file is damaged or incomplete: restore another checkpoint.")
    wanted_set = set(wanted)
    extra = [k for k in tensors if k not in wanted_set]
    if extra:
        raise CheckpointError(f"{source} holds tensor(s) {extra[:5]} that its metadata does not list; it is not a "
                              "state written by `state_to_tensors` (or its metadata was edited).")

    _check_slots(m, tensors, source)
    expected = _expected(host, optimizer, m, tensors, source)
    for prefix, keys in names.items():
        want = expected[prefix]
        have = {_SEP.join((prefix, *k)) for k in keys}
        if have != set(want):
            lack = sorted(set(want) - have)
            more = sorted(have - set(want))
            raise CheckpointError(
                f"{source} does not hold the {prefix} the state needs: "
                + "; ".join(filter(None, (f"lacks {lack}" if lack else "", f"has unexpected {more}" if more else "")))
                + f" (slots {list(m.slot_names)}, blueprints {list(m.blueprints)}). It was saved from another "
                "state or its metadata was edited: restore it into the host it was saved from."
            )
        for name in (_SEP.join((prefix, *k)) for k in keys):
            shape, dtype = want[name]
            _check_tensor(name, tensors[name], shape, dtype, source)
    for prefix in ("params", "buffers", "opt"):
        for k in names[prefix]:
            name = _SEP.join((prefix, *k))
            t = tensors[name]
            if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
                n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
                raise NonFiniteCheckpointError(
                    f"{source}: tensor {name!r} holds {n_nan} NaN and {n_inf} infinite value(s) of {t.numel()}; "
                    "a state with non-finite values is never restored. The run diverged before this checkpoint "
                    "was written (or the file was edited): restore an earlier step (`CheckpointManager.steps()` "
                    "lists them; `restore_state(host, step)` restores one).",
                    key=name,
                )

    def take(prefix: str) -> dict[tuple[str, ...], Tensor]:
        return {k: tensors[_SEP.join((prefix, *k))] for k in names[prefix]}

    # the slot records in their saved order (a state's own order), so the round trip is exact
    slots = TensorDict({k.split(_SEP, 1)[1]: v for k, v in tensors.items() if k.startswith("slots" + _SEP)},
                       batch_size=[len(m.slot_names)])
    return State(host, optimizer, take("params"), take("buffers"), take("opt"), slots, tuple(m.slot_names),
                 tuple(m.blueprints), m.n_seeds, sculpts=m.sculpts)


def _parse_meta(meta: Any, source: str) -> _StateMeta:
    if not isinstance(meta, dict):
        raise CheckpointError(f"{source}: the state metadata must be a dict as `state_to_tensors` returns it, got "
                              f"{type(meta).__name__}.")
    try:
        return _StateMeta.model_validate(meta)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in err.errors()[:4])
        raise CheckpointError(f"{source}: the state metadata is malformed ({problems}). It was not written by "
                              "`state_to_tensors` or was edited: restore another checkpoint.") from None


def _optimizer(o: _OptimizerMeta, source: str) -> Optimizer:
    want_hyper = _HYPER[o.name]
    if o.name == "sgd":
        mirrors: tuple[str, ...] = ("step", "momentum") if o.hyper.get("momentum") else ("step",)
    else:
        mirrors = ("step", "mu", "nu")
    problems = []
    if set(o.lr) != {"host", "seeds"} or any(isinstance(v, bool) or v < 0 for v in o.lr.values()):
        problems.append(f"lr {o.lr} (expected non-negative numbers for 'host' and 'seeds')")
    if set(o.hyper) != set(want_hyper):
        problems.append(f"hyperparameters {sorted(o.hyper)} (a {o.name} optimizer has {list(want_hyper)})")
    elif any(isinstance(v, bool) != (k == "nesterov") for k, v in o.hyper.items()):
        problems.append(f"hyperparameters {o.hyper} (numbers, and a bool 'nesterov' for sgd)")
    if tuple(o.mirrors) != mirrors:
        problems.append(f"mirrors {o.mirrors} (a {o.name} optimizer with these hyperparameters keeps {list(mirrors)})")
    if problems:
        raise CheckpointError(f"{source}: the optimizer metadata is inconsistent: {'; '.join(problems)}. The metadata "
                              "was edited or damaged: restore another checkpoint.")
    return Optimizer(o.name, o.lr, tuple(o.mirrors), o.hyper)


def _check_tensor(name: str, t: Tensor, shape: tuple[int, ...], dtype: torch.dtype, source: str,
                  note: str = "") -> None:
    if not isinstance(t, Tensor):
        raise CheckpointError(f"{source}: {name!r} is a {type(t).__name__}, not a tensor.")
    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise CheckpointError(
            f"{source}: tensor {name!r} is {_fmt(t.dtype, t.shape)}, but the state it restores into needs "
            f"{_fmt(dtype, shape)}{note}. The checkpoint was saved from a host with other layer sizes or dtypes, or "
            "the file was rewritten: restore it into the host it was saved from (same module, widths and dtype), "
            "or restore another checkpoint."
        )


def _fmt(dtype: torch.dtype, shape) -> str:
    return f"{str(dtype).removeprefix('torch.')} {list(shape)}"


def _check_slots(m: _StateMeta, tensors: dict[str, Tensor], source: str) -> None:
    """The slot records: one entry per slot, field dtypes, and values a state can hold."""
    S = len(m.slot_names)
    if len(m.blueprints) != S:
        raise CheckpointError(f"{source}: metadata lists {S} slots {m.slot_names} but {len(m.blueprints)} "
                              f"blueprints {m.blueprints}; the metadata was edited or damaged.")
    for f in SLOT_FIELDS:
        _check_tensor(f"slots{_SEP}{f}", tensors[f"slots{_SEP}{f}"], (S,), SLOT_DTYPES[f], source)
    rec = {f: tensors[f"slots{_SEP}{f}"].tolist() for f in SLOT_FIELDS}
    valid = {s.value for s in Stage}
    for i, name in enumerate(m.slot_names):
        st, bid = rec["stage"][i], m.blueprints[i]
        bad = None
        if st not in valid:
            bad = f"slots/stage is {st} (stages are {sorted(valid)})"
        elif not 0 <= rec["curve"][i] < len(CURVES):
            bad = f"slots/curve is {rec['curve'][i]} (curves are 0..{len(CURVES) - 1}: {CURVES})"
        elif not 0.0 <= rec["alpha"][i] <= 1.0:  # NaN fails too
            bad = f"slots/alpha is {rec['alpha'][i]} (alpha lies in [0, 1])"
        elif rec["tempo"][i] < 0 or rec["epochs"][i] < 0 or rec["seed_id"][i] < -1:
            bad = (f"slots/tempo, epochs, seed_id are {rec['tempo'][i]}, {rec['epochs'][i]}, {rec['seed_id'][i]} "
                   "(tempo and epochs >= 0, seed_id >= -1)")
        elif rec["seed_id"][i] >= m.n_seeds:
            bad = f"slots/seed_id is {rec['seed_id'][i]}, but only {m.n_seeds} seeds were ever germinated (n_seeds)"
        elif (bid is not None) != (Stage(st) in SEEDED_STAGES):
            bad = (f"the slot is {Stage(st).name} and holds blueprint {bid!r} (a slot holds a seed exactly when it is "
                   f"one of {sorted(s.name for s in SEEDED_STAGES)})")
        if bad is not None:
            raise CheckpointError(f"{source}: slot {name!r} (index {i}) has an impossible record: {bad}. The file or "
                                  "its metadata was edited or damaged: restore another checkpoint.")
    if m.n_seeds < 0:
        raise CheckpointError(f"{source}: n_seeds is {m.n_seeds}; it counts the seeds germinated so far (>= 0).")
    if m.sculpts < 0:
        raise CheckpointError(f"{source}: sculpts is {m.sculpts}; it counts the sculpts that shaped the state (>= 0).")


def _expected(host: Host, optimizer: Optimizer, m: _StateMeta, tensors: dict[str, Tensor], source: str
              ) -> dict[str, dict[str, tuple[tuple[int, ...], torch.dtype]]]:
    """``{prefix: {checkpoint key: (shape, dtype)}}`` that the host and blueprints give the state."""
    p0, b0 = host.init_like()
    if m.dtype is not None:  # the state was cast: its floating-point tensors are in that dtype
        p0, b0 = place(p0, None, getattr(torch, m.dtype)), place(b0, None, getattr(torch, m.dtype))
    dtype = placement(p0)[1]  # seeds are born in the state's dtype
    params: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    buffers: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    groups = host_units(host, {n: tuple(v.shape) for n, v in p0.items()})
    growable = {s.name for s in host.slots(p0) if s.consumer_layer is not None}
    groups = {slot: [m for m in ms if m[3] != "bias"] for slot, ms in groups.items()}
    member_of = {(n, d): (slot, block) for slot, ms in groups.items() for n, d, block, _ in ms}
    fresh = {_SEP.join(("params", "host", *n.split("."))): v for n, v in p0.items()}
    deltas: dict[str, dict[str, float]] = {}  # unit group -> {checkpoint key: units added (< 0: removed)}
    shapes: dict[str, tuple[int, ...]] = {}
    for n, v in p0.items():
        key = _SEP.join(("params", "host", *n.split(".")))
        shape = list(v.shape)
        t = tensors.get(key)
        if isinstance(t, Tensor) and t.dim() == v.dim():
            for d in range(v.dim()):
                g = member_of.get((n, d))
                if g is not None:
                    deltas.setdefault(g[0], {})[key] = (t.shape[d] - v.shape[d]) / g[1]
                    shape[d] = t.shape[d]
        params[key] = (tuple(shape), v.dtype)
        shapes[n] = tuple(shape)
    for g, added in deltas.items():
        units = set(added.values())
        if units == {0}:
            continue
        members = [_SEP.join(("params", "host", *n.split("."))) for n, _, _, _ in groups[g]]
        n0, d0, b0_ = groups[g][0][:3]
        u = units.pop() if len(units) == 1 else None
        if (len(added) == len(members) and u is not None and u == int(u) and p0[n0].shape[d0] // b0_ + u >= 1
                and ((u > 0 and g in growable and m.n_seeds > 0) or (u < 0 and m.sculpts > 0))):
            continue  # a width growth or a sculpt: every tensor of the group, by the same number of units
        if u is not None and u > 0 and m.n_seeds == 0:
            why = "no seed was ever grafted, so the host cannot have grown"
        elif u is not None and u < 0 and m.sculpts == 0:
            why = "the state records no sculpt, so the host cannot have shrunk"
        else:
            why = (f"a width growth or a sculpt changes {members} together, by the same number of units, leaving at "
                   "least one")
        for key in members:
            if added.get(key, 0) != 0:
                _check_tensor(key, tensors[key], tuple(fresh[key].shape), fresh[key].dtype, source, note=f" ({why})")
    for n, v in b0.items():
        buffers[_SEP.join(("buffers", "host", *n.split(".")))] = (tuple(v.shape), v.dtype)
    try:
        specs = host.slots(shapes)
    except (KeyError, IndexError, ValueError, TypeError) as err:  # a slots_fn reading a missing or odd shape
        raise CheckpointError(f"{source}: the host's slots cannot be derived from the checkpoint's parameter "
                              f"shapes ({type(err).__name__}: {err}); restore it into the host it was saved "
                              "from.") from None
    if [s.name for s in specs] != list(m.slot_names):
        raise CheckpointError(f"{source}: the checkpoint's slots are {list(m.slot_names)}, host {host.name!r} has "
                              f"{[s.name for s in specs]}; restore it into the host it was saved from.")
    reg = bpm.registry()
    stages = dict(zip(m.slot_names, (Stage(s) for s in tensors[f"slots{_SEP}stage"].tolist())))
    for spec, bid in zip(specs, m.blueprints):
        if bid is None:
            continue
        bp = reg.get(bid)
        if bp is None:
            raise CheckpointError(f"{source}: slot {spec.name!r} holds blueprint {bid!r}, which is not registered in "
                                  "this process; register it (`esper_fn.blueprints.register`) before restoring.")
        why = bp.misfit(spec)
        if why is not None:
            raise CheckpointError(f"{source}: slot {spec.name!r} holds blueprint {bid!r}, which does not fit it on "
                                  f"this host: {why}. Restore it into the host it was saved from.")
        try:
            sp, sb = bp.init(spec, torch.Generator().manual_seed(0))
        except BlueprintError as err:
            raise CheckpointError(f"{source}: slot {spec.name!r}: blueprint {bid!r} cannot be built there: "
                                  f"{err}") from None
        sp, sb = place(sp, None, dtype), place(sb, None, dtype)
        want = {k: list(v.shape) for k, v in sp.items()}
        if stages[spec.name] == Stage.FOSSILIZED and m.sculpts > 0:
            _sculpted_units(spec.name, bp, want, tensors)
        for k, v in sp.items():
            params[_SEP.join(("params", "seeds", spec.name, k))] = (tuple(want[k]), v.dtype)
        for k, v in sb.items():
            buffers[_SEP.join(("buffers", "seeds", spec.name, k))] = (tuple(v.shape), v.dtype)
    opt = {}
    for mirror in optimizer.mirrors:
        for key, (shape, dtype) in params.items():
            leaf = zero_leaf(mirror, torch.empty(shape, dtype=dtype, device="meta"))
            opt[_SEP.join(("opt", mirror, key.split(_SEP, 1)[1]))] = (tuple(leaf.shape), leaf.dtype)
    return {"params": params, "buffers": buffers, "opt": opt}


def _sculpted_units(slot: str, bp: bpm.Blueprint, want: dict[str, list[int]], tensors: dict[str, Tensor]) -> None:
    """Shrink `want` (a fossilized seed's expected shapes) to the checkpoint's unit counts where a
    sculpt explains them: every tensor of a unit group (`Blueprint.units`) holds the same number of
    units, between 1 and the blueprint's own. Anything else is left for the shape check to report."""
    for group in bp.units:
        group = [m for m in group if m[2] != "bias"]
        have = set()
        for name, dim, _ in group:
            t = tensors.get(_SEP.join(("params", "seeds", slot, name)))
            have.add(t.shape[dim] if isinstance(t, Tensor) and t.dim() == len(want[name]) else None)
        n = have.pop() if len(have) == 1 else None
        if n is not None and 1 <= n <= min(want[name][dim] for name, dim, _ in group):
            for name, dim, _ in group:
                want[name][dim] = n


def _jsonable(x):
    return json.loads(json.dumps(dict(x)))
