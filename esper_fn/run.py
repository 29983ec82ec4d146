"""The morphogenetic training run (`esper-fn grow`): train, measure, govern, decide, checkpoint, log.

A run directory holds ``config.yaml``, ``events.jsonl`` (typed events), ``metrics.jsonl`` and
``metrics.csv`` (one row per epoch), ``checkpoints/step_*`` (safetensors + manifest) and
``summary.json``. `grow` resumes bit-identically from the latest checkpoint with ``resume=True``.
"""

from __future__ import annotations

import csv
import json
import math
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field

from . import _host
from ._errors import ConfigError
from ._lifecycle import LIVE_STAGES, Op, Stage
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
    Pruned,
    Rollback,
    read_events,
)
from .optim import adam
from .tasks import load
from .training import TrainConfig, evaluate, telemetry, train_epoch

__all__ = ["GovernorConfig", "RunConfig", "RunSummary", "governor_verdict", "grow", "load_config"]


class GovernorConfig(BaseModel):
    """When the governor rolls a run back.

    Attributes:
        spike_factor: a validation loss above ``spike_factor`` x the median of the last `window`
            good epochs is a divergence.
        window: epochs in that median (the rule is off until `window` good epochs exist).
        chance_margin: validation accuracy <= chance + margin, after the run once reached
            chance + 3 x margin, is a collapse.
        max_rollbacks: rollbacks allowed in one run; one more ends the run (reason recorded).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    spike_factor: float = Field(default=3.0, gt=1)
    window: int = Field(default=5, ge=1)
    chance_margin: float = Field(default=0.02, ge=0)
    max_rollbacks: int = Field(default=10, ge=0)


class RunConfig(BaseModel):
    """Everything a run needs; YAML files and CLI flags fill it (unknown keys are errors).

    Attributes:
        task: "mnist1d", "mnist1d-seq", "digits" or "spirals".
        host: a host preset (`esper_fn.hosts.hosts()`), e.g. "mlp-impaired", "cnn-impaired".
        controller: "static", "schedule" or "heuristic".
        epochs: the epoch budget.
        seed: seeds host init, data order and seed init.
        lr: Adam learning rate of the host; seed_lr: of the seeds (default: lr).
        param_budget: the most parameters the grown network may have (None: unbounded).
        preinstall: ``[[slot, blueprint], ...]`` grafted at alpha 1 before epoch 0 (to train a
            grown architecture from scratch for comparison).
        checkpoint_every: epochs between checkpoints (the last epoch is always saved).
    """

    model_config = ConfigDict(extra="forbid")

    task: str = "mnist1d"
    host: str = "mlp-impaired"
    controller: Literal["static", "schedule", "heuristic"] = "heuristic"
    epochs: int = Field(default=200, ge=1)
    seed: int = 0
    lr: float = Field(default=1e-2, gt=0)
    seed_lr: float | None = None
    param_budget: int | None = 1100
    train: TrainConfig = TrainConfig()
    plateau: PlateauConfig = PlateauConfig()
    schedule_every: int = Field(default=20, ge=1)
    governor: GovernorConfig = GovernorConfig()
    preinstall: list[tuple[str, str]] = Field(default_factory=list)
    checkpoint_every: int = Field(default=25, ge=1)
    max_to_keep: int = Field(default=3, ge=1)


class RunSummary(BaseModel):
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


def _controller(config: RunConfig):
    if config.controller == "static":
        return Static()
    if config.controller == "schedule":
        return FixedSchedule(every=config.schedule_every, tempo=config.plateau.tempo,
                             incubate_epochs=config.plateau.incubate_epochs, hold_epochs=config.plateau.hold_epochs)
    return Plateau(config.plateau)


def _controller_state(ctrl) -> dict:
    if isinstance(ctrl, Plateau):
        return {"germinated": ctrl.germinated}
    if isinstance(ctrl, FixedSchedule):
        return {"next": ctrl._next}
    return {}


def _set_controller_state(ctrl, d: dict) -> None:
    if isinstance(ctrl, Plateau):
        ctrl.germinated = d["germinated"]
    elif isinstance(ctrl, FixedSchedule):
        ctrl._next = d["next"]


def _apply_action(state: State, a: Action, g: torch.Generator) -> State:
    if a.op == Op.GERMINATE:
        return germinate(state, a.slot, a.blueprint, generator=g, tempo=a.tempo, curve=a.curve)
    if a.op == Op.ADVANCE:
        return advance(state, a.slot)
    if a.op == Op.FOSSILIZE:
        return fossilize(state, a.slot)
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
    task = load(config.task, seed=config.seed)
    host = _host.HOST_PRESETS[config.host]() if config.host in _host.HOST_PRESETS else None
    if host is None:
        raise ConfigError(f"unknown host {config.host!r}; presets are {sorted(_host.HOST_PRESETS)}.")
    ckpts = CheckpointManager(out / "checkpoints", max_to_keep=config.max_to_keep)
    g = torch.Generator().manual_seed(config.seed)
    ctrl = _controller(config)
    history: list[dict[str, float]] = []
    counts = {"germinated": 0, "fossilized": 0, "pruned": 0, "rollbacks": 0}
    timing = {"train": 0.0, "telemetry": 0.0}
    start_epoch = 0
    if resume and ckpts.latest_step() is not None:
        tensors, meta = ckpts.restore()
        saved = RunConfig.model_validate(meta["run"]["config"])
        if saved.model_dump() != config.model_dump():
            raise ConfigError("resume: the config differs from the checkpointed run's; resume with the same config "
                              f"(saved in {out / 'config.yaml'}).")
        state = state_from_tensors(host, {k[6:]: v for k, v in tensors.items() if k.startswith("state/")}, meta["state"])
        g.set_state(tensors["rng/train"].clone())
        run = meta["run"]
        run_id, start_epoch, history, counts = run["run_id"], run["epoch"], run["history"], run["counts"]
        params_before = run["params_before"]
        _set_controller_state(ctrl, run["controller"])
        timing = run["timing"]
        # Drop what the interrupted run logged after its last checkpoint: the resumed run redoes it.
        (out / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
        kept = [e for e in read_events(out / "events.jsonl", skip_truncated_tail=True) if e.epoch <= start_epoch]
        (out / "events.jsonl").write_text("".join(e.model_dump_json() + "\n" for e in kept))
    else:
        if resume:
            raise ConfigError(f"resume: no checkpoint in {out / 'checkpoints'}; start the run without --resume.")
        run_id = f"{out.name}-{uuid.uuid4().hex[:8]}"
        (out / "config.yaml").write_text(yaml.safe_dump(json.loads(config.model_dump_json()), sort_keys=False))
        opt = adam({"host": config.lr, "seeds": config.seed_lr or config.lr})
        state = init(host, optimizer=opt, generator=g)
        params_before = state.num_params()
        for slot, bid in config.preinstall:
            state = germinate(state, slot, bid, generator=g)
            state = advance(advance(advance(state, slot), slot), slot, force=True)
        for f in ("events.jsonl", "metrics.jsonl"):
            (out / f).unlink(missing_ok=True)
    good = [h for h in history if not h.get("rolled_back")]
    stopped = None
    log = EventLog(out / "events.jsonl", drop_truncated_tail=True)
    metrics_log = (out / "metrics.jsonl").open("a")
    bar = tqdm(range(start_epoch, config.epochs), initial=start_epoch, total=config.epochs, disable=not progress,
               desc=f"grow {config.host}", unit="ep", dynamic_ncols=True)

    def checkpoint(done: int, state: State, final: bool = False) -> None:
        """Save after epoch `done` when it is a checkpoint epoch, the last epoch, or `final`."""
        if final or done % config.checkpoint_every == 0 or done == config.epochs:
            metrics_log.flush()
            path = _save(ckpts, done, state, g, config, run_id, history, counts, params_before, ctrl, timing)
            log.append(CheckpointSaved(run_id=run_id, epoch=done, step=done, path=str(path)))

    try:
        for epoch in bar:
            last_good = state
            if on_epoch_start is not None:  # a fault injected here hits this epoch only
                state = on_epoch_start(epoch, state)
            t0 = time.perf_counter()
            new, m = train_epoch(state, task, config.train, generator=g)
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
                state = tick(state)
                checkpoint(epoch + 1, state)
                continue
            state = new
            obs = Observation(epoch + 1, config.epochs, state, m, good, legal_actions(state), config.param_budget)
            for a in ctrl.decide(obs):
                before = state.stage(a.slot) if a.slot else None
                state = _apply_action(state, a, g)
                if a.op == Op.GERMINATE:
                    counts["germinated"] += 1
                    log.append(Germinated(run_id=run_id, epoch=epoch + 1, slot=a.slot, blueprint=a.blueprint,
                                          seed_id=state.n_seeds - 1))
                elif a.op == Op.ADVANCE:
                    log.append(Advanced(run_id=run_id, epoch=epoch + 1, slot=a.slot, from_stage=before.name,
                                        to_stage=state.stage(a.slot).name))
                elif a.op == Op.FOSSILIZE:
                    counts["fossilized"] += 1
                    log.append(Fossilized(run_id=run_id, epoch=epoch + 1, slot=a.slot,
                                          merged=state.stage(a.slot) == Stage.DORMANT))
                elif a.op == Op.PRUNE:
                    counts["pruned"] += 1
                    log.append(Pruned(run_id=run_id, epoch=epoch + 1, slot=a.slot, reason="contribution below threshold"))
            state = tick(state)
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
    summary = RunSummary(
        run_id=run_id, epochs=len(history), test_accuracy=test["accuracy"], test_loss=test["loss"],
        best_val_accuracy=max((h.get("val_accuracy", 0.0) for h in history), default=0.0),
        params_before=params_before, params_after=state.num_params(), **counts,
        wall_seconds=time.perf_counter() - t_start, train_seconds=timing["train"],
        telemetry_seconds=timing["telemetry"], stopped=stopped,
    )
    (out / "summary.json").write_text(summary.model_dump_json(indent=2))
    return summary


def _save(ckpts, step, state, g, config, run_id, history, counts, params_before, ctrl, timing):
    tensors, meta = state_to_tensors(state)
    tensors = {f"state/{k}": v for k, v in tensors.items()}
    tensors["rng/train"] = g.get_state()
    run = {"config": json.loads(config.model_dump_json()), "run_id": run_id, "epoch": step, "history": history,
           "counts": counts, "params_before": params_before, "controller": _controller_state(ctrl), "timing": timing}
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
