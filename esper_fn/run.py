"""The morphogenetic training run (`esper-fn grow`): a loop over the growth step, plus I/O.

`grow` drives one episode through `esper_fn.episode.step` (apply the controller's decisions, tick,
train, measure, govern; docs/env.md "One growth step, two drivers") and does the rest: the config,
asking the controller after every epoch, the event log, the metrics, checkpoints, resume and the
progress bar.

A run directory holds ``config.yaml``, ``events.jsonl`` (typed events), ``metrics.jsonl`` and
``metrics.csv`` (one row per epoch), ``checkpoints/step_*`` (safetensors + manifest) and
``summary.json``. `grow` resumes bit-identically from the latest checkpoint with ``resume=True``.

With ``RunConfig.sculpt`` set, the run ends with Emrakul: once its epochs are done it sculpts the
grown network (`esper_fn.sculpt`, measured on the validation split; a `Sculpted` event) and
fine-tunes it for ``sculpt_epochs`` more epochs of the same growth step, without growth decisions.
`sculpt_run` (``esper-fn sculpt RUN_DIR``) adds that phase to a finished run.

Randomness: the run seed is split into independent streams for host init, data order and seed init
(`esper_fn.episode.rng_streams`), so runs with different controllers on one seed train on the same
batches in the same order. Checkpoints save every stream.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from . import _blueprint as bpm
from . import _host, karn
from . import blueprints as _catalogue  # noqa: F401  (registers the built-in blueprints)
from ._errors import (CheckpointError, ConfigError, EsperError, NonFiniteCheckpointError, RunDirError, RunExistsError,
                      RunWriteError)
from ._lifecycle import Stage
from ._state import State
from .checkpoint import CheckpointManager
from .controllers import Controller, FixedSchedule, Plateau, PlateauConfig, Recipe, Static, observe
from .episode import (
    RNG_STREAMS,
    Episode,
    GovernorConfig,
    Rules,
    chance_margin,
    episode_from_tensors,
    episode_to_tensors,
    governor_verdict,
    never_left_chance,
    rng_streams,
    standard_init,
    start,
    step,
    stream_seed,
)
from .emrakul import SculptReport, sculpt
from .events import (CheckpointSaved, EpochMetrics, EventLog, Fossilized, Germinated, GrowthBlocked, Resumed,
                     read_events)
from .optim import adam
from .tasks import Task, load
from .training import TrainConfig, evaluate

__all__ = [
    "RNG_STREAMS",
    "GovernorConfig",
    "RunConfig",
    "RunSummary",
    "SculptSummary",
    "governor_verdict",
    "grow",
    "load_config",
    "make_controller",
    "offer_generated",
    "read_run_config",
    "read_yaml_config",
    "validate_config",
    "never_left_chance",
    "param_budget",
    "restore_run",
    "rng_streams",
    "sculpt_run",
    "standard_init",
    "stream_seed",
]

class RunConfig(BaseModel):
    """Everything a run needs; YAML files and CLI flags fill it (unknown keys are errors).

    Attributes:
        task: "mnist1d", "mnist1d-seq", "digits" or "spirals".
        host: a host preset (`esper_fn.hosts.hosts()`), e.g. "mlp-impaired", "cnn-impaired".
        controller: "static", "schedule", "heuristic", a fixed recipe
            "recipe:<position>-<kind or blueprint id>-<at %>" (`esper_fn.controllers.Recipe`, e.g.
            "recipe:input-karn_conv1d_k7_d2_c4@1.0.0-0": graft that generated blueprint on the input
            before the first epoch), or "tamiyo" (the shipped learned controller,
            `esper_fn.policies.SHIPPED_WEIGHTS`) or "tamiyo:PATH" (Tamiyo weights written by
            ``esper-fn train-tamiyo``). `grow` builds all but Tamiyo itself (`make_controller`); a
            learned controller lives outside the core and is handed to `grow` by the caller
            (``esper-fn grow`` builds it with `esper_fn.envs.tamiyo_controller`; docs/tamiyo.md).
        epochs: the epoch budget.
        seed: the run seed, in [-2**63, 2**64 - 1] (what `torch.Generator.manual_seed` takes); host
            init, data order and seed init each draw from their own stream derived from it
            (`rng_streams`). It also chooses the task's validation split.
        lr: Adam learning rate of the host; seed_lr: of the seeds (default: lr). Both > 0; no float
            of a run config may be NaN or infinite.
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
            germination and the run id; and the generated blueprints it keeps (``esper-fn karn``'s
            winners) are registered first (`esper_fn.karn.load`), so the run can grow them. None:
            nothing is stored.
        device: where the run's task and state live ("cpu", "cuda", "cuda:1"); weights and data
            orders are drawn on the CPU streams, so a seed starts the same run on every device.
        sculpt: end the run with Emrakul: after `epochs`, shrink the network to at most ``floor(sculpt
            x`` its parameters``)`` by removing the hidden units (of fossilized seeds and host layers)
            whose measured contribution on the validation split per parameter is lowest
            (`esper_fn.sculpt`), then fine-tune. None: no sculpt.
        sculpt_epochs: epochs of fine-tuning after the sculpt (the growth step with no decisions; the
            optimizer state of what remains carries over). 0 replaces the last checkpoint with the
            sculpted network.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    task: str = "mnist1d"
    host: str = "mlp-impaired"
    controller: str = "heuristic"
    epochs: int = Field(default=200, ge=1)
    seed: int = Field(default=0, ge=-(2**63), le=2**64 - 1)
    lr: float = Field(default=1e-2, gt=0)
    seed_lr: float | None = Field(default=None, gt=0)
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
    sculpt: float | None = Field(default=None, gt=0, le=1)
    sculpt_epochs: int = Field(default=10, ge=0)
    device: str = "cpu"

    @field_validator("device")
    @classmethod
    def _device_name(cls, v: str) -> str:
        try:
            torch.device(v)
        except (RuntimeError, ValueError):
            raise ValueError(f"{v!r} is not a device: use cpu, cuda or cuda:<index>; closest valid value: cpu") from None
        return v

    @field_validator("controller")
    @classmethod
    def _known_controller(cls, v: str) -> str:
        if v in ("static", "schedule", "heuristic", "tamiyo") or (v.startswith("tamiyo:") and len(v) > 7):
            return v
        if v.startswith("recipe:"):
            Recipe.parse(v)  # a ConfigError (a ValueError) names what is malformed
            return v
        import difflib

        close = difflib.get_close_matches(v, ["static", "schedule", "heuristic", "tamiyo"], n=1)
        raise ValueError(f"unknown controller {v!r}: use static, schedule, heuristic, "
                         "recipe:<position>-<kind or blueprint id>-<at %>, tamiyo (the shipped policy) or tamiyo:PATH "
                         "(Tamiyo weights from `esper-fn train-tamiyo`)"
                         + (f"; closest valid value: {close[0]}" if close else ""))


