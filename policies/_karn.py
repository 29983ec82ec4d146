"""Karn's search: Optuna's TPE sampler over the blueprint families of `esper_fn.karn`, every trial
played through the growth env on a suite's train split by the bench harness (`esper_fn.policies._bench`).

A **trial** draws a family, its parameters and a placement (the raw input, the first or the last
hidden slot), which give a generated blueprint B and the fixed policy
``recipe:<placement>-<B>-0``: graft B there before the first epoch (a*'s timing) where the
instance's budget leaves room for it, then let the env's gates advance it and fossilize or prune it
(`esper_fn.controllers.Recipe`). The policy plays every instance of the train split on every
training seed, as a job of the bench harness (`run_jobs`: one env per instance, its rows the seeds,
the suite's env settings with B added to the action space; finished jobs are kept in ``OUT/jobs``
and never rerun). Its **value** is the a* rule of the benchmark (`astar`: final validation accuracy,
the mean over seeds per instance, then over instances), minus ``param_penalty x (params / host
params - 1)`` (same weighting; 0 by default). Test accuracy is never read.

**Reproducible for a seed**: trial n (failed trials not counted) asks a fresh `TPESampler` seeded
from (seed, n), so the proposals depend only on the seed and the trials before, also across an
interrupted and resumed search; the episodes are deterministic given their run seeds. A proposal of
a point measured already is answered with its value (a repeat, not rerun); `trials` counts distinct
points, and `max_repeats` repeats in a row end the search early (converged).

**What the library records** (`esper_fn.urza.Library`): before the first trial, the outcomes an
earlier search or catalogue evaluation recorded on the same runs (same instances, seeds and settings:
`context_key`) enter the study as completed trials (priors that TPE learns from without rerunning
them), and the `warm_start` family points with the best contribution per added parameter among the
stored seeds and recorded outcomes (`esper_fn.karn.evidence`) are enqueued as the first trials. Every
trial's outcome (validation accuracy, contribution over the static host on the same runs, parameters
added) is recorded there in turn, and the winner is kept (`esper_fn.karn.persist`) with its
Tezzeret characterisation at the slots it is grafted at.

`karn_catalogue` scores every catalogue blueprint at every placement by the same rule on the same
runs; `karn_compare` plays the winner and the catalogue's best on the test split's instances and
evaluation seeds and reports their difference paired by (instance, seed) (`difference`).

Run directory (``esper-fn karn --out DIR``)::

    karn.json        the config, the study's name and context, the winner and its score
    study.sqlite3    the Optuna study (RDB storage): a rerun with the same config resumes it
    trials.csv/json  one row per trial: source, family, parameters, placement, blueprint, value,
                     validation accuracy, parameters, contribution, Tezzeret costs, seconds
    jobs/            the harness's job records (RunRecord CSVs)
    library/         the seed library (default; --library elsewhere)
    catalogue.csv/json, compare/ (jobs), compare.md/json   from karn_catalogue and karn_compare
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from esper_fn import karn
from esper_fn._errors import BlueprintError, ConfigError
from esper_fn.bench import Instance, Suite, suite as get_suite
from esper_fn.controllers import Recipe

from ._bench import Job, run_jobs
from ._bench_stats import astar, difference, read_runs
from ._eval import RunRecord, mean_ci

__all__ = ["KarnConfig", "Score", "context_key", "karn_catalogue", "karn_compare", "karn_search", "score"]

CONFIG_FILE = "karn.json"
STUDY_FILE = "study.sqlite3"
STATIC = "static"


class KarnConfig(BaseModel):
    """What a search is: written to ``OUT/karn.json``; a rerun into the same directory must agree
    (only `trials` may grow, which continues the search).

    Attributes:
        suite: a registered suite (`esper_fn.bench.SUITES`).
        split: the split trials run on: "train" (the search chooses, so it never sees the test split).
        trials: distinct points to evaluate (priors from the library do not count, nor do proposals
            of a point measured already: those are answered with its value, not rerun, and recorded
            as repeats).
        seed: the sampler's seed.
        train_seeds: the run seeds every trial plays (contiguous).
        families: the `esper_fn.karn.FAMILIES` searched.
        param_penalty: the value is validation accuracy minus this x (params / host params - 1).
        warm_start: how many of the library's best points (contribution per parameter) to enqueue.
        startup_trials: TPE's random startup trials (`TPESampler.n_startup_trials`).
        characterise_repeats: Tezzeret's timed repeats per latency of each trial's blueprint.
        at: when the recipe germinates, as a fraction of the horizon (a*'s 0: before epoch 1).
        max_repeats: the search stops early (converged) when TPE proposes this many points in a row
            that were measured already.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    suite: str = "growthbench-v1"
    split: str = "train"
    trials: int = Field(ge=1)
    seed: int = 0
    train_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    families: tuple[str, ...] = tuple(karn.FAMILIES)
    param_penalty: float = Field(default=0.0, ge=0)
    warm_start: int = Field(default=3, ge=0)
    startup_trials: int = Field(default=8, ge=0)
    characterise_repeats: int = Field(default=10, ge=1)
    at: float = Field(default=0.0, ge=0, lt=1)
    max_repeats: int = Field(default=50, ge=1)

    @field_validator("split")
    @classmethod
    def _train_only(cls, v: str) -> str:
        if v != "train":
            raise ValueError(f"the search chooses blueprints, so it runs on the train split only (got {v!r}); the test "
                             "split is for karn_compare (esper-fn karn-compare)")
        return v

    @field_validator("train_seeds")
    @classmethod
    def _contiguous(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or list(v) != list(range(v[0], v[0] + len(v))):
            raise ValueError(f"train_seeds must be contiguous and increasing, like 0-4; got {list(v)}")
        return v

    @field_validator("families")
    @classmethod
    def _known(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [f for f in v if f not in karn.FAMILIES]
        if not v or bad or len(set(v)) != len(v):
            raise ValueError(f"families must be distinct names among {list(karn.FAMILIES)}; got {list(v)}")
        return v

    @classmethod
    def make(cls, **fields: Any) -> KarnConfig:
        """Validate, turning every problem into one `ConfigError` line."""
        try:
            return cls(**fields)
        except ValidationError as e:
            msg = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg'].removeprefix('Value error, ')}"
                            for err in e.errors())
            raise ConfigError(f"karn: {msg}") from None


class Score(NamedTuple):
    """One fixed policy scored on the train split.

    Attributes:
        value: the objective: `val_accuracy` - penalty x (`params_ratio` - 1).
        val_accuracy: the a* score (final validation accuracy, mean over seeds, then instances).
        params_ratio: final parameters over the host's, weighted the same way.
        added_params: final parameters minus the host's, weighted the same way (the cost).
        contribution: validation accuracy minus the static host's on the same runs, weighted the
            same way (None without static runs).
        params: final parameters, weighted the same way.
        runs: how many runs.
    """

    value: float
    val_accuracy: float
    params_ratio: float
    added_params: float
    contribution: float | None
    params: float
    runs: int


def _by_instance(records: Sequence[RunRecord], f: Callable[[RunRecord], float]) -> float:
    per: dict[str, list[float]] = {}
    for r in records:
        per.setdefault(r.instance, []).append(f(r))
    return sum(sum(v) / len(v) for v in per.values()) / len(per)


def score(records: Sequence[RunRecord], member: str, *, penalty: float = 0.0, static: str | None = STATIC) -> Score:
    """Score a fixed policy on the TRAIN split by the benchmark's a* rule (`astar` over this member
    alone), with its parameters and its contribution over `static` on the same (instance, seed).

    Raises:
        ConfigError: no train-split records of `member` (or `astar`'s errors).
    """
    _, table = astar(records, members=[member])
    mine = [r for r in records if r.controller == member and r.split == "train"]
    base = {(r.instance, r.seed): r for r in records if r.controller == static and r.split == "train"}
    ratio = _by_instance(mine, lambda r: r.params / r.params0)
    contribution = None
    if static is not None and all((r.instance, r.seed) in base for r in mine):
        contribution = _by_instance(mine, lambda r: r.val_accuracy - base[(r.instance, r.seed)].val_accuracy)
    return Score(table[member] - penalty * (ratio - 1), table[member], ratio,
                 _by_instance(mine, lambda r: r.params - r.params0), contribution,
                 _by_instance(mine, lambda r: r.params), len(mine))


def context_key(s: Suite, split: str, seeds: Sequence[int], at: float = 0.0) -> str:
    """What makes two outcomes comparable: the split's instances, the seeds, the suite's action space
    and the recipe's timing, hashed (16 hex digits)."""
    data = [s.name, [i.model_dump(mode="json") for i in s.split(split)], list(seeds), list(s.blueprints),
            list(s.tempos), s.num_slots, at]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# --- helpers ----------------------------------------------------------------------------------------------------


def _member(bid: str, placement: str, at: float) -> str:
    return Recipe(placement, bid, at).name


def _study_name(c: KarnConfig) -> str:
    return f"karn-{c.suite}-{c.split}-seed{c.seed}"


def _trial_seed(seed: int, number: int) -> int:
    return int(hashlib.sha256(f"esper_fn:karn:{seed}:{number}".encode()).hexdigest()[:8], 16)


def _make_env(env_factory: Callable[..., Any], s: Suite, extra: Sequence[str]):
    """The harness's ``make_env`` for a suite with `extra` blueprints in the action space (picklable
    when `env_factory` is, e.g. the env class)."""
    offered = tuple(dict.fromkeys((*s.blueprints, *extra)))
    return partial(env_factory, blueprints=offered, tempos=s.tempos, max_slots=s.num_slots)


def _play(members: Sequence[str], insts: Sequence[Instance], seeds: Sequence[int], make_env, out: Path,
          workers: int, progress: bool) -> list[RunRecord]:
    jobs = [Job(m, m, inst, tuple(seeds)) for m in members for inst in insts]
    files = run_jobs(jobs, make_env, out, workers=workers, progress=progress)
    return [r for f in files for r in read_runs(f)]


def _slot_at(host, placement: str):
    """The slot a recipe at `placement` grows at in `host` (`Recipe.slot`'s rule), or None."""
    slots = list(host.slots())
    hidden = slots[1:-1]
    if placement == "input":
        return slots[0]
    if not hidden:
        return None
    return hidden[0] if placement == "first" else hidden[-1]


def _specs(s: Suite, split: str, placement: str, load_task: Callable[[str], Any]) -> list[tuple[str, Any]]:
    """``[(instance name, slot spec at the placement or None)]`` for a split's instances."""
    import esper_fn as ef

    out = []
    for inst in s.split(split):
        task = load_task(inst.task)
        host = ef.hosts.preset(inst.host, input_shape=task.input_shape, n_classes=task.n_classes)
        out.append((inst.name, _slot_at(host, placement)))
    return out


def _characterise(bp, specs: Sequence[tuple[str, Any]], repeats: int) -> list:
    from esper_fn.tezzeret import characterise

    return [characterise(bp, spec, host=name, repeats=repeats) for name, spec in specs
            if spec is not None and bp.fits(spec)]


def _costs(chars: Sequence) -> dict[str, float | None]:
    if not chars:
        return {"param_delta": None, "flop_delta": None, "forward_ms": None, "expected_latency_ms": None}
    n = len(chars)
    return {"param_delta": sum(c.param_delta for c in chars) / n, "flop_delta": sum(c.flop_delta for c in chars) / n,
            "forward_ms": sum(c.forward_ms for c in chars) / n,
            "expected_latency_ms": sum(c.expected_latency_ms for c in chars) / n}


def _suggest(trial, families: Sequence[str]) -> tuple[karn.Family, dict[str, int | float], str]:
    """The define-by-run space: a family, then its parameters and placement (names prefixed by it)."""
    fam = karn.FAMILIES[trial.suggest_categorical("family", list(families))]
    values = {p.name: trial.suggest_categorical(f"{fam.name}.{p.name}", list(p.choices)) for p in fam.params}
    placement = trial.suggest_categorical(f"{fam.name}.placement", list(fam.placements))
    return fam, values, placement


def _point_params(fam: karn.Family, values: Mapping[str, Any], placement: str) -> dict[str, Any]:
    return {"family": fam.name, **{f"{fam.name}.{k}": v for k, v in values.items()}, f"{fam.name}.placement": placement}


def _distributions(fam: karn.Family, families: Sequence[str]) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution

    out = {"family": CategoricalDistribution(list(families))}
    out.update({f"{fam.name}.{p.name}": CategoricalDistribution(list(p.choices)) for p in fam.params})
    out[f"{fam.name}.placement"] = CategoricalDistribution(list(fam.placements))
    return out


def _read_config(out: Path) -> dict:
    path = out / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{out} holds no {CONFIG_FILE}: give the --out of an `esper-fn karn` search.")
    return json.loads(path.read_text())


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


TRIAL_COLUMNS = ("number", "state", "source", "family", "params", "placement", "blueprint", "value", "val_accuracy",
                 "params_ratio", "added_params", "params_mean", "contribution", "runs", "param_delta", "flop_delta",
                 "forward_ms", "expected_latency_ms", "seconds", "repeat_of")


def _first_measured(trials) -> dict[str, int]:
    """member -> the first completed trial that measured it (a prior or a played trial)."""
    from optuna.trial import TrialState

    first: dict[str, int] = {}
    for t in trials:
        if t.state == TrialState.COMPLETE and t.user_attrs.get("source") != "repeat" and "member" in t.user_attrs:
            first.setdefault(t.user_attrs["member"], t.number)
    return first


def _trial_rows(study) -> list[dict[str, Any]]:
    rows = []
    trials = study.get_trials(deepcopy=False)
    first = _first_measured(trials)
    for t in trials:
        a = t.user_attrs
        fam = t.params.get("family")
        # A point measured by an earlier trial is a repeat: its value is that trial's (this also marks the
        # repeats of a study recorded before repeats were detected, whose jobs were read back from disk).
        earlier = a.get("repeat_of", first.get(a.get("member"), t.number))
        repeat_of = earlier if earlier != t.number else None
        rows.append({
            "number": t.number, "state": t.state.name, "source": "repeat" if repeat_of is not None else
            a.get("source", "tpe"), "family": fam,
            "params": json.dumps({k.split(".", 1)[1]: v for k, v in t.params.items()
                                  if "." in k and not k.endswith(".placement")}),
            "placement": t.params.get(f"{fam}.placement"), "blueprint": a.get("blueprint"), "value": t.value,
            **{k: a.get(k) for k in TRIAL_COLUMNS[8:-1]}, "repeat_of": repeat_of})
    return rows


def _write_trials(out: Path, study) -> None:
    rows = _trial_rows(study)
    _write_json(out / "trials.json", rows)
    tmp = out / "trials.csv.tmp"
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=TRIAL_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(out / "trials.csv")
    plot_trials(out, rows)


def plot_trials(out: str | Path, rows: list[dict[str, Any]] | None = None) -> Path:
    """``OUT/trials.png``: every measured point of a search, objective against parameters / host,
    one colour per family, the priors from the library hollow, the best point starred.

    Args:
        out: the search directory.
        rows: its trial rows (default: read ``OUT/trials.json``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    if rows is None:
        rows = json.loads((out / "trials.json").read_text())
    done = [r for r in rows if r["state"] == "COMPLETE" and r["source"] != "repeat" and r["params_ratio"] is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, fam in enumerate(sorted({r["family"] for r in done})):
        mine = [r for r in done if r["family"] == fam]
        for prior in (False, True):
            pts = [r for r in mine if (r["source"] in ("library", "prior")) == prior]
            if pts:
                ax.scatter([r["params_ratio"] for r in pts], [r["value"] for r in pts], s=28,
                           label=None if prior else fam, facecolors="none" if prior else f"C{i}",
                           edgecolors=f"C{i}")
    if done:
        best = max(done, key=lambda r: r["value"])
        ax.scatter([best["params_ratio"]], [best["value"]], marker="*", s=220, color="black", zorder=3,
                   label=f"best: {best['blueprint'].split('@')[0]} at {best['placement']}")
    ax.set_xlabel("parameters / host parameters (mean over the train instances)")
    ax.set_ylabel("objective (validation accuracy - penalty)")
    ax.set_title(f"Karn search: {len(done)} measured points (hollow: from the library)")
    ax.grid(alpha=0.3)
    if done:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "trials.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- the search --------------------------------------------------------------------------------------------------


def karn_search(config: KarnConfig, env_factory: Callable[..., Any], out: str | Path, *,
                load_task: Callable[[str], Any], library: str | Path | None = None, workers: int = 1,
                progress: bool = True) -> dict[str, Any]:
    """Search the families for the best blueprint on the suite's train split; keep the winner.

    Args:
        config: the search (`KarnConfig`).
        env_factory: the env class (or a picklable callable with its arguments): called as
            ``env_factory(blueprints=..., tempos=..., max_slots=..., instances=[...], num_envs=n, seed=s)``.
        out: the run directory (created; a directory holding a search with another config is refused).
        load_task: ``load_task(name) -> Task`` (shapes only: where each placement lands).
        library: the seed library read for the warm start and written with outcomes and the winner
            (default ``OUT/library``).
        workers: processes for the harness's jobs.
        progress: a progress bar over trials.

    Returns:
        What ``OUT/karn.json`` holds: the config, study, context, library, the winner (blueprint,
        placement, member, score, characterisation) and the wall seconds.

    Raises:
        ConfigError: an unknown suite, or `out` holds a search with another config.
        LibraryError: the library cannot be read or written.
    """
    import optuna
    from optuna.trial import TrialState

    from esper_fn.urza import Library

    s = get_suite(config.suite)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / CONFIG_FILE
    if meta_path.is_file():
        old = KarnConfig.make(**json.loads(meta_path.read_text())["config"])
        if old.model_copy(update={"trials": config.trials}) != config:
            diff = {k: (v, getattr(config, k)) for k, v in old.model_dump().items()
                    if k != "trials" and v != getattr(config, k)}
            raise ConfigError(f"{out} holds a Karn search with another config ({', '.join(f'{k}: {a!r} there, {b!r} now' for k, (a, b) in diff.items())}); "
                              "continue it with its own flags (more --trials extend it) or use another --out.")
    lib = Library(library if library is not None else out / "library")
    name, ctx = _study_name(config), context_key(s, config.split, config.train_seeds, config.at)
    insts = s.split(config.split)
    t0 = time.perf_counter()
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(storage=f"sqlite:///{(out / STUDY_FILE).resolve()}", study_name=name,
                                    direction="maximize", load_if_exists=True)
        if not study.get_trials(deepcopy=False):
            _warm_start(study, config, lib, ctx, name)
        _write_json(meta_path, {"config": config.model_dump(), "study": name, "context": ctx, "library": str(lib.path)})
        static = _play([STATIC], insts, config.train_seeds, _make_env(env_factory, s, ()), out, workers, False)

        def evaluated() -> int:  # distinct points played (a study from before repeats were detected has repeats
            # recorded as played trials; counting points keeps its resumption the same search as a fresh one)
            return len({t.user_attrs["member"] for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                        if t.user_attrs.get("source") not in ("prior", "repeat")})

        repeats = 0  # in a row: TPE proposing only points already measured means the search has converged

        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=config.trials, initial=min(evaluated(), config.trials), desc="karn", unit="trial")
        try:
            while evaluated() < config.trials and repeats < config.max_repeats:
                for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                    # left running by an interrupted process: fail it, and ask for its point again
                    study.tell(t.number, state=TrialState.FAIL)
                    study.enqueue_trial(t.params, user_attrs={k: v for k, v in t.user_attrs.items() if k == "source"})
                # the trials before, less those an interrupted process failed (their points are asked again): a
                # resumed search draws what the uninterrupted one would have
                number = sum(t.state != TrialState.FAIL for t in study.get_trials(deepcopy=False))
                study.sampler = optuna.samplers.TPESampler(seed=_trial_seed(config.seed, number),
                                                           n_startup_trials=config.startup_trials)
                trial = study.ask()
                fam, values, placement = _suggest(trial, config.families)
                bp = karn.blueprint(fam, **values)
                member = _member(bp.id, placement, config.at)
                earlier = _first_measured(study.get_trials(deepcopy=False)).get(member)
                if earlier is not None:  # measured already, and episodes are deterministic: its value, no rerun
                    e = study.trials[earlier]
                    for k, v in e.user_attrs.items():
                        trial.set_user_attr(k, v)
                    trial.set_user_attr("source", "repeat")
                    trial.set_user_attr("repeat_of", earlier)
                    trial.set_user_attr("seconds", 0.0)
                    study.tell(trial, e.value)
                    _write_trials(out, study)
                    repeats += 1
                    continue
                repeats = 0
                t1 = time.perf_counter()
                chars = _characterise(bp, _specs(s, config.split, placement, load_task), config.characterise_repeats)
                records = _play([member], insts, config.train_seeds, _make_env(env_factory, s, (bp.id,)), out,
                                workers, False)
                sc = score([*records, *static], member, penalty=config.param_penalty)
                seconds = time.perf_counter() - t1
                attrs = {"source": trial.user_attrs.get("source", "tpe"), "blueprint": bp.id, "member": member,
                         "val_accuracy": sc.val_accuracy, "params_ratio": sc.params_ratio,
                         "added_params": sc.added_params, "params_mean": sc.params, "contribution": sc.contribution,
                         "runs": sc.runs, "seconds": seconds, **_costs(chars)}
                for k, v in attrs.items():
                    trial.set_user_attr(k, v)
                study.tell(trial, sc.value)
                lib.put_outcome(blueprint=bp.id, placement=placement, context=ctx, val_accuracy=sc.val_accuracy,
                                added_params=sc.added_params, params_ratio=sc.params_ratio, runs=sc.runs,
                                contribution=sc.contribution, study=name, trial=trial.number, seconds=seconds)
                _write_trials(out, study)
                if bar is not None:
                    bar.update(1)
                    best = study.best_trial
                    bar.set_postfix(best=f"{best.value:.4f}", last=f"{sc.value:.4f} {bp.id.split('@')[0]}")
        finally:
            if bar is not None:
                bar.close()
        _write_trials(out, study)
        result = _keep_winner(study, config, s, lib, name, out, load_task)
        result["evaluated"] = evaluated()
        result["converged"] = repeats >= config.max_repeats
    finally:
        optuna.logging.set_verbosity(verbosity)
    meta = {"config": config.model_dump(), "study": name, "context": ctx, "library": str(lib.path), **result,
            "seconds": time.perf_counter() - t0}
    _write_json(meta_path, meta)
    return meta


def _warm_start(study, config: KarnConfig, lib, ctx: str, name: str) -> None:
    """Priors (earlier outcomes on the same runs) as completed trials, then the library's best points
    by contribution per parameter enqueued."""
    import optuna

    seen: set[tuple[str, str]] = set()
    latest = {}
    for o in lib.outcomes(context=ctx):
        if o.study == name:
            continue
        try:
            hit = karn.equivalent(o.blueprint)
        except BlueprintError:  # a Karn id of another family version: another design now
            continue
        if hit is None or hit[0].name not in config.families or o.placement not in hit[0].placements:
            continue
        latest[(hit[0].blueprint_id(**hit[1]), o.placement)] = (hit, o)
    for (bid, placement), ((fam, values), o) in latest.items():
        value = o.val_accuracy - config.param_penalty * (o.params_ratio - 1)
        study.add_trial(optuna.trial.create_trial(
            params=_point_params(fam, values, placement), distributions=_distributions(fam, config.families),
            value=value, user_attrs={"source": "prior", "blueprint": bid, "member": _member(bid, placement, config.at),
                                     "val_accuracy": o.val_accuracy, "params_ratio": o.params_ratio,
                                     "added_params": o.added_params, "contribution": o.contribution, "runs": o.runs}))
        seen.add((bid, placement))
    queued = 0
    for e in karn.evidence(lib, families=config.families):
        if queued >= config.warm_start:
            break
        if (e.blueprint, e.placement) in seen:
            continue
        fam, values = karn.parse(e.blueprint)
        study.enqueue_trial(_point_params(fam, values, e.placement), user_attrs={"source": "library"})
        seen.add((e.blueprint, e.placement))
        queued += 1


def _best(trials) -> Any:
    """The best completed trial: highest value; ties to fewer parameters, then the earlier trial."""
    return max(trials, key=lambda t: (t.value, -float(t.user_attrs.get("params_ratio", 0.0)), -t.number))


def _keep_winner(study, config: KarnConfig, s: Suite, lib, name: str, out: Path, load_task) -> dict[str, Any]:
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = _best(done)
    fam = karn.FAMILIES[best.params["family"]]
    values = {p.name: best.params[f"{fam.name}.{p.name}"] for p in fam.params}
    placement = best.params[f"{fam.name}.placement"]
    bp = karn.blueprint(fam, **values)
    chars = _characterise(bp, _specs(s, config.split, placement, load_task), config.characterise_repeats)
    a = best.user_attrs
    sc = {"objective": best.value, "val_accuracy": a["val_accuracy"], "params_ratio": a["params_ratio"],
          "added_params": a["added_params"]}
    if a.get("contribution") is not None:
        sc["contribution"] = a["contribution"]
    rec = karn.persist(lib, bp, placement=placement, score=sc, characterisation=chars,
                       source=f"{name} ({out}), trial {best.number}")
    return {"winner": {"blueprint": bp.id, "placement": placement, "member": _member(bp.id, placement, config.at),
                       "trial": best.number, "source": a.get("source", "tpe"), "score": sc,
                       "description": rec.description, "characterisation": rec.characterisation},
            "trials": len(done)}


# --- the catalogue, by the same rule ----------------------------------------------------------------------------


def catalogue_members(s: Suite, split: str, load_task: Callable[[str], Any], at: float = 0.0) -> list[str]:
    """``recipe:<placement>-<id>-<at>`` for every catalogue blueprint (not generated, available here,
    with parameters) offered at that placement on at least one instance of the split."""
    from esper_fn import blueprints as bpm

    out = []
    for placement in karn.PLACEMENTS:
        specs = [spec for _, spec in _specs(s, split, placement, load_task) if spec is not None]
        ids = []
        for spec in specs:
            for bid in bpm.offered(spec):
                if not karn.is_generated(bid) and bpm.get(bid).param_count(spec) > 0 and bid not in ids:
                    ids.append(bid)
        out += [_member(bid, placement, at) for bid in sorted(ids)]
    return out


def karn_catalogue(out: str | Path, env_factory: Callable[..., Any], *, load_task: Callable[[str], Any],
                   workers: int = 1, progress: bool = True) -> dict[str, Any]:
    """Score every catalogue blueprint at every placement on the search's train split and seeds by
    the search's rule (`score`, its penalty), and choose the best the same way (`_best`'s tie rule).
    Writes ``OUT/catalogue.csv`` and ``OUT/catalogue.json``; records every outcome in the library.

    Raises:
        ConfigError: `out` holds no search.
    """
    from esper_fn.urza import Library

    out = Path(out)
    meta = _read_config(out)
    config = KarnConfig.make(**meta["config"])
    s = get_suite(config.suite)
    insts = s.split(config.split)
    members = catalogue_members(s, config.split, load_task, config.at)
    ids = [Recipe.parse(m).blueprint for m in members]
    records = _play([STATIC, *members], insts, config.train_seeds, _make_env(env_factory, s, ids), out, workers,
                    progress)
    lib = Library(meta["library"])
    rows = []
    for i, m in enumerate(members):
        sc = score(records, m, penalty=config.param_penalty)
        rec = Recipe.parse(m)
        rows.append({"member": m, "blueprint": rec.blueprint, "placement": rec.position, **sc._asdict()})
        lib.put_outcome(blueprint=rec.blueprint, placement=rec.position, context=meta["context"],
                        val_accuracy=sc.val_accuracy, added_params=sc.added_params, params_ratio=sc.params_ratio,
                        runs=sc.runs, contribution=sc.contribution, study=f"catalogue:{meta['context']}", trial=i)
    rows.sort(key=lambda r: (-r["value"], r["params_ratio"], r["member"]))
    with (out / "catalogue.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    result = {"best": rows[0], "members": rows}
    _write_json(out / "catalogue.json", result)
    return result


# --- the comparison on the test split ---------------------------------------------------------------------------


def _best_new_design(out: Path, meta: Mapping[str, Any]) -> dict[str, Any]:
    """The best measured trial (`_best`'s rule, train split) whose blueprint is no catalogue design."""
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=meta["study"], storage=f"sqlite:///{(out / STUDY_FILE).resolve()}")
    new = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
           if t.user_attrs.get("source") != "repeat" and karn.catalogue_design(t.user_attrs["blueprint"]) is None]
    if not new:
        raise ConfigError(f"the search in {out} measured no new design (every trial's blueprint is a catalogue "
                          "design): run more --trials, or compare its winner (without --new-design).")
    best = _best(new)
    a = best.user_attrs
    sc = {"objective": best.value, "val_accuracy": a["val_accuracy"], "params_ratio": a["params_ratio"],
          "added_params": a["added_params"]}
    return {"member": a["member"], "blueprint": a["blueprint"], "trial": best.number, "score": sc}


