"""Karn: blueprints generated from parameterised families.

A `Family` is one of the catalogue's building blocks (`esper_fn.blueprints`: the residual Conv1d
block, the depthwise-separable Conv1d block, the residual GELU MLP, LoRA, Net2Net width growth) with
its design choices as parameters (kernel size, dilation, hidden width, expansion, rank, units) and
the placements it may be grafted at. Fixing the parameters generates a concrete, versioned
blueprint whose id encodes them::

    karn_conv1d_k7_d2_c4@1.0.0      kernel 7, dilation 2, 4 hidden channels (family conv1d, version 1.0.0)
    karn_mlp_x0_5@1.0.0             hidden = max(4, 0.5 x features)
    karn_lora_r2@1.0.0              rank 2

Its init, apply, merge and costs (``param_count``, ``flops``) are the building block's, so every
generated blueprint keeps the catalogue's invariant (its delta is exactly zero at germination), and
its metadata is the block's with the family's name, version and parameters. The version is the
family's: it is bumped whenever the family's code changes. `Family.fingerprint` hashes that code
(the family's maker and every esper_fn function it calls, as syntax trees: comments and formatting
do not count), and a library refuses to store one id with two fingerprints.

Generated blueprints are registered like any other (`blueprint(id)` generates and registers one;
the id alone is enough, in any process), and searched over by ``esper-fn karn``
(`esper_fn.policies.karn_search`: Optuna's TPE sampler, trials run through the growth environment).
The winners are kept in a seed library (`esper_fn.urza.Library`, its ``blueprints`` table):
`persist` writes one, `load` registers every winner a library holds, so later runs, the env's
``blueprints=`` and the controllers (``recipe:<position>-<blueprint id>-<at>``) can offer them.
`evidence` summarises what a library records about earlier seeds and blueprint outcomes
(contribution per parameter, cost) by family point: the search's warm start.

Nothing here imports the RL packages; Tezzeret characterises a generated blueprint like any other
(`esper_fn.tezzeret.characterise`).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import itertools
import re
import textwrap
import time
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from . import _blueprint as bpm
from ._blueprint import Blueprint, BlueprintMeta
from ._errors import BlueprintError
from .blueprints._conv import conv1d_block, conv1d_dwsep_block
from .blueprints._dense import lora_block, mlp_gelu_block, width_block

if TYPE_CHECKING:
    from .urza import BlueprintRecord, Library

__all__ = [
    "FAMILIES",
    "PLACEMENTS",
    "PREFIX",
    "Evidence",
    "Family",
    "Param",
    "blueprint",
    "catalogue_design",
    "equivalent",
    "evidence",
    "generate",
    "is_generated",
    "load",
    "parse",
    "persist",
]

PREFIX = "karn_"
"""Every generated blueprint's name starts with this."""

PLACEMENTS: tuple[str, ...] = ("input", "first", "last")
"""Where a generated blueprint may be grafted: the raw input slot, the first or the last hidden slot
(the positions of `esper_fn.controllers.RECIPE_POSITIONS`)."""


@dataclass(frozen=True)
class Param:
    """One parameter of a family.

    Attributes:
        name: its name in the blueprint's ``hyperparams`` ("kernel").
        code: its letter in the id ("k": ``..._k7_...``).
        choices: the values it may take, in order (the search's grid).
    """

    name: str
    code: str
    choices: tuple[int | float, ...]


def _token(v: int | float) -> str:
    """7 -> "7", 0.5 -> "0_5", 2.0 -> "2" (ids are snake_case)."""
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return str(v).replace(".", "_")


