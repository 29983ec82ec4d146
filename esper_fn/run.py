"""The morphogenetic training run (`esper-fn grow`): train, measure, govern, decide, checkpoint, log.

A run directory holds ``config.yaml``, ``events.jsonl`` (typed events), ``metrics.jsonl`` and
``metrics.csv`` (one row per epoch), ``checkpoints/step_*`` (safetensors + manifest) and
``summary.json``. `grow` resumes bit-identically from the latest checkpoint with ``resume=True``.

Randomness. The run seed is split into independent streams (`RNG_STREAMS`), one `torch.Generator`
each: "host" draws the host's initial weights, "data" the order of the training samples (one
permutation per epoch) and "seeds" the initial weights of every germinated or preinstalled seed.
Stream ``name`` of run seed ``s`` is seeded with `stream_seed` (the first 8 bytes of
``sha256(f"esper_fn:{name}:{s}")``, big-endian, top bit cleared). So two runs on one seed see the
same host init and the same batches in the same order whatever their controllers germinate, and
"grown vs static" compares the same data order. Checkpoints save every stream.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from . import _host
from . import blueprints as _catalogue  # noqa: F401  (registers the built-in blueprints)
from ._errors import CheckpointError, ConfigError
from ._lifecycle import LIVE_STAGES, GateConfig, Op, Stage
from ._serialize import state_from_tensors, state_to_tensors
from ._state import State, advance, fossilize, germinate, init, legal_actions, prune, tick
from .checkpoint import CheckpointManager
from .controllers import Action, FixedSchedule, Observation, Plateau, PlateauConfig, Static
from .events import (
    Advanced,
    CheckpointSaved,
    EpochMetrics,
    EventLog,
    Fossilized,
    Germinated,
    GrowthBlocked,
    Pruned,
    Rollback,
    StuckAtChance,
    read_events,
)
from .optim import adam
from .tasks import load
from .training import TrainConfig, evaluate, telemetry, train_epoch

__all__ = [
    "RNG_STREAMS",
    "GovernorConfig",
    "RunConfig",
    "RunSummary",
    "governor_verdict",
    "grow",
    "load_config",
    "never_left_chance",
    "param_budget",
    "rng_streams",
    "standard_init",
    "stream_seed",
]

RNG_STREAMS: tuple[str, ...] = ("host", "data", "seeds")
"""The run's independent random streams (see the module docstring)."""


