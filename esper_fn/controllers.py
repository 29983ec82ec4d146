"""Controllers without RL: the baselines a learned controller must beat.

A controller sees an `Observation` once per epoch and returns the `Action`s to apply before the next
epoch. `Static` never grows; `FixedSchedule` germinates every k epochs round-robin; `Plateau`
germinates when validation accuracy stalls and manages each seed through the gates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from . import _blueprint as bpm
from ._lifecycle import LIVE_STAGES, Op, Stage
from ._state import State

__all__ = ["Action", "Controller", "FixedSchedule", "Observation", "Plateau", "PlateauConfig", "Static", "choose_seed"]


@dataclass(frozen=True)
class Action:
    """One lifecycle request. ``blueprint``, ``tempo`` and ``curve`` matter for GERMINATE only."""

    op: Op
    slot: str | None = None
    blueprint: str | None = None
    tempo: int = 5
    curve: str = "linear"


@dataclass(frozen=True)
class Observation:
    """What a controller sees after an epoch.

    Attributes:
        epoch: epochs completed (1-based count).
        max_epochs: the run's epoch budget.
        state: the current training state (read its stages, alphas, parameter count).
        metrics: this epoch's train metrics and telemetry (see `esper_fn.training.telemetry`).
        history: the metrics of every earlier epoch that was not rolled back, oldest first.
        legal: `esper_fn.legal_actions(state)`.
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
    def decide(self, obs: Observation) -> list[Action]: ...


class Static:
    """Never grows."""

    name = "static"

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
    state = obs.state
    used = state.num_params()
    room = (obs.param_budget - used) if obs.param_budget is not None else used
    best: tuple | None = None
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
            if bp.meta.name not in family:
                continue
            n = bp.param_count(spec)
            if n <= room:
                key = (n, health, -depth)
                if best is None or key > best[0]:
                    best = (key, slot, bid)
    return None if best is None else (best[1], best[2])


@dataclass
class FixedSchedule:
    """Germinates every `every` epochs, round-robin over the non-output slots, with the blueprint
    `choose_seed` would pick there; advances each seed as soon as the gates allow and fossilizes it
    when its ramp has held for `hold_epochs`."""

    every: int = 20
    hold_epochs: int = 2
    incubate_epochs: int = 3
    tempo: int = 5
    name: str = "schedule"
    _next: int = field(default=0, repr=False)

    def decide(self, obs: Observation) -> list[Action]:
        actions = _manage(obs, self.incubate_epochs, self.hold_epochs, min_contribution=None)
        if obs.epoch % self.every == 0 and not _live(obs.state):
            slots = list(obs.state.slot_names)[:-1]
            for j in range(len(slots)):
                slot = slots[(self._next + j) % len(slots)]
                legal = obs.legal[slot]
                if Op.GERMINATE not in legal["ops"]:
                    continue
                pick = choose_seed(_only(obs, slot))
                if pick:
                    self._next = (self._next + j + 1) % len(slots)
                    actions.append(Action(Op.GERMINATE, slot, pick[1], tempo=self.tempo))
                    break
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
    `min_contribution`, prunes it otherwise."""

    name = "heuristic"

    def __init__(self, config: PlateauConfig | None = None):
        self.config = config or PlateauConfig()
        self.germinated = 0

    def decide(self, obs: Observation) -> list[Action]:
        c = self.config
        actions = _manage(obs, c.incubate_epochs, c.hold_epochs, c.min_contribution)
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
        return actions


def _live(state: State) -> bool:
    return any(state.stage(n) in LIVE_STAGES for n in state.slot_names)


def _only(obs: Observation, slot: str) -> Observation:
    legal = {n: (v if n == slot else {"stage": v["stage"], "ops": (Op.WAIT,), "blueprints": ()})
             for n, v in obs.legal.items()}
    names = list(obs.state.slot_names)
    return Observation(obs.epoch, obs.max_epochs, obs.state, obs.metrics, obs.history,
                       {n: legal[n] for n in names}, obs.param_budget)


def _manage(obs: Observation, incubate: int, hold: int, min_contribution: float | None) -> list[Action]:
    """Advance every live seed through its stages; decide fossilize/prune at the end of HOLDING."""
    out = []
    state = obs.state
    for i, slot in enumerate(state.slot_names):
        stage = state.stage(slot)
        epochs = int(state.slots["epochs"][i])
        if stage == Stage.GERMINATED:
            out.append(Action(Op.ADVANCE, slot))
        elif stage == Stage.TRAINING and epochs >= incubate:
            out.append(Action(Op.ADVANCE, slot))
        elif stage == Stage.BLENDING and float(state.slots["alpha"][i]) >= 1.0:
            out.append(Action(Op.ADVANCE, slot))
        elif stage == Stage.HOLDING and epochs >= hold:
            contrib = obs.metrics.get(f"{slot}/contribution")
            if min_contribution is None or (contrib is not None and contrib >= min_contribution):
                out.append(Action(Op.FOSSILIZE, slot))
            else:
                out.append(Action(Op.PRUNE, slot))
    return out