@dataclass(frozen=True, eq=False)
class Family:
    """A building block with parameters, from which concrete blueprints are generated.

    Attributes:
        name: the family's name ("conv1d"; no underscore, so ids parse unambiguously).
        version: semantic version; every blueprint it generates carries it. Bump it whenever the
            family's code (its maker and the building block it calls) changes.
        params: its parameters, in id order.
        placements: where its blueprints may be grafted (a subset of `PLACEMENTS`).
        make: ``make(**params) -> Blueprint``: the catalogue building block for those parameters
            (its init, apply, merge and costs are the generated blueprint's).
        summary: one line for tables.
    """

    name: str
    version: str
    params: tuple[Param, ...]
    placements: tuple[str, ...]
    make: Callable[..., Blueprint]
    summary: str

    def blueprint_id(self, **values: int | float) -> str:
        """The id of the blueprint with these parameter values, e.g. ``karn_conv1d_k7_d2_c4@1.0.0``.

        Raises:
            BlueprintError: a parameter is missing, unknown, or not one of its choices.
        """
        self.check(values)
        parts = "_".join(f"{p.code}{_token(values[p.name])}" for p in self.params)
        return f"{PREFIX}{self.name}_{parts}@{self.version}"

    def check(self, values: Mapping[str, Any]) -> None:
        """Raises `BlueprintError` unless `values` gives every parameter one of its choices."""
        names = [p.name for p in self.params]
        missing, extra = [n for n in names if n not in values], sorted(set(values) - set(names))
        if missing or extra:
            raise BlueprintError(f"Karn family {self.name!r} takes parameters {names}; got {sorted(values)} "
                                 f"(missing {missing}, unknown {extra}).")
        for p in self.params:
            v = values[p.name]
            if isinstance(v, bool) or v not in p.choices:
                raise BlueprintError(f"Karn family {self.name!r}: {p.name} = {v!r} is not one of its choices "
                                     f"{list(p.choices)}.")

    def canonical(self, values: Mapping[str, Any]) -> dict[str, int | float]:
        """`values` checked, each as its choice is written (``expansion=1`` -> ``1.0``)."""
        self.check(values)
        return {p.name: p.choices[p.choices.index(values[p.name])] for p in self.params}

    def points(self) -> Iterator[dict[str, int | float]]:
        """Every parameter combination of the grid, in order."""
        for combo in itertools.product(*(p.choices for p in self.params)):
            yield {p.name: v for p, v in zip(self.params, combo)}

    @functools.cached_property
    def fingerprint(self) -> str:
        """SHA-256 of the family's code: its parameters and placements, and the syntax trees of `make`
        and of every esper_fn function it reaches (the building block and its helpers), so a change to
        any of them changes it (comments and formatting do not)."""
        h = hashlib.sha256(f"{self.name}|{[(p.name, p.code, p.choices) for p in self.params]}|"
                           f"{self.placements}".encode())
        for fn in _code_closure(self.make):
            h.update(fn.__module__.encode() + b"." + fn.__qualname__.encode() + b"\n")
            h.update(ast.dump(ast.parse(textwrap.dedent(inspect.getsource(fn)))).encode())
        return h.hexdigest()


def _code_closure(root: Callable) -> list[types.FunctionType]:
    """`root` and every esper_fn function its code names (recursively, nested functions included),
    sorted by qualified name."""
    seen: dict[str, types.FunctionType] = {}
    todo = [root]
    while todo:
        fn = todo.pop()
        key = f"{fn.__module__}.{fn.__qualname__}"
        if key in seen:
            continue
        seen[key] = fn
        codes, names = [fn.__code__], set()
        while codes:
            c = codes.pop()
            names.update(c.co_names)
            codes.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
        for n in sorted(names):
            g = fn.__globals__.get(n)
            if isinstance(g, types.FunctionType) and (g.__module__ or "").startswith("esper_fn"):
                todo.append(g)
    return [seen[k] for k in sorted(seen)]


# --- the families --------------------------------------------------------------------------------------------


def _make_conv1d(kernel: int, dilation: int, hidden: int) -> Blueprint:
    return conv1d_block(kernel, hidden, dilation)


def _make_dwsep(kernel: int, dilation: int) -> Blueprint:
    return conv1d_dwsep_block(kernel, dilation)


def _make_mlp(expansion: float) -> Blueprint:
    return mlp_gelu_block(float(expansion))


def _make_lora(rank: int) -> Blueprint:
    return lora_block(rank)