def karn_compare(out: str | Path, env_factory: Callable[..., Any], seeds: Sequence[int], *,
                 load_task: Callable[[str], Any], split: str = "test", new_design: bool = False, workers: int = 1,
                 progress: bool = True) -> dict[str, Any]:
    """Play the search's winner and the catalogue's best (both chosen on the train split; the
    catalogue is scored first if it was not) on `split`'s instances and `seeds`, and report
    ``winner - catalogue`` in test accuracy and in parameters, paired by (instance, seed).

    Args:
        new_design: compare, instead of the winner, the best measured point that is no catalogue
            design (`esper_fn.karn.catalogue_design`; chosen by the same rule on the train split):
            what the search found beyond the catalogue when its winner is a catalogue design.

    Writes ``OUT/compare/jobs`` (the runs, shared by both comparisons), ``OUT/compare.json`` and
    ``OUT/compare.md`` (``compare-new.*`` with `new_design`).

    Raises:
        ConfigError: `out` holds no search, or `seeds` overlap the search's training seeds, or (with
            `new_design`) the search measured no new design.
    """
    out = Path(out)
    meta = _read_config(out)
    if "winner" not in meta:
        raise ConfigError(f"{out} holds a search that has not finished: rerun esper-fn karn with its flags first.")
    config = KarnConfig.make(**meta["config"])
    seeds = list(seeds)
    if not seeds or seeds != list(range(seeds[0], seeds[0] + len(seeds))):
        raise ConfigError(f"evaluation seeds must be contiguous and increasing, like 1000000-1000009; got {seeds}.")
    if set(seeds) & set(config.train_seeds):
        raise ConfigError(f"evaluation seeds {sorted(set(seeds) & set(config.train_seeds))} are training seeds of the "
                          "search: evaluate on seeds never used for choosing (>= 1000000 by convention).")
    pick = _best_new_design(out, meta) if new_design else meta["winner"]
    cat = json.loads((out / "catalogue.json").read_text()) if (out / "catalogue.json").is_file() else None
    if cat is None:
        cat = karn_catalogue(out, env_factory, load_task=load_task, workers=workers, progress=progress)
    a, b = pick["member"], cat["best"]["member"]
    s = get_suite(config.suite)
    records = _play([a, b], s.split(split), seeds,
                    _make_env(env_factory, s, (Recipe.parse(a).blueprint, Recipe.parse(b).blueprint)),
                    out / "compare", workers, progress)
    acc = difference(records, a, b, split=split, key="test_accuracy")
    par = difference(records, a, b, split=split, key="params")

    def mean(name: str, key: str) -> float:
        xs = [getattr(r, key) for r in records if r.controller == name and r.split == split]
        return sum(xs) / len(xs)

    o = acc.overall
    met = o.mean - o.half > 0 and par.overall.mean <= 0
    # by seed: the mean over the instances of each seed's differences, with the CI over seeds (the
    # instances of one seed are not independent draws; this view treats the seed as the unit)
    per_seed: dict[int, list[float]] = {}
    for (_, seed), d in acc.diffs.items():
        per_seed.setdefault(seed, []).append(d)
    by_seed = {seed: sum(v) / len(v) for seed, v in sorted(per_seed.items())}
    seed_mean, seed_half = mean_ci(list(by_seed.values()))
    result = {
        "split": split, "seeds": seeds, "karn": a, "catalogue": b, "new_design": new_design,
        "karn_design": karn.catalogue_design(pick["blueprint"]), "karn_train": pick["score"],
        "catalogue_train": {k: cat["best"][k] for k in Score._fields},
        "test_accuracy": {"karn": mean(a, "test_accuracy"), "catalogue": mean(b, "test_accuracy")},
        "params": {"karn": mean(a, "params"), "catalogue": mean(b, "params")},
        "difference": {"mean": o.mean, "half": o.half, "n": o.n},
        "params_difference": {"mean": par.overall.mean, "half": par.overall.half, "n": par.overall.n},
        "by_seed": {"mean": seed_mean, "half": seed_half, "n": len(by_seed), "seeds": by_seed},
        "per_instance": {i: {"mean": p.mean, "half": p.half, "n": p.n,
                             "params": par.per_instance[i].mean} for i, p in acc.per_instance.items()},
        "target_met": bool(met),
    }
    stem = "compare-new" if new_design else "compare"
    _write_json(out / f"{stem}.json", result)
    (out / f"{stem}.md").write_text(compare_report(result) + "\n")
    return result


