"""One epoch of growth, batched: the step that `esper-fn grow` and `MorphogenesisEnv` both drive.

An `Episode` is the whole record of one host's growth run: its training state, its random streams,
the last epoch's metrics, the governor's memory, lifecycle counts, parameter and FLOP baselines
and whether it is done. `step(episodes, decisions, rules)` is one epoch of every episode:

1. apply each episode's decisions (`esper_fn.controllers.Action`s: germinate, advance, fossilize,
   prune; and `Sculpt`: remove hidden units of a fossilized seed or a host layer) to its state, in
   order;
2. tick (advance blends and stage clocks);
3. train the epoch, episodes of one structure and task stacked in one call
   (`esper_fn.training.train_epochs`), each with its own data order;
4. measure the telemetry (validation accuracy and loss, per-slot health, contributions);
5. govern: a diverged or collapsed epoch is rolled back (the state the epoch trained from, with its
   live seeds pruned, re-measured); too many rollbacks end the episode; a run that never left
   chance is flagged once;
6. under the automatic lifecycle, advance every seed whose gates allow it.

It returns new episodes (the inputs are untouched, their generators included) and, per episode, the
typed events `esper-fn grow` writes to its log (`esper_fn.events`). Two drivers run it: `esper_fn.run.grow`
(a loop over `step` plus I/O: config, resume, event log, metrics, checkpoints, progress) and
`esper_fn.envs.MorphogenesisEnv` (`step` plus an observation and a reward).

Randomness. A run seed is split into independent streams (`RNG_STREAMS`), one `torch.Generator`
each: "host" draws the host's initial weights, "data" the order of the training samples (one
permutation per epoch) and "seeds" the initial weights of every germinated or preinstalled seed.
Stream ``name`` of run seed ``s`` is seeded with `stream_seed` (the first 8 bytes of
``sha256(f"esper_fn:{name}:{s}")``, big-endian, top bit cleared). So two runs on one seed see the
same host init and the same batches in the same order whatever their controllers germinate.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from ._errors import CheckpointError, EsperError
from ._host import Host
from ._lifecycle import LIVE_STAGES, GateConfig, Op, Stage
from ._serialize import state_from_tensors, state_to_tensors
from ._state import State, advance, fossilize, germinate, init, legal_actions, prune, tick
from .emrakul import sculpt, sculptable
from .events import Advanced, Event, Fossilized, Germinated, Pruned, Rollback, StuckAtChance
from .optim import Optimizer
from .tasks import Task
from .training import TrainConfig, telemetry, train_epochs

if TYPE_CHECKING:
    from .tezzeret import KernelCache

__all__ = [
    "RNG_STREAMS",
    "SCULPT_KEEP",
    "Action",
    "Counts",
    "Episode",
    "EpisodeError",
    "GovernorConfig",
    "Rules",
    "Sculpt",
    "Streams",
    "auto_advances",
    "chance_margin",
    "episode_from_tensors",
    "episode_to_tensors",
    "governor_verdict",
    "never_left_chance",
    "rng_streams",
    "sculpt_offered",
    "standard_init",
    "start",
    "step",
    "stream_seed",
    "verdict_due",
]

RNG_STREAMS: tuple[str, ...] = ("host", "data", "seeds")
"""The independent random streams of a run (see the module docstring)."""


class EpisodeError(EsperError, RuntimeError):
    """An episode was stepped out of order (after it ended), or decisions do not match episodes."""


def stream_seed(seed: int, stream: str) -> int:
    """The seed of random stream `stream` of run seed `seed`: the first 8 bytes of
    ``sha256(f"esper_fn:{stream}:{seed}")`` as a big-endian integer, top bit cleared (a valid
    `torch.Generator.manual_seed` argument; distinct streams and seeds give unrelated values)."""
    digest = hashlib.sha256(f"esper_fn:{stream}:{int(seed)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def rng_streams(seed: int) -> dict[str, torch.Generator]:
    """One fresh `torch.Generator` per stream of `RNG_STREAMS`, seeded with `stream_seed`."""
    return {name: torch.Generator().manual_seed(stream_seed(seed, name)) for name in RNG_STREAMS}


def _fork(g: torch.Generator) -> torch.Generator:
    """A new generator in `g`'s state (drawing from it leaves `g` where it was)."""
    out = torch.Generator(device=g.device)
    out.set_state(g.get_state())
    return out