def _make_width(units: int) -> Blueprint:
    return width_block(units)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("conv1d", "1.0.0",
           (Param("kernel", "k", (3, 5, 7, 9)), Param("dilation", "d", (1, 2, 4)), Param("hidden", "c", (2, 4, 8, 16, 32))),
           PLACEMENTS, _make_conv1d,
           "residual Conv1d block conv_k,d(relu(conv_k,d(x))), C -> c -> C channels, output conv zero-initialised"),
    Family("dwsep", "1.0.0", (Param("kernel", "k", (3, 5, 7, 9)), Param("dilation", "d", (1, 2, 4))),
           PLACEMENTS, _make_dwsep,
           "residual depthwise-separable Conv1d block: depthwise k (dilation d), ReLU, pointwise C -> C zero-initialised"),
    Family("mlp", "1.0.0", (Param("expansion", "x", (0.5, 1.0, 2.0, 4.0)),), PLACEMENTS, _make_mlp,
           "residual GELU MLP, hidden = max(4, expansion x features), output layer zero-initialised"),
    Family("lora", "1.0.0", (Param("rank", "r", (1, 2, 4, 8, 16)),), ("first", "last"), _make_lora,
           "LoRA adapter of rank r on the preceding Linear (B zero-initialised); folds into W"),
    Family("width", "1.0.0", (Param("units", "u", (1, 2, 4, 8, 16)),), ("first", "last"), _make_width,
           "Net2Net width growth by u hidden units, outgoing weights zero; merges into both Linears"),
)}
"""The families by name. A new family goes last; changing one means bumping its version."""

_EQUIVALENTS: dict[str, tuple[str, dict[str, int | float]]] = {
    "conv1d_k5@1.0.0": ("conv1d", {"kernel": 5, "dilation": 1, "hidden": 16}),
    "conv1d_k3@1.0.0": ("conv1d", {"kernel": 3, "dilation": 1, "hidden": 16}),
    "conv1d_dwsep@1.0.0": ("dwsep", {"kernel": 5, "dilation": 1}),
    "mlp_gelu@1.0.0": ("mlp", {"expansion": 1.0}),
    "mlp_gelu_x0_5@1.0.0": ("mlp", {"expansion": 0.5}),
    "lora_r4@1.0.0": ("lora", {"rank": 4}),
    "lora_r8@1.0.0": ("lora", {"rank": 8}),
    "lora_r16@1.0.0": ("lora", {"rank": 16}),
    "width_k4@1.0.0": ("width", {"units": 4}),
    "width_k16@1.0.0": ("width", {"units": 16}),
}


def equivalent(blueprint_id: str) -> tuple[Family, dict[str, int | float]] | None:
    """The family point that computes the same function as a blueprint: a generated id's own, or a
    catalogue design's (``conv1d_k5@1.0.0`` is conv1d with kernel 5, dilation 1, 16 hidden
    channels); None for a design no family covers."""
    if is_generated(blueprint_id):
        return parse(blueprint_id)
    hit = _EQUIVALENTS.get(blueprint_id)
    return None if hit is None else (FAMILIES[hit[0]], dict(hit[1]))


def catalogue_design(blueprint_id: str) -> str | None:
    """The catalogue design a generated id computes the same function as (``karn_conv1d_k5_d1_c16@1.0.0``
    is ``conv1d_k5@1.0.0``), or None for a point no catalogue design is (a new design).

    Raises:
        BlueprintError: a malformed Karn id.
    """
    fam, values = parse(blueprint_id)
    for design, (name, params) in _EQUIVALENTS.items():
        if name == fam.name and params == values:
            return design
    return None


# --- generation ----------------------------------------------------------------------------------------------


def is_generated(blueprint_id: str) -> bool:
    """Whether an id (or bare name) names a Karn-generated blueprint."""
    return isinstance(blueprint_id, str) and blueprint_id.startswith(PREFIX)


def _family(name: str) -> Family:
    if name not in FAMILIES:
        raise BlueprintError(f"unknown Karn family {name!r}; the families are {sorted(FAMILIES)}.")
    return FAMILIES[name]


