"""The immutable training state and the lifecycle operations over it.

`State` holds the parameter tree, buffers, optimizer state and per-slot lifecycle record of one host
(or of N hosts of one structure, stacked). Every operation returns a new `State` and leaves its input
untouched. Internally the trees are kept as flat ``{key tuple: tensor}`` dicts, which the hot paths
read directly; the `TensorDict` views (``state.params``, ``state.opt``, ...) are built on first access.

Parameter keys: ``("host", *module_path, name)`` and ``("seeds", slot, name)``.
Optimizer keys: ``(mirror, *param_key)``, e.g. ``("mu", "host", "fc1", "weight")``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from dataclasses import replace as _dc_replace
from functools import cached_property

import torch
from tensordict import TensorDict
from torch import Tensor

from . import _blueprint as bpm
from ._device import check_device, check_float_dtype
from ._errors import DonatedStateError, GateError, GraftError, HostError, WarmStartError
from ._host import Host, SlotSpec
from ._lifecycle import (
    CURVES,
    GateConfig,
    Op,
    Stage,
    alpha_at,
    check_gate,
    check_transition,
    legal_ops,
)
from .optim import Optimizer, adam, zero_leaf

__all__ = [
    "State",
    "advance",
    "fossilize",
    "germinate",
    "init",
    "legal_actions",
    "partition",
    "prune",
    "stack",
    "structure",
    "tick",
    "unstack",
]

Key = tuple[str, ...]
Flat = dict[Key, Tensor]

SLOT_FIELDS = ("stage", "alpha", "curve", "tempo", "epochs", "seed_id")


def _to_td(flat: Mapping[Key, Tensor], batch_size: Sequence[int] = ()) -> TensorDict:
    td = TensorDict(batch_size=list(batch_size))
    for k, v in flat.items():
        td.set(k, v)
    return td.lock_()


class _Ownership:
    """Which tensors of a state no other state can see (the only ones `train_step` may donate).

    A state that another state is derived from loses its claims (the child shares its tensors);
    `train_step` gives the child a claim on the fresh tensors it wrote.
    """

    __slots__ = ("holder", "keys", "donated")

    def __init__(self, keys: frozenset = frozenset()):
        self.holder = 0  # id() of the state holding the claim; 0 until a state adopts it
        self.keys = keys
        self.donated = False  # set once `train_step(..., donate=True)` gave up some of its tensors


def check_not_donated(state: State, what: str) -> None:
    """Raise `DonatedStateError` if `state` gave up tensors to a donating `train_step`.

    Args:
        state: the state about to be used.
        what: the operation, for the message (e.g. "apply").
    """
    if state._own.donated:
        raise DonatedStateError(
            f"{what}: this state was given to `train_step(..., donate=True)`, which updated its tensors in place "
            "to build the next state, so its values are no longer its own. Use the state that call returned, or "
            "call train_step without donate=True to keep this one."
        )


def _from_td(td: TensorDict) -> Flat:
    return {k if isinstance(k, tuple) else (k,): v for k, v in td.items(True, True)}


@dataclass(frozen=True, eq=False)
class State:
    """One host's training state (or N stacked hosts of one structure). Treat as immutable.

    Attributes:
        host: the static host definition.
        optimizer: the functional optimizer whose state `opt_flat` holds.
        params_flat: ``{("host", ...) | ("seeds", slot, ...): tensor}``.
        buffers_flat: non-trainable state (BatchNorm statistics, seed buffers), same key scheme.
        opt_flat: ``{(mirror, *param_key): tensor}`` for every mirror of `optimizer`.
        slots: TensorDict with batch size ``[*batch, S]`` and int64 "stage", float32 "alpha",
            int64 "curve" (index into `CURVES`), "tempo" (blend epochs), "epochs" (in stage) and
            "seed_id" (-1 when empty), on the CPU wherever the state lives (see `State.to`).
        slot_names: the S slot names, in host order.
        blueprints: blueprint id per slot, or None where the slot holds no seed.
        n_seeds: seeds germinated so far (the next seed id); one count per host when stacked.
        batch: leading batch shape of every tensor (``()`` for one host, ``(N,)`` stacked).
        sculpts: sculpts (`esper_fn.sculpt`) that shaped this state; a checkpoint whose unit groups
            are smaller than the host's or a blueprint's own restores only with a count above 0.
    """

    host: Host
    optimizer: Optimizer
    params_flat: Flat
    buffers_flat: Flat
    opt_flat: Flat
    slots: TensorDict
    slot_names: tuple[str, ...]
    blueprints: tuple[str | None, ...]
    n_seeds: int | tuple[int, ...] = 0
    batch: tuple[int, ...] = ()
    sculpts: int = 0
    _cache: dict = field(default_factory=dict, repr=False, compare=False)
    _own: _Ownership = field(default_factory=_Ownership, repr=False, compare=False)

    def __post_init__(self):
        own = self._own
        if own.donated:
            check_not_donated(self, "copying a state")
        if own.holder not in (0, id(self)):
            # Built by copying another state's fields (e.g. `dataclasses.replace`): both now share
            # every tensor, so neither may donate any.
            own.keys = frozenset()
            object.__setattr__(self, "_own", _Ownership())
            own = self._own
        own.holder = id(self)

    def __copy__(self) -> State:
        # A shallow copy shares every tensor: derive it, so that neither may donate them.
        return derive(self, _keep_cache=True)

    def replace(self, **changes) -> State:
        """A new state with `changes` applied to its fields (always safe: cached structure is
        recomputed, and neither state may donate tensors the other can see).

        Args:
            **changes: field values, e.g. ``params_flat=...``, ``slots=...``, ``blueprints=...``.
        """
        return derive(self, **changes)

    # -- TensorDict views ------------------------------------------------------------------------
    # The views are locked: setting or deleting a key raises. Their leaves are the state's own
    # tensors, shared with the states derived from it, so in-place tensor ops (`zero_`, `mul_`,
    # `update_`) would change them: derive a new state instead (`replace`, the lifecycle ops).
    @cached_property
    def params(self) -> TensorDict:
        """Parameter tree: ``{"host": {...}, "seeds": {slot: {...}}}`` (a locked view)."""
        return _to_td(self.params_flat, self.batch)

    @cached_property
    def buffers(self) -> TensorDict:
        """Buffers (BatchNorm statistics, seed buffers), same key scheme (read-only view)."""
        return _to_td(self.buffers_flat, self.batch)

    @cached_property
    def opt(self) -> TensorDict:
        """Optimizer state: ``{mirror: tree mirroring params}`` (read-only view)."""
        return _to_td(self.opt_flat, self.batch)

    # -- queries ---------------------------------------------------------------------------------
    def index(self, slot: str) -> int:
        try:
            return self.slot_names.index(slot)
        except ValueError:
            raise HostError(f"host {self.host.name!r} has no slot {slot!r}; its slots are "
                            f"{list(self.slot_names)}.") from None

    def stage(self, slot: str) -> Stage:
        """The slot's stage (on a stacked state, the stage every host shares there).

        Raises:
            GraftError: the stacked hosts are in different stages at `slot` (use `host_stages`).
        """
        vals = set(self.host_stages(slot))
        if len(vals) != 1:
            raise GraftError(
                f"slot {slot!r} is in different stages across the stacked hosts: {sorted(v.name for v in vals)}. "
                "Read them with `state.host_stages(slot)`; to change one host, `unstack` the state, apply the "
                "op to that host and `stack` again."
            )
        return vals.pop()

    def host_stages(self, slot: str) -> tuple[Stage, ...]:
        """The slot's stage on every host (one entry for an unstacked state)."""
        return tuple(Stage(v) for v in self.slots["stage"][..., self.index(slot)].flatten().tolist())

    def stages(self) -> dict[str, Stage]:
        """Stage of every slot."""
        return {n: self.stage(n) for n in self.slot_names}

    def spec(self, slot: str) -> SlotSpec:
        """The slot's spec for the current host parameter shapes."""
        return self.host.slot(slot, self._host_shapes())

    def slot_specs(self) -> tuple[SlotSpec, ...]:
        """The spec of every slot, in `slot_names` order, for the current host parameter shapes."""
        return self.host.slots(self._host_shapes())

    def _host_shapes(self) -> dict[str, tuple[int, ...]]:
        nb = len(self.batch)
        return {".".join(k[1:]): tuple(v.shape[nb:]) for k, v in self.params_flat.items() if k[0] == "host"}

    def num_params(self) -> int:
        """Parameters of one host (seeds included), counted once per stacked host."""
        n = sum(v.numel() for v in self.params_flat.values())
        return n // math.prod(self.batch)

    def seed_params(self, slot: str) -> dict[str, Tensor]:
        return {k[2]: v for k, v in self.params_flat.items() if k[0] == "seeds" and k[1] == slot}

    # -- device and dtype ------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """The device the state's parameters, buffers and optimizer state live on (that of its host
        parameters; the slot records stay on the CPU)."""
        return placement(self.params_flat)[0]

    @property
    def dtype(self) -> torch.dtype:
        """The floating-point dtype of the host parameters (float32 unless the host was built or
        cast otherwise); seeds are born in it and floating-point input must have it."""
        return placement(self.params_flat)[1]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> State:
        """The state on another device and/or in another floating-point dtype (a new state; this one
        is unchanged).

        Parameters, buffers and optimizer state move to `device`. With `dtype`, floating-point
        parameters, buffers and optimizer moments are cast to it; the optimizer's step counts stay
        float32. The slot records (`slots`) stay on the CPU in their own dtypes, wherever the state
        lives: they are what lifecycle decisions read, so reading a stage never waits for the device
        (the forward takes a device copy of the alphas once per change of the record).

        Args:
            device: e.g. "cpu", "cuda", "cuda:1", "meta"; None keeps the device.
            dtype: a floating-point dtype (torch.float64, torch.bfloat16, ...); None keeps it.

        Raises:
            ConfigError: `device` is not a device name, or `dtype` not a floating-point dtype.
            CapabilityError: a device this machine does not have (e.g. "cuda" without a GPU).
        """
        return to(self, device, dtype)


# --- construction ----------------------------------------------------------------------------


def init(host: Host, *, optimizer: Optimizer | None = None, generator: torch.Generator | None = None,
         device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> State:
    """A fresh state for `host`: initial parameters, zero optimizer state, every slot DORMANT.

    Args:
        host: the host definition.
        optimizer: functional optimizer (default ``esper_fn.optim.adam(1e-2)``).
        generator: source of randomness for the host's initial weights. A wrapped host
            (`esper_fn.wrap`) is re-drawn from it, each layer by its own reset rule; without one it
            starts from the module's weights. The weights are drawn where the generator lives (a
            CPU generator draws on the CPU), then moved, so one seed gives the same weights on
            every device.
        device: where the state lives: "cpu", "cuda", "meta", ...; None: where the host's weights
            are (the CPU for the built-in hosts, the module's device for a wrapped host).
        dtype: the floating-point dtype of the parameters, buffers and optimizer moments (e.g.
            torch.float64, torch.bfloat16); None: the host's (float32 for the built-in hosts, the
            module's for a wrapped host). Seeds germinated later are born in it; floating-point
            input must have it.

    Raises:
        HostError: a wrapped host has a parameter no known reset rule covers, and `generator` is set.
        ConfigError: `device` is not a device name, or `dtype` not a floating-point dtype.
        CapabilityError: a device this machine does not have (e.g. "cuda" without a GPU).
    """
    device, dtype = check_device(device, "init"), check_float_dtype(dtype, "init")
    optimizer = optimizer or adam(1e-2)
    p, b = host.init_fn(generator)
    names = tuple(s.name for s in host.slots(p))
    if device is not None or dtype is not None:
        p, b = place(p, device, dtype), place(b, device, dtype)
    params = {("host", *k.split(".")): v for k, v in p.items()}
    buffers = {("host", *k.split(".")): v for k, v in b.items()}
    opt = {(m, *k): zero_leaf(m, v) for m in optimizer.mirrors for k, v in params.items()}
    S = len(names)
    slots = TensorDict(
        {
            "stage": torch.zeros(S, dtype=torch.int64),
            "alpha": torch.zeros(S, dtype=torch.float32),
            "curve": torch.zeros(S, dtype=torch.int64),
            "tempo": torch.zeros(S, dtype=torch.int64),
            "epochs": torch.zeros(S, dtype=torch.int64),
            "seed_id": torch.full((S,), -1, dtype=torch.int64),
        },
        batch_size=[S],
    )
    return State(host, optimizer, params, buffers, opt, slots, names, (None,) * S)


def placement(flat: Mapping) -> tuple[torch.device, torch.dtype]:
    """``(device, floating dtype)`` of a flat parameter map: the device of its first tensor and the
    dtype of its first floating-point tensor (float32 if none is)."""
    device, dtype = torch.device("cpu"), None
    for i, v in enumerate(flat.values()):
        if i == 0:
            device = v.device
        if v.is_floating_point():
            dtype = v.dtype
            break
    return device, dtype or torch.float32


def place(tensors: Mapping, device: torch.device | str | None, dtype: torch.dtype | None
          ) -> dict:
    """`tensors` (a flat map) moved to `device` with floating-point ones cast to `dtype` (None keeps either);
    tensors already there are returned as they are (not copied)."""
    out = {}
    for k, v in tensors.items():
        dt = dtype if dtype is not None and v.is_floating_point() else v.dtype
        out[k] = v.to(device=device if device is not None else v.device, dtype=dt)
    return out


def to(state: State, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> State:
    """`State.to`: the state on `device` in `dtype` (see there)."""
    device, dtype = check_device(device, "State.to"), check_float_dtype(dtype, "State.to")
    opt = {}
    for k, v in state.opt_flat.items():
        dt = dtype if dtype is not None and k[0] != "step" and v.is_floating_point() else v.dtype
        opt[k] = v.to(device=device if device is not None else v.device, dtype=dt)
    return derive(state, params_flat=place(state.params_flat, device, dtype),
                  buffers_flat=place(state.buffers_flat, device, dtype), opt_flat=opt)


def derive(state: State, *, _owned: frozenset = frozenset(), _keep_cache: bool = False, **changes) -> State:
    """A state derived from `state`. The parent loses its donation claims (the child shares its
    tensors); the child claims `_owned`, the keys of fresh tensors written for it alone.
    `_keep_cache` shares the per-structure cache (only for changes that keep the structure)."""
    check_not_donated(state, "deriving a state (a lifecycle op, replace, stack)")
    state._own.keys = frozenset()
    return _dc_replace(state, **changes, _cache=state._cache if _keep_cache else {}, _own=_Ownership(_owned))


def _checked_weights(weights, bp: bpm.Blueprint, spec) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Copies of a warm start's ``(params, buffers)``, checked against what `bp` creates at `spec`."""
    fresh = bp.init(spec, torch.Generator().manual_seed(0))
    out = []
    for given, want, what in zip(weights, fresh, ("parameter", "buffer")):
        given = dict(given)
        problems = [f"{what} {k} is missing" for k in want if k not in given]
        problems += [f"{what} {k} is not one {bp.id} has" for k in given if k not in want]
        problems += [f"{what} {k} is {tuple(given[k].shape)} {given[k].dtype}, the slot needs {tuple(v.shape)} {v.dtype}"
                     for k, v in want.items() if k in given and (given[k].shape != v.shape or given[k].dtype != v.dtype)]
        if problems:
            raise WarmStartError(f"germinate: the warm-start weights do not fit {bp.id} at slot {spec.name!r}: "
                                 f"{'; '.join(problems)}.")
        out.append({k: given[k].detach().clone() for k in want})
    return out[0], out[1]


def _set_slot(slots: TensorDict, i: int, **values) -> TensorDict:
    new = slots.clone()
    for k, v in values.items():
        new[k][..., i] = v
    return new


# --- lifecycle operations --------------------------------------------------------------------


def germinate(
    state: State,
    slot: str,
    blueprint: str | bpm.Blueprint | None = None,
    *,
    generator: torch.Generator | None = None,
    tempo: int = 5,
    curve: str = "linear",
    weights: tuple[Mapping[str, Tensor], Mapping[str, Tensor]] | None = None,
) -> State:
    """Graft a new seed into a DORMANT slot. The network's function is unchanged (the delta is 0).

    The seed's parameters get zero optimizer state in every mirror. The seed is born on the state's
    device and in its dtype (`State.device`, `State.dtype`): the blueprint draws its weights in
    float32 with `generator` (a CPU generator), and they are moved and cast once.

    Args:
        state: current state.
        slot: slot name.
        blueprint: blueprint id ("lora@1.0.0"), bare name ("lora") or `Blueprint`; may be omitted
            with `from_library` (the stored seed's blueprint is used).
        generator: randomness for the seed's initial weights (unused by a warm start).
        tempo: epochs the BLENDING alpha ramp will take (>= 1).
        curve: "linear", "cosine" or "sigmoid".
        weights: ``(params, buffers)`` to start the seed from instead of a fresh draw (a warm
            start: `esper_fn.urza.warm_start` grafts a stored seed's trained weights this way). They
            must have exactly the names, shapes and dtypes the blueprint creates at this slot. The
            seed still enters the network at alpha 0 (GERMINATED and TRAINING leave the live output
            alone), so the function is unchanged now; its weights matter once it blends in.

    On a stacked state every host gets the same initial seed weights (one draw, broadcast);
    germinate the hosts one by one before `stack` for independent draws.

    Raises:
        IllegalTransitionError: the slot is not DORMANT.
        BlueprintError: unknown blueprint, or it does not fit the slot.
        CapabilityError: the blueprint needs a capability this machine lacks (and has no fallback).
        WarmStartError: `weights` lack a tensor the blueprint needs, hold one it does not, or one of
            another shape or dtype.

    A blueprint whose capability is absent resolves to its fallback, and the state records the
    design that actually runs (``state.blueprints``). A `Blueprint` object that is not in the
    catalogue yet is registered (`esper_fn.blueprints.register`), since states name seeds by id.
    """
    i = state.index(slot)
    check_transition(slot, state.stage(slot), Op.GERMINATE)
    if blueprint is None:
        raise bpm.BlueprintError(f"germinate: name a blueprint for slot {slot!r} (e.g. 'conv1d_k5'), or warm-start "
                                 "from a stored seed with esper_fn.urza.warm_start(state, slot, ID, library=PATH).")
    if isinstance(blueprint, bpm.Blueprint):
        bpm.register(blueprint)  # the state names its seeds by id; the id must resolve to this design
    bp = bpm.get(blueprint)
    spec = state.spec(slot)
    why = bp.misfit(spec)
    if why is not None:
        fitting = list(bpm.offered(spec))
        raise bpm.BlueprintError(
            f"blueprint {bp.id!r} does not fit slot {slot!r}: {why}. Blueprints that fit {slot!r}: "
            f"{fitting or 'none'} (as `esper_fn.legal_actions(state)[{slot!r}]['blueprints']` lists them: "
            "capabilities checked, `esper_fn.blueprints.offered`)."
        )
    if curve not in CURVES:
        raise GraftError(f"unknown alpha curve {curve!r}; choose one of {CURVES}.")
    if int(tempo) < 1:
        raise GraftError(f"tempo must be >= 1 epoch, got {tempo}.")
    if weights is not None:
        p, b = _checked_weights(weights, bp, spec)
    else:
        p, b = bp.init(spec, generator)
    # Blueprints draw in float32 where the generator lives (the CPU); the seed is then born in the
    # host's dtype and on its device, so one generator gives the same seed everywhere (to rounding).
    device, dtype = placement(state.params_flat)
    p, b = place(p, device, dtype), place(b, device, dtype)
    if state.batch:
        p = {k: v.expand(*state.batch, *v.shape).clone() for k, v in p.items()}
        b = {k: v.expand(*state.batch, *v.shape).clone() for k, v in b.items()}
    params = dict(state.params_flat)
    buffers = dict(state.buffers_flat)
    opt = dict(state.opt_flat)
    for k, v in p.items():
        params[("seeds", slot, k)] = v
        for m in state.optimizer.mirrors:
            leaf = zero_leaf(m, v)
            opt[(m, "seeds", slot, k)] = leaf.expand(*state.batch).clone() if m == "step" and state.batch else leaf
    for k, v in b.items():
        buffers[("seeds", slot, k)] = v
    slots = _set_slot(state.slots, i, stage=int(Stage.GERMINATED), alpha=0.0, curve=CURVES.index(curve),
                      tempo=int(tempo), epochs=0,
                      seed_id=torch.tensor(state.n_seeds) if isinstance(state.n_seeds, tuple) else state.n_seeds)
    bps = tuple(bp.id if j == i else b_ for j, b_ in enumerate(state.blueprints))
    return derive(state, params_flat=params, buffers_flat=buffers, opt_flat=opt, slots=slots, blueprints=bps,
                   n_seeds=tuple(n + 1 for n in state.n_seeds) if isinstance(state.n_seeds, tuple)
                   else state.n_seeds + 1)


def advance(
    state: State,
    slot: str,
    *,
    gates: GateConfig | None = None,
    telemetry: Mapping[str, float] | None = None,
    force: bool = False,
) -> State:
    """Move a seed one stage forward: GERMINATED -> TRAINING -> BLENDING -> HOLDING.

    Entering BLENDING starts the alpha ramp (alpha stays 0 until the first `tick`). Leaving
    BLENDING needs the ramp to be complete (alpha == 1).

    Args:
        gates: thresholds (default `GateConfig()`: leaving TRAINING checks min_training_epochs only);
            telemetry: measurements for the gates (`esper_fn.training.telemetry`).
        force: skip the gates (not the transition table); a forced BLENDING -> HOLDING sets alpha 1.

    Raises:
        IllegalTransitionError: no ADVANCE from the slot's stage.
        GateError: a gate refused (and not `force`).
        MissingTelemetryError: a gate that is on (e.g. ``max_grad_norm`` set) lacks its telemetry key.
    """
    i = state.index(slot)
    stage = state.stage(slot)
    nxt = check_transition(slot, stage, Op.ADVANCE)
    if not force:
        refusal = _gate_refusal(state, slot, stage, Op.ADVANCE, gates or GateConfig(), telemetry)
        if refusal is not None:
            raise refusal
    values = {"stage": int(nxt), "epochs": 0}
    if nxt == Stage.HOLDING:
        values["alpha"] = 1.0
    return derive(state, slots=_set_slot(state.slots, i, **values))


def tick(state: State, *, gates: GateConfig | None = None) -> State:
    """Advance the clock by one epoch.

    Every slot's epochs-in-stage count grows by one; BLENDING alphas follow their curve
    (``alpha = curve(epochs / tempo)``); a PRUNED slot becomes EMBARGOED, and an EMBARGOED slot
    becomes DORMANT after ``gates.embargo_epochs`` epochs (default `GateConfig()`: 2).
    """
    embargo_epochs = (gates or GateConfig()).embargo_epochs
    slots = state.slots.clone()
    stage, epochs = slots["stage"], slots["epochs"]
    epochs += 1
    # Per host and slot, as data: stacked hosts may be in different stages.
    blending = stage == int(Stage.BLENDING)
    if bool(blending.any()):
        tempo, curves, alpha = slots["tempo"], slots["curve"], slots["alpha"]
        for j in blending.nonzero().tolist():
            j = tuple(j)
            alpha[j] = alpha_at(CURVES[int(curves[j])], int(epochs[j]) / int(tempo[j]))
    pruned = stage == int(Stage.PRUNED)
    released = (stage == int(Stage.EMBARGOED)) & (epochs >= embargo_epochs)
    stage[pruned] = int(Stage.EMBARGOED)
    stage[released] = int(Stage.DORMANT)
    epochs[pruned | released] = 0
    return derive(state, slots=slots)


def _drop_seed(state: State, slot: str) -> tuple[Flat, Flat, Flat]:
    params = {k: v for k, v in state.params_flat.items() if not (k[0] == "seeds" and k[1] == slot)}
    buffers = {k: v for k, v in state.buffers_flat.items() if not (k[0] == "seeds" and k[1] == slot)}
    opt = {k: v for k, v in state.opt_flat.items() if not (k[1] == "seeds" and k[2] == slot)}
    return params, buffers, opt


def prune(state: State, slot: str) -> State:
    """Remove a live seed exactly: its parameters, buffers and optimizer state are dropped, so the
    network computes what it computed before the graft. The slot becomes PRUNED (then EMBARGOED and
    DORMANT through `tick`).

    Raises:
        IllegalTransitionError: the slot holds no live seed.
    """
    i = state.index(slot)
    check_transition(slot, state.stage(slot), Op.PRUNE)
    params, buffers, opt = _drop_seed(state, slot)
    slots = _set_slot(state.slots, i, stage=int(Stage.PRUNED), alpha=0.0, epochs=0, seed_id=-1, tempo=0)
    bps = tuple(None if j == i else b for j, b in enumerate(state.blueprints))
    return derive(state, params_flat=params, buffers_flat=buffers, opt_flat=opt, slots=slots, blueprints=bps)


def fossilize(
    state: State,
    slot: str,
    *,
    gates: GateConfig | None = None,
    telemetry: Mapping[str, float] | None = None,
    force: bool = False,
) -> State:
    """Make a HOLDING seed permanent.

    A mergeable seed (LoRA, IA3, width growth) is folded into the host's weights (the function
    changes by float rounding only), its optimizer state is folded or dropped, and the slot returns
    to DORMANT, free for a new seed. Any other seed stays as permanent structure at alpha 1
    (FOSSILIZED): it can no longer be pruned, and it trains with the host from then on.

    The default gate demands evidence that the seed helps: the lower bound ``<slot>/contribution -
    1.645 * <slot>/contribution_se`` of the epoch's telemetry must exceed 0 (see `GateConfig`).
    Pass `telemetry` (`esper_fn.training.telemetry`), other `gates`, or ``force=True``.

    Raises:
        IllegalTransitionError: the slot is not HOLDING.
        GateError: a gate refused (and not `force`).
        MissingTelemetryError: the contribution gate (on by default) lacks its telemetry keys.
    """
    i = state.index(slot)
    stage = state.stage(slot)
    check_transition(slot, stage, Op.FOSSILIZE)
    if not force:
        refusal = _gate_refusal(state, slot, stage, Op.FOSSILIZE, gates or GateConfig(), telemetry)
        if refusal is not None:
            raise refusal
    bp = bpm.registry()[state.blueprints[i]]
    if not bp.meta.mergeable:
        slots = _set_slot(state.slots, i, stage=int(Stage.FOSSILIZED), alpha=1.0, epochs=0)
        return derive(state, slots=slots)
    spec = state.spec(slot)
    blocker = _reshape_conflict(state, slot, bp)
    if blocker is not None:
        raise GraftError(blocker)
    nb = len(state.batch)
    host_flat = {".".join(k[1:]): v for k, v in state.params_flat.items() if k[0] == "host"}
    seed = state.seed_params(slot)
    alpha = state.slots["alpha"][..., i].to(state.device)  # the record stays on the CPU; the merge runs on the device
    merge = bp.merge
    if nb:
        merge_one = lambda h, s, a: bp.merge(h, s, spec, a)  # noqa: E731
        updates = torch.vmap(merge_one)(host_flat, seed, alpha)
    else:
        updates = merge(host_flat, seed, spec, alpha)
    params, buffers, opt = _drop_seed(state, slot)
    for name, v in updates.items():
        params[("host", *name.split("."))] = v
    if bp.merge_moment is not None:
        for m in state.optimizer.mirrors:
            if m == "step":
                continue
            host_m = {".".join(k[2:]): v for k, v in state.opt_flat.items() if k[0] == m and k[1] == "host"}
            seed_m = {k[3]: v for k, v in state.opt_flat.items() if k[0] == m and k[1] == "seeds" and k[2] == slot}
            mm = (torch.vmap(lambda h, s: bp.merge_moment(h, s, spec))(host_m, seed_m) if nb
                  else bp.merge_moment(host_m, seed_m, spec))
            for name, v in mm.items():
                opt[(m, "host", *name.split("."))] = v
    slots = _set_slot(state.slots, i, stage=int(Stage.DORMANT), alpha=0.0, epochs=0, seed_id=-1, tempo=0)
    bps = tuple(None if j == i else b for j, b in enumerate(state.blueprints))
    return derive(state, params_flat=params, buffers_flat=buffers, opt_flat=opt, slots=slots, blueprints=bps)


def _reshape_conflict(state: State, slot: str, bp: bpm.Blueprint) -> str | None:
    """Why folding `bp` at `slot` would break another seed, or None.

    A merge that changes host shapes (width growth) widens the consumer Linear's input; a seed at
    the consumer's slot that reads that layer (LoRA, IA3, width growth) was built for the old width.
    """
    if bp.merge_moment is None:
        return None
    consumer = state.spec(slot).consumer
    if consumer is None:
        return None
    other = state.blueprints[state.index(consumer)]
    if other is not None and bpm.registry()[other].meta.layer_types is not None:
        return (f"fossilizing {bp.id!r} at slot {slot!r} widens the input of layer {consumer!r}, and slot "
                f"{consumer!r} holds {other!r}, which was built for the old width. Fossilize or prune the "
                f"seed at {consumer!r} first.")
    return None


# --- action masks ------------------------------------------------------------------------------


def legal_actions(
    state: State,
    *,
    capabilities: frozenset[str] | None = None,
    gates: GateConfig | None = None,
    telemetry: Mapping[str, float] | None = None,
) -> dict[str, dict]:
    """What each slot may do now: the transition table, blueprint fit, capabilities and the gates.

    An op listed here never raises when requested with the same `gates` and `telemetry` (ADVANCE
    and FOSSILIZE are listed only where their gates pass; ADVANCE from BLENDING only once alpha is 1).
    Where a gate that is on needs a telemetry key that `telemetry` lacks (or misspells), the gate
    cannot pass, so the op is not listed; the op itself, asked for anyway, raises the
    `MissingTelemetryError` that names the key. (With the default gates that is
    ``"<slot>/contribution"`` and ``"<slot>/contribution_se"`` for a HOLDING seed whose holding time
    is up; with ``max_grad_norm`` set, ``"grad_norm/<slot>"`` for a seed that has not trained yet.)

    Args:
        state: a single (unstacked) state.
        capabilities: the capabilities to assume (default: this machine's, less "distributed":
            pass it explicitly where every rank takes the same lifecycle actions); the blueprints
            listed are `esper_fn.blueprints.offered(spec, capabilities)`.
        gates: thresholds (default `GateConfig()`, as `advance` and `fossilize` use).
        telemetry: the epoch's telemetry (`esper_fn.training.telemetry`), read by the gates.

    Returns:
        ``{slot: {"stage": Stage, "ops": tuple[Op, ...], "blueprints": tuple[str, ...]}}``, where
        "blueprints" lists the ids that fit the slot and whose capabilities are present (a design
        whose capability is absent is masked out even if it has a fallback: the fallback is offered
        under its own id), non-empty only where GERMINATE is legal.

    Raises:
        GraftError: `state` is stacked (masks are per host: `unstack` it first).
    """
    if state.batch:
        raise GraftError(f"legal_actions: the state is stacked (batch {state.batch}); masks are per host. "
                         "Call it on each of `unstack(state)`.")
    gates = gates or GateConfig()
    out = {}
    for name in state.slot_names:
        stage = state.stage(name)
        ops = legal_ops(stage)
        bps: tuple[str, ...] = ()
        refused = set()
        if Op.FOSSILIZE in ops:
            if _reshape_conflict(state, name, bpm.registry()[state.blueprints[state.index(name)]]):
                refused.add(Op.FOSSILIZE)
            elif _gate_refusal(state, name, stage, Op.FOSSILIZE, gates, telemetry) is not None:
                refused.add(Op.FOSSILIZE)
        if Op.ADVANCE in ops and _gate_refusal(state, name, stage, Op.ADVANCE, gates, telemetry) is not None:
            refused.add(Op.ADVANCE)
        if Op.GERMINATE in ops:
            bps = bpm.offered(state.spec(name), capabilities)
            if not bps:
                refused.add(Op.GERMINATE)
        out[name] = {"stage": stage, "ops": tuple(o for o in ops if o not in refused), "blueprints": bps}
    return out


def _gate_refusal(state: State, slot: str, stage: Stage, op: Op, gates: GateConfig,
                  telemetry: Mapping[str, float] | None) -> GateError | None:
    """The `GateError` that `advance`/`fossilize` would raise for `op` at `slot`, or None."""
    i = state.index(slot)
    epochs = int(state.slots["epochs"][..., i].min())
    try:
        check_gate(slot, stage, op, epochs, gates, telemetry)
    except GateError as e:  # a gate that cannot read its input (MissingTelemetryError) refuses too
        return e
    if stage == Stage.BLENDING and op == Op.ADVANCE:
        a = float(state.slots["alpha"][..., i].min())
        if a < 1.0:
            return GateError(
                f"slot {slot!r} is still blending (alpha={a:.3f}, epoch {epochs} of "
                f"{int(state.slots['tempo'][..., i].max())}); tick until alpha reaches 1, or pass force=True."
            )
    return None


# --- stacking N hosts of one structure -------------------------------------------------------


def structure(state: State) -> Hashable:
    """What must be equal for states to stack: the host object, the optimizer, the blueprint per
    slot, and the keys and per-host shapes of every tensor. Stages, alphas and epochs are data and
    may differ (hosts that decide differently still train in one call).
    """
    nb = len(state.batch)
    shapes = lambda flat: tuple((k, tuple(v.shape[nb:])) for k, v in flat.items())  # noqa: E731
    opt = state.optimizer
    return (id(state.host), opt.name, tuple(sorted(opt.lr.items())), tuple(sorted(opt.hyper.items())),
            state.blueprints, shapes(state.params_flat),
            shapes(state.buffers_flat), shapes(state.opt_flat))


def partition(states: Sequence[State]) -> list[list[int]]:
    """Group a population by structure: each group lists the indices of states that `stack` accepts
    together, in order of first appearance. A host that germinates, fossilizes (merging) or prunes
    changes structure and so moves to another group; the next `partition` finds it there.

    The intended loop (what `esper_fn.training.train_epochs` does): keep N single states, and per
    epoch ``partition`` -> ``stack`` each group -> train -> ``unstack``; stacking costs a few
    microseconds per tensor (docs/benchmarks.md), small next to an epoch.
    """
    groups: dict[Hashable, list[int]] = {}
    for j, s in enumerate(states):
        if s.batch:
            raise GraftError(f"state {j} is stacked (batch {s.batch}); populations are lists of single states: "
                             "pass `unstack(state)` instead.")
        groups.setdefault(structure(s), []).append(j)
    return list(groups.values())


def stack(states: Sequence[State]) -> State:
    """Stack N states of one structure (same host, slots, blueprints, keys and shapes) into one
    state whose tensors have a leading dimension N. `train_step` and `apply` on the stacked state
    run all N hosts in one vectorised call. Stages, alphas and epochs-in-stage are per-host data:
    hosts may be in different stages at the same slot (a TRAINING seed on one host and a BLENDING
    one on another); `tick` and `train_step` treat each host by its own stage. Lifecycle ops that
    change one host (germinate, advance, ...) work on single states: `unstack`, apply, `stack`
    (`partition` groups a population into stackable sets).

    Raises:
        GraftError: the states differ in structure (naming the first difference).
    """
    if not states:
        raise GraftError("stack: need at least one state.")
    s0 = states[0]
    fix = "Group a population with `esper_fn.partition(states)` and stack each group."
    for j, s in enumerate(states[1:], 1):
        if s.host is not s0.host:
            raise GraftError(f"stack: state {j} was built from a different Host object than state 0 (stacking "
                             "needs the very same host definition); build every state from one Host. " + fix)
        if s.optimizer != s0.optimizer:
            raise GraftError(f"stack: state {j} uses optimizer {s.optimizer}, state 0 uses {s0.optimizer}; "
                             "stacked hosts share one optimizer. " + fix)
        if s.batch != s0.batch:
            raise GraftError(f"stack: state {j} has batch {s.batch}, state 0 has {s0.batch}; stack single states "
                             "(`unstack` a stacked one first).")
        if s.blueprints != s0.blueprints:
            raise GraftError(f"stack: state {j} has seeds {s.blueprints}, state 0 has {s0.blueprints}. " + fix)
        for what, a, b in (("parameter", s.params_flat, s0.params_flat), ("optimizer", s.opt_flat, s0.opt_flat),
                           ("buffer", s.buffers_flat, s0.buffers_flat)):
            for k in sorted(set(a) | set(b)):
                if k not in a or k not in b or a[k].shape != b[k].shape:
                    have = lambda f: tuple(f[k].shape) if k in f else "no such tensor"  # noqa: E731
                    raise GraftError(f"stack: {what} {'/'.join(k)} is {have(a)} in state {j} and {have(b)} in "
                                     f"state 0 (e.g. a width growth fossilized on one host only). " + fix)

    def st(attr):
        return {k: torch.stack([getattr(s, attr)[k] for s in states]) for k in getattr(s0, attr)}

    return derive(s0, params_flat=st("params_flat"), buffers_flat=st("buffers_flat"), opt_flat=st("opt_flat"),
                   slots=torch.stack([s.slots for s in states]), batch=(len(states),) + s0.batch,
                   n_seeds=tuple(s.n_seeds for s in states), sculpts=max(s.sculpts for s in states))


def unstack(state: State) -> list[State]:
    """Split a stacked state back into its N states."""
    if not state.batch:
        raise GraftError("unstack: the state is not stacked (batch is ()).")
    n = state.batch[0]

    def pick(flat, j):
        return {k: v[j] for k, v in flat.items()}

    return [
        derive(state, params_flat=pick(state.params_flat, j), buffers_flat=pick(state.buffers_flat, j),
                opt_flat=pick(state.opt_flat, j), slots=state.slots[j], batch=state.batch[1:],
                n_seeds=state.n_seeds[j] if isinstance(state.n_seeds, tuple) else state.n_seeds)
        for j in range(n)
    ]
