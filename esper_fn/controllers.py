"""Controllers without RL: the baselines a learned controller must beat.

A controller sees an `Observation` once per epoch and returns the `Action`s to apply before the next
epoch. `Static` never grows; `FixedSchedule` germinates every k epochs round-robin; `Plateau`
germinates when validation accuracy stalls and manages each seed through the gates.

Gates, one mechanism: a controller states its thresholds as a `GateConfig` (``controller.gates``);
the runner passes it, with the epoch's telemetry, to `legal_actions` and to the lifecycle ops, so
the mask a controller reads (``obs.legal``) already says which seeds may advance or be fossilized.
`manage_seeds` acts on that mask and re-checks nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from . import _blueprint as bpm
from . import blueprints as _catalogue  # noqa: F401  (registers the built-in blueprints choose_seed picks from)
from ._lifecycle import LIVE_STAGES, GateConfig, Op, Stage
from ._state import State

__all__ = [
    "Action",
    "Controller",
    "FixedSchedule",
    "Observation",
    "Plateau",
    "PlateauConfig",
    "Static",
    "budget_blocked",
    "choose_seed",
    "manage_seeds",
]

NO_CONTRIBUTION_GATE = -1.0
"""A `GateConfig.min_contribution` that every measured contribution (in [-1, 1]) passes."""


@dataclass(frozen=True)
class Action:
    """One lifecycle request. ``blueprint``, ``tempo`` and ``curve`` matter for GERMINATE only;
    ``reason`` says why (the runner writes it into the `Pruned` event)."""

    op: Op
    slot: str | None = None
    blueprint: str | None = None
    tempo: int = 5
    curve: str = "linear"
    reason: str | None = None


@dataclass(frozen=True)
class Observation:
    """What a controller sees after an epoch.

    Attributes:
        epoch: epochs completed (0 only for a controller with ``decides_at_start``).
        max_epochs: the run's epoch budget.
        state: the current training state (read its stages, alphas, parameter count).
        metrics: this epoch's train metrics and telemetry (see `esper_fn.training.telemetry`).
        history: the metrics of every earlier epoch that was not rolled back, oldest first.
        legal: ``esper_fn.legal_actions(state, gates=controller.gates, telemetry=metrics)``: the
            transition table, blueprint fit and the controller's own gates.
        param_budget: maximum parameters the grown network may have, or None.
    """

    epoch: int
    max_epochs: int
    state: State
    metrics: Mapping[str, float]
    history: Sequence[Mapping[str, float]]
    legal: Mapping[str, Mapping]
    param_budget: int | None = None


class Controller(Protocol):
    """What the runner needs from a controller.

    Attributes:
        gates: the thresholds its seeds must pass; the runner builds ``obs.legal`` and calls the
            lifecycle ops with them.
        blocked: set by `decide` to a reason when it wanted to germinate and the parameter budget
            left no seed that fits (see `budget_blocked`), else None.

    Optional: ``decides_at_start = True`` makes the runner ask the controller once more before the
    first epoch, with ``epoch=0`` and the untrained network's evaluation as ``metrics``
    (`esper_fn.envs.PolicyController` does: a policy trained on the env acts on its reset
    observation); ``state_dict()`` / ``load_state_dict(d)`` (JSON-serialisable) are checkpointed
    with the run.
    """

    gates: GateConfig
    blocked: str | None

    def decide(self, obs: Observation) -> list[Action]: ...


class Static:
    """Never grows."""

    name = "static"
    gates = GateConfig()
    blocked: str | None = None

    def decide(self, obs: Observation) -> list[Action]:
        return []


def choose_seed(obs: Observation) -> tuple[str, str] | None:
    """The (slot, blueprint) the heuristics graft next, or None if nothing fits the budget.

    The rule, tuned on training seeds of MNIST-1D (docs/results.md):
    1. Candidates are slots where GERMINATE is legal, except the output slot (the last one).
    2. On a signal slot (the raw input vector, or a conv feature map) the family is residual Conv1d
       blocks; elsewhere residual GELU MLPs. (On MNIST-1D a conv seed on the signal lifts an MLP by
       ~30 points; hidden-layer MLP seeds on MLP hosts give nothing.)
    3. Among all candidates that fit the remaining parameter budget (the run's `param_budget`, or
       the host's own size when there is none), take the one with the most parameters: capacity is
       what an impaired host lacks. Ties go to the slot with the worst health signal (highest
       dead + saturated fraction), then to the earliest slot.
    """
    room = _room(obs)
    fits = [c for c in _candidates(obs) if c[0][0] <= room]
    if not fits:
        return None
    _, slot, bid = max(fits, key=lambda c: c[0])
    return slot, bid


def budget_blocked(obs: Observation) -> str | None:
    """Why `choose_seed` returns None although a seed would fit the network, or None.

    Returns:
        A sentence naming the budget, the room it leaves and the smallest candidate seed, when
        `choose_seed` has candidates (legal slots, fitting blueprints of the right family) and the
        parameter budget excludes all of them; None when a candidate fits or there is none at all.
    """
    cands = _candidates(obs)
    room = _room(obs)
    if not cands or any(c[0][0] <= room for c in cands):
        return None
    (n, _, _), slot, bid = min(cands, key=lambda c: c[0][0])
    used = obs.state.num_params()
    limit = (f"the parameter budget of {obs.param_budget}" if obs.param_budget is not None
             else f"the default limit of the network's own size ({used})")
    return (f"{limit} leaves room for {room} parameters at {used}; the smallest candidate seed, {bid} at slot "
            f"{slot!r}, needs {n}. Raise param_budget (or param_budget_ratio) to let it grow.")


def _room(obs: Observation) -> int:
    used = obs.state.num_params()
    return (obs.param_budget - used) if obs.param_budget is not None else used


def _candidates(obs: Observation) -> list[tuple[tuple[int, float, int], str, str]]:
    """``((params, health, -depth), slot, blueprint)`` for every seed `choose_seed` considers."""
    state = obs.state
    out = []
    names = list(state.slot_names)
    for depth, slot in enumerate(names[:-1]):
        legal = obs.legal[slot]
        if Op.GERMINATE not in legal["ops"]:
            continue
        spec = state.spec(slot)
        signal = spec.kind == "conv1d" or (spec.kind == "vector" and spec.layer is None and spec.shape[0] >= 8)
        family = ("conv1d_k5", "conv1d_k3") if signal else ("mlp_gelu", "mlp_gelu_x0_5")
        health = obs.metrics.get(f"{slot}/dead", 0.0) + obs.metrics.get(f"{slot}/saturation", 0.0)
        for bid in legal["blueprints"]:
            bp = bpm.get(bid)
            if bp.meta.name in family:
                out.append(((bp.param_count(spec), health, -depth), slot, bid))
    return out


@dataclass
class FixedSchedule:
    """Germinates every `every` epochs, round-robin over the non-output slots, with the blueprint
    `choose_seed` would pick there; advances each seed as soon as the gates allow and fossilizes it
    when it has held for `hold_epochs`, whatever it contributes.

    Its gates (``self.gates``): ``min_training_epochs=incubate_epochs``,
    ``min_holding_epochs=hold_epochs``, and no contribution threshold.
    """

    every: int = 20
    hold_epochs: int = 2
    incubate_epochs: int = 3
    tempo: int = 5
    name: str = "schedule"
    _next: int = field(default=0, repr=False)
    blocked: str | None = field(default=None, repr=False)

    @property
    def gates(self) -> GateConfig:
        return GateConfig(min_training_epochs=self.incubate_epochs, min_holding_epochs=self.hold_epochs,
                          min_contribution=NO_CONTRIBUTION_GATE)

    def decide(self, obs: Observation) -> list[Action]:
        self.blocked = None
        actions = manage_seeds(obs, self.gates)
        if obs.epoch % self.every == 0 and not _live(obs.state):
            slots = list(obs.state.slot_names)[:-1]
            blocked = []
            for j in range(len(slots)):
                slot = slots[(self._next + j) % len(slots)]
                legal = obs.legal[slot]
                if Op.GERMINATE not in legal["ops"]:
                    continue
                only = _only(obs, slot)
                pick = choose_seed(only)
                if pick:
                    self._next = (self._next + j + 1) % len(slots)
                    actions.append(Action(Op.GERMINATE, slot, pick[1], tempo=self.tempo))
                    break
                blocked.append(budget_blocked(only))
            else:
                self.blocked = next((b for b in blocked if b), None)
        return actions


class PlateauConfig(BaseModel):
    """Thresholds of the plateau heuristic.

    Attributes:
        patience: epochs without a `min_delta` gain in validation accuracy that make a plateau.
        min_delta: the gain (accuracy points in [0, 1]) that counts as progress.
        min_train_loss: do not grow once the train loss is below this (the host has memorised;
            measured on MNIST-1D: growing late costs 4-12 points).
        grow_until: fraction of the epoch budget after which no seed is germinated.
        max_seeds: seeds germinated in the whole run.
        incubate_epochs: epochs in TRAINING before blending.
        tempo: blending ramp length in epochs.
        hold_epochs: epochs at alpha 1 before the fossilize/prune decision.
        min_contribution: fossilize only if the seed's measured contribution reaches this.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    patience: int = Field(default=2, ge=1)
    min_delta: float = Field(default=0.005, ge=0)
    min_train_loss: float = Field(default=0.5, ge=0)
    grow_until: float = Field(default=0.5, gt=0, le=1)
    max_seeds: int = Field(default=2, ge=0)
    incubate_epochs: int = Field(default=3, ge=0)
    tempo: int = Field(default=5, ge=1)
    hold_epochs: int = Field(default=3, ge=0)
    min_contribution: float = 0.005


class Plateau:
    """Germinates when validation accuracy stalls, at the slot and with the blueprint `choose_seed`
    picks; advances through the gates; fossilizes a seed whose measured contribution clears
    `min_contribution`, prunes it otherwise.

    Its gates (``self.gates``): ``min_training_epochs=incubate_epochs``,
    ``min_holding_epochs=hold_epochs``, ``min_contribution=min_contribution``.
    """

    name = "heuristic"

    def __init__(self, config: PlateauConfig | None = None):
        self.config = config or PlateauConfig()
        self.germinated = 0
        self.blocked: str | None = None

    @property
    def gates(self) -> GateConfig:
        c = self.config
        return GateConfig(min_training_epochs=c.incubate_epochs, min_holding_epochs=c.hold_epochs,
                          min_contribution=c.min_contribution)

    def decide(self, obs: Observation) -> list[Action]:
        c = self.config
        self.blocked = None
        actions = manage_seeds(obs, self.gates)
        if _live(obs.state) or actions or self.germinated >= c.max_seeds:
            return actions
        if obs.epoch > c.grow_until * obs.max_epochs or obs.metrics.get("train_loss", 1e9) < c.min_train_loss:
            return actions
        accs = [h["val_accuracy"] for h in obs.history] + [obs.metrics["val_accuracy"]]
        if len(accs) <= c.patience:
            return actions
        if max(accs[-c.patience:]) - max(accs[: -c.patience]) >= c.min_delta:
            return actions
        pick = choose_seed(obs)
        if pick:
            self.germinated += 1
            actions.append(Action(Op.GERMINATE, pick[0], pick[1], tempo=c.tempo))
        else:
            self.blocked = budget_blocked(obs)
        return actions


def _live(state: State) -> bool:
    return any(state.stage(n) in LIVE_STAGES for n in state.slot_names)


def _only(obs: Observation, slot: str) -> Observation:
    legal = {n: (v if n == slot else {"stage": v["stage"], "ops": (Op.WAIT,), "blueprints": ()})
             for n, v in obs.legal.items()}
    names = list(obs.state.slot_names)
    return Observation(obs.epoch, obs.max_epochs, obs.state, obs.metrics, obs.history,
                       {n: legal[n] for n in names}, obs.param_budget)


def manage_seeds(obs: Observation, gates: GateConfig) -> list[Action]:
    """Move every live seed on as far as the gated mask ``obs.legal`` allows.

    The mask was built with the same `gates` (and the epoch's telemetry), so this re-checks no
    threshold: a seed advances whenever ADVANCE is legal (GERMINATED -> TRAINING at once, TRAINING ->
    BLENDING after ``gates.min_training_epochs`` with a healthy gradient, BLENDING -> HOLDING once
    alpha is 1), and at HOLDING it is fossilized when FOSSILIZE is legal. A seed is pruned when its
    time is up and the gate still refuses: at HOLDING after ``gates.min_holding_epochs`` with
    FOSSILIZE masked (its contribution is below ``gates.min_contribution``, or folding it would break
    another seed), and in TRAINING after ``gates.min_training_epochs`` with ADVANCE masked (its
    gradient norm is not finite or above ``gates.max_grad_norm``).
    """
    out = []
    state = obs.state
    for i, slot in enumerate(state.slot_names):
        stage = state.stage(slot)
        ops = obs.legal[slot]["ops"]
        epochs = int(state.slots["epochs"][i])
        if stage in (Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING) and Op.ADVANCE in ops:
            out.append(Action(Op.ADVANCE, slot))
        elif stage == Stage.TRAINING and epochs >= gates.min_training_epochs and Op.PRUNE in ops:
            g = obs.metrics.get(f"grad_norm/{slot}")
            out.append(Action(Op.PRUNE, slot, reason=f"gradient gate: grad_norm/{slot} = {g} after {epochs} epochs "
                                                     f"of incubation (max_grad_norm {gates.max_grad_norm})"))
        elif stage == Stage.HOLDING:
            if Op.FOSSILIZE in ops:
                out.append(Action(Op.FOSSILIZE, slot))
            elif epochs >= gates.min_holding_epochs and Op.PRUNE in ops:
                c = obs.metrics.get(f"{slot}/contribution")
                why = (f"contribution {c:+.4f} < min_contribution {gates.min_contribution}"
                       if c is not None and c < gates.min_contribution else "the fossilize gate refused")
                out.append(Action(Op.PRUNE, slot, reason=f"{why} after {epochs} epochs at alpha 1"))
    return out