def parse(blueprint_id: str) -> tuple[Family, dict[str, int | float]]:
    """The family and parameters an id encodes (``karn_conv1d_k7_d2_c4@1.0.0``).

    Raises:
        BlueprintError: not a Karn id, an unknown family, parameters that do not parse or are not
            the family's choices, or a version other than the family's (generated by other code).
    """
    m = re.fullmatch(rf"{PREFIX}([a-z0-9]+)_([a-z0-9_]+)@(\d+\.\d+\.\d+)", blueprint_id or "")
    if m is None:
        raise BlueprintError(f"{blueprint_id!r} is not a Karn blueprint id like 'karn_conv1d_k7_d2_c4@1.0.0' "
                             "(karn_<family>_<parameters>@<family version>).")
    fam = _family(m.group(1))
    pattern = "_".join(f"{p.code}(\\d+(?:_\\d+)?)" for p in fam.params)
    pm = re.fullmatch(pattern, m.group(2))
    if pm is None:
        raise BlueprintError(f"{blueprint_id!r}: the {fam.name!r} family's parameters are written "
                             f"{'_'.join(p.code + '<' + p.name + '>' for p in fam.params)}, got {m.group(2)!r}.")
    values: dict[str, int | float] = {}
    for p, text in zip(fam.params, pm.groups()):
        v = float(text.replace("_", ".")) if "_" in text or any(isinstance(c, float) for c in p.choices) else int(text)
        values[p.name] = v
    fam.check(values)
    if m.group(3) != fam.version:
        raise BlueprintError(f"{blueprint_id!r} was generated by version {m.group(3)} of the {fam.name!r} family; this "
                             f"esper_fn has version {fam.version}, whose code differs. Generate "
                             f"{fam.blueprint_id(**values)!r} instead (rerun esper-fn karn to rescore it).")
    return fam, values


def generate(family: str | Family, **values: int | float) -> Blueprint:
    """A new (unregistered) blueprint of a family: the building block's init, apply, merge and costs
    with the family's metadata (name, version, parameters in ``hyperparams``). Pure.

    Raises:
        BlueprintError: an unknown family or parameter values outside its choices.
    """
    fam = family if isinstance(family, Family) else _family(family)
    values = fam.canonical(values)
    bid = fam.blueprint_id(**values)
    block = fam.make(**values)
    name = bid.split("@")[0]
    shown = ", ".join(f"{p.name} {_token(values[p.name]).replace('_', '.')}" for p in fam.params)
    meta = BlueprintMeta(**{**block.meta.model_dump(), "name": name, "version": fam.version,
                            "description": f"Karn {fam.name} family ({shown}): {block.meta.description}",
                            "hyperparams": {"family": fam.name, **values}, "measured_latency_us": None})
    return replace(block, meta=meta)


_GENERATED: dict[str, Blueprint] = {}  # what this process generated, by id (one object per id)


def blueprint(blueprint_id: str | Family, **values: int | float) -> Blueprint:
    """The registered blueprint of a Karn id (or of a family and parameter values), generated and
    registered on first use; the same object every time in one process.

    Args:
        blueprint_id: a Karn id (``karn_conv1d_k7_d2_c4@1.0.0``), or a family (name or `Family`) with
            the parameter values as keyword arguments.

    Raises:
        BlueprintError: a malformed id, an unknown family, values outside its choices, an id of
            another family version, or the id registered by something other than Karn.
    """
    if isinstance(blueprint_id, Family):
        fam = blueprint_id
    elif values:
        fam = _family(blueprint_id)
    else:
        fam, values = parse(blueprint_id)
    values = fam.canonical(values)
    bid = fam.blueprint_id(**values)
    reg = bpm.registry()
    bp = _GENERATED.get(bid)
    if bid in reg:
        if reg[bid] is not bp:
            raise BlueprintError(f"blueprint {bid!r} is registered, but not by esper_fn.karn: Karn ids "
                                 f"({PREFIX}...) are reserved for generated blueprints.")
        return bp
    if bp is None:
        bp = _GENERATED[bid] = generate(fam, **values)
    return bpm.register(bp)


# --- the library ---------------------------------------------------------------------------------------------


