"""The growth benchmark's harness: every comparator runs as a policy through the env, on a suite's
instances, seed by seed, in worker processes, resumably.

A *job* is one comparator on one instance over a block of contiguous seeds: one env whose rows are
those seeds (`esper_fn.envs.MorphogenesisEnv(instances=[instance])`; rows of one structure train
stacked). Its records (`esper_fn.policies.RunRecord`s with the instance, split and budget set) go to
``OUT/jobs/<comparator>~<instance>~<seeds>.csv`` when the job is done, so
an interrupted run skips what is finished; `collect` joins them into ``OUT/runs.csv``.

Comparators (`COMPARATORS`; docs/bench.md): ``static``; ``capacity`` (a*'s grown architecture
trained from epoch 0, static); ``scaleup`` (the host widened to the instance's budget, static);
``random`` (masked random); ``schedule`` and ``heuristic`` (the core controllers, tuned on the train
split); the fixed-policy family (``recipe:<position>-<kind>-<at>``, `esper_fn.controllers.Recipe`),
whose best member on the train split is ``astar`` and whose best member per instance, chosen on
other seeds, is ``oracle`` (both read from the family's records, no runs of their own); ``tamiyo`` or
``tamiyo:PATH``; and ``py:module:factory``, any TorchRL policy: ``factory(action_space)`` returns it.

The env is never imported: the caller passes ``make_env(instances=..., num_envs=..., seed=...)``.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esper_fn._errors import ConfigError
from esper_fn.actions import ActionSpace
from esper_fn.bench import Instance, Suite
from esper_fn.controllers import Recipe, recipe_family

from ._bench_stats import read_runs, write_runs
from ._eval import RunRecord

__all__ = ["COMPARATORS", "Job", "capacity_plans", "choose_params", "collect", "family_names", "make_policy", "plan_jobs",
           "run_jobs", "scaleup_instance", "tuning_jobs"]

COMPARATORS = ("static", "capacity", "scaleup", "random", "schedule", "heuristic", "astar", "oracle", "tamiyo")
"""The comparators ``esper-fn bench run --controllers`` knows by name (besides ``recipe:...``,
``tamiyo:PATH`` and ``py:module:factory``)."""



def family_names() -> list[str]:
    """The names of the fixed-policy family: "static" and every `recipe_family` member."""
    return ["static", *(r.name for r in recipe_family())]


def parse_recipe(name: str) -> Recipe:
    """``recipe:<position>-<kind or blueprint id>-<at %>`` -> `Recipe` (`Recipe.parse`).

    Raises:
        ConfigError: a malformed name.
    """
    return Recipe.parse(name)


def make_policy(name: str, space: ActionSpace, params: Mapping[str, Mapping] | None = None, *, device=None):
    """The TorchRL policy of comparator `name` over an env with this action space.

    Args:
        name: a comparator (``static``, ``random``, ``schedule``, ``heuristic``, ``recipe:...``,
            ``tamiyo``, ``tamiyo:PATH``, ``py:module:factory``; ``capacity`` and ``scaleup`` play
            ``static`` on their variant instances).
        space: the env's action space.
        params: tuned parameters per baseline name (``{"heuristic": {"patience": 1}, ...}``).
        device: the env's device, where a learned policy acts (default the CPU).

    Raises:
        ConfigError: an unknown comparator, or a ``py:`` factory that cannot be imported.
    """
    from ._baselines import ControllerPolicy, make_baseline

    params = params or {}
    if name in ("static", "capacity", "scaleup"):
        return make_baseline("static", space)
    if name in ("random", "schedule", "heuristic"):
        return make_baseline(name, space, **dict(params.get(name, {})))
    if name.startswith("recipe:"):
        recipe = parse_recipe(name)
        return ControllerPolicy(recipe, space, name=recipe.name)
    if name == "tamiyo" or name.startswith("tamiyo:"):
        from . import SHIPPED_WEIGHTS
        from ._eval import tamiyo_policy

        path = name.partition(":")[2] or str(SHIPPED_WEIGHTS)
        if not Path(path).is_file():
            raise ConfigError(f"controller {name!r}: no Tamiyo weights at {path}; give the .safetensors file "
                              "`esper-fn train-tamiyo` wrote (OUT/tamiyo.safetensors), or `tamiyo` for the shipped policy.")
        return tamiyo_policy(path, space, device=device)
    if name.startswith("py:"):
        module, _, attr = name[3:].partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"controller {name!r}: cannot import {attr!r} from {module!r} ({e}); give "
                              "py:package.module:factory, a function factory(action_space) -> TorchRL policy.") from None
        policy = factory(space)
        import torch

        if device is not None and isinstance(policy, torch.nn.Module):  # a learned policy acts where the env is
            policy = policy.to(device)
        return policy
    raise ConfigError(f"unknown controller {name!r}; comparators are {list(COMPARATORS)}, recipe:<position>-<kind>-<at>, "
                      "tamiyo:PATH and py:module:factory.")


def scaleup_instance(inst: Instance, load_task: Callable[[str], Any]) -> Instance | None:
    """`inst` with its host widened to the instance's parameter budget (the widest host of its width
    family that fits), and no budget of its own: the "scaleup" comparator. None where the host is not
    of a width family or has no budget.

    Args:
        inst: the instance.
        load_task: ``load_task(name) -> Task`` (its shapes are all that is read).
    """
    import esper_fn as ef

    family, sep, width = inst.host.rpartition("-w")
    if not sep or not width.isdigit() or inst.budget_ratio is None:
        return None
    task = load_task(inst.task)

    def params(w: int) -> int:
        h = ef.hosts.preset(f"{family}-w{w}", input_shape=task.input_shape, n_classes=task.n_classes)
        return sum(v.numel() for v in h.init_like()[0].values())

    budget = inst.param_budget(params(int(width)))
    w = int(width)
    while params(w + 1) <= budget:
        w += 1
    return inst.model_copy(update={"host": f"{family}-w{w}", "budget_ratio": None})


@dataclass(frozen=True)
class Job:
    """One comparator on one instance over contiguous seeds (one env, one row per seed).

    Attributes:
        comparator: its name in the records.
        policy: the policy to build (`make_policy`; differs from `comparator` for variants).
        instance: the instance played (a variant for ``capacity`` and ``scaleup``).
        seeds: contiguous run seeds.
    """

    comparator: str
    policy: str
    instance: Instance
    seeds: tuple[int, ...]
    params: str = ""  # JSON parameters for this job's policy (tuning grids), overriding the run's

    @property
    def key(self) -> str:
        """The job's file name stem."""
        safe = self.comparator.replace("/", "_").replace(":", "_")
        return f"{safe}~{self.instance.name}~{self.seeds[0]}-{self.seeds[-1]}"


