"""The flat action layout of the growth environment: one categorical over (op, slot, blueprint, tempo).

Layout, for ``S`` slot positions, ``B`` blueprints and ``T`` tempos::

    0                                   WAIT
    1 + (s * B + b) * T + t             GERMINATE blueprint b at slot s with tempo t
    1 + S*B*T + s                       ADVANCE slot s
    1 + S*B*T + S + s                   FOSSILIZE slot s
    1 + S*B*T + 2*S + s                 PRUNE slot s
    1 + S*B*T + 3*S + s                 SCULPT slot s (only with ``sculpt=True``)

so ``A = 1 + S*B*T + 3*S`` (``+ S`` with SCULPT). WAIT is index 0 and always legal. SCULPT is opt-in
and comes after PRUNE, so the default layout (and every policy trained on it) is unchanged: SCULPT
slot s removes hidden units of what slot s holds (its fossilized seed, or the host layer it follows;
`esper_fn.episode.Sculpt`), keeping ``sculpt_keep`` of them.

This module is the one place the layout is written down: `esper_fn.envs.MorphogenesisEnv` encodes
and masks with it, and every policy (Tamiyo's heads, the baselines, the evaluation harness, PPO's
action statistics) decodes with it. It depends on torch only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ._blueprint import resolve
from ._errors import EsperError
from ._lifecycle import Op

from .episode import SCULPT_KEEP, Action, Sculpt

if TYPE_CHECKING:
    from .controllers import Observation

__all__ = ["SCULPT_OP", "ActionSpace", "FlatAction", "IllegalActionError", "action_mask", "from_action", "to_action"]

SCULPT_OP = 5
"""The op code of a SCULPT action in `FlatAction.op` and `ActionSpace.unravel`. Sculpting removes
committed structure rather than moving a seed through its lifecycle, so it is no `Op` (whose members
the transition table and the observation's per-slot legal ops enumerate)."""


class IllegalActionError(EsperError, ValueError):
    """An action outside the current action mask (or outside the action space) was requested."""


@dataclass(frozen=True)
class FlatAction:
    """One decoded action. ``op`` is an `Op` or `SCULPT_OP`; ``slot`` is a slot index (None for WAIT);
    ``blueprint`` (an id) and ``tempo`` (epochs) are set for GERMINATE only."""

    op: Op | int
    slot: int | None = None
    blueprint: str | None = None
    tempo: int | None = None


@dataclass(frozen=True)
class ActionSpace:
    """Encoding of (op, slot, blueprint, tempo) into one integer and back.

    Attributes:
        num_slots: ``S``, slot positions (hosts with fewer slots leave the rest masked).
        blueprints: the ``B`` blueprint ids offered, in index order.
        tempos: the ``T`` blending tempos (epochs) a germination may choose.
        sculpt: also offer SCULPT at every slot (S more actions, after PRUNE); off by default, so
            the default layout is unchanged.
        sculpt_keep: the fraction of a target's units one SCULPT keeps, in (0, 1)
            (`esper_fn.episode.Sculpt`).
    """

    num_slots: int
    blueprints: tuple[str, ...]
    tempos: tuple[int, ...]
    sculpt: bool = False
    sculpt_keep: float = SCULPT_KEEP

    def __post_init__(self):
        if not 0.0 < self.sculpt_keep < 1.0:
            raise IllegalActionError(f"sculpt_keep={self.sculpt_keep} must lie in (0, 1): it is the fraction of a "
                                     "target's units one SCULPT keeps (at least one unit goes).")

    @property
    def n(self) -> int:
        """Number of actions ``A = 1 + S*B*T + 3*S`` (``+ S`` with SCULPT)."""
        return 1 + self.n_germinate + (4 if self.sculpt else 3) * self.num_slots

    @property
    def n_germinate(self) -> int:
        """Number of GERMINATE actions ``S*B*T`` (indices 1 to ``S*B*T``)."""
        return self.num_slots * len(self.blueprints) * len(self.tempos)

    def op_base(self, op: Op | int) -> int:
        """Index of `op` at slot 0, for ADVANCE, FOSSILIZE, PRUNE and (with `sculpt`) `SCULPT_OP`
        (slot s adds s).

        Raises:
            IllegalActionError: SCULPT in a space without it.
        """
        if op == SCULPT_OP:
            if not self.sculpt:
                raise IllegalActionError("this action space has no SCULPT actions; build it with sculpt=True.")
            return 1 + self.n_germinate + 3 * self.num_slots
        return {Op.ADVANCE: 1 + self.n_germinate, Op.FOSSILIZE: 1 + self.n_germinate + self.num_slots,
                Op.PRUNE: 1 + self.n_germinate + 2 * self.num_slots}[Op(op)]

    def encode(self, op: Op | int, slot: int | None = None, blueprint: str | None = None,
               tempo: int | None = None) -> int:
        """The flat index of an action.

        Args:
            op: the lifecycle op, or `SCULPT_OP`.
            slot: slot index in ``[0, S)`` (ignored for WAIT).
            blueprint: blueprint id or bare name, for GERMINATE.
            tempo: blending tempo in epochs (one of `tempos`), for GERMINATE.

        Raises:
            IllegalActionError: a slot, blueprint or tempo outside this space.
        """
        op = op if op == SCULPT_OP else Op(op)
        if op == Op.WAIT:
            return 0
        if slot is None or not 0 <= int(slot) < self.num_slots:
            raise IllegalActionError(f"slot index {slot!r} is outside [0, {self.num_slots}).")
        slot = int(slot)
        if op == Op.GERMINATE:
            b = self.blueprint_index(blueprint)
            if tempo not in self.tempos:
                raise IllegalActionError(f"tempo {tempo!r} is not offered; the tempos are {list(self.tempos)}.")
            return 1 + (slot * len(self.blueprints) + b) * len(self.tempos) + self.tempos.index(tempo)
        return self.op_base(op) + slot

    def decode(self, index: int) -> FlatAction:
        """The action at a flat index.

        Raises:
            IllegalActionError: the index is outside ``[0, A)``.
        """
        index = int(index)
        if not 0 <= index < self.n:
            raise IllegalActionError(f"action {index} is outside [0, {self.n}).")
        if index == 0:
            return FlatAction(Op.WAIT)
        j = index - 1
        if j < self.n_germinate:
            T, B = len(self.tempos), len(self.blueprints)
            t, rest = j % T, j // T
            return FlatAction(Op.GERMINATE, rest // B, self.blueprints[rest % B], self.tempos[t])
        j -= self.n_germinate
        return FlatAction((Op.ADVANCE, Op.FOSSILIZE, Op.PRUNE, SCULPT_OP)[j // self.num_slots], j % self.num_slots)

    def unravel(self, action: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """`decode` on a tensor of indices, vectorised.

        Args:
            action: int64 [*B] flat indices.

        Returns:
            ``(op, slot, blueprint, tempo)``, int64 [*B] each: the `Op` value (or `SCULPT_OP`); the
            slot index (-1 for WAIT); the blueprint index and the tempo index (-1 unless GERMINATE).
        """
        S, B, T = self.num_slots, len(self.blueprints), len(self.tempos)
        j = action - 1
        germ = (action >= 1) & (action <= self.n_germinate)
        rest = (j - self.n_germinate).clamp_min(0)
        which = torch.div(rest, S, rounding_mode="floor")  # 0 ADVANCE, 1 FOSSILIZE, 2 PRUNE, 3 SCULPT
        ops = [int(Op.ADVANCE), int(Op.FOSSILIZE), int(Op.PRUNE)] + ([SCULPT_OP] if self.sculpt else [])
        op = torch.where(action == 0, torch.full_like(action, int(Op.WAIT)),
                         torch.where(germ, torch.full_like(action, int(Op.GERMINATE)),
                                     torch.tensor(ops, device=action.device)[which.clamp(0, len(ops) - 1)]))
        gj = j.clamp(0, max(self.n_germinate - 1, 0))
        g_slot = torch.div(gj, B * T, rounding_mode="floor")
        slot = torch.where(action == 0, torch.full_like(action, -1), torch.where(germ, g_slot, rest % S))
        none = torch.full_like(action, -1)
        blueprint = torch.where(germ, torch.div(gj, T, rounding_mode="floor") % B, none)
        tempo = torch.where(germ, gj % T, none)
        return op, slot, blueprint, tempo

    def blueprint_index(self, blueprint: str | None) -> int:
        """Index of a blueprint id, or of a bare name's newest version, in `blueprints`.

        Raises:
            IllegalActionError: the blueprint is not offered.
        """
        if blueprint is None:
            raise IllegalActionError("GERMINATE needs a blueprint.")
        bid = resolve(blueprint, self.blueprints)
        if bid is None:
            raise IllegalActionError(f"blueprint {blueprint!r} is not offered here; the action space offers "
                                     f"{list(self.blueprints)}.")
        return self.blueprints.index(bid)

    def describe(self, index: int, slot_names: Sequence[str] | None = None) -> str:
        """A readable form of an action, e.g. ``"GERMINATE conv1d_k5@1.0.0 at input (tempo 5)"``."""
        a = self.decode(index)
        if a.op == Op.WAIT:
            return "WAIT"
        where = slot_names[a.slot] if slot_names is not None and a.slot < len(slot_names) else f"slot {a.slot}"
        if a.op == Op.GERMINATE:
            return f"GERMINATE {a.blueprint} at {where} (tempo {a.tempo})"
        if a.op == SCULPT_OP:
            return f"SCULPT {where} (keep {self.sculpt_keep:g} of its units)"
        return f"{a.op.name} {where}"


def action_mask(space: ActionSpace, obs: Observation, *, advance: bool, prunable: Sequence[bool] | None,
                sculptable: Sequence[bool] | None = None) -> Tensor:
    """The action mask of one episode.

    Args:
        space: the action space.
        obs: the core observation (`esper_fn.controllers.observe`): per slot, the ops legal under the
            run's gates and the parameters each fitting blueprint would add; and the parameter budget.
        advance: offer ADVANCE where it is legal (False under the automatic lifecycle, which advances
            seeds itself).
        prunable: per slot, whether PRUNE may be offered where it is legal (None: wherever it is).
        sculptable: per slot, whether SCULPT is legal (`esper_fn.episode.sculpt_offered`); read only
            by a space with `sculpt` (None there: SCULPT is never offered).

    Returns:
        bool [A]; index 0 (WAIT) is always True. A germination is offered only for blueprints of
        `space` that fit the slot and whose parameters fit the room the budget leaves.
    """
    B, T = len(space.blueprints), len(space.tempos)
    index = {b: j for j, b in enumerate(space.blueprints)}
    room = None if obs.param_budget is None else obs.param_budget - obs.params
    on = [0]
    for s, v in enumerate(obs.slots):
        if Op.GERMINATE in v.ops:
            for bid, cost in v.seeds.items():
                b = index.get(bid)
                if b is None or (room is not None and cost > room):
                    continue
                start = 1 + (s * B + b) * T
                on.extend(range(start, start + T))
        if Op.ADVANCE in v.ops and advance:
            on.append(space.op_base(Op.ADVANCE) + s)
        if Op.FOSSILIZE in v.ops:
            on.append(space.op_base(Op.FOSSILIZE) + s)
        if Op.PRUNE in v.ops and (prunable is None or prunable[s]):
            on.append(space.op_base(Op.PRUNE) + s)
        if space.sculpt and sculptable is not None and sculptable[s]:
            on.append(space.op_base(SCULPT_OP) + s)
    mask = torch.zeros(space.n, dtype=torch.bool)
    mask[on] = True
    return mask


def to_action(space: ActionSpace, index: int, slot_names: Sequence[str], *, curve: str = "linear",
              reason: str | None = None) -> Action | Sculpt | None:
    """The core `esper_fn.episode.Action` (or `esper_fn.episode.Sculpt`) a flat index stands for, or
    None for WAIT.

    Args:
        space: the action space.
        index: the flat index.
        slot_names: the episode's slots, in host order.
        curve: the alpha curve of a germination's blend.
        reason: recorded with a PRUNE.

    Raises:
        IllegalActionError: the index is outside the space, or names a slot the host does not have.
    """
    a = space.decode(index)
    if a.op == Op.WAIT:
        return None
    if a.slot >= len(slot_names):
        raise IllegalActionError(f"action {index} ({space.describe(index)}) names slot position {a.slot}; the host has "
                                 f"{len(slot_names)} slots {list(slot_names)}.")
    slot = slot_names[a.slot]
    if a.op == SCULPT_OP:
        return Sculpt(slot, keep=space.sculpt_keep)
    if a.op == Op.GERMINATE:
        return Action(Op.GERMINATE, slot, a.blueprint, tempo=a.tempo, curve=curve)
    return Action(a.op, slot, reason=reason if a.op == Op.PRUNE else None)


def from_action(space: ActionSpace, action: Action | Sculpt, slot_names: Sequence[str]) -> int:
    """The flat index of a core `esper_fn.episode.Action` or `esper_fn.episode.Sculpt` (its slot named
    among `slot_names`).

    Raises:
        IllegalActionError: the slot, blueprint or tempo is not in the space; a `Sculpt` in a space
            without SCULPT, or with another keep fraction.
    """
    if isinstance(action, Sculpt):
        if action.slot not in slot_names:
            raise IllegalActionError(f"slot {action.slot!r} is not one of {list(slot_names)}.")
        if action.keep != space.sculpt_keep or action.by != "contribution":
            raise IllegalActionError(f"{action} is not this space's SCULPT (keep {space.sculpt_keep}, by contribution).")
        return space.encode(SCULPT_OP, list(slot_names).index(action.slot))
    if action.op == Op.WAIT:
        return 0
    if action.slot not in slot_names:
        raise IllegalActionError(f"slot {action.slot!r} is not one of {list(slot_names)}.")
    return space.encode(action.op, list(slot_names).index(action.slot), action.blueprint,
                        action.tempo if action.op == Op.GERMINATE else None)