def persist(library: Library, bp: Blueprint | str, *, placement: str | None = None,
            score: Mapping[str, float] | None = None, characterisation: Sequence[Any] = (),
            source: str | None = None) -> BlueprintRecord:
    """Keep a generated blueprint in a library (its ``blueprints`` table), so a later process can
    `load` it.

    Args:
        library: an `esper_fn.urza.Library`.
        bp: the generated blueprint or its id.
        placement: where it was chosen to be grafted (one of `PLACEMENTS`), or None.
        score: how it was chosen (objective, validation accuracy, parameters ...).
        characterisation: `esper_fn.tezzeret.Characterisation`s (or their dicts) at the slots it was
            chosen for.
        source: what chose it (e.g. the search's study and directory).

    Raises:
        BlueprintError: not a Karn blueprint, or an unknown placement.
        LibraryError: the library holds this id with another code fingerprint, or cannot be written.
    """
    from . import __version__
    from .urza import BlueprintRecord

    bid = bp.id if isinstance(bp, Blueprint) else bp
    fam, values = parse(bid)
    if placement is not None and placement not in fam.placements:
        raise BlueprintError(f"placement {placement!r} of {bid!r}: the {fam.name!r} family is grafted at "
                             f"{list(fam.placements)}.")
    chars = [c if isinstance(c, Mapping) else c.model_dump() for c in characterisation]
    rec = BlueprintRecord(id=bid, family=fam.name, family_version=fam.version, fingerprint=fam.fingerprint,
                          params=values, placement=placement, description=blueprint(bid).meta.description,
                          score={k: float(v) for k, v in (score or {}).items()}, characterisation=chars,
                          source=source, created=time.time(), esper_version=__version__)
    return library.put_blueprint(rec)


def load(library: Library) -> list[Blueprint]:
    """Register every generated blueprint a library keeps (idempotent), and return them, oldest first.

    Raises:
        BlueprintError: a kept blueprint was generated by another version of its family, or by code
            whose fingerprint differs from this esper_fn's (the message names it and the fix).
        LibraryError: the library cannot be read.
    """
    out = []
    for rec in library.blueprint_records():
        fam, values = parse(rec.id)
        if rec.fingerprint != fam.fingerprint:
            raise BlueprintError(
                f"library {library.path} keeps {rec.id!r}, generated by {fam.name!r} family code with fingerprint "
                f"{rec.fingerprint[:12]}; this esper_fn's code for version {fam.version} has {fam.fingerprint[:12]}. "
                "The family changed without a version bump: bump it, then rerun esper-fn karn, or drop the record "
                f"with Library({str(library.path)!r}).remove_blueprint({rec.id!r}).")
        out.append(blueprint(rec.id))
    return out


@dataclass(frozen=True)
class Evidence:
    """What a library records about one family point at one placement.

    Attributes:
        blueprint: the generated id of the point (catalogue designs are mapped to their family point).
        placement: "input", "first" or "last".
        contribution: mean measured contribution (validation accuracy points, in [-1, 1]).
        cost: mean parameters added.
        per_param: contribution per added parameter (the ranking key).
        n: how many records were averaged.
    """

    blueprint: str
    placement: str
    contribution: float
    cost: float
    per_param: float
    n: int


def evidence(library: Library, *, families: Sequence[str] | None = None) -> list[Evidence]:
    """Earlier seeds and blueprint outcomes a library records, by family point and placement, best
    contribution per parameter first (points whose mean contribution is not above 0 are left out).

    Reads the stored seeds (their measured contribution at fossilization or pruning and their
    parameters; a seed at the input slot counts as placement "input", any other as "first") and the
    recorded outcomes (contribution over the same runs without the seed, parameters added). Designs
    no family covers are skipped.

    Args:
        library: an `esper_fn.urza.Library`.
        families: only points of these families (default: all).
    """
    rows: dict[tuple[str, str], list[tuple[float, float]]] = {}

    def add(bid: str, placement: str, contribution: float | None, cost: float) -> None:
        if contribution is None or cost <= 0:
            return
        try:
            hit = equivalent(bid)
        except BlueprintError:  # a Karn id of another family version: not evidence about this code
            return
        if hit is None:
            return
        fam, values = hit
        if (families is not None and fam.name not in families) or placement not in fam.placements:
            return
        rows.setdefault((fam.blueprint_id(**values), placement), []).append((float(contribution), float(cost)))

    for rec in library.records():
        add(rec.blueprint, "input" if rec.slot_spec.get("layer") is None else "first", rec.contribution, rec.n_params)
    for o in library.outcomes():
        add(o.blueprint, o.placement, o.contribution, o.added_params)
    out = []
    for (bid, placement), xs in rows.items():
        c = sum(x[0] for x in xs) / len(xs)
        cost = sum(x[1] for x in xs) / len(xs)
        if c > 0:
            out.append(Evidence(bid, placement, c, cost, c / cost, len(xs)))
    return sorted(out, key=lambda e: (-e.per_param, e.blueprint, e.placement))