def compare_report(r: Mapping[str, Any]) -> str:
    """The markdown of a `karn_compare` result."""
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    d, p = r["difference"], r["params_difference"]
    what = "Karn's best new design" if r.get("new_design") else "Karn winner"
    lines = [
        f"{what} `{r['karn']}` vs the catalogue's best `{r['catalogue']}` (both chosen on the train split by "
        f"the a* rule), {r['split']} split, seeds {r['seeds'][0]}-{r['seeds'][-1]}, paired by (instance, seed):",
        "",
        "| | train val acc % | train params / host | test acc % | params |",
        "|---|---|---|---|---|",
        f"| Karn | {pct(r['karn_train']['val_accuracy'])} | {r['karn_train']['params_ratio']:.2f} | "
        f"{pct(r['test_accuracy']['karn'])} | {r['params']['karn']:.0f} |",
        f"| catalogue | {pct(r['catalogue_train']['val_accuracy'])} | {r['catalogue_train']['params_ratio']:.2f} | "
        f"{pct(r['test_accuracy']['catalogue'])} | {r['params']['catalogue']:.0f} |",
        "",
        "| instance | Karn - catalogue (points) | params difference |",
        "|---|---|---|",
    ]
    for i, v in r["per_instance"].items():
        lines.append(f"| {i} | {100 * v['mean']:+.1f} ± {100 * v['half']:.1f} | {v['params']:+.0f} |")
    lines.append(f"| **all ({d['n']} pairs)** | **{100 * d['mean']:+.1f} ± {100 * d['half']:.1f}** | "
                 f"{p['mean']:+.0f} ± {p['half']:.0f} |")
    if "by_seed" in r:
        bs = r["by_seed"]
        lines += ["", f"By seed (each seed's mean over the instances; {bs['n']} seeds): "
                      f"{100 * bs['mean']:+.1f} ± {100 * bs['half']:.1f} points; per seed "
                      + " ".join(f"{100 * v:+.1f}" for v in bs["seeds"].values()) + "."]
    if r.get("karn_design"):
        lines += ["", f"The Karn blueprint is the catalogue design `{r['karn_design']}` (the same function); "
                      "`--new-design` compares the best point that is not."]
    lines += ["", f"Target (Karn better, 95% CI excluding 0, at equal or fewer parameters): "
                  f"{'met' if r['target_met'] else 'not met'}."]
    return "\n".join(lines)
