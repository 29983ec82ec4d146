"""The flat action space of `MorphogenesisEnv`: one categorical over (op, slot, blueprint, tempo).

Layout, for ``S`` slots (the env's ``S_max``), ``B`` blueprints and ``T`` tempos::

    0                                   WAIT
    1 + (s * B + b) * T + t             GERMINATE blueprint b at slot s with tempo t
    1 + S*B*T + s                       ADVANCE slot s
    1 + S*B*T + S + s                   FOSSILIZE slot s
    1 + S*B*T + 2*S + s                 PRUNE slot s

so ``A = 1 + S*B*T + 3*S``. WAIT is index 0 and always legal.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from esper_fn import EsperError, Op

__all__ = ["ActionSpace", "FlatAction", "IllegalActionError"]


class IllegalActionError(EsperError, ValueError):
    """An action outside the current action mask was sent to the environment."""


class EnvStateError(EsperError, RuntimeError):
    """The environment was used out of order (a row stepped before its reset or after its end)."""


@dataclass(frozen=True)
class FlatAction:
    """One decoded action. ``slot`` is a slot index (None for WAIT); ``blueprint`` (an id) and
    ``tempo`` (epochs) are set for GERMINATE only."""

    op: Op
    slot: int | None = None
    blueprint: str | None = None
    tempo: int | None = None


@dataclass(frozen=True)
class ActionSpace:
    """Encoding of (op, slot, blueprint, tempo) into one integer and back.

    Attributes:
        num_slots: ``S``, slot positions (hosts with fewer slots leave the rest masked).
        blueprints: the ``B`` blueprint ids the env offers, in index order.
        tempos: the ``T`` blending tempos (epochs) a germination may choose.
    """

    num_slots: int
    blueprints: tuple[str, ...]
    tempos: tuple[int, ...]

    @property
    def n(self) -> int:
        """Number of actions ``A = 1 + S*B*T + 3*S``."""
        return 1 + self._n_germ + 3 * self.num_slots

    @property
    def _n_germ(self) -> int:
        return self.num_slots * len(self.blueprints) * len(self.tempos)

    def _op_base(self, op: Op) -> int:
        return {Op.ADVANCE: 1 + self._n_germ, Op.FOSSILIZE: 1 + self._n_germ + self.num_slots,
                Op.PRUNE: 1 + self._n_germ + 2 * self.num_slots}[op]

    def encode(self, op: Op | int, slot: int | None = None, blueprint: str | None = None,
               tempo: int | None = None) -> int:
        """The flat index of an action.

        Args:
            op: the lifecycle op.
            slot: slot index in ``[0, S)`` (ignored for WAIT).
            blueprint: blueprint id or bare name, for GERMINATE.
            tempo: blending tempo in epochs (one of `tempos`), for GERMINATE.

        Raises:
            IllegalActionError: a slot, blueprint or tempo outside this space.
        """
        op = Op(op)
        if op == Op.WAIT:
            return 0
        if slot is None or not 0 <= int(slot) < self.num_slots:
            raise IllegalActionError(f"slot index {slot!r} is outside [0, {self.num_slots}).")
        slot = int(slot)
        if op == Op.GERMINATE:
            b = self.blueprint_index(blueprint)
            if tempo not in self.tempos:
                raise IllegalActionError(f"tempo {tempo!r} is not offered; the env's tempos are {list(self.tempos)}.")
            return 1 + (slot * len(self.blueprints) + b) * len(self.tempos) + self.tempos.index(tempo)
        return self._op_base(op) + slot

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
        if j < self._n_germ:
            T, B = len(self.tempos), len(self.blueprints)
            t, rest = j % T, j // T
            return FlatAction(Op.GERMINATE, rest // B, self.blueprints[rest % B], self.tempos[t])
        j -= self._n_germ
        return FlatAction((Op.ADVANCE, Op.FOSSILIZE, Op.PRUNE)[j // self.num_slots], j % self.num_slots)

    def blueprint_index(self, blueprint: str | None) -> int:
        """Index of a blueprint id, or of a bare name's newest version, in `blueprints`."""
        if blueprint is None:
            raise IllegalActionError("GERMINATE needs a blueprint.")
        if blueprint in self.blueprints:
            return self.blueprints.index(blueprint)
        same = [b for b in self.blueprints if b.split("@")[0] == blueprint]
        if not same:
            raise IllegalActionError(f"blueprint {blueprint!r} is not offered by this env; it offers "
                                     f"{list(self.blueprints)}.")
        newest = max(same, key=lambda b: tuple(int(v) for v in b.split("@")[1].split(".")))
        return self.blueprints.index(newest)

    def describe(self, index: int, slot_names: Sequence[str] | None = None) -> str:
        """A readable form of an action, e.g. ``"GERMINATE conv1d_k5@1.0.0 at input (tempo 5)"``."""
        a = self.decode(index)
        if a.op == Op.WAIT:
            return "WAIT"
        where = slot_names[a.slot] if slot_names is not None and a.slot < len(slot_names) else f"slot {a.slot}"
        if a.op == Op.GERMINATE:
            return f"GERMINATE {a.blueprint} at {where} (tempo {a.tempo})"
        return f"{a.op.name} {where}"


def row_mask(space: ActionSpace, slot_names: Sequence[str], legal: Mapping[str, Mapping], *, advance: bool,
             prunable: Collection[str] | None, room: float | None,
             param_cost: Mapping[tuple[str, str], int]) -> Tensor:
    """The action mask of one env row.

    Args:
        space: the action space.
        slot_names: the row's slots, in host order (the first ``len(slot_names)`` slot positions).
        legal: `esper_fn.legal_actions(state, gates=..., telemetry=...)` of the row.
        advance: offer ADVANCE where it is legal (False in ``lifecycle="auto"``: the env advances).
        prunable: the slots where PRUNE may be offered (None: wherever it is legal).
        room: parameters the row may still add (None: no budget).
        param_cost: ``{(slot, blueprint id): trainable parameters}`` for the blueprints that fit.

    Returns:
        bool [A]; index 0 (WAIT) is always True.
    """
    B, T = len(space.blueprints), len(space.tempos)
    index = {b: j for j, b in enumerate(space.blueprints)}
    on = [0]
    for s, name in enumerate(slot_names):
        entry = legal[name]
        ops = entry["ops"]
        if Op.GERMINATE in ops:
            for bid in entry["blueprints"]:
                b = index.get(bid)
                if b is None or (room is not None and param_cost[(name, bid)] > room):
                    continue
                start = 1 + (s * B + b) * T
                on.extend(range(start, start + T))
        if Op.ADVANCE in ops and advance:
            on.append(space._op_base(Op.ADVANCE) + s)
        if Op.FOSSILIZE in ops:
            on.append(space._op_base(Op.FOSSILIZE) + s)
        if Op.PRUNE in ops and (prunable is None or name in prunable):
            on.append(space._op_base(Op.PRUNE) + s)
    mask = torch.zeros(space.n, dtype=torch.bool)
    mask[on] = True
    return mask
