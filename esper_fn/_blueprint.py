"""Blueprints: seed designs as pure (init, apply) functions with pydantic metadata, and their registry.

A seed attached at a slot sees the slot tensor ``h`` (and the input ``x_in`` of the layer the slot
follows) and returns a *delta*; the live output is ``h + alpha * delta``. Every blueprint's init
makes the delta exactly zero, so germination never changes the network's function.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from ._errors import BlueprintError, CapabilityError
from ._host import SlotSpec

__all__ = [
    "Blueprint",
    "BlueprintMeta",
    "SeedOut",
    "available_capabilities",
    "get",
    "offered",
    "register",
    "registry",
]

BLUEPRINT_ID = re.compile(r"^[a-z][a-z0-9_]*@\d+\.\d+\.\d+$")
"""What a blueprint id looks like: ``name@MAJOR.MINOR.PATCH``."""


class BlueprintMeta(BaseModel):
    """Validated metadata of a blueprint (unknown keys are an error).

    Attributes:
        name: snake_case name, e.g. "mlp_gelu".
        version: semantic version "MAJOR.MINOR.PATCH".
        description: one line for catalogue tables.
        mergeable: whether fossilizing folds the seed into host weights (the slot becomes free).
        risk_score: prior risk in [0, 1] that the seed destabilises training.
        requires_capability: capabilities the seed needs (e.g. "cuda", "flash_attention").
        fallback: id of a pure-PyTorch blueprint used where a capability is absent, or None.
        slot_kinds: slot kinds it fits ("vector", "conv1d", "conv2d", "sequence").
        layer_types: layer types it needs before the slot (e.g. ("linear",) for LoRA), or None.
        target: "slot" (delta lands at the slot) or "consumer" (lands after the consumer Linear:
            width growth).
        hyperparams: fixed design choices (rank, hidden width, ...).
        measured_latency_us: median forward latency measured by `characterise`, if measured.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: str = Field(pattern=r"^\d+\.\d+\.\d+$")
    description: str
    mergeable: bool = False
    risk_score: float = Field(ge=0.0, le=1.0)
    requires_capability: tuple[str, ...] = ()
    fallback: str | None = None
    slot_kinds: tuple[str, ...]
    layer_types: tuple[str, ...] | None = None
    target: str = Field(default="slot", pattern=r"^(slot|consumer)$")
    hyperparams: dict[str, int | float | str] = Field(default_factory=dict)
    measured_latency_us: float | None = None

    @field_validator("name")
    @classmethod
    def _snake(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", v):
            raise ValueError(f"blueprint name {v!r} must be snake_case ([a-z][a-z0-9_]*)")
        return v

    @property
    def id(self) -> str:
        return f"{self.name}@{self.version}"


class SeedOut(NamedTuple):
    """What a blueprint's apply may return instead of a bare delta tensor.

    Attributes:
        delta: the seed's additive output, same shape as the slot tensor (or the consumer's output).
        aux_loss: a 0-d auxiliary loss (e.g. router load balancing) to add to the training loss.
        buffers: updated seed buffers (training forward only), same keys as the seed's buffers.
    """

    delta: Tensor
    aux_loss: Tensor | None = None
    buffers: dict[str, Tensor] | None = None


InitFn = Callable[[SlotSpec, "torch.Generator | None"], tuple[dict[str, Tensor], dict[str, Tensor]]]
ApplyFn = Callable[[Mapping[str, Tensor], Tensor, "Tensor | None", SlotSpec, bool], "Tensor | SeedOut"]
MergeFn = Callable[[Mapping[str, Tensor], Mapping[str, Tensor], SlotSpec, float], dict[str, Tensor]]


@dataclass(frozen=True, eq=False)
class Blueprint:
    """A seed design.

    Attributes:
        meta: validated metadata.
        init: ``init(spec, generator) -> (params, buffers)``, flat dicts; the delta is zero at init.
        apply: ``apply(p, h, x_in, spec, train) -> delta | SeedOut`` where ``p`` maps the seed's
            parameter and buffer names to tensors, ``h`` is the slot tensor ([B, *spec.shape]) and
            ``x_in`` the input of the layer the slot follows (or None).
        param_count: ``param_count(spec) -> int`` trainable parameters at that slot.
        flops: ``flops(spec) -> int`` multiply-adds per sample (approximate, documented per design).
        merge: for mergeable seeds, ``merge(host, seed, spec, alpha) -> updates``: new values for
            the host's flat parameters that fold ``alpha * delta`` into them exactly.
        merge_moment: for merges that change host shapes (width growth), ``merge_moment(host,
            seed, spec) -> updates`` applied to every optimizer moment tree; None keeps host moments.
        check: extra fit test ``check(spec) -> reason | None`` beyond slot kind and layer type.
        module: ``module(spec, tensors) -> (seed_module, reads)``: the seed as an `nn.Module` of
            standard layers holding copies of `tensors` (its parameters and buffers by name), whose
            output equals apply's delta; `reads` says what it is called with: "h" (the slot tensor),
            "x_in" (the layer's input) or "h,x_in" (both). `esper_fn.export` grafts it on the
            exported host. None: the export holds the seed as a generic `SeedFn` module that calls
            `apply` (consumer-target seeds are folded into the host's layers instead).
        units: the seed's hidden units that Emrakul (`esper_fn.sculpt`) may remove once it is
            fossilized: one group per hidden layer, each a tuple of ``(tensor, dim, role)``: the
            tensors that index the group's units along `dim`, role "in" for the producing layer's
            weight rows and bias, "out" for the consuming layer's input columns, and "bias" for the
            consuming layer's bias (not cut: it receives the removed units' mean contribution, its
            `dim` is its output dim). Only units between
            an elementwise nonlinearity and a linear map qualify (removing one drops exactly its
            term from the consumer's output). Empty: the seed cannot be sculpted.
    """

    meta: BlueprintMeta
    init: InitFn
    apply: ApplyFn
    param_count: Callable[[SlotSpec], int]
    flops: Callable[[SlotSpec], int]
    merge: MergeFn | None = None
    merge_moment: Callable[[Mapping[str, Tensor], Mapping[str, Tensor], SlotSpec], dict[str, Tensor]] | None = None
    check: Callable[[SlotSpec], str | None] | None = None
    module: Callable[[SlotSpec, Mapping[str, Tensor]], tuple[nn.Module, str]] | None = None
    units: tuple[tuple[tuple[str, int, str], ...], ...] = ()

    @property
    def id(self) -> str:
        return self.meta.id

    def misfit(self, spec: SlotSpec) -> str | None:
        """Why this blueprint cannot attach at `spec`, or None if it fits."""
        m = self.meta
        if not spec.dtype.is_floating_point:
            dt = str(spec.dtype).removeprefix("torch.")
            what = "values" if spec.dtype.is_complex or spec.dtype == torch.bool else "tokens"
            return (f"slot {spec.name!r} carries {dt} {what}; "
                    "seeds add a float delta, so no blueprint fits there (attach seeds after the layer that "
                    "turns it into floats, e.g. a slot after the nn.Embedding)")
        if spec.kind not in m.slot_kinds:
            return f"it fits slot kinds {list(m.slot_kinds)}, and slot {spec.name!r} is {spec.kind!r}"
        if m.layer_types is not None and spec.layer_type not in m.layer_types:
            return (f"it needs a slot after a layer of type {list(m.layer_types)}, and slot "
                    f"{spec.name!r} follows {spec.layer_type!r}")
        if m.target == "consumer" and spec.consumer is None:
            return (f"it widens a Linear read by another Linear through an elementwise activation, "
                    f"and slot {spec.name!r} has no such consumer")
        if self.check is not None:
            return self.check(spec)
        return None

    def fits(self, spec: SlotSpec) -> bool:
        return self.misfit(spec) is None


_REGISTRY: dict[str, Blueprint] = {}


def register(bp: Blueprint) -> Blueprint:
    """Add a blueprint to the catalogue; raises `BlueprintError` on a malformed or duplicate id."""
    _catalogue()  # built-in ids first, so a clash with one is reported here
    if not isinstance(bp, Blueprint):
        raise BlueprintError(f"register: expected a Blueprint, got {type(bp).__name__}.")
    if bp.meta.mergeable and bp.merge is None:
        raise BlueprintError(f"blueprint {bp.id!r} is declared mergeable but has no merge function.")
    if bp.id in _REGISTRY and _REGISTRY[bp.id] is not bp:
        raise BlueprintError(f"blueprint {bp.id!r} is already registered; bump its version instead.")
    _REGISTRY[bp.id] = bp
    return bp


def _catalogue() -> None:
    """Register the built-in catalogue on first use, whichever module asked first (importing
    `esper_fn.blueprints` registers it; a user may import only `esper_fn._state`, say)."""
    import importlib

    importlib.import_module("esper_fn.blueprints")


def registry() -> dict[str, Blueprint]:
    """All registered blueprints by id ("name@x.y.z"), in registration order."""
    _catalogue()
    return dict(_REGISTRY)


def available_capabilities() -> frozenset[str]:
    """Capabilities this process has (e.g. "cuda", "flash_attention")."""
    caps = set()
    if torch.cuda.is_available():
        caps.add("cuda")
        major, _ = torch.cuda.get_device_capability()
        if major >= 8:  # the flash kernel needs Ampere or newer
            caps.add("flash_attention")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        caps.add("distributed")  # any backend (gloo on CPU, nccl on GPU)
    return frozenset(caps)


def resolve(name: str, ids: Iterable[str] | None = None) -> str | None:
    """The id a blueprint name stands for among `ids` (default: the registry): an id ("lora@1.0.0")
    stands for itself, a bare name ("lora") for its newest version. None if nothing matches.

    The one place a bare name is resolved: `get`, the env's action space and the policies use it.
    """
    ids = list(registry() if ids is None else ids)
    if name in ids:
        return name
    same = [i for i in ids if i.split("@")[0] == name]
    if not same:
        return None
    return max(same, key=lambda i: tuple(int(v) for v in i.split("@")[1].split(".")))


def offered(spec: SlotSpec, capabilities: frozenset[str] | None = None) -> tuple[str, ...]:
    """The blueprints a slot offers: the ids that fit `spec` and whose required capabilities are
    all present, in registry order. The one rule behind `esper_fn.legal_actions`' blueprint list
    and the list a `BlueprintError` suggests.

    A design whose capability is absent is left out even if it has a fallback (the fallback is
    offered under its own id).

    Args:
        spec: the slot.
        capabilities: the capabilities to assume; default: this machine's, less "distributed" (a
            collective seed works only if every rank grafts it in lockstep, which no per-host
            decision can promise: pass it explicitly where every rank takes the same actions).
    """
    caps = available_capabilities() - {"distributed"} if capabilities is None else capabilities
    return tuple(bid for bid, bp in registry().items() if bp.fits(spec) and set(bp.meta.requires_capability) <= caps)


def get(blueprint: str | Blueprint, *, capabilities: frozenset[str] | None = None) -> Blueprint:
    """Look a blueprint up by id ("lora@1.0.0") or bare name (newest version).

    A blueprint whose `requires_capability` is not met resolves to its pure-PyTorch fallback if it
    declares one.

    Raises:
        BlueprintError: unknown name or malformed id (listing close matches).
        CapabilityError: a required capability is absent and there is no fallback.
    """
    _catalogue()
    if isinstance(blueprint, Blueprint):
        bp = blueprint
    else:
        if not isinstance(blueprint, str):
            raise BlueprintError(f"a blueprint is named by a string like 'lora@1.0.0', got {blueprint!r}.")
        if "@" in blueprint and not BLUEPRINT_ID.match(blueprint):
            raise BlueprintError(f"malformed blueprint id {blueprint!r}; expected 'name@MAJOR.MINOR.PATCH'.")
        bid = resolve(blueprint, _REGISTRY)
        bp = _REGISTRY.get(bid) if bid is not None else None
        if bp is None:
            import difflib

            close = difflib.get_close_matches(blueprint, list(_REGISTRY), n=3, cutoff=0.4)
            raise BlueprintError(
                f"unknown blueprint {blueprint!r}. Close matches: {close or 'none'}; "
                f"list them all with `esper_fn.blueprints.registry()`."
            )
    caps = available_capabilities() if capabilities is None else capabilities
    missing = [c for c in bp.meta.requires_capability if c not in caps]
    if missing:
        if bp.meta.fallback is not None:
            return get(bp.meta.fallback, capabilities=caps)
        raise CapabilityError(
            f"blueprint {bp.id!r} requires {missing}, which this machine lacks, and has no fallback. "
            f"Mask it out with `esper_fn.legal_actions(...)`."
        )
    return bp