def _run_job(job: Job, make_env, params: Mapping[str, Mapping], out_dir: str) -> str:
    """Run one job in this process and write its records (atomically); returns the file."""
    import torch

    from ._eval import run_episodes

    torch.set_num_threads(1)
    env = make_env(instances=[job.instance], num_envs=len(job.seeds), seed=job.seeds[0])
    space = env.action_space
    if job.params:
        params = {**params, job.policy: json.loads(job.params)}
    policy = make_policy(job.policy, space, params, device=env.device)
    t0 = time.perf_counter()
    records = run_episodes(env, policy, list(job.seeds), space, job.comparator)
    seconds = (time.perf_counter() - t0) / len(job.seeds)
    for r in records:
        r.instance, r.split, r.seconds = job.instance.name, job.instance.split, seconds
        r.param_budget = None if job.instance.budget_ratio is None else job.instance.param_budget(r.params0)
    path = Path(out_dir) / "jobs" / f"{job.key}.csv"
    tmp = path.with_suffix(".tmp")
    write_runs(records, tmp)
    os.replace(tmp, path)
    return str(path)


def run_jobs(jobs: Sequence[Job], make_env: Callable[..., Any], out: str | Path, *,
             params: Mapping[str, Mapping] | None = None, workers: int = 1, progress: bool = True) -> list[str]:
    """Run the jobs not yet done in ``out/jobs`` (in `workers` processes), and return every job file.

    Args:
        jobs: what to run.
        make_env: ``make_env(instances=[...], num_envs=n, seed=s)``, picklable for workers > 1
            (e.g. a `functools.partial` of the env class with the suite's blueprints and tempos).
        out: the run directory.
        params: tuned parameters per baseline.
        workers: processes (1: this process).
        progress: a progress bar over jobs.
    """
    out = Path(out)
    (out / "jobs").mkdir(parents=True, exist_ok=True)
    todo = [j for j in jobs if not (out / "jobs" / f"{j.key}.csv").is_file()]
    files = [str(out / "jobs" / f"{j.key}.csv") for j in jobs if j not in todo]
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="bench", unit="job")
    try:
        if workers <= 1:
            for j in todo:
                files.append(_run_job(j, make_env, dict(params or {}), str(out)))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(last=j.key[:40])
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed

            with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
                futures = {pool.submit(_run_job, j, make_env, dict(params or {}), str(out)): j for j in todo}
                for f in as_completed(futures):
                    files.append(f.result())
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(last=futures[f].key[:40])
    finally:
        if bar is not None:
            bar.close()
    return files