class SculptSummary(BaseModel):
    """The sculpt at the end of a run (`RunConfig.sculpt`).

    Attributes:
        epoch: the epoch after which it sculpted.
        fine_tune_epochs: epochs trained after it.
        test_accuracy_before, test_loss_before: the unsculpted network's, on the test split
            (reported only; the sculpt measured on the validation split).
        report: what `esper_fn.sculpt` did (parameters, units per target, the change it measured on
            the validation split before fine-tuning).
    """

    model_config = ConfigDict(extra="forbid")

    epoch: int
    fine_tune_epochs: int
    test_accuracy_before: float
    test_loss_before: float
    report: SculptReport


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
        moved_aside: where ``overwrite=True`` moved the run that was in the directory, or None.
        sculpt: the sculpt that ended the run (`RunConfig.sculpt`), or None; then `test_accuracy`
            and `params_after` are the sculpted, fine-tuned network's.
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
    moved_aside: str | None = None
    sculpt: SculptSummary | None = None


def load_config(path: str | Path | None = None, *, base: Mapping | None = None, **overrides) -> RunConfig:
    """Read a YAML run config and apply overrides (None values are ignored).

    Args:
        path: a YAML file of `RunConfig` keys, or None.
        base: keys applied before the file's (e.g. a run directory's ``config.yaml`` on resume).
        overrides: keys applied last (the command-line flags); a key that is None is left alone.

    Raises:
        ConfigError: unreadable or malformed YAML (with ``file:line:col``), or an unknown or invalid
            key: one line naming the key, what is wrong, the value given and the closest valid
            value or key where there is one.
    """
    data: dict = dict(base or {})
    if path is not None:
        data.update(read_yaml_config(Path(path)))
    given = {k: v for k, v in overrides.items() if v is not None}
    data.update(given)
    return validate_config(data, RunConfig, where=str(path) if path is not None else "",
                     flags=set(given) - set(read_yaml_config(Path(path)) if path is not None else {}))