def stream_seed(seed: int, stream: str) -> int:
    """The seed of random stream `stream` of run seed `seed`: the first 8 bytes of
    ``sha256(f"esper_fn:{stream}:{seed}")`` as a big-endian integer, top bit cleared (a valid
    `torch.Generator.manual_seed` argument; distinct streams and seeds give unrelated values)."""
    digest = hashlib.sha256(f"esper_fn:{stream}:{int(seed)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def rng_streams(seed: int) -> dict[str, torch.Generator]:
    """One fresh `torch.Generator` per stream of `RNG_STREAMS`, seeded with `stream_seed`."""
    return {name: torch.Generator().manual_seed(stream_seed(seed, name)) for name in RNG_STREAMS}


class GovernorConfig(BaseModel):
    """When the governor rolls a run back.

    Attributes:
        spike_factor: a validation loss above ``spike_factor`` x the median of the last `window`
            good epochs is a divergence.
        window: epochs in that median (the rule is off until `window` good epochs exist).
        chance_margin: validation accuracy <= chance + margin, after the run once reached
            chance + 3 x margin, is a collapse.
        stuck_epochs: a run whose validation accuracy has not exceeded chance + 3 x chance_margin
            in any of its first `stuck_epochs` good epochs "never left chance": the governor
            writes a `StuckAtChance` event then (once), and the summary says so (see
            `never_left_chance`). Chance is 1 / n_classes.
        max_rollbacks: rollbacks allowed in one run; one more ends the run (reason recorded).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    spike_factor: float = Field(default=3.0, gt=1)
    window: int = Field(default=5, ge=1)
    chance_margin: float = Field(default=0.02, ge=0)
    stuck_epochs: int = Field(default=10, ge=1)
    max_rollbacks: int = Field(default=10, ge=0)


class RunConfig(BaseModel):
    """Everything a run needs; YAML files and CLI flags fill it (unknown keys are errors).

    Attributes:
        task: "mnist1d", "mnist1d-seq", "digits" or "spirals".
        host: a host preset (`esper_fn.hosts.hosts()`), e.g. "mlp-impaired", "cnn-impaired".
        controller: "static", "schedule", "heuristic", or "tamiyo" (the shipped learned controller,
            `esper_fn.policies.SHIPPED_WEIGHTS`) or "tamiyo:PATH" (Tamiyo weights written by
            ``esper-fn train-tamiyo``): the policy runs through a one-row env observation
            (`esper_fn.envs.PolicyController`; docs/tamiyo.md, "Tamiyo in grow").
        epochs: the epoch budget.
        seed: the run seed; host init, data order and seed init each draw from their own stream
            derived from it (`rng_streams`). It also chooses the task's validation split.
        lr: Adam learning rate of the host; seed_lr: of the seeds (default: lr).
        param_budget: the most parameters the grown network may have, absolute. None: use
            `param_budget_ratio`.
        param_budget_ratio: with no `param_budget`, the budget is ``floor(ratio x the host's
            initial parameters)``: with 1.3, mlp-impaired 826 -> 1073, cnn-impaired 486 -> 631,
            mlp-paper 15210 -> 19773, cnn-paper 5210 -> 6773. (The heuristics graft the largest
            seed that fits, so the budget also picks the seed: on mlp-impaired, 1.3 keeps the
            177-parameter conv seed on the input, while 1.35 would admit the 280-parameter MLP seed
            at fc1 instead. The MNIST-1D benchmarks pass their acceptance target,
            ``param_budget=1100``, explicitly.) None (and no `param_budget`): no budget; the
            heuristics then limit each new seed to the network's current size. When the budget is
            what stops a germination, the run says so (a `GrowthBlocked` event,
            `RunSummary.growth_blocked`).
        preinstall: ``[[slot, blueprint], ...]`` grafted at alpha 1 before epoch 0, to train a
            grown architecture from scratch for comparison. Their weights get the standard
            initialisation a user would give those layers (`standard_init`), not the zero-output
            birth initialisation of a seed.
        checkpoint_every: epochs between checkpoints (the last epoch is always saved).
        library: a seed library directory (`esper_fn.urza`, created if missing): every seed the run
            fossilizes is stored there just before it is fossilized (a mergeable seed is folded into
            the host then), with its blueprint, slot, host, task, measured contribution, epochs since
            germination and the run id. None: nothing is stored.
    """

    model_config = ConfigDict(extra="forbid")

    task: str = "mnist1d"
    host: str = "mlp-impaired"
    controller: str = "heuristic"
    epochs: int = Field(default=200, ge=1)
    seed: int = 0
    lr: float = Field(default=1e-2, gt=0)
    seed_lr: float | None = None
    param_budget: int | None = Field(default=None, ge=1)
    param_budget_ratio: float | None = Field(default=1.3, gt=0)
    train: TrainConfig = TrainConfig()
    plateau: PlateauConfig = PlateauConfig()
    schedule_every: int = Field(default=20, ge=1)
    governor: GovernorConfig = GovernorConfig()
    preinstall: list[tuple[str, str]] = Field(default_factory=list)
    checkpoint_every: int = Field(default=25, ge=1)
    max_to_keep: int = Field(default=3, ge=1)
    library: str | None = None

    @field_validator("controller")
    @classmethod
    def _known_controller(cls, v: str) -> str:
        if v in ("static", "schedule", "heuristic", "tamiyo") or (v.startswith("tamiyo:") and len(v) > 7):
            return v
        raise ValueError(f"unknown controller {v!r}: use static, schedule, heuristic, tamiyo (the shipped policy) "
                         "or tamiyo:PATH (Tamiyo weights from `esper-fn train-tamiyo`).")


class RunSummary(BaseModel):
    """What a run did, also written to ``summary.json``.

    Attributes (beyond the self-explanatory ones):
        stopped: why the run ended before its epoch budget (too many rollbacks), or None.
        param_budget: the parameter budget the run used (see `RunConfig.param_budget_ratio`).
        growth_blocked: the first time the controller wanted to germinate and the budget left no
            seed that fits, the reason (`GrowthBlocked` event); growth_blocked_epoch: its epoch.
        stuck_at_chance: the run never left chance: the governor flagged it (a `StuckAtChance`
            event at stuck_at_chance_epoch) and no later epoch left chance either. Its accuracy is
            that of an untrained network; do not compare it as a trained result.
        stuck_at_chance_epoch: the epoch of the `StuckAtChance` event, or None. Set with
            ``stuck_at_chance=False`` when a run was flagged and left chance later.
    """

    model_config = ConfigDict(extra="forbid")

    run_id: str
    epochs: int
    test_accuracy: float
    test_loss: float
    best_val_accuracy: float
    params_before: int
    params_after: int
    germinated: int
    fossilized: int
    pruned: int
    rollbacks: int
    wall_seconds: float
    train_seconds: float
    telemetry_seconds: float
    stopped: str | None = None
    param_budget: int | None = None
    growth_blocked: str | None = None
    growth_blocked_epoch: int | None = None
    stuck_at_chance: bool = False
    stuck_at_chance_epoch: int | None = None


def load_config(path: str | Path | None = None, **overrides) -> RunConfig:
    """Read a YAML run config and apply overrides (None values are ignored).

    Raises:
        ConfigError: unreadable YAML, or an unknown or invalid key (naming the closest valid key).
    """
    data: dict = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config {path} must be a mapping of keys to values, got {type(data).__name__}.")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return _validate(data, RunConfig, where=str(path or "flags"))


def _validate(data: dict, model: type[BaseModel], where: str):
    import difflib

    from pydantic import ValidationError

    def check_keys(d: dict, m: type[BaseModel], prefix: str):
        for k, v in d.items():
            if k not in m.model_fields:
                close = difflib.get_close_matches(k, list(m.model_fields), n=1)
                hint = f" Did you mean {prefix}{close[0]!r}?" if close else ""
                raise ConfigError(f"{where}: unknown key {prefix}{k!r}.{hint} Valid keys: {sorted(m.model_fields)}.")
            ann = m.model_fields[k].annotation
            if isinstance(v, dict) and isinstance(ann, type) and issubclass(ann, BaseModel):
                check_keys(v, ann, f"{prefix}{k}.")

    check_keys(data, model, "")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{where}: invalid config:\n{e}") from e


def governor_verdict(metrics: dict[str, float], good: list[dict[str, float]], n_classes: int,
                     config: GovernorConfig) -> str | None:
    """Why this epoch must be rolled back, or None. Pure: reads the epoch's metrics and the
    metrics of earlier good epochs."""
    for k in ("train_loss", "val_loss"):
        if not math.isfinite(metrics.get(k, 0.0)):
            return f"{k} is {metrics[k]} (NaN/Inf)"
    if len(good) >= config.window:
        recent = sorted(h["val_loss"] for h in good[-config.window:])
        med = recent[len(recent) // 2]
        if metrics["val_loss"] > config.spike_factor * med:
            return f"val_loss {metrics['val_loss']:.3f} > {config.spike_factor} x recent median {med:.3f} (divergence)"
    chance = 1.0 / n_classes
    if good and max(h["val_accuracy"] for h in good) > chance + 3 * config.chance_margin:
        if metrics["val_accuracy"] <= chance + config.chance_margin:
            return f"val_accuracy {metrics['val_accuracy']:.3f} collapsed to chance ({chance:.3f})"
    return None


def never_left_chance(good: list[dict[str, float]], n_classes: int, config: GovernorConfig) -> bool:
    """Whether a run has "never left chance": at least ``config.stuck_epochs`` good (not rolled back)
    epochs, and none of them had a validation accuracy above ``1 / n_classes + 3 x chance_margin``
    (0.16 for 10 classes, 0.56 for 2). Pure: reads the metrics of the good epochs."""
    threshold = 1.0 / n_classes + 3 * config.chance_margin
    return len(good) >= config.stuck_epochs and all(h["val_accuracy"] <= threshold for h in good)


def param_budget(config: RunConfig, host_params: int) -> int | None:
    """The run's parameter budget: `RunConfig.param_budget` if set, else ``floor(param_budget_ratio x
    host_params)``, else None (no budget)."""
    if config.param_budget is not None:
        return config.param_budget
    if config.param_budget_ratio is not None:
        return math.floor(config.param_budget_ratio * host_params)
    return None


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
        params[("seeds", slot, name)] = (torch.rand(t.shape, generator=generator, dtype=t.dtype) * 2 - 1) * bound
    return state.replace(params_flat=params)


def _controller(config: RunConfig, task, host):
    if config.controller.startswith("tamiyo"):
        return _tamiyo_controller(config, task, host)
    if config.controller == "static":
        return Static()
    if config.controller == "schedule":
        return FixedSchedule(every=config.schedule_every, tempo=config.plateau.tempo,
                             incubate_epochs=config.plateau.incubate_epochs, hold_epochs=config.plateau.hold_epochs)
    return Plateau(config.plateau)


def _tamiyo_controller(config: RunConfig, task, host):
    """Tamiyo's actor over a one-row env observation (the env and policies packages are imported here,
    when a run asks for them: the core itself never needs them)."""
    from esper_fn.envs import MorphogenesisEnv, PolicyController
    from esper_fn.policies import SHIPPED_WEIGHTS, load_tamiyo

    _, _, path = config.controller.partition(":")
    path = Path(path) if path else SHIPPED_WEIGHTS
    if not path.is_file():
        raise ConfigError(f"controller {config.controller!r}: no Tamiyo weights at {path}; give the .safetensors "
                          "file `esper-fn train-tamiyo` wrote (OUT/tamiyo.safetensors), or `tamiyo` for the shipped "
                          "policy.")
    actor, _, _ = load_tamiyo(path)
    c = actor.tamiyo_config
    env = MorphogenesisEnv(contexts=[(task, host)], num_envs=1, max_epochs=config.epochs, blueprints=c.blueprints,
                           tempos=c.tempos, governor=config.governor, lr=config.lr, seed_lr=config.seed_lr,
                           train=config.train)
    return PolicyController(actor, env)


def _controller_state(ctrl) -> dict:
    if hasattr(ctrl, "state_dict"):
        return ctrl.state_dict()
    if isinstance(ctrl, Plateau):
        return {"germinated": ctrl.germinated}
    if isinstance(ctrl, FixedSchedule):
        return {"next": ctrl._next}
    return {}


def _set_controller_state(ctrl, d: dict) -> None:
    if hasattr(ctrl, "load_state_dict"):
        ctrl.load_state_dict(d)
    elif isinstance(ctrl, Plateau):
        ctrl.germinated = d["germinated"]
    elif isinstance(ctrl, FixedSchedule):
        ctrl._next = d["next"]


def _apply_action(state: State, a: Action, g: torch.Generator, gates: GateConfig,
                  telemetry: dict[str, float]) -> State:
    if a.op == Op.GERMINATE:
        return germinate(state, a.slot, a.blueprint, generator=g, tempo=a.tempo, curve=a.curve)
    if a.op == Op.ADVANCE:
        return advance(state, a.slot, gates=gates, telemetry=telemetry)
    if a.op == Op.FOSSILIZE:
        return fossilize(state, a.slot, gates=gates, telemetry=telemetry)
    if a.op == Op.PRUNE:
        return prune(state, a.slot)
    return state


def grow(
    config: RunConfig,
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    on_epoch_start: Callable[[int, State], State] | None = None,
) -> RunSummary:
    """Run a morphogenetic training and write its run directory.

    Args:
        config: the run configuration.
        out: run directory (created).
        resume: continue from the latest checkpoint in ``out/checkpoints``.
        progress: show a progress bar on stderr.
        on_epoch_start: ``f(epoch, state) -> state`` applied to the state an epoch trains from
            (fault injection: a corrupted state there is rolled back to the uncorrupted one).

    Returns:
        The summary, also written to ``out/summary.json``.
    """
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    if config.host not in _host.HOST_PRESETS:
        raise ConfigError(f"unknown host {config.host!r}; presets are {sorted(_host.HOST_PRESETS)}.")
    task = load(config.task, seed=config.seed)
    # Sized for the task's samples and classes; a host that cannot take them is a HostError here.
    host = _host.preset(config.host, input_shape=task.input_shape, n_classes=task.n_classes)
    ckpts = CheckpointManager(out / "checkpoints", max_to_keep=config.max_to_keep)
    rng = rng_streams(config.seed)
    ctrl = _controller(config, task, host)
    gates = ctrl.gates
    history: list[dict[str, float]] = []
    counts = {"germinated": 0, "fossilized": 0, "pruned": 0, "rollbacks": 0}
    timing = {"train": 0.0, "telemetry": 0.0}
    flags: dict = {"growth_blocked": None, "growth_blocked_epoch": None, "stuck_at_chance_epoch": None}
    start_epoch = 0
    library = None
    born: dict[str, int] = {}  # slot -> epoch its seed was germinated (for the library's record)
    if config.library is not None:
        from .urza import Library

        library = Library(config.library)
    if resume and ckpts.latest_step() is not None:
        tensors, meta = ckpts.restore()
        saved = RunConfig.model_validate(meta["run"]["config"])
        if saved.model_dump() != config.model_dump():
            raise ConfigError("resume: the config differs from the checkpointed run's; resume with the same config "
                              f"(saved in {out / 'config.yaml'}).")
        saved_state = {k[6:]: v for k, v in tensors.items() if k.startswith("state/")}
        state = state_from_tensors(host, saved_state, meta["state"])
        missing = [name for name in RNG_STREAMS if f"rng/{name}" not in tensors]
        if missing:
            raise CheckpointError(
                f"resume: the checkpoint in {out / 'checkpoints'} has no random stream(s) {missing} (it was written "
                f"with one shared stream by an older esper_fn); it cannot continue bit-identically. Start the run "
                f"again in a new directory.")
        for name, gen in rng.items():
            gen.set_state(tensors[f"rng/{name}"].clone())
        run = meta["run"]
        run_id, start_epoch, history, counts = run["run_id"], run["epoch"], run["history"], run["counts"]
        params_before = run["params_before"]
        flags = run["flags"]
        _set_controller_state(ctrl, run["controller"])
        timing = run["timing"]
        # Drop what the interrupted run logged after its last checkpoint: the resumed run redoes it.
        (out / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
        kept = [e for e in read_events(out / "events.jsonl", skip_truncated_tail=True) if e.epoch <= start_epoch]
        born = {e.slot: e.epoch for e in kept if isinstance(e, Germinated)}
        (out / "events.jsonl").write_text("".join(e.model_dump_json() + "\n" for e in kept))
    else:
        if resume:
            raise ConfigError(f"resume: no checkpoint in {out / 'checkpoints'}; start the run without --resume.")
        run_id = f"{out.name}-{uuid.uuid4().hex[:8]}"
        (out / "config.yaml").write_text(yaml.safe_dump(json.loads(config.model_dump_json()), sort_keys=False))
        opt = adam({"host": config.lr, "seeds": config.seed_lr or config.lr})
        state = init(host, optimizer=opt, generator=rng["host"])
        params_before = state.num_params()
        for slot, bid in config.preinstall:
            state = germinate(state, slot, bid, generator=rng["seeds"])
            state = standard_init(state, slot, generator=rng["seeds"])
            for _ in range(3):  # GERMINATED -> TRAINING -> BLENDING -> HOLDING at alpha 1
                state = advance(state, slot, force=True)
        for f in ("events.jsonl", "metrics.jsonl"):
            (out / f).unlink(missing_ok=True)
    good = [h for h in history if not h.get("rolled_back")]
    budget = param_budget(config, params_before)
    stopped = None
    log = EventLog(out / "events.jsonl", drop_truncated_tail=True)
    metrics_log = (out / "metrics.jsonl").open("a")
    bar = tqdm(range(start_epoch, config.epochs), initial=start_epoch, total=config.epochs, disable=not progress,
               desc=f"grow {config.host}", unit="ep", dynamic_ncols=True)

    def checkpoint(done: int, state: State, final: bool = False) -> None:
        """Save after epoch `done` when it is a checkpoint epoch, the last epoch, or `final`."""
        if final or done % config.checkpoint_every == 0 or done == config.epochs:
            metrics_log.flush()
            path = _save(ckpts, done, state, rng, config, run_id, history, counts, params_before, ctrl, timing,
                         flags)
            log.append(CheckpointSaved(run_id=run_id, epoch=done, step=done, path=str(path)))

    def decide(epoch: int, state: State, m: dict[str, float]) -> State:
        """Ask the controller after `epoch` epochs, apply and log what it asks for, then tick (except
        after the last epoch: ticking prepares the next epoch, e.g. moves a blend's alpha, and the
        network the run reports is the one it validated, as in the env)."""
        legal = legal_actions(state, gates=gates, telemetry=m)
        actions = ctrl.decide(Observation(epoch, config.epochs, state, m, good, legal, budget))
        if ctrl.blocked is not None and flags["growth_blocked"] is None:
            flags["growth_blocked"], flags["growth_blocked_epoch"] = ctrl.blocked, epoch
            log.append(GrowthBlocked(run_id=run_id, epoch=epoch, reason=ctrl.blocked, budget=budget or 0,
                                     params=state.num_params()))
        for a in actions:
            before = state.stage(a.slot) if a.slot else None
            pre = state
            state = _apply_action(state, a, rng["seeds"], gates, m)
            if library is not None and a.op == Op.FOSSILIZE:  # stored once the fossilize succeeded
                library.store_seed(pre, a.slot, fate="FOSSILIZED", host=config.host, task=config.task,
                                   contribution=m.get(f"{a.slot}/contribution"), run_id=run_id,
                                   epochs=epoch - born[a.slot] if a.slot in born else None)
            if a.op == Op.GERMINATE:
                born[a.slot] = epoch
                counts["germinated"] += 1
                log.append(Germinated(run_id=run_id, epoch=epoch, slot=a.slot, blueprint=a.blueprint,
                                      seed_id=state.n_seeds - 1))
            elif a.op == Op.ADVANCE:
                log.append(Advanced(run_id=run_id, epoch=epoch, slot=a.slot, from_stage=before.name,
                                    to_stage=state.stage(a.slot).name))
            elif a.op == Op.FOSSILIZE:
                counts["fossilized"] += 1
                log.append(Fossilized(run_id=run_id, epoch=epoch, slot=a.slot,
                                      merged=state.stage(a.slot) == Stage.DORMANT))
            elif a.op == Op.PRUNE:
                counts["pruned"] += 1
                log.append(Pruned(run_id=run_id, epoch=epoch, slot=a.slot,
                                  reason=a.reason or "pruned by the controller"))
        return tick(state, gates=gates) if epoch < config.epochs else state

    try:
        if start_epoch == 0 and getattr(ctrl, "decides_at_start", False):
            # Asked on the untrained network too, with its evaluation as the metrics (as the env's
            # policy acts on the reset observation); the actions apply before epoch 1 trains.
            with torch.no_grad():
                m0 = telemetry(state, task, {})
            state = decide(0, state, m0)
        for epoch in bar:
            last_good = state
            if on_epoch_start is not None:  # a fault injected here hits this epoch only
                state = on_epoch_start(epoch, state)
            t0 = time.perf_counter()
            new, m = train_epoch(state, task, config.train, generator=rng["data"])
            t1 = time.perf_counter()
            m.update(telemetry(new, task, m))
            t2 = time.perf_counter()
            timing["train"] += t1 - t0
            timing["telemetry"] += t2 - t1
            m["epoch"] = epoch + 1
            m["time/train"], m["time/telemetry"] = t1 - t0, t2 - t1
            reason = governor_verdict(m, good, task.n_classes, config.governor)
            if reason is not None:
                counts["rollbacks"] += 1
                involved = [n for n in last_good.slot_names if last_good.stage(n) in LIVE_STAGES]
                state = last_good
                for n in involved:
                    state = prune(state, n)
                    counts["pruned"] += 1
                log.append(Rollback(run_id=run_id, epoch=epoch + 1, reason=reason, to_epoch=epoch, pruned=involved))
                m = {"epoch": epoch + 1, "rolled_back": 1.0}
                history.append(m)
                metrics_log.write(json.dumps(m) + "\n")
                if counts["rollbacks"] > config.governor.max_rollbacks:
                    stopped = f"more than {config.governor.max_rollbacks} rollbacks; last: {reason}"
                    checkpoint(epoch + 1, state, final=True)
                    break
                if epoch + 1 < config.epochs:
                    state = tick(state, gates=gates)
                checkpoint(epoch + 1, state)
                continue
            state = new
            if flags["stuck_at_chance_epoch"] is None and never_left_chance(good + [m], task.n_classes,
                                                                            config.governor):
                flags["stuck_at_chance_epoch"] = epoch + 1
                log.append(StuckAtChance(
                    run_id=run_id, epoch=epoch + 1, chance=1.0 / task.n_classes,
                    threshold=1.0 / task.n_classes + 3 * config.governor.chance_margin,
                    best_val_accuracy=max(h["val_accuracy"] for h in good + [m])))
            state = decide(epoch + 1, state, m)
            m["time/control"] = time.perf_counter() - t2  # governor, controller, lifecycle ops, tick
            log.append(EpochMetrics(run_id=run_id, epoch=epoch + 1, metrics={k: float(v) for k, v in m.items()}))
            metrics_log.write(json.dumps(m) + "\n")
            history.append(m)
            good.append(m)
            bar.set_postfix(val=f"{m['val_accuracy']:.3f}", params=state.num_params(),
                            seeds=" ".join(f"{n}:{state.stage(n).name[:4]}" for n in state.slot_names
                                           if state.stage(n) != Stage.DORMANT) or "-")
            checkpoint(epoch + 1, state)
    finally:
        bar.close()
        metrics_log.close()
        log.close()
    test = evaluate(state, task.x_test, task.y_test)
    _write_csv(out / "metrics.csv", history)
    threshold = 1.0 / task.n_classes + 3 * config.governor.chance_margin
    stuck = flags["stuck_at_chance_epoch"] is not None and all(
        h["val_accuracy"] <= threshold for h in history if not h.get("rolled_back"))
    summary = RunSummary(
        run_id=run_id, epochs=len(history), test_accuracy=test["accuracy"], test_loss=test["loss"],
        best_val_accuracy=max((h.get("val_accuracy", 0.0) for h in history), default=0.0),
        params_before=params_before, params_after=state.num_params(), **counts,
        wall_seconds=time.perf_counter() - t_start, train_seconds=timing["train"],
        telemetry_seconds=timing["telemetry"], stopped=stopped, param_budget=budget,
        growth_blocked=flags["growth_blocked"], growth_blocked_epoch=flags["growth_blocked_epoch"],
        stuck_at_chance=stuck, stuck_at_chance_epoch=flags["stuck_at_chance_epoch"],
    )
    (out / "summary.json").write_text(summary.model_dump_json(indent=2))
    return summary


def _save(ckpts, step, state, rng, config, run_id, history, counts, params_before, ctrl, timing, flags):
    tensors, meta = state_to_tensors(state)
    tensors = {f"state/{k}": v for k, v in tensors.items()}
    for name, gen in rng.items():
        tensors[f"rng/{name}"] = gen.get_state()
    run = {"config": json.loads(config.model_dump_json()), "run_id": run_id, "epoch": step, "history": history,
           "counts": counts, "params_before": params_before, "controller": _controller_state(ctrl), "timing": timing,
           "flags": flags}
    return ckpts.save(step, tensors, {"state": meta, "run": run}, overwrite=True)


def _write_csv(path: Path, history: list[dict[str, float]]) -> None:
    keys: list[str] = []
    for h in history:
        keys.extend(k for k in h if k not in keys)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for h in history:
            w.writerow(h)