def collect(out: str | Path) -> Path:
    """Join the job files of ``out/jobs`` into ``out/runs.csv`` (sorted by split, instance,
    comparator, seed); returns its path."""
    out = Path(out)
    records = [r for p in sorted((out / "jobs").glob("*.csv")) for r in read_runs(p)]
    records.sort(key=lambda r: (r.split, r.instance, r.controller, r.seed))
    return write_runs(records, out / "runs.csv")


def read_params(path: str | Path) -> dict[str, dict]:
    """Tuned baseline parameters written by ``esper-fn bench run`` (``tuned.json``)."""
    return json.loads(Path(path).read_text())


def plan_jobs(suite: Suite, split: str, comparators: Sequence[str], seeds: Sequence[int], *,
              load_task: Callable[[str], Any],
              capacity_plan: Mapping[str, tuple[tuple[str, str], ...]] | None = None) -> list[Job]:
    """The jobs of comparators on a split's instances.

    ``astar`` and ``oracle`` expand to the fixed-policy family (their values come from its records);
    ``capacity`` needs `capacity_plan` (instance name -> a*'s preinstall), ``scaleup`` a width-family
    host with a budget (instances without one are skipped).
    """
    seeds = tuple(seeds)
    names: list[str] = []
    for c in comparators:
        if c in ("astar", "oracle", "family"):
            names.extend(n for n in family_names() if n not in names)
        elif c not in names:
            names.append(c)
    jobs = []
    for inst in suite.split(split):
        for c in names:
            if c == "scaleup":
                variant = scaleup_instance(inst, load_task)
                if variant is not None:
                    jobs.append(Job(c, c, variant, seeds))
            elif c == "capacity":
                plan = (capacity_plan or {}).get(inst.name)
                if plan is None:
                    raise ConfigError("the capacity comparator needs a*'s plan: run the family on the train split "
                                      "first (esper-fn bench run --split train --controllers astar).")
                jobs.append(Job(c, c, inst.model_copy(update={"preinstall": plan, "budget_ratio": None}), seeds))
            else:
                jobs.append(Job(c, c, inst, seeds))
    return jobs


def tuning_jobs(suite: Suite, grids: Mapping[str, Sequence[Mapping]], seeds: Sequence[int]) -> list[Job]:
    """Jobs that run every grid point of every baseline on the TRAIN split (comparator
    ``tune:<name>:<index>``), for `choose_params`."""
    return [Job(f"tune:{name}:{k}", name, inst, tuple(seeds), json.dumps(dict(point), sort_keys=True))
            for name, grid in grids.items() for k, point in enumerate(grid) for inst in suite.split("train")]


def choose_params(records: Sequence[RunRecord], grids: Mapping[str, Sequence[Mapping]]) -> dict[str, dict]:
    """Each baseline's grid point with the best mean final VALIDATION accuracy over the train split
    (mean over seeds per instance, then over instances; the test split is never read).

    Args:
        records: runs including the ``tune:`` comparators.
        grids: the grids the tuning jobs ran.

    Raises:
        ConfigError: a grid point has no train-split records.
    """
    out = {}
    for name, grid in grids.items():
        scores = []
        for k, point in enumerate(grid):
            mine = [r for r in records if r.controller == f"tune:{name}:{k}" and r.split == "train"]
            if not mine:
                raise ConfigError(f"no train-split records of tuning point {name}:{k} ({dict(point)}).")
            by_inst: dict[str, list[float]] = {}
            for r in mine:
                by_inst.setdefault(r.instance, []).append(r.val_accuracy)
            scores.append((sum(sum(v) / len(v) for v in by_inst.values()) / len(by_inst), -k))
        best = max(range(len(grid)), key=lambda k: scores[k])
        out[name] = dict(grid[best])
    return out


def capacity_plans(suite: Suite, split: str, astar: str, make_env: Callable[..., Any]) -> dict[str, tuple]:
    """Per instance of a split, the seed a* would graft, as a ``preinstall`` (``((slot, blueprint),)``,
    or ``()`` where a* grafts nothing there): the "capacity" comparator trains that architecture from
    epoch 0 (standard layer init, no lifecycle), a ceiling for growing it."""
    from esper_fn.controllers import observe

    if astar == "static":
        return {inst.name: () for inst in suite.split(split)}
    recipe = parse_recipe(astar)
    plans = {}
    for inst in suite.split(split):
        env = make_env(instances=[inst], num_envs=1, seed=0)
        env.reset()
        obs = observe(env.episode(0), env.gates)
        bid = recipe.pick(obs)
        plans[inst.name] = ((recipe.slot(obs).name, bid),) if bid is not None else ()
    return plans