def read_yaml_config(path: str | Path) -> dict:
    """A YAML mapping from a file.

    Raises:
        ConfigError: the file cannot be read, is not YAML (``file:line:col`` of the problem), or is
            not a mapping.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}.") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        before = data[: e.start].decode("utf-8", errors="replace")
        line, col = before.count("\n") + 1, len(before) - before.rfind("\n")
        raise ConfigError(f"{path}:{line}:{col}: not UTF-8 text (byte {data[e.start:e.start + 1]!r}); save the config "
                          "as UTF-8.") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: YAML syntax error: {problem}.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of keys to values, got {type(data).__name__}.")
    return data


def validate_config(data: dict, model: type[BaseModel], where: str = "", flags: set[str] = frozenset()):
    """Validate `data` as `model`; every problem becomes a one-line `ConfigError` (keys given as
    command-line flags are named as flags, ``--param-budget``)."""
    import difflib

    from pydantic import ValidationError

    def name(key: str) -> str:
        top = key.split(".")[0]
        return f"--{key.replace('_', '-')}" if top in flags and "." not in key else key

    def check_keys(d: dict, m: type[BaseModel], prefix: str):
        for k, v in d.items():
            if k not in m.model_fields:
                close = difflib.get_close_matches(str(k), list(m.model_fields), n=1)
                hint = f"; did you mean {prefix}{close[0]!r}?" if close else f"; valid keys: {sorted(m.model_fields)}"
                raise ConfigError(f"{where + ': ' if where else ''}unknown key {prefix}{k!r}{hint}")
            ann = m.model_fields[k].annotation
            if isinstance(v, dict) and isinstance(ann, type) and issubclass(ann, BaseModel):
                check_keys(v, ann, f"{prefix}{k}.")

    check_keys(data, model, "")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError((f"{where}: " if where else "") + "; ".join(_one_line(err, name) for err in e.errors())) from None


def _one_line(err: Mapping, name) -> str:
    """One pydantic error as ``key: what is wrong (got value)[; closest valid value: v]``."""
    key = ".".join(str(p) for p in err["loc"])
    msg, _, closest = err["msg"].removeprefix("Value error, ").partition("; closest valid value: ")
    given = err.get("input")
    out = f"{name(key)}: {msg[0].lower() + msg[1:] if msg else msg} (got {given!r})"
    ctx = err.get("ctx") or {}
    if not closest and isinstance(given, (int, float)) and not isinstance(given, bool):
        for bound in ("ge", "le", "gt", "lt"):
            v = ctx.get(bound)
            if v is None:
                continue
            if bound in ("ge", "le"):
                closest = str(v)
            elif isinstance(v, int) and isinstance(given, int):  # an integer field: the next integer
                closest = str(v + 1 if bound == "gt" else v - 1)
            break
    return out + (f"; closest valid value: {closest}" if closest else "")


def param_budget(config: RunConfig, host_params: int) -> int | None:
    """The run's parameter budget: `RunConfig.param_budget` if set, else ``floor(param_budget_ratio x
    host_params)``, else None (no budget)."""
    if config.param_budget is not None:
        return config.param_budget
    if config.param_budget_ratio is not None:
        budget = config.param_budget_ratio * host_params
        return math.floor(budget) if math.isfinite(budget) else None  # beyond any float: no budget
    return None




def offer_generated(config: RunConfig) -> None:
    """Register the generated blueprints a run may grow: the Karn winners its library keeps
    (`esper_fn.karn.load`) and any Karn blueprint its recipe or preinstall names (an id is its whole
    definition, `esper_fn.karn.blueprint`).

    Raises:
        BlueprintError: a malformed Karn id, or a kept winner generated by other family code.
        ConfigError: the recipe names a blueprint that is not registered.
    """
    if config.library is not None:
        from .urza import Library

        karn.load(Library(config.library))
    named = [(f"preinstall [{slot}, {bid}]", bid) for slot, bid in config.preinstall]
    if config.controller.startswith("recipe:"):
        named.append((f"controller {config.controller!r}", Recipe.parse(config.controller).blueprint))
    for where, bid in named:
        if bid is None:
            continue
        if karn.is_generated(bid):
            karn.blueprint(bid)
        elif bpm.resolve(bid) is None:
            raise ConfigError(f"{where}: unknown blueprint {bid!r} (not registered); see `esper-fn blueprints`.")


def make_controller(config: RunConfig) -> Controller:
    """The core controller a config names: static, schedule, heuristic or a recipe.

    Raises:
        ConfigError: the config names a learned controller ("tamiyo..."): the core does not build
            those; `esper_fn.envs.tamiyo_controller(config)` does (pass it to `grow` as ``controller=``).
    """
    if config.controller.startswith("tamiyo"):
        raise ConfigError(f"controller {config.controller!r} is a learned policy, which the core does not build: pass "
                          "controller=esper_fn.envs.tamiyo_controller(config) to grow (the esper-fn command does).")
    if config.controller == "static":
        return Static()
    if config.controller.startswith("recipe:"):
        return Recipe.parse(config.controller)
    if config.controller == "schedule":
        return FixedSchedule(every=config.schedule_every, tempo=config.plateau.tempo,
                             incubate_epochs=config.plateau.incubate_epochs, hold_epochs=config.plateau.hold_epochs)
    return Plateau(config.plateau)


RUN_FILES: tuple[str, ...] = ("config.yaml", "checkpoints", "events.jsonl", "metrics.jsonl", "summary.json")
"""What makes a directory hold a run: any of these (`grow` refuses to write a second run over them)."""


def _holds_run(out: Path) -> list[str]:
    return [f for f in RUN_FILES if (out / f).exists()] if out.is_dir() else []


def _differences(a: RunConfig, b: RunConfig) -> str:
    """``key: x vs y`` for every differing (flattened) key of two configs."""
    fa, fb = _flat(a.model_dump()), _flat(b.model_dump())
    return ", ".join(f"{k}: {fa.get(k)!r} vs {fb.get(k)!r}" for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k))


def _flat(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def read_run_config(out: str | Path) -> RunConfig | None:
    """The config a run directory was started with (its ``config.yaml``), or None if it has none.

    Raises:
        ConfigError: the file is not a valid run config (naming the file and the problem).
    """
    path = Path(out) / "config.yaml"
    return load_config(path) if path.is_file() else None


def _move_aside(out: Path) -> Path:
    n = 1
    while (dest := out.with_name(f"{out.name}.old-{n}")).exists():
        n += 1
    out.rename(dest)
    return dest


def grow(
    config: RunConfig,
    out: str | Path,
    *,
    controller: Controller | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    on_epoch_start: Callable[[int, State], State] | None = None,
) -> RunSummary:
    """Run a morphogenetic training and write its run directory.

    Run directories are never mixed: a directory that already holds a run (any of `RUN_FILES`) is
    continued with ``resume=True``, moved aside with ``overwrite=True`` (to ``OUT.old-<n>``), or
    refused. Everything is checked before anything is written, so a refused call creates nothing.

    Args:
        config: the run configuration.
        out: run directory (created).
        controller: the controller (default `make_controller(config)`; a learned one must be passed).
        resume: continue the run in `out`: from its latest checkpoint without NaN or infinite values
            (later ones that hold some are skipped), or from epoch 0 when it stopped before its first
            checkpoint (a `Resumed` event says which, and what it skipped). `config` must be the
            run's (``out/config.yaml``, unedited since the run started).
        overwrite: move a run already in `out` aside first (to ``OUT.old-<n>``) and start afresh.
        progress: show a progress bar on stderr.
        on_epoch_start: ``f(epoch, state) -> state`` applied to the state an epoch trains from
            (fault injection: a corrupted state there is rolled back to the uncorrupted one).

    Returns:
        The summary, also written to ``out/summary.json``.

    Raises:
        ConfigError: an unknown host or controller; `out` is a file; it holds a run and neither
            `resume` nor `overwrite` is given (`RunExistsError`); `resume` with no run in `out`, or
            with a config that differs from the run's, or after ``config.yaml`` was edited.
        RunWriteError: the run directory cannot be written (e.g. a read-only file system).
        CheckpointError: a checkpoint to resume from is corrupt.
    """
    from tqdm import tqdm

    out = Path(out)
    t_start = time.perf_counter()
    if not _host.is_preset(config.host):
        raise ConfigError(f"unknown host {config.host!r}; presets are {sorted(_host.HOST_PRESETS)}, and any width of "
                          "the families mlp-w<W>, cnn1d-w<W>, cnn1d-shallow-w<W>, cnn2d-w<W>.")
    offer_generated(config)
    ctrl = controller if controller is not None else make_controller(config)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is an existing file; a run directory must be a directory: choose another --out.")
    found = _holds_run(out)
    if resume and not found:
        raise ConfigError(f"resume: {out} holds no run to resume (none of {list(RUN_FILES)}); start the run without "
                          "--resume.")
    if found and not resume and not overwrite:
        raise RunExistsError(f"{out} already holds a run ({', '.join(found)}); continue it with --resume, start this "
                             "run in another --out, or pass --overwrite to move the old run aside.")
    task = load(config.task, seed=config.seed, device=config.device)
    # Sized for the task's samples and classes; a host that cannot take them is a HostError here.
    host = _host.preset(config.host, input_shape=task.input_shape, n_classes=task.n_classes)
    rules = Rules(train=config.train, gates=ctrl.gates, governor=config.governor, lifecycle="auto",
                  inject=on_epoch_start)
    history: list[dict[str, float]] = []
    timing = {"train": 0.0, "telemetry": 0.0}
    flags: dict = {"growth_blocked": None, "growth_blocked_epoch": None}
    born: dict[str, int] = {}  # slot -> epoch its seed was germinated (for the library's record)
    restored = None
    resume_why = ""  # with no checkpoint to resume from: what the run found instead
    if resume:
        on_disk = read_run_config(out)
        ckpts = CheckpointManager(out / "checkpoints", max_to_keep=config.max_to_keep) if (
            out / "checkpoints").is_dir() else None
        steps = ckpts.steps() if ckpts is not None else []
        found_ckpt, skipped = _latest_episode(ckpts, task, host) if ckpts is not None else (None, [])
        # A step_* directory without a manifest is no checkpoint (a save never leaves one): it was damaged.
        after = found_ckpt[0].epoch if found_ckpt is not None else -1
        no_manifest = [n for n in _step_dirs(out / "checkpoints") if n not in steps and n > after]
        skipped = sorted([(n, f"non-finite values in {k}") for n, k in skipped]
                         + [(n, "no manifest.json") for n in no_manifest], reverse=True)
        if found_ckpt is not None:
            ep_restored, meta = found_ckpt
            saved = RunConfig.model_validate(meta["run"]["config"])
            if on_disk is not None and on_disk != saved:
                raise ConfigError(f"resume: config differs: {out / 'config.yaml'} was edited after the run started "
                                  f"({_differences(on_disk, saved)}; file vs run); restore it, or start a new run in "
                                  "another --out.")
            amend = config != saved and _only_sculpt_differs(config, saved)
            if config != saved and not amend:
                raise ConfigError(f"resume: config differs from the run's ({_differences(config, saved)}; given vs "
                                  f"run); resume with the run's config (a bare `esper-fn grow --resume --out {out}` "
                                  "reads its config.yaml).")
            if amend:
                why = _why_no_sculpt(ep_restored, meta["run"]["flags"])
                if why is not None:
                    raise ConfigError(f"resume: {out} {why}; the sculpt settings of a run (--sculpt, --sculpt-epochs) "
                                      "change only once its epochs are done and before it is sculpted.")
            restored = (ep_restored, meta["run"], _resumed_log(out, ckpts, ep_restored.epoch, meta["run"], skipped))
        elif on_disk is not None and config != on_disk:
            raise ConfigError(f"resume: config differs from the run's ({_differences(config, on_disk)}; given vs run); "
                              f"resume with the run's config (a bare `esper-fn grow --resume --out {out}` reads its "
                              "config.yaml).")
        elif skipped:
            resume_why = ("no usable checkpoint (" + ", ".join(f"step_{n:08d}: {k}" for n, k in skipped)
                          + "); started again from epoch 0")
    if restored is None:  # a new run: built before anything is written, so a run that cannot start writes nothing
        run_id = f"{out.name}-{uuid.uuid4().hex[:8]}"
        optimizer = adam({"host": config.lr, "seeds": config.seed_lr or config.lr})
        ep = start(task, host, seed=config.seed, optimizer=optimizer, max_epochs=config.epochs,
                   preinstall=config.preinstall, run_id=run_id)
        ep = replace(ep, param_budget=param_budget(config, ep.params0))
    library = None
    if config.library is not None:
        from .urza import Library

        library = Library(config.library)
    try:
        moved = _move_aside(out) if overwrite and found and not resume else None
        out.mkdir(parents=True, exist_ok=True)
        for f in RUN_LOGS:  # leftovers of a write a crash interrupted (`_write_atomic`)
            for tmp in out.glob(f".tmp-{f}-*"):
                tmp.unlink()
        if restored is not None:
            ep, run, (kept, metrics_rows) = restored
            run_id, history, timing, flags = run["run_id"], run["history"], run["timing"], run["flags"]
            if config != RunConfig.model_validate(run["config"]):  # a finished run given its sculpt settings
                _write_atomic(out / "config.yaml", yaml.safe_dump(json.loads(config.model_dump_json()), sort_keys=False))
            born = {e.slot: e.epoch for e in kept if isinstance(e, Germinated)}
            _write_atomic(out / "metrics.jsonl", metrics_rows)
            _write_atomic(out / "events.jsonl", "".join(e.model_dump_json() + "\n" for e in kept))
        else:
            # config.yaml first: a crash never leaves a run directory without its config.
            _write_atomic(out / "config.yaml", yaml.safe_dump(json.loads(config.model_dump_json()), sort_keys=False))
            for f in ("events.jsonl", "metrics.jsonl", "summary.json", "metrics.csv"):
                (out / f).unlink(missing_ok=True)
            if resume:  # a run that stopped before its first checkpoint starts again from epoch 0
                with EventLog(out / "events.jsonl") as first:
                    first.append(Resumed(run_id=run_id, epoch=0, from_step=0, skipped=[n for n, _ in skipped],
                                         reason=resume_why or "the run stopped before its first checkpoint; started "
                                                              "again from epoch 0"))
        ckpts = CheckpointManager(out / "checkpoints", max_to_keep=config.max_to_keep)
        log = EventLog(out / "events.jsonl", drop_truncated_tail=True)
        metrics_log = (out / "metrics.jsonl").open("a")
        n_events = len(read_events(out / "events.jsonl"))
    except EsperError:
        raise
    except OSError as e:
        raise _write_error(out, e) from None
    # wall time of the processes before this one (a resumed or sculpted run): the summary's wall time
    # covers the whole run, as its train and telemetry times do
    wall_before = float(timing.pop("wall", 0.0))
    bar = tqdm(total=ep.max_epochs, initial=ep.epoch, disable=not progress, desc=f"grow {config.host}", unit="ep",
               dynamic_ncols=True)

    def emit(event) -> None:
        nonlocal n_events
        log.append(event)
        n_events += 1

    def save_checkpoint(ep: Episode) -> None:
        metrics_log.flush()
        run = {"config": json.loads(config.model_dump_json()), "run_id": run_id, "history": history,
               "timing": {**timing, "wall": wall_before + time.perf_counter() - t_start}, "flags": flags,
               "n_events": n_events}
        tensors, ep_meta = episode_to_tensors(ep)
        path = ckpts.save(ep.epoch, tensors, {**ep_meta, "run": run}, overwrite=True)
        emit(CheckpointSaved(run_id=run_id, epoch=ep.epoch, step=ep.epoch, path=str(path)))

    def sculpt_now(ep: Episode) -> Episode:
        """Emrakul at the end of the run: sculpt on the validation split, then `sculpt_epochs` more."""
        before = evaluate(ep.state, task.x_test, task.y_test)  # reported only
        state, report = sculpt(ep.state, keep=config.sculpt, data=task.split("val"))
        emit(report.event(run_id, ep.epoch))
        flags["sculpt"] = SculptSummary(epoch=ep.epoch, fine_tune_epochs=config.sculpt_epochs,
                                        test_accuracy_before=before["accuracy"], test_loss_before=before["loss"],
                                        report=report).model_dump(mode="json")
        ep = replace(ep, state=state, max_epochs=ep.epoch + config.sculpt_epochs,
                     counts=replace(ep.counts, sculpted=ep.counts.sculpted + 1))
        bar.total = ep.max_epochs
        bar.refresh()
        if config.sculpt_epochs == 0:
            save_checkpoint(ep)
        return ep

    try:
        while True:
            if ep.done:
                if config.sculpt is None or flags.get("sculpt") is not None or ep.stopped is not None:
                    break
                ep = sculpt_now(ep)
                continue
            t0 = time.perf_counter()
            actions = [] if flags.get("sculpt") is not None else ctrl.decide(observe(ep, ctrl.gates))  # fine-tuning: none
            if ctrl.blocked is not None and flags["growth_blocked"] is None and flags.get("sculpt") is None:
                flags["growth_blocked"], flags["growth_blocked_epoch"] = ctrl.blocked, ep.epoch
                emit(GrowthBlocked(run_id=run_id, epoch=ep.epoch, reason=ctrl.blocked, budget=ep.param_budget or 0,
                                   params=ep.state.num_params()))
            control = time.perf_counter() - t0
            (new,), (events,) = step([ep], [actions], rules)
            for e in events:
                if isinstance(e, Germinated):
                    born[e.slot] = e.epoch
                elif isinstance(e, Fossilized) and library is not None:  # stored once the fossilize succeeded
                    library.store_seed(ep.state, e.slot, fate="FOSSILIZED", host=config.host, task=config.task,
                                       contribution=e.contribution, run_id=run_id,
                                       epochs=e.epoch - born[e.slot] if e.slot in born else None)
                emit(e)
            ep = new
            m = {**ep.metrics, "epoch": ep.epoch}
            timing["train"] += m["time/train"]
            timing["telemetry"] += m["time/telemetry"]
            if ep.rolled_back:
                m = {"epoch": ep.epoch, "rolled_back": 1.0}
            else:
                m["time/control"] = control
                emit(EpochMetrics(run_id=run_id, epoch=ep.epoch, metrics={k: float(v) for k, v in m.items()}))
            metrics_log.write(json.dumps(m) + "\n")
            history.append(m)
            bar.update(1)
            bar.set_postfix(val=f"{ep.metrics['val_accuracy']:.3f}", params=ep.state.num_params(),
                            seeds=" ".join(f"{n}:{ep.state.stage(n).name[:4]}" for n in ep.state.slot_names
                                           if ep.state.stage(n) != Stage.DORMANT) or "-")
            if ep.done or ep.epoch % config.checkpoint_every == 0:
                save_checkpoint(ep)
    except EsperError:
        raise
    except OSError as e:
        raise _write_error(out, e) from None
    finally:
        bar.close()
        metrics_log.close()
        log.close()
    state = ep.state
    test = evaluate(state, task.x_test, task.y_test)
    threshold = 1.0 / task.n_classes + 3 * chance_margin(config.governor, task.n_classes, int(task.y_val.shape[0]))
    stuck = ep.stuck_at_chance_epoch is not None and all(h["val_accuracy"] <= threshold for h in ep.good)
    c = ep.counts
    summary = RunSummary(
        run_id=run_id, epochs=ep.epoch, test_accuracy=test["accuracy"], test_loss=test["loss"],
        best_val_accuracy=max((h.get("val_accuracy", 0.0) for h in history), default=0.0),
        params_before=ep.params0, params_after=state.num_params(), germinated=c.germinated, fossilized=c.fossilized,
        pruned=c.pruned, rollbacks=c.rollbacks, wall_seconds=wall_before + time.perf_counter() - t_start,
        train_seconds=timing["train"], telemetry_seconds=timing["telemetry"], stopped=ep.stopped,
        param_budget=ep.param_budget, growth_blocked=flags["growth_blocked"],
        growth_blocked_epoch=flags["growth_blocked_epoch"], stuck_at_chance=stuck,
        stuck_at_chance_epoch=ep.stuck_at_chance_epoch, moved_aside=str(moved) if moved else None,
        sculpt=SculptSummary.model_validate(flags["sculpt"]) if flags.get("sculpt") else None,
    )
    try:
        _write_csv(out / "metrics.csv", history)
        _write_atomic(out / "summary.json", summary.model_dump_json(indent=2))
    except OSError as e:
        raise _write_error(out, e) from None
    return summary


RUN_LOGS = ("config.yaml", "events.jsonl", "metrics.jsonl", "summary.json", "metrics.csv")


def _write_atomic(path: Path, text: str) -> None:
    """Replace `path` by `text` with one rename: a crash leaves the old file or the new one, never a
    cut one (a leftover ``.tmp-<name>-*`` at worst, removed by the next `grow`)."""
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        with tmp.open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _step_dirs(directory: Path) -> list[int]:
    """Steps of every ``step_*`` directory in a checkpoint directory, with a manifest or not."""
    if not directory.is_dir():
        return []
    return sorted(int(m.group(1)) for p in directory.iterdir() if (m := re.fullmatch(r"step_(\d{8,})", p.name)))


def _resumed_log(out: Path, ckpts: CheckpointManager, epoch: int, run: Mapping,
                 skipped: list[tuple[int, str]]) -> tuple[list, str]:
    """The event log and the metrics rows a resume from checkpoint `epoch` writes, read and checked
    before anything is written.

    The events the interrupted run logged after the checkpoint are dropped (the resumed run redoes
    them), a checkpoint_saved event lost to a crash just after the checkpoint landed is put back, and
    a `Resumed` event says where the run continues from, which checkpoints it skipped, and which
    events were lost when events.jsonl was cut short or deleted.

    Raises:
        EventLogError: a line of events.jsonl other than a cut-off last one is not an event.
        ConfigError: events.jsonl holds events of another run.
    """
    path, n, run_id = out / "events.jsonl", run["n_events"], run["run_id"]
    logged = read_events(path, skip_truncated_tail=True) if path.is_file() else []
    kept = logged[:n]
    foreign = sorted({e.run_id for e in kept} - {run_id})
    if foreign:
        raise ConfigError(f"resume: {path} holds events of another run ({', '.join(foreign)}; the checkpoints are run "
                          f"{run_id}): the directory mixes two runs; put back the run's own events.jsonl, or start a "
                          "new run in another --out.")
    kept.append(CheckpointSaved(run_id=run_id, epoch=epoch, step=epoch, path=str(ckpts.step_dir(epoch))))
    why = f"continued from checkpoint {ckpts.step_dir(epoch).name}"
    if skipped:
        why += "; skipped the later checkpoint(s) " + ", ".join(f"{ckpts.step_dir(s).name} ({k})" for s, k in skipped)
    if len(logged) < n:
        how = "was cut short" if path.is_file() else "was missing"
        why += (f"; {path.name} {how}: it held {len(logged)} of the {n} events logged up to this checkpoint, the other "
                f"{n - len(logged)} are lost")
    kept.append(Resumed(run_id=run_id, epoch=epoch, from_step=epoch, skipped=[s for s, _ in skipped], reason=why))
    return kept, "".join(json.dumps(h) + "\n" for h in run["history"])


def _latest_episode(ckpts: CheckpointManager, task, host) -> tuple[tuple[Episode, dict] | None, list]:
    """The episode (and metadata) of the latest checkpoint without NaN or infinite values, verified,
    and the later checkpoints skipped for holding some (``[(step, key), ...]``); None if there is none.

    Raises:
        CheckpointError: a checkpoint is corrupt, or every one holds non-finite values.
    """
    skipped: list[tuple[int, str | None]] = []
    for step_no in reversed(ckpts.steps()):
        tensors, meta = ckpts.restore(step_no)
        try:
            return (episode_from_tensors(task, host, tensors, meta), meta), skipped
        except NonFiniteCheckpointError as err:  # diverged just before it was saved: try an earlier one
            skipped.append((step_no, err.key))
    if skipped:
        raise CheckpointError(f"every checkpoint in {ckpts.directory} holds non-finite values "
                              f"({', '.join(f'step {n}: {k}' for n, k in skipped)}); start the run again in a new "
                              "--out.")
    return None, skipped


def restore_run(out: str | Path) -> tuple[RunConfig, Task, Episode]:
    """A run directory's config, task and latest episode (its latest checkpoint without NaN or
    infinite values, verified against the host and blueprints), e.g. to evaluate or sculpt it.

    Raises:
        RunDirError: `out` holds no run checkpoint.
        CheckpointError: its checkpoints are corrupt or all non-finite.
    """
    out = Path(out)
    config = read_run_config(out) if out.is_dir() else None
    if config is None or not (out / "checkpoints").is_dir():
        raise RunDirError(f"{out} is not a run directory with checkpoints (it lacks config.yaml or checkpoints/).")
    task = load(config.task, seed=config.seed, device=config.device)
    host = _host.preset(config.host, input_shape=task.input_shape, n_classes=task.n_classes)
    found, _ = _latest_episode(CheckpointManager(out / "checkpoints"), task, host)
    if found is None:
        raise RunDirError(f"{out} holds no checkpoint yet; resume the run (`esper-fn grow --resume --out {out}`).")
    ep, meta = found
    return RunConfig.model_validate(meta["run"]["config"]), task, ep


def _only_sculpt_differs(config: RunConfig, saved: RunConfig) -> bool:
    """Whether two configs differ in their sculpt settings only."""
    same = {"sculpt": None, "sculpt_epochs": 0}
    return config.model_copy(update=same) == saved.model_copy(update=same)


def _why_no_sculpt(ep: Episode, flags: Mapping) -> str | None:
    """Why a run's sculpt settings cannot change now, or None (its epochs are done, it did not stop
    early, and it has not been sculpted)."""
    if flags.get("sculpt") is not None:
        return "was sculpted already (a Sculpted event in its log)"
    if ep.stopped is not None:
        return f"stopped early ({ep.stopped})"
    if not ep.done:
        return (f"is not finished (epoch {ep.epoch} of {ep.max_epochs}): finish it first with `esper-fn grow --resume "
                "--out DIR`")
    return None


def sculpt_run(out: str | Path, *, keep: float, fine_tune_epochs: int = 10, controller: Controller | None = None,
               progress: bool = True) -> RunSummary:
    """Sculpt a finished run in its directory (``esper-fn sculpt RUN_DIR``): what ``esper-fn grow
    --sculpt KEEP --sculpt-epochs K`` does at the end of a run, added afterwards.

    The run's latest checkpoint is restored (verified: `CheckpointManager`), the network sculpted to
    at most ``floor(keep x`` its parameters``)`` on the validation split (`esper_fn.sculpt`; a
    `Sculpted` event) and fine-tuned for `fine_tune_epochs` epochs of the growth step without
    decisions; the run's config gains ``sculpt`` and ``sculpt_epochs`` (config.yaml is rewritten),
    its log the events and epochs, and a new checkpoint and ``summary.json`` (with ``sculpt``: the
    test accuracy before, the report) are written. The same run continues: its id, its random
    streams, its directory; a sculpted run resumes (``esper-fn grow --resume``) like any other.

    Args:
        out: the run directory.
        keep: the fraction of the network's parameters to keep, in (0, 1].
        fine_tune_epochs: epochs to train after the sculpt (>= 0; 0 replaces the last checkpoint
            with the sculpted network).
        controller: the run's controller, for its gates (default `make_controller` of the run's
            config; a learned one must be passed, as for `grow`).
        progress: show a progress bar.

    Raises:
        RunDirError: `out` is not a run directory.
        ConfigError: keep or fine_tune_epochs out of range; the run is not finished, stopped early,
            or was sculpted already.
        CheckpointError: its checkpoint is corrupt.
        SculptError: nothing in the network can be sculpted, or not down to `keep`.
    """
    out = Path(out)
    if not (out / "config.yaml").is_file() or not (out / "checkpoints").is_dir():
        raise RunDirError(f"{out} is not a run directory (it lacks config.yaml or checkpoints/); give the --out of a "
                          "finished `esper-fn grow`.")
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise ConfigError(f"--keep: the fraction of the network's parameters to keep must lie in (0, 1] "
                          f"(got {keep!r}); e.g. 0.8 removes at least 20%.")
    if isinstance(fine_tune_epochs, bool) or not isinstance(fine_tune_epochs, int) or fine_tune_epochs < 0:
        raise ConfigError(f"--fine-tune-epochs: input should be greater than or equal to 0 (got {fine_tune_epochs!r}); "
                          "closest valid value: 0")
    config = read_run_config(out)
    new = config.model_copy(update={"sculpt": float(keep), "sculpt_epochs": fine_tune_epochs})
    if controller is None and not config.controller.startswith("tamiyo"):
        controller = make_controller(config)
    return grow(RunConfig.model_validate(new.model_dump()), out, controller=controller, resume=True, progress=progress)


def _write_error(out: Path, e: OSError) -> RunWriteError:
    where = f" ({e.filename})" if e.filename else ""
    return RunWriteError(f"cannot write the run directory {out}: {e.strerror or e}{where}; choose a writable --out.")


def _write_csv(path: Path, history: list[dict[str, float]]) -> None:
    keys: list[str] = []
    for h in history:
        keys.extend(k for k in h if k not in keys)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for h in history:
            w.writerow(h)