@dataclass(frozen=True)
class Streams:
    """The random streams of one run (`RNG_STREAMS`). `step` draws from forks, never from these."""

    host: torch.Generator
    data: torch.Generator
    seeds: torch.Generator

    @classmethod
    def of(cls, seed: int) -> Streams:
        """The streams of run seed `seed` (`rng_streams`)."""
        return cls(**rng_streams(seed))

    def fork(self) -> Streams:
        """Copies in the same states."""
        return Streams(_fork(self.host), _fork(self.data), _fork(self.seeds))


class GovernorConfig(BaseModel):
    """When the governor rolls an epoch back, and when it gives up.

    Attributes:
        spike_factor: a validation loss above ``spike_factor`` x the median of the last `window`
            good epochs is a divergence.
        window: epochs in that median (the rule is off until `window` good epochs exist).
        chance_margin: validation accuracy <= chance + margin, after the run once reached
            chance + 3 x margin, is a collapse. The margin is at least `margin_se` standard errors of
            an accuracy at chance on the validation set, ``sqrt(chance (1 - chance) / n_val)``: on a
            small validation set a swing of that size is noise (10 samples of 2 classes: 0.32, so the
            rule is off; 1,000 of 10: 0.019, so 0.02 stands).
        margin_se: that floor, in standard errors.
        stuck_epochs: a run whose validation accuracy has not exceeded chance + 3 x chance_margin
            in any of its first `stuck_epochs` good epochs "never left chance": the step emits a
            `StuckAtChance` event then (once). Chance is 1 / n_classes.
        max_rollbacks: rollbacks allowed in one episode; one more ends it (reason recorded).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    spike_factor: float = Field(default=3.0, gt=1)
    window: int = Field(default=5, ge=1)
    chance_margin: float = Field(default=0.02, ge=0)
    margin_se: float = Field(default=2.0, ge=0)
    stuck_epochs: int = Field(default=10, ge=1)
    max_rollbacks: int = Field(default=10, ge=0)


def chance_margin(config: GovernorConfig, n_classes: int, n_val: int | None = None) -> float:
    """The governor's margin around chance: ``chance_margin``, or `margin_se` standard errors of an
    accuracy at chance on `n_val` validation samples if that is larger."""
    if not n_val:
        return config.chance_margin
    chance = 1.0 / n_classes
    return max(config.chance_margin, config.margin_se * math.sqrt(chance * (1 - chance) / n_val))


def governor_verdict(metrics: Mapping[str, float], good: Sequence[Mapping[str, float]], n_classes: int,
                     config: GovernorConfig, n_val: int | None = None) -> str | None:
    """Why this epoch must be rolled back, or None. Pure: reads the epoch's metrics, the metrics of
    earlier good epochs and the validation set's size (`chance_margin`)."""
    for k in ("train_loss", "val_loss"):
        if not math.isfinite(metrics.get(k, 0.0)):
            return f"{k} is {metrics[k]} (NaN/Inf)"
    if len(good) >= config.window:
        recent = sorted(h["val_loss"] for h in good[-config.window:])
        med = recent[len(recent) // 2]
        if metrics["val_loss"] > config.spike_factor * med:
            return f"val_loss {metrics['val_loss']:.3f} > {config.spike_factor} x recent median {med:.3f} (divergence)"
    chance, margin = 1.0 / n_classes, chance_margin(config, n_classes, n_val)
    if good and max(h["val_accuracy"] for h in good) > chance + 3 * margin:
        if metrics["val_accuracy"] <= chance + margin:
            return f"val_accuracy {metrics['val_accuracy']:.3f} collapsed to chance ({chance:.3f})"
    return None


def never_left_chance(good: Sequence[Mapping[str, float]], n_classes: int, config: GovernorConfig,
                      n_val: int | None = None) -> bool:
    """Whether a run has "never left chance": at least ``config.stuck_epochs`` good (not rolled back)
    epochs, and none of them had a validation accuracy above ``1 / n_classes + 3 x`` the margin
    (`chance_margin`: 0.16 for 10 classes and 1,000 validation samples, 0.56 for 2 classes). Pure:
    reads the metrics of the good epochs."""
    threshold = 1.0 / n_classes + 3 * chance_margin(config, n_classes, n_val)
    return len(good) >= config.stuck_epochs and all(h["val_accuracy"] <= threshold for h in good)


@dataclass(frozen=True)
class Action:
    """One lifecycle request (a decision `step` applies; controllers return lists of them). ``blueprint``, ``tempo`` and ``curve`` matter for GERMINATE only;
    ``reason`` says why (the runner writes it into the `Pruned` event)."""

    op: Op
    slot: str | None = None
    blueprint: str | None = None
    tempo: int = 5
    curve: str = "linear"
    reason: str | None = None


SCULPT_KEEP = 0.75
"""The fraction of a target's units one `Sculpt` decision keeps by default (the env's SCULPT op)."""


@dataclass(frozen=True)
class Sculpt:
    """A request to sculpt (`esper_fn.sculpt`) what slot `slot` holds: its fossilized seed, or the host
    layer it follows. It keeps ``max(1, floor(keep x n))`` units of a target whose largest unit group
    holds n (so at least one unit goes whenever n >= 2 and keep < 1), chosen by measured contribution
    on the episode's validation split. The environment's SCULPT action is this decision with
    ``keep=SCULPT_KEEP`` (or the env's ``sculpt_keep``).

    Attributes:
        slot: the slot naming the target.
        keep: the fraction of the target's units to keep, in (0, 1).
        by: "contribution" or "magnitude".
    """

    slot: str
    keep: float = SCULPT_KEEP
    by: str = "contribution"

    def units(self, largest: int) -> int:
        """The units to keep per unit group of a target whose largest group holds `largest`."""
        return max(1, math.floor(self.keep * largest))


def sculpt_offered(state: State) -> dict[str, bool]:
    """Per slot, whether a `Sculpt` decision there is legal now (it then never raises): `sculptable`
    lists the slot, and its largest unit group holds at least 2 units."""
    can = sculptable(state)
    return {n: n in can and max(can[n].units) >= 2 for n in state.slot_names}


# --- the lifecycle rules -------------------------------------------------------------------------

_AUTO_ADVANCE = frozenset({Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING})


def auto_advances(legal: Mapping[str, Mapping]) -> list[str]:
    """The slots the automatic lifecycle advances now: every seed in GERMINATED, TRAINING or
    BLENDING whose ADVANCE is legal (``legal`` from `esper_fn.legal_actions` with the run's gates and
    telemetry). So a seed starts incubating at once, blends after ``gates.min_training_epochs`` with
    a healthy gradient, and holds once alpha is 1.

    This and `verdict_due` are the lifecycle rules; the step, the env's mask and the controllers
    (`esper_fn.controllers.manage_seeds`) all read them, so a new rule is an edit here.
    """
    return [n for n, e in legal.items() if e["stage"] in _AUTO_ADVANCE and Op.ADVANCE in e["ops"]]


def verdict_due(stage: Stage, ops: Sequence[Op], epochs: int, gates: GateConfig) -> bool:
    """Whether a seed awaits its verdict, fossilize or prune: it is HOLDING (at alpha 1), or it has
    incubated ``gates.min_training_epochs`` (and at least one epoch, so its gradient was measured)
    and its gradient gate still refuses to let it blend. Under the automatic lifecycle these are the
    only seeds a controller may prune."""
    if stage == Stage.HOLDING:
        return True
    return stage == Stage.TRAINING and Op.ADVANCE not in ops and epochs >= max(gates.min_training_epochs, 1)


# --- the episode record --------------------------------------------------------------------------


@dataclass(frozen=True)
class Counts:
    """Lifecycle counts of an episode."""

    germinated: int = 0
    fossilized: int = 0
    pruned: int = 0
    rollbacks: int = 0
    sculpted: int = 0


@dataclass(frozen=True)
class Rules:
    """What every episode a driver steps shares: how an epoch trains and how it is governed.

    Attributes:
        train: batch size, incubation mode, evaluation batch size.
        gates: the lifecycle gates the decisions and the automatic lifecycle must pass.
        governor: rollback and give-up thresholds.
        lifecycle: "auto": after every good epoch the step advances each seed the gates allow
            (`auto_advances`), so decisions need only germinate and deliver verdicts; "full": only
            decisions advance seeds.
        kernels: opt-in compiled train steps (`esper_fn.tezzeret.KernelCache`), or None (eager).
        inject: fault injection for tests of the governor: ``inject(epoch, state) -> state`` is applied
            to the state each episode trains from (after its decisions and tick; `epoch` is the
            episode's epochs so far). A rollback still restores the uncorrupted state.
    """

    train: TrainConfig = field(default_factory=TrainConfig)
    gates: GateConfig = field(default_factory=GateConfig)
    governor: GovernorConfig = field(default_factory=GovernorConfig)
    lifecycle: Literal["auto", "full"] = "auto"
    kernels: KernelCache | None = None
    inject: Callable[[int, State], State] | None = None


@dataclass(frozen=True, eq=False)
class Episode:
    """One host's growth run, at the end of an epoch (or at its start, before epoch 1).

    Treat it as immutable: `step` returns new episodes and never changes these fields, the
    generators in `streams` included (it draws from forks).

    Attributes:
        task: the data (train and validation splits are used by the step; test never is).
        state: the training state.
        streams: host init, data order and seed init generators.
        max_epochs: the epoch budget.
        param_budget: the most parameters the network may grow to, or None.
        params0: parameters at the start (before any preinstalled seed).
        flops0: forward FLOPs per sample at the start.
        metrics: the last epoch's train metrics and telemetry (the start's evaluation at epoch 0;
            after a rollback, the restored network's, re-measured).
        evals: ``{"val_accuracy", "val_loss"}`` of the start and of every epoch, rolled back or not.
        good: the metrics of the epochs that were not rolled back (the governor's memory).
        epoch: epochs trained.
        counts: lifecycle counts.
        last_germinated: index of the slot of the latest germination, or None.
        rolled_back: the last epoch was rolled back.
        stopped: why the governor ended the episode early, or None.
        stuck_at_chance_epoch: the epoch at which the governor found the run stuck at chance.
        run_id: names the run in events.
    """

    task: Task
    state: State
    streams: Streams
    max_epochs: int
    param_budget: int | None
    params0: int
    flops0: float
    metrics: Mapping[str, float]
    evals: tuple[Mapping[str, float], ...]
    good: tuple[Mapping[str, float], ...] = ()
    epoch: int = 0
    counts: Counts = Counts()
    last_germinated: int | None = None
    rolled_back: bool = False
    stopped: str | None = None
    stuck_at_chance_epoch: int | None = None
    run_id: str = ""

    @property
    def done(self) -> bool:
        """The budget is spent or the governor ended the episode."""
        return self.epoch >= self.max_epochs or self.stopped is not None


def standard_init(state: State, slot: str, *, generator: torch.Generator) -> State:
    """Give the seed at `slot` the initialisation a user would give those layers trained from scratch.

    Seeds are born with a zero output (their last layer, or a gate, is zero), so grafting one never
    changes the network. A from-scratch baseline of the grown architecture must instead train its
    layers as ordinary layers. The rule, applied in the blueprint's parameter order:

    * a tensor the blueprint drew at random keeps its draw (blueprints draw their inner layers with
      the standard rule below);
    * a zero tensor with two or more dimensions (a last conv or Linear, a LoRA B, a width-growth V,
      an attention output projection) is drawn from ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` with
      PyTorch's fan-in ``shape[1] x prod(shape[2:])``: the default init of ``nn.Linear`` and
      ``nn.Conv1d`` (kaiming-uniform with a = sqrt(5)), as the built-in hosts use;
    * a zero bias is drawn from the same interval as its weight (the name with its first "b" turned
      into "w": b2 -> w2, pw_b -> pw_w);
    * a zero gate ("gate", RMSNorm's) becomes 1, so the block is a plain layer; other 1-d tensors
      keep their value (norm weights stay 1, and IA3's scale stays 0, its standard init, since it
      computes h * (1 + scale)).

    For the seeds the heuristics grow (conv1d_k5, conv1d_k3: w2 [C, 16, k] and b2 [C] with fan-in
    16 k; mlp_gelu, mlp_gelu_x0_5: w2 [d, k] and b2 [d] with fan-in k) this makes ``w2``/``b2``
    standard, so the residual block starts as an ordinary randomly initialised block.

    Args:
        state: a single state with a seed at `slot`.
        slot: the slot.
        generator: draws the new values.

    Returns:
        A new state (the optimizer state of the seed is unchanged: zero, as after germination).
    """
    params = dict(state.params_flat)
    seed = state.seed_params(slot)
    for name, t in seed.items():
        if t.any():
            continue
        if t.dim() >= 2:
            fan_in = t.shape[1] * math.prod(t.shape[2:])
        elif (partner := seed.get(name.replace("b", "w", 1))) is not None and partner.dim() >= 2 and partner is not t:
            fan_in = partner.shape[1] * math.prod(partner.shape[2:])
        else:
            if name == "gate":
                params[("seeds", slot, name)] = torch.ones_like(t)
            continue
        bound = 1.0 / math.sqrt(fan_in)
        draw = torch.rand(t.shape, generator=generator, dtype=t.dtype)  # on the generator's device (the CPU)
        params[("seeds", slot, name)] = ((draw * 2 - 1) * bound).to(t.device)
    return state.replace(params_flat=params)


def start(task: Task, host: Host, *, seed: int | None = None, streams: Streams | None = None,
          optimizer: Optimizer | None = None, max_epochs: int, param_budget: int | None = None,
          preinstall: Sequence[tuple[str, str]] = (), run_id: str = "") -> Episode:
    """A new episode: the host initialised from the "host" stream and evaluated once.

    Args:
        task: the data. The state lives on the task's device and in its dtype (`Task.to`); its
            weights are drawn on the CPU streams and moved there, so a seed gives the same run on
            every device (to the device's float rounding).
        host: the host to grow.
        seed: the run seed (its `Streams`); or pass `streams`.
        streams: the random streams (copied: the caller's generators are not advanced).
        optimizer: the functional optimizer (default ``esper_fn.optim.adam(1e-2)``).
        max_epochs: the epoch budget.
        param_budget: the most parameters the network may grow to (None: no budget).
        preinstall: ``[(slot, blueprint), ...]`` grafted at alpha 1 before epoch 1 with their layers'
            standard initialisation (`standard_init`), to train a grown architecture from scratch.
            `params0` counts the host alone.
        run_id: names the run in events.

    Raises:
        EpisodeError: neither or both of `seed` and `streams`; a budget below 1.
    """
    from .optim import adam

    if (seed is None) == (streams is None):
        raise EpisodeError("start: pass either seed= or streams=, not both or neither.")
    if not isinstance(max_epochs, int) or max_epochs < 1:
        raise EpisodeError(f"start: max_epochs must be a positive int, got {max_epochs!r}.")
    streams = Streams.of(seed) if streams is None else streams.fork()
    state = init(host, optimizer=optimizer or adam(1e-2), generator=streams.host, device=task.device,
                 dtype=task.dtype)
    params0 = state.num_params()
    for slot, bid in preinstall:
        state = germinate(state, slot, bid, generator=streams.seeds)
        state = standard_init(state, slot, generator=streams.seeds)
        for _ in range(3):  # GERMINATED -> TRAINING -> BLENDING -> HOLDING at alpha 1
            state = advance(state, slot, force=True)
    with torch.no_grad():
        m = telemetry(state, task, {})
    return Episode(task=task, state=state, streams=streams, max_epochs=max_epochs, param_budget=param_budget,
                   params0=params0, flops0=m["flops"], metrics=m,
                   evals=({"val_accuracy": m["val_accuracy"], "val_loss": m["val_loss"]},), run_id=run_id)


# --- the step ------------------------------------------------------------------------------------


def _decide(ep: Episode, state: State, decisions: Sequence[Action | Sculpt], gates: GateConfig,
            seeds: torch.Generator, counts: dict[str, int], events: list[Event]) -> tuple[State, int | None]:
    """Apply one episode's decisions in order; returns the state and the latest germinated slot."""
    last = ep.last_germinated
    m = ep.metrics
    for a in decisions:
        if isinstance(a, Sculpt):
            target = sculptable(state).get(a.slot)
            keep = a.units(max(target.units)) if target is not None else 1  # an unsculptable slot: sculpt says why
            state, report = sculpt(state, a.slot, keep=keep, by=a.by, data=ep.task.split("val"))
            counts["sculpted"] += 1
            events.append(report.event(ep.run_id, ep.epoch))
            continue
        if a.op == Op.WAIT:
            continue
        before = state.stage(a.slot)
        if a.op == Op.GERMINATE:
            state = germinate(state, a.slot, a.blueprint, generator=seeds, tempo=a.tempo, curve=a.curve)
            counts["germinated"] += 1
            last = state.index(a.slot)
            events.append(Germinated(run_id=ep.run_id, epoch=ep.epoch, slot=a.slot, blueprint=state.blueprints[last],
                                     seed_id=state.n_seeds - 1))
        elif a.op == Op.ADVANCE:
            state = advance(state, a.slot, gates=gates, telemetry=m)
            events.append(Advanced(run_id=ep.run_id, epoch=ep.epoch, slot=a.slot, from_stage=before.name,
                                   to_stage=state.stage(a.slot).name))
        elif a.op == Op.FOSSILIZE:
            state = fossilize(state, a.slot, gates=gates, telemetry=m)
            counts["fossilized"] += 1
            events.append(Fossilized(run_id=ep.run_id, epoch=ep.epoch, slot=a.slot,
                                     merged=state.stage(a.slot) == Stage.DORMANT,
                                     contribution=m.get(f"{a.slot}/contribution")))
        elif a.op == Op.PRUNE:
            state = prune(state, a.slot)
            counts["pruned"] += 1
            events.append(Pruned(run_id=ep.run_id, epoch=ep.epoch, slot=a.slot,
                                 reason=a.reason or "pruned by the controller"))
        else:
            raise EpisodeError(f"unknown op {a.op!r} in a decision for slot {a.slot!r}.")
    return state, last


def step(episodes: Sequence[Episode], decisions: Sequence[Sequence[Action | Sculpt]],
         rules: Rules) -> tuple[list[Episode], list[list[Event]]]:
    """One epoch of every episode (see the module docstring for the order of things).

    Args:
        episodes: N episodes, none done.
        decisions: per episode, the `Action`s (and `Sculpt`s) to apply before the epoch
            (empty: wait). Validated by the lifecycle ops themselves, with ``rules.gates`` and the
            episode's metrics as telemetry (`esper_fn.sculpt` for a `Sculpt`).
        rules: training, gates, governor and lifecycle.

    Returns:
        ``(episodes, events)``: the N new episodes, and per episode its events in order: the
        decisions' (stamped with the epoch they were taken at), then the governor's and the automatic
        lifecycle's (stamped with the new epoch). Each episode's ``metrics`` gains "epoch",
        "time/train" (the batched training call's wall time) and "time/telemetry".

    Raises:
        EpisodeError: an episode is done, or the counts of episodes and decisions differ.
        IllegalTransitionError, GateError, BlueprintError: a decision the lifecycle refuses;
        SculptError: a `Sculpt` with nothing to sculpt at its slot (`sculpt_offered` says where one
            is legal). Nothing is changed then: the inputs are never modified.
    """
    if len(decisions) != len(episodes):
        raise EpisodeError(f"step: {len(episodes)} episodes need {len(episodes)} decision lists, got {len(decisions)}.")
    for i, ep in enumerate(episodes):
        if ep.done:
            raise EpisodeError(f"step: episode {i} is done (epoch {ep.epoch} of {ep.max_epochs}"
                               f"{', stopped: ' + ep.stopped if ep.stopped else ''}); start a new one.")
    gates, governor = rules.gates, rules.governor
    streams = [ep.streams.fork() for ep in episodes]
    events: list[list[Event]] = [[] for _ in episodes]
    counts = [vars(ep.counts).copy() for ep in episodes]
    before, last = [], []
    for i, ep in enumerate(episodes):
        state, lg = _decide(ep, ep.state, decisions[i], gates, streams[i].seeds, counts[i], events[i])
        before.append(tick(state, gates=gates))
        last.append(lg)
    trained = before if rules.inject is None else [rules.inject(ep.epoch, s) for ep, s in zip(episodes, before)]
    t0 = time.perf_counter()
    results = train_epochs(trained, [ep.task for ep in episodes], rules.train,
                           generators=[s.data for s in streams], kernels=rules.kernels)
    t_train = time.perf_counter() - t0
    out = []
    for i, (ep, (new, train_m)) in enumerate(zip(episodes, results)):
        epoch = ep.epoch + 1
        t1 = time.perf_counter()
        with torch.no_grad():
            m = {**train_m, **telemetry(new, ep.task, train_m)}
        m["epoch"] = float(epoch)
        m["time/train"], m["time/telemetry"] = t_train, time.perf_counter() - t1
        times = {k: m[k] for k in ("time/train", "time/telemetry")}
        n_classes = ep.task.n_classes
        n_val = int(ep.task.y_val.shape[0])
        reason = governor_verdict(m, ep.good, n_classes, governor, n_val)
        good, stopped, stuck = ep.good, ep.stopped, ep.stuck_at_chance_epoch
        if reason is not None:
            state = before[i]
            involved = [n for n in state.slot_names if state.stage(n) in LIVE_STAGES]
            for n in involved:
                state = prune(state, n)
            counts[i]["pruned"] += len(involved)
            counts[i]["rollbacks"] += 1
            events[i].append(Rollback(run_id=ep.run_id, epoch=epoch, reason=reason, to_epoch=ep.epoch,
                                      pruned=involved))
            # The restored network, re-measured; the last good epoch's train metrics carried over.
            carried = {k: v for k, v in ep.metrics.items()
                       if k in ("train_loss", "train_accuracy", "shadow_loss") or k.startswith("grad_norm/")}
            with torch.no_grad():
                m = {**carried, **telemetry(state, ep.task, carried), "epoch": float(epoch), **times}
            if counts[i]["rollbacks"] > governor.max_rollbacks:
                stopped = f"more than {governor.max_rollbacks} rollbacks; last: {reason}"
        else:
            state = new
            if stuck is None and never_left_chance((*good, m), n_classes, governor, n_val):
                stuck = epoch
                events[i].append(StuckAtChance(
                    run_id=ep.run_id, epoch=epoch, chance=1.0 / n_classes,
                    threshold=1.0 / n_classes + 3 * chance_margin(governor, n_classes, n_val),
                    best_val_accuracy=max(h["val_accuracy"] for h in (*good, m))))
            good = (*good, m)
            if rules.lifecycle == "auto":
                for n in auto_advances(legal_actions(state, gates=gates, telemetry=m)):
                    from_stage = state.stage(n)
                    state = advance(state, n, gates=gates, telemetry=m)
                    events[i].append(Advanced(run_id=ep.run_id, epoch=epoch, slot=n, from_stage=from_stage.name,
                                              to_stage=state.stage(n).name))
        out.append(replace(
            ep, state=state, streams=streams[i], metrics=m, good=good, epoch=epoch, counts=Counts(**counts[i]),
            evals=(*ep.evals, {"val_accuracy": m["val_accuracy"], "val_loss": m["val_loss"]}),
            last_germinated=last[i], rolled_back=reason is not None, stopped=stopped, stuck_at_chance_epoch=stuck))
    return out, events


# --- checkpoints ---------------------------------------------------------------------------------

_EPISODE_FORMAT = "esper_fn.episode/1"


def episode_to_tensors(ep: Episode) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An episode as named tensors (``state/...``: its state; ``rng/<stream>``: its generators) and
    JSON metadata (the rest but the task, which the caller restores from its own config; the state's
    metadata under ``"state"``, so `esper_fn.checkpoint.CheckpointManager.restore_state` reads the
    state of a checkpoint written from it)."""
    tensors, state_meta = state_to_tensors(ep.state)
    out = {f"state/{k}": v for k, v in tensors.items()}
    for name in RNG_STREAMS:
        out[f"rng/{name}"] = getattr(ep.streams, name).get_state()
    meta = {
        "format": _EPISODE_FORMAT, "state": state_meta, "max_epochs": ep.max_epochs, "param_budget": ep.param_budget,
        "params0": ep.params0, "flops0": ep.flops0, "metrics": dict(ep.metrics), "evals": [dict(e) for e in ep.evals],
        "good": [dict(g) for g in ep.good], "epoch": ep.epoch, "counts": vars(ep.counts),
        "last_germinated": ep.last_germinated, "rolled_back": ep.rolled_back, "stopped": ep.stopped,
        "stuck_at_chance_epoch": ep.stuck_at_chance_epoch, "run_id": ep.run_id,
    }
    return out, meta


def episode_from_tensors(task: Task, host: Host, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Episode:
    """The episode `episode_to_tensors` wrote (bit-exact: a resumed episode continues identically).

    Raises:
        CheckpointError: not an episode record of this format, or a tensor is missing.
    """
    if meta.get("format") != _EPISODE_FORMAT:
        raise CheckpointError(f"not an episode checkpoint of format {_EPISODE_FORMAT!r} (found "
                              f"{meta.get('format')!r}); it was written by another esper_fn version: start the run "
                              "again in a new directory.")
    missing = [n for n in RNG_STREAMS if f"rng/{n}" not in tensors]
    if missing:
        raise CheckpointError(f"the episode checkpoint has no random stream(s) {missing} (tensors rng/<name>); it "
                              "cannot continue bit-identically. Start the run again in a new directory.")
    state = state_from_tensors(host, {k[6:]: v for k, v in tensors.items() if k.startswith("state/")}, meta["state"])
    if state.device != task.device:
        state = state.to(task.device)  # checkpoints hold CPU tensors; the episode lives with its task
    gens = {}
    for name in RNG_STREAMS:
        g = torch.Generator()
        g.set_state(tensors[f"rng/{name}"].clone())
        gens[name] = g
    return Episode(
        task=task, state=state, streams=Streams(**gens), max_epochs=meta["max_epochs"],
        param_budget=meta["param_budget"], params0=meta["params0"], flops0=meta["flops0"], metrics=meta["metrics"],
        evals=tuple(meta["evals"]), good=tuple(meta["good"]), epoch=meta["epoch"], counts=Counts(**meta["counts"]),
        last_germinated=meta["last_germinated"], rolled_back=meta["rolled_back"], stopped=meta["stopped"],
        stuck_at_chance_epoch=meta["stuck_at_chance_epoch"], run_id=meta["run_id"])
