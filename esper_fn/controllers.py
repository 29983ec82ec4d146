"""Controllers without RL: the baselines a learned controller must beat.

A controller reads an `Observation` once per epoch and returns the `Action`s to apply before the
next epoch. `Static` never grows; `FixedSchedule` germinates on a fixed period, round-robin over
the slots; `Plateau` germinates when validation accuracy stalls. Both growing controllers pick the
seed with `choose_seed` and deliver verdicts with `manage_seeds`.

An `Observation` is plain data (numbers, stages, the legal ops and the seeds that fit each slot),
built from an episode by `observe`. It round-trips through a TensorDict (`observations_to_tensordict`
/ `Observation.from_tensordict`), which `esper_fn.envs.MorphogenesisEnv` puts in every observation
under ``"controller"``: so a controller runs unchanged in `esper-fn grow` and, wrapped as a TorchRL
policy (`esper_fn.policies.ControllerPolicy`), through the env, in any collector.

Gates, one mechanism: a controller states its thresholds as a `GateConfig` (``controller.gates``);
the driver passes it, with the epoch's telemetry, to `legal_actions` and to the lifecycle ops, so
the ops an observation lists (``slot.ops``) already say which seeds may advance or be fossilized.
`manage_seeds` acts on them and re-checks nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field
from tensordict import TensorDict, TensorDictBase

from . import _blueprint as bpm
from . import blueprints as _catalogue  # noqa: F401  (registers the built-in blueprints choose_seed picks from)
from ._errors import ConfigError, GateError
from ._lifecycle import LIVE_STAGES, GateConfig, Op, Stage, check_gate
from ._state import legal_actions
from .episode import Action, auto_advances, verdict_due

if TYPE_CHECKING:
    from .episode import Episode

__all__ = [
    "Action",
    "Controller",
    "FixedSchedule",
    "Observation",
    "Plateau",
    "PlateauConfig",
    "RECIPE_KINDS",
    "RECIPE_POSITIONS",
    "Recipe",
    "SlotView",
    "Static",
    "budget_blocked",
    "choose_seed",
    "manage_seeds",
    "observe",
    "observations_to_tensordict",
    "recipe_family",
]

MAX_GRAD_NORM = 1e3
"""The gradient gate of the heuristics: a seed whose incubation gradient norm is not finite or above
this does not blend (and `manage_seeds` prunes it once its incubation time is up)."""

SIGNAL_FAMILY = ("conv1d_k5", "conv1d_k3")
"""The blueprints `choose_seed` grows on a signal slot (the raw input vector, a conv feature map)."""
HIDDEN_FAMILY = ("mlp_gelu", "mlp_gelu_x0_5")
"""The blueprints `choose_seed` grows on any other slot."""


@dataclass(frozen=True)
class SlotView:
    """What a controller reads of one slot.

    Attributes:
        name: the slot's name (a TensorDict carries no names: decoded views use ``str(index)``).
        stage: its lifecycle stage.
        epochs: epochs in the current stage.
        signal: a signal slot: the raw input of 8 or more features, or a 1-D conv feature map.
        output: the last slot (on the network's output side).
        health: dead + saturated fraction of its activations (0 where unmeasured).
        contribution: the live seed's measured contribution (validation accuracy with it minus
            without it), or None.
        contribution_se: the standard error of that paired difference over the validation samples,
            or None.
        grad_norm: the seed's gradient norm over the last epoch, or None.
        ops: the ops legal now under the driver's gates (`esper_fn.legal_actions`).
        seeds: blueprint id -> trainable parameters it would add here, for every blueprint GERMINATE
            may graft at this slot (empty where GERMINATE is not legal), in catalogue order.
    """

    name: str
    stage: Stage
    epochs: int
    signal: bool
    output: bool
    health: float = 0.0
    contribution: float | None = None
    contribution_se: float | None = None
    grad_norm: float | None = None
    ops: tuple[Op, ...] = ()
    seeds: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Observation:
    """What a controller sees after an epoch.

    Attributes:
        epoch: epochs completed (0 before the first).
        max_epochs: the epoch budget.
        val_accuracy: the validation accuracy of every epoch that was not rolled back, oldest first,
            ending with the current network's (at epoch 0 and after a rollback, the current
            network's measurement is appended).
        train_loss: the last epoch's training loss (inf before the first epoch).
        params: the network's parameters now.
        param_budget: the most parameters it may grow to, or None.
        germinated: seeds germinated so far in the episode.
        last_germinated: index of the slot of the latest germination, or None.
        rolled_back: the last epoch was rolled back by the governor.
        slots: one `SlotView` per slot, in host order.
        episode: the `esper_fn.episode.Episode` this was built from (in-process drivers); None for
            an observation decoded from a TensorDict.
    """

    epoch: int
    max_epochs: int
    val_accuracy: tuple[float, ...]
    train_loss: float
    params: int
    param_budget: int | None
    germinated: int
    last_germinated: int | None
    rolled_back: bool
    slots: tuple[SlotView, ...]
    episode: Episode | None = field(default=None, compare=False, repr=False)

    def slot(self, name: str) -> SlotView:
        """The view of the slot called `name`."""
        for v in self.slots:
            if v.name == name:
                return v
        raise KeyError(f"no slot {name!r}; slots are {[v.name for v in self.slots]}.")

    def under(self, gates: GateConfig) -> Observation:
        """This observation with the ops `gates` refuse withdrawn (ADVANCE out of TRAINING, FOSSILIZE
        at HOLDING), judged on the observation's own numbers (epochs in stage, gradient norm,
        contribution). An observation built with the same gates is unchanged; one built with a
        driver's laxer gates (an env's) becomes what the controller would see in ``esper-fn grow``."""
        slots = []
        for v in self.slots:
            telemetry = {}
            if v.grad_norm is not None:
                telemetry[f"grad_norm/{v.name}"] = v.grad_norm
            if v.contribution is not None:
                telemetry[f"{v.name}/contribution"] = v.contribution
            if v.contribution_se is not None:
                telemetry[f"{v.name}/contribution_se"] = v.contribution_se
            ops = []
            for op in v.ops:
                if op in (Op.ADVANCE, Op.FOSSILIZE):
                    try:
                        check_gate(v.name, v.stage, op, v.epochs, gates, telemetry)
                    except GateError:
                        continue
                ops.append(op)
            slots.append(replace(v, ops=tuple(ops)))
        return replace(self, slots=tuple(slots))

    @classmethod
    def from_tensordict(cls, td: TensorDictBase, blueprints: Sequence[str]) -> Observation:
        """Decode one row of `observations_to_tensordict` (no batch dimensions).

        Args:
            td: the ``"controller"`` entry of one observation.
            blueprints: the blueprint ids of the seed columns (the action space's).
        """
        valid = td["slot_valid"].tolist()
        n = sum(valid)
        f = lambda x: None if math.isnan(x) else x  # noqa: E731
        stage, epochs = td["stage"].tolist(), td["epochs"].tolist()
        signal, output, health = td["signal"].tolist(), td["output"].tolist(), td["health"].tolist()
        contribution, grad_norm = td["contribution"].tolist(), td["grad_norm"].tolist()
        contribution_se = td["contribution_se"].tolist()
        ops, seed_params = td["ops"].tolist(), td["seed_params"].tolist()
        slots = tuple(
            SlotView(name=str(s), stage=Stage(stage[s]), epochs=epochs[s], signal=signal[s], output=output[s],
                     health=health[s], contribution=f(contribution[s]), contribution_se=f(contribution_se[s]),
                     grad_norm=f(grad_norm[s]),
                     ops=tuple(o for o in Op if ops[s][int(o)]),
                     seeds={b: seed_params[s][j] for j, b in enumerate(blueprints) if seed_params[s][j] >= 0})
            for s in range(n))
        count = int(td["val_count"])
        budget, last = int(td["param_budget"]), int(td["last_germinated"])
        return cls(epoch=int(td["epoch"]), max_epochs=int(td["max_epochs"]),
                   val_accuracy=tuple(td["val_accuracy"][:count].tolist()), train_loss=float(td["train_loss"]),
                   params=int(td["params"]), param_budget=None if budget < 0 else budget,
                   germinated=int(td["germinated"]), last_germinated=None if last < 0 else last,
                   rolled_back=bool(td["rolled_back"]), slots=slots)


def _signal(spec) -> bool:
    return spec.kind == "conv1d" or (spec.kind == "vector" and spec.layer is None and spec.shape[0] >= 8)


def observe(episode: Episode, gates: GateConfig) -> Observation:
    """The controller's observation of an episode, under the driver's `gates`."""
    state, m = episode.state, episode.metrics
    legal = legal_actions(state, gates=gates, telemetry=m)
    reg = bpm.registry()
    names = list(state.slot_names)
    epochs = state.slots["epochs"].tolist()
    slots = []
    for i, name in enumerate(names):
        entry = legal[name]
        spec = state.spec(name)
        seeds = {bid: reg[bid].param_count(spec) for bid in entry["blueprints"]} if Op.GERMINATE in entry["ops"] else {}
        slots.append(SlotView(
            name=name, stage=entry["stage"], epochs=int(epochs[i]), signal=_signal(spec), output=i == len(names) - 1,
            health=m.get(f"{name}/dead", 0.0) + m.get(f"{name}/saturation", 0.0),
            contribution=m.get(f"{name}/contribution"), contribution_se=m.get(f"{name}/contribution_se"),
            grad_norm=m.get(f"grad_norm/{name}"),
            ops=tuple(entry["ops"]), seeds=seeds))
    accs = [g["val_accuracy"] for g in episode.good]
    if episode.epoch == 0 or episode.rolled_back:
        accs.append(m["val_accuracy"])
    return Observation(
        epoch=episode.epoch, max_epochs=episode.max_epochs, val_accuracy=tuple(accs),
        train_loss=m.get("train_loss", math.inf), params=state.num_params(), param_budget=episode.param_budget,
        germinated=episode.counts.germinated, last_germinated=episode.last_germinated,
        rolled_back=episode.rolled_back, slots=tuple(slots), episode=episode)


def observations_to_tensordict(observations: Sequence[Observation], *, num_slots: int,
                               blueprints: Sequence[str], horizon: int) -> TensorDict:
    """Encode observations as one TensorDict of batch [N] (`Observation.from_tensordict` decodes a row).

    Args:
        observations: N observations.
        num_slots: S, slot positions (padded; ``slot_valid`` marks the real ones).
        blueprints: the B blueprint ids of the ``seed_params`` columns (others are dropped).
        horizon: H, the length of the padded validation history (at least the longest one).

    Returns:
        TensorDict [N] with int64 ``epoch``, ``max_epochs``, ``params``, ``param_budget`` (-1: none),
        ``germinated``, ``last_germinated`` (-1: none), ``val_count``; float64 ``train_loss``,
        ``val_accuracy`` [N, H]; bool ``rolled_back``; per slot [N, S]: bool ``slot_valid``, ``signal``,
        ``output``, int64 ``stage``, ``epochs``, float64 ``health``, ``contribution``, ``contribution_se``
        and ``grad_norm`` (NaN: unmeasured); bool ``ops`` [N, S, len(Op)]; int64 ``seed_params`` [N, S, B] (-1: not offered).
    """
    N, S, B, H = len(observations), num_slots, len(blueprints), horizon
    col = {b: j for j, b in enumerate(blueprints)}
    i64, f64 = torch.int64, torch.float64
    seed_params = torch.full((N, S, B), -1, dtype=i64)
    ops = torch.zeros(N, S, len(Op), dtype=torch.bool)
    slot_i = {k: torch.zeros(N, S, dtype=i64) for k in ("stage", "epochs")}
    slot_b = {k: torch.zeros(N, S, dtype=torch.bool) for k in ("slot_valid", "signal", "output")}
    slot_f = {k: torch.full((N, S), math.nan if k != "health" else 0.0, dtype=f64)
              for k in ("health", "contribution", "contribution_se", "grad_norm")}
    val = torch.zeros(N, H, dtype=f64)
    for i, o in enumerate(observations):
        if len(o.slots) > S or len(o.val_accuracy) > H:
            raise ValueError(f"observation {i} has {len(o.slots)} slots and {len(o.val_accuracy)} epochs of history; "
                             f"the encoding holds {S} and {H}.")
        val[i, :len(o.val_accuracy)] = torch.tensor(o.val_accuracy, dtype=f64)
        for s, v in enumerate(o.slots):
            slot_b["slot_valid"][i, s], slot_b["signal"][i, s], slot_b["output"][i, s] = True, v.signal, v.output
            slot_i["stage"][i, s], slot_i["epochs"][i, s] = int(v.stage), v.epochs
            slot_f["health"][i, s] = v.health
            if v.contribution is not None:
                slot_f["contribution"][i, s] = v.contribution
            if v.contribution_se is not None:
                slot_f["contribution_se"][i, s] = v.contribution_se
            if v.grad_norm is not None:
                slot_f["grad_norm"][i, s] = v.grad_norm
            for o_ in v.ops:
                ops[i, s, int(o_)] = True
            for bid, n in v.seeds.items():
                j = col.get(bid)
                if j is not None:
                    seed_params[i, s, j] = n
    t = lambda xs, dt: torch.tensor(xs, dtype=dt)  # noqa: E731
    return TensorDict({
        "epoch": t([o.epoch for o in observations], i64), "max_epochs": t([o.max_epochs for o in observations], i64),
        "val_accuracy": val, "val_count": t([len(o.val_accuracy) for o in observations], i64),
        "train_loss": t([o.train_loss for o in observations], f64), "params": t([o.params for o in observations], i64),
        "param_budget": t([-1 if o.param_budget is None else o.param_budget for o in observations], i64),
        "germinated": t([o.germinated for o in observations], i64),
        "last_germinated": t([-1 if o.last_germinated is None else o.last_germinated for o in observations], i64),
        "rolled_back": t([o.rolled_back for o in observations], torch.bool),
        **slot_b, **slot_i, **slot_f, "ops": ops, "seed_params": seed_params,
    }, batch_size=[N])


class Controller(Protocol):
    """What a driver needs from a controller.

    Attributes:
        gates: the thresholds its seeds must pass; the driver builds the observation's legal ops and
            runs the lifecycle with them.
        blocked: set by `decide` to a reason when it wanted to germinate and the parameter budget
            left no seed that fits (see `budget_blocked`), else None.

    `decide` is asked after every epoch and before the first one (``obs.epoch == 0``); it must be a
    function of the observation (no memory of earlier calls), so a resumed run decides as the
    uninterrupted one did and one controller serves many episodes.
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
       blocks (`SIGNAL_FAMILY`); elsewhere residual GELU MLPs (`HIDDEN_FAMILY`). (On MNIST-1D a conv
       seed on the signal lifts an MLP by ~30 points; hidden-layer MLP seeds on MLP hosts give nothing.)
    3. Among all candidates that fit the remaining parameter budget (the run's `param_budget`, or
       the network's own size when there is none), take the one with the most parameters: capacity
       is what an impaired host lacks. Ties go to the slot with the worst health signal (highest
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
    limit = (f"the parameter budget of {obs.param_budget}" if obs.param_budget is not None
             else f"the default limit of the network's own size ({obs.params})")
    return (f"{limit} leaves room for {room} parameters at {obs.params}; the smallest candidate seed, {bid} at slot "
            f"{slot!r}, needs {n}. Raise param_budget (or param_budget_ratio) to let it grow.")


def _room(obs: Observation) -> int:
    return (obs.param_budget - obs.params) if obs.param_budget is not None else obs.params


def _candidates(obs: Observation) -> list[tuple[tuple[int, float, int], str, str]]:
    """``((params, health, -depth), slot, blueprint)`` for every seed `choose_seed` considers."""
    out = []
    for depth, v in enumerate(obs.slots[:-1]):
        if Op.GERMINATE not in v.ops:
            continue
        family = SIGNAL_FAMILY if v.signal else HIDDEN_FAMILY
        for bid, n in v.seeds.items():
            if bid.split("@")[0] in family:
                out.append(((n, v.health, -depth), v.name, bid))
    return out


@dataclass
class FixedSchedule:
    """Germinates at epochs ``start, start + every, start + 2 every, ...`` while no seed is live,
    round-robin over the non-output slots (starting after the slot of the latest germination), with
    the blueprint `choose_seed` would pick there; advances each seed as soon as the gates allow and
    fossilizes it when it has held for `hold_epochs`, whatever it contributes.

    Attributes:
        every: epochs between germinations.
        start: the first germination epoch (default: `every`).
        hold_epochs, incubate_epochs: its gates (below).
        tempo: blending tempo of its seeds.
        max_seeds: germinations per episode (None: no limit).

    Its gates (``self.gates``): ``min_training_epochs=incubate_epochs``,
    ``min_holding_epochs=hold_epochs``, ``max_grad_norm=MAX_GRAD_NORM``, and no contribution gate.
    """

    every: int = 20
    start: int | None = None
    hold_epochs: int = 2
    incubate_epochs: int = 3
    tempo: int = 5
    max_seeds: int | None = None
    name: str = "schedule"
    blocked: str | None = field(default=None, repr=False)

    @property
    def gates(self) -> GateConfig:
        return GateConfig(min_training_epochs=self.incubate_epochs, min_holding_epochs=self.hold_epochs,
                          max_grad_norm=MAX_GRAD_NORM, min_contribution=None)

    def decide(self, obs: Observation) -> list[Action]:
        self.blocked = None
        actions = manage_seeds(obs, self.gates)
        first = self.every if self.start is None else self.start
        if obs.epoch < first or (obs.epoch - first) % self.every or _live(obs):
            return actions
        if self.max_seeds is not None and obs.germinated >= self.max_seeds:
            return actions
        slots = obs.slots[:-1]
        nxt = 0 if obs.last_germinated is None else (obs.last_germinated + 1) % len(slots)
        blocked = []
        for j in range(len(slots)):
            v = slots[(nxt + j) % len(slots)]
            if Op.GERMINATE not in v.ops:
                continue
            only = _only(obs, v.name)
            pick = choose_seed(only)
            if pick:
                actions.append(Action(Op.GERMINATE, v.name, pick[1], tempo=self.tempo))
                return actions
            blocked.append(budget_blocked(only))
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
        min_contribution: fossilize only if the lower confidence bound of the seed's measured
            contribution (`GateConfig.min_contribution`, with ``contribution_z``) is above this.
        contribution_z: the z of that bound (0: the measured contribution alone).
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
    contribution_z: float = Field(default=1.645, ge=0)


class Plateau:
    """Germinates when validation accuracy stalls, at the slot and with the blueprint `choose_seed`
    picks; advances through the gates; fossilizes a seed whose measured contribution clears
    `min_contribution`, prunes it otherwise.

    Its gates (``self.gates``): ``min_training_epochs=incubate_epochs``,
    ``min_holding_epochs=hold_epochs``, ``min_contribution`` and ``contribution_z``, and
    ``max_grad_norm=MAX_GRAD_NORM``.
    """

    name = "heuristic"

    def __init__(self, config: PlateauConfig | None = None):
        self.config = config or PlateauConfig()
        self.blocked: str | None = None

    @property
    def gates(self) -> GateConfig:
        c = self.config
        return GateConfig(min_training_epochs=c.incubate_epochs, min_holding_epochs=c.hold_epochs,
                          max_grad_norm=MAX_GRAD_NORM, min_contribution=c.min_contribution,
                          contribution_z=c.contribution_z)

    def decide(self, obs: Observation) -> list[Action]:
        c = self.config
        self.blocked = None
        actions = manage_seeds(obs, self.gates)
        if _live(obs) or actions or obs.germinated >= c.max_seeds:
            return actions
        if obs.epoch > c.grow_until * obs.max_epochs or obs.train_loss < c.min_train_loss:
            return actions
        accs = obs.val_accuracy
        if len(accs) <= c.patience:
            return actions
        if max(accs[-c.patience:]) - max(accs[: -c.patience]) >= c.min_delta:
            return actions
        pick = choose_seed(obs)
        if pick:
            actions.append(Action(Op.GERMINATE, pick[0], pick[1], tempo=c.tempo))
        else:
            self.blocked = budget_blocked(obs)
        return actions


def _live(obs: Observation) -> bool:
    return any(v.stage in LIVE_STAGES for v in obs.slots)


def _only(obs: Observation, slot: str) -> Observation:
    """`obs` with GERMINATE (and every other op) withheld from all slots but `slot`."""
    return replace(obs, slots=tuple(v if v.name == slot else replace(v, ops=(), seeds={}) for v in obs.slots))


def manage_seeds(obs: Observation, gates: GateConfig) -> list[Action]:
    """Move every live seed on as far as the legal ops allow, and deliver the verdicts.

    The ops were computed with the same `gates` (and the epoch's telemetry), so this re-checks no
    threshold: a seed advances whenever the automatic lifecycle would (`esper_fn.episode.auto_advances`;
    under ``lifecycle="auto"`` the step has done it already), and at HOLDING it is fossilized when
    FOSSILIZE is legal. A seed is pruned when its time is up and the gate still refuses: at HOLDING
    after ``gates.min_holding_epochs`` with FOSSILIZE refused (its contribution is below
    ``gates.min_contribution``, or folding it would break another seed), and in TRAINING after
    ``gates.min_training_epochs`` with ADVANCE refused (its gradient norm is not finite or above
    ``gates.max_grad_norm``).
    """
    out = []
    advancing = set(auto_advances({v.name: {"stage": v.stage, "ops": v.ops} for v in obs.slots}))
    for v in obs.slots:
        if v.name in advancing:
            out.append(Action(Op.ADVANCE, v.name))
        elif not verdict_due(v.stage, v.ops, v.epochs, gates):
            continue
        elif v.stage == Stage.TRAINING:
            if Op.PRUNE in v.ops:
                out.append(Action(Op.PRUNE, v.name, reason=f"gradient gate: grad_norm/{v.name} = {v.grad_norm} after "
                                                           f"{v.epochs} epochs of incubation (max_grad_norm "
                                                           f"{gates.max_grad_norm})"))
        elif Op.FOSSILIZE in v.ops:
            out.append(Action(Op.FOSSILIZE, v.name))
        elif v.epochs >= gates.min_holding_epochs and Op.PRUNE in v.ops:
            out.append(Action(Op.PRUNE, v.name, reason=f"{_refusal(v, gates)} after {v.epochs} epochs at alpha 1"))
    return out


def _refusal(v: SlotView, gates: GateConfig) -> str:
    """Why FOSSILIZE was refused at HOLDING, in words (for the `Pruned` event)."""
    c, se, z = v.contribution, v.contribution_se, gates.contribution_z
    if gates.min_contribution is None or c is None:
        return "the fossilize gate refused"
    bound = c - z * se if z > 0 and se is not None else c
    if not bound > gates.min_contribution:
        shown = f"contribution {c:+.4f}" + (f" - {z} x standard error {se:.4f} = {bound:+.4f}" if bound != c else "")
        return f"{shown} is not above min_contribution {gates.min_contribution}"
    return "the fossilize gate refused"


# --- the fixed-policy family of the growth benchmark -------------------------------------------------

RECIPE_KINDS: dict[str, tuple[str, ...]] = {
    "conv": ("conv2d_k3", "conv1d_k5", "conv1d_k3"),
    "mlp": ("mlp_gelu", "mlp_gelu_x0_5"),
    "lowrank": ("lora_r8", "lora_r4"),
    "norm": ("rmsnorm",),
}
"""Blueprint families of `Recipe` kinds, in order of preference (the first that fits the slot and the
budget is grafted; the bigger variant first)."""

RECIPE_POSITIONS = ("input", "first", "last")
"""Slot positions every host has: the raw input, the first and the last hidden slot (the slot after
the first and after the last hidden layer; one-hidden-layer hosts have first == last)."""


@dataclass
class Recipe:
    """A fixed action sequence written in terms every host has, so it applies to every instance:
    germinate a seed of `kind` at slot `position` once the episode reaches ``at`` of its horizon,
    then let the lifecycle advance it, fossilize it where the gates allow and prune it when its
    verdict is due and they refuse. One seed per episode.

    Attributes:
        position: "input", "first" or "last" (`RECIPE_POSITIONS`).
        kind: "conv", "mlp", "lowrank" or "norm" (`RECIPE_KINDS`): the largest variant that fits the
            slot and the budget room is grafted, or nothing if none does; or one blueprint id
            ("conv1d_k5@1.0.0", a generated "karn_conv1d_k7_d2_c4@1.0.0"): that blueprint is grafted
            where it is offered and fits the room, else nothing.
        at: the fraction of the horizon at which to germinate: epoch ``round(at x max_epochs)`` (0:
            before the first epoch).
        tempo: blending tempo; hold_epochs, incubate_epochs: its gates (no contribution gate of its
            own: the driver's gates decide whether a seed may be fossilized).
    """

    position: str
    kind: str
    at: float = 0.0
    tempo: int = 5
    hold_epochs: int = 2
    incubate_epochs: int = 3
    blocked: str | None = field(default=None, repr=False)

    def __post_init__(self):
        kind_ok = self.kind in RECIPE_KINDS or bpm.BLUEPRINT_ID.match(str(self.kind)) is not None
        if self.position not in RECIPE_POSITIONS or not kind_ok or not 0 <= self.at < 1:
            raise ValueError(f"Recipe(position={self.position!r}, kind={self.kind!r}, at={self.at}): position must be one "
                             f"of {RECIPE_POSITIONS}, kind one of {tuple(RECIPE_KINDS)} or a blueprint id "
                             "('name@x.y.z'), at in [0, 1).")

    @property
    def name(self) -> str:
        """``recipe:<position>-<kind>-<at as a percentage>``, e.g. ``recipe:input-conv-0`` or
        ``recipe:input-conv1d_k5@1.0.0-0``."""
        return f"recipe:{self.position}-{self.kind}-{round(100 * self.at)}"

    @classmethod
    def parse(cls, name: str) -> Recipe:
        """``recipe:<position>-<kind or blueprint id>-<at %>`` -> `Recipe` (the inverse of `name`).

        Raises:
            ConfigError: a malformed name.
        """
        try:
            position, kind, at = str(name).removeprefix("recipe:").split("-")
            return cls(position, kind, int(at) / 100)
        except ValueError as e:
            raise ConfigError(f"{name!r} is not a recipe name like 'recipe:input-conv-0' or "
                              f"'recipe:first-karn_lora_r2@1.0.0-25' ({e}).") from None

    @property
    def blueprint(self) -> str | None:
        """The one blueprint id this recipe grafts, or None for a kind of `RECIPE_KINDS`."""
        return None if self.kind in RECIPE_KINDS else self.kind

    @property
    def gates(self) -> GateConfig:
        return GateConfig(min_training_epochs=self.incubate_epochs, min_holding_epochs=self.hold_epochs,
                          max_grad_norm=MAX_GRAD_NORM, min_contribution=None)

    def slot(self, obs: Observation) -> SlotView | None:
        """The slot this recipe grows at in `obs`'s host, or None if the host has no hidden slot."""
        hidden = obs.slots[1:-1]
        if self.position == "input":
            return obs.slots[0]
        if not hidden:
            return None
        return hidden[0] if self.position == "first" else hidden[-1]

    def pick(self, obs: Observation) -> str | None:
        """The blueprint this recipe grafts now, or None (not legal, or nothing fits the budget)."""
        v = self.slot(obs)
        if v is None or Op.GERMINATE not in v.ops:
            return None
        room = _room(obs)
        if self.blueprint is not None:
            n = v.seeds.get(self.blueprint)
            return self.blueprint if n is not None and n <= room else None
        for name in RECIPE_KINDS[self.kind]:
            for bid, n in v.seeds.items():
                if bid.split("@")[0] == name and n <= room:
                    return bid
        return None

    def decide(self, obs: Observation) -> list[Action]:
        self.blocked = None
        actions = manage_seeds(obs, self.gates)
        if obs.germinated or obs.epoch < round(self.at * obs.max_epochs):
            return actions
        bid = self.pick(obs)
        if bid is not None:
            actions.append(Action(Op.GERMINATE, self.slot(obs).name, bid, tempo=self.tempo))
        return actions


def recipe_family(kinds=("conv", "mlp", "lowrank"), positions=RECIPE_POSITIONS,
                  times=(0.0, 0.25, 0.5)) -> list[Recipe]:
    """The benchmark's finite family of fixed policies: one `Recipe` per (position, kind, time)
    (27 by default; `Static` is the family's "never grow" member, named "static")."""
    return [Recipe(p, k, t) for k in kinds for p in positions for t in times]
