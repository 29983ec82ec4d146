"""The ``esper-fn train-tamiyo`` and ``esper-fn eval`` subcommands.

`add_parsers(subparsers, load_envs)` registers them. This module imports nothing heavy at import
time (the ``esper-fn`` command must start fast), and it never imports `esper_fn.envs` itself: the
caller (`esper_fn.cli`, the application's composition root) passes ``load_envs``, a function that
returns the envs module when a subcommand actually runs.

    esper-fn train-tamiyo --task mnist1d --hosts mlp-impaired,cnn-impaired --num-envs 8 --epochs 30 \\
        --iterations 100 --seed 0 --out runs/tamiyo
    esper-fn eval --controllers static,random,schedule,heuristic,tamiyo:runs/tamiyo/tamiyo.safetensors \\
        --task mnist1d --hosts mlp-impaired --seeds 1000000-1000009 --epochs 30 --out runs/eval
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from esper_fn._errors import ConfigError

__all__ = ["DEFAULT_GRIDS", "add_parsers", "parse_seeds"]

DEFAULT_GRIDS: dict[str, list[dict]] = {
    "random": [{"wait_prob": p} for p in (0.5, 0.8, 0.95)],
    "schedule": [{"start": s, "every": e} for s in (1, 5) for e in (5, 15)],
    "heuristic": [{"patience": p, "min_train_loss": m} for p in (1, 2, 4) for m in (0.0, 0.5)],
}
"""Parameter grids `--tune-seeds` searches (by mean final validation accuracy on those seeds)."""


def parse_seeds(text: str) -> list[int]:
    """``"0-4,10,12-13"`` -> ``[0, 1, 2, 3, 4, 10, 12, 13]``.

    Raises:
        ConfigError: a part that is not a non-negative integer or an ``A-B`` range with A <= B, or
            no seeds at all.
    """
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        a, dash, b = part.partition("-")
        if not (a.isdigit() and (b.isdigit() if dash else True)) or (dash and int(a) > int(b)):
            raise ConfigError(f"seeds {text!r}: {part!r} is not a seed or a range A-B of non-negative integers with "
                              "A <= B; write e.g. 0-4,10,12-13.")
        out += list(range(int(a), int(b) + 1)) if dash else [int(a)]
    if not out:
        raise ConfigError(f"seeds {text!r}: no seeds given; write e.g. 0-4,10,12-13.")
    return out


_TEMPOS = "3,5,8"


def _env_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("environment (use the same values for training and evaluation)")
    g.add_argument("--task", default="mnist1d")
    g.add_argument("--hosts", default="mlp-impaired", help="comma-separated host presets (one context each)")
    g.add_argument("--epochs", type=int, default=30, help="epochs per episode (the budget)")
    g.add_argument("--num-envs", type=int, default=8, help="env rows (hosts trained in lockstep)")
    g.add_argument("--reward", default="delta_accuracy")
    g.add_argument("--rent", type=float, default=None,
                   help="train-tamiyo: the reward's parameter rent (default: the reward's own, 0.1; also read as "
                        "`reward: {rent: ...}` from --config; eval ignores it)")
    g.add_argument("--blueprints", default=None, help="comma-separated blueprint ids (default: the catalogue; eval: "
                                                      "the first Tamiyo's when one is evaluated)")
    g.add_argument("--tempos", default=_TEMPOS, help="blending tempos (eval: default the first Tamiyo's, when one is "
                                                     "evaluated and --blueprints is not given)")
    g.add_argument("--max-param-ratio", type=float, default=None, help="mask germinations beyond this size ratio")
    g.add_argument("--subset-train", type=int, default=None, help="keep the first N training samples")
    g.add_argument("--device", default="cpu", help="where the hosts train and Tamiyo acts (and learns): cpu, cuda, "
                                                   "cuda:<index>")


def env_kwargs(args) -> dict:
    """MorphogenesisEnv keyword arguments from the parsed environment flags."""
    kw = dict(contexts=[(args.task, h.strip()) for h in args.hosts.split(",") if h.strip()], max_epochs=args.epochs,
              reward=args.reward, tempos=tuple(int(t) for t in args.tempos.split(",")),
              max_param_ratio=args.max_param_ratio, device=args.device)
    if args.blueprints:
        kw["blueprints"] = tuple(b.strip() for b in args.blueprints.split(","))
    if args.subset_train:
        kw["subset"] = {"train": args.subset_train}
    return kw


def _train(args, load_envs: Callable[[], ModuleType]) -> int:
    from functools import partial

    import torch

    from ._ppo import PPOConfig, plot_training, train_ppo

    torch.set_num_threads(args.threads)
    envs = load_envs()
    if args.suite:  # the suite's train split, its action space; --task/--hosts/--epochs/... do not apply
        from esper_fn.bench import suite

        s = suite(args.suite)
        kw = dict(instances=s.split("train"), blueprints=s.blueprints, tempos=s.tempos, max_slots=s.num_slots,
                  reward=args.reward, device=args.device)
    else:
        kw = env_kwargs(args)
    make_env = partial(envs.MorphogenesisEnv, num_envs=args.num_envs, seed=args.seed, **kw)
    probe = envs.MorphogenesisEnv(num_envs=1, **kw)
    space = probe.action_space
    from esper_fn.run import read_yaml_config, validate_config

    fields = read_yaml_config(args.config) if args.config else {}
    from_file = set(fields)
    for name in ("iterations", "lr", "entropy_coeff", "ppo_epochs", "minibatch_size", "gamma", "lmbda",
                 "reward_scale", "checkpoint_every"):
        v = getattr(args, name)
        if v is not None:
            fields[name] = v
    fields["seed"] = args.seed
    reward = {"name": args.reward, **(fields.pop("reward", None) or {})}  # env reward options, not PPOConfig
    if args.rent is not None:
        reward["rent"] = args.rent
    if len(reward) > 1:  # options beyond the name: build the reward function here
        opts = {k: v for k, v in reward.items() if k != "name"}
        try:
            kw["reward"] = envs.rewards.REWARDS[reward["name"]](**opts)
        except TypeError as e:
            raise ConfigError(f"reward {reward['name']!r}: {e}") from None
        make_env = partial(envs.MorphogenesisEnv, num_envs=args.num_envs, seed=args.seed, **kw)
    bc_only = bool(args.imitate) and args.iterations == 0
    if bc_only:  # no PPO: the config still gives the seed and the architecture
        fields["iterations"] = 1
    config = validate_config(fields, PPOConfig, where=args.config or "", flags=set(fields) - from_file)
    print(f"esper-fn train-tamiyo: {list(probe.draws)}, {args.num_envs} rows x {probe.max_epochs} epochs, "
          f"{0 if bc_only else config.iterations} PPO iterations{' (imitation only)' if bc_only else ''}, "
          f"{probe.action_space.n} actions, seed {config.seed} -> {args.out}")
    env_meta = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items() if k != "instances"}
    env_meta["reward"] = reward
    if args.suite:
        env_meta["suite"] = args.suite
    metadata = {"command": " ".join(["esper-fn", *sys.argv[1:]]), "env": json.loads(json.dumps(env_meta, default=str))}
    init = args.init
    if args.imitate:
        init = _imitate(args, envs, kw, probe, config, metadata)
        if bc_only:  # imitation only: its weights are the result
            import shutil

            weights = Path(args.out) / "tamiyo.safetensors"
            shutil.copyfile(init, weights)
            plot_training(args.out)
            print(f"weights: {weights}")
            return 0
    summary = train_ppo(make_env, config, args.out, space, resume=args.resume, progress=not args.no_progress,
                        init=init, metadata=metadata)
    last = summary["last"]
    print(f"done: {summary['frames']} frames; last iteration: return {last.get('episode_return', float('nan')):.3f}, "
          f"final val acc {last.get('final_val_accuracy', float('nan')):.3f}, explained variance "
          f"{last.get('explained_variance', float('nan')):.2f}, entropy {last.get('entropy', float('nan')):.2f}")
    print(f"weights: {summary['weights']}")
    return 0


def _imitate(args, envs, kw, probe, config, metadata) -> Path:
    """Behaviour cloning of the per-instance teachers on the suite's train split; returns the weights."""
    from functools import partial

    import torch

    from esper_fn.bench import suite

    from ._bench import make_policy
    from ._bench_stats import read_runs
    from ._imitation import behavior_clone, demonstrations, teachers
    from ._offline import load_rollouts, save_rollouts
    from ._tamiyo import make_tamiyo, save_tamiyo

    if not args.suite:
        raise ConfigError("--imitate needs --suite: the teachers are the suite's per-instance best fixed policies.")
    runs = Path(args.imitate) / "runs.csv"
    if not runs.is_file():
        raise ConfigError(f"--imitate {args.imitate}: no runs.csv there; give the --out of an `esper-fn bench run` "
                          "that ran the family on the train split (its controllers include astar).")
    s = suite(args.suite)
    train = s.split("train")
    chosen = teachers(read_runs(runs), train)
    print("teachers (best fixed policy per train instance, by validation accuracy on training seeds):")
    for name, t in chosen.items():
        print(f"  {name}: {t}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    demos_dir = out / "demonstrations"
    if (demos_dir / "rollouts.json").is_file():
        data = load_rollouts(demos_dir)[:]
    else:
        plays = [(i.model_copy(update={"epochs": max(2, round(i.epochs * m))}), chosen[i.name])
                 for i in train for m in (float(x) for x in args.horizons.split(","))]
        make = partial(envs.MorphogenesisEnv, **{k: v for k, v in kw.items() if k != "instances"})
        data = demonstrations(make, plays, parse_seeds(args.demo_seeds), make_policy,
                              progress=not args.no_progress).to("cpu")  # cloning runs on the CPU (small batches)
        save_rollouts(data, demos_dir)
    print(f"{data.shape[0]} demonstrated transitions ({int((data['action'] != 0).sum())} growth decisions)")
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        actor, critic = make_tamiyo(probe.observation_spec, probe.action_spec, blueprints=probe.action_space.blueprints,
                                    tempos=probe.action_space.tempos, **config.tamiyo)
    log = (out / "imitation.jsonl").open("w")

    def on_epoch(e, m):
        log.write(json.dumps({"epoch": e, **m}) + "\n")
        log.flush()

    m = behavior_clone(actor, critic, data, epochs=args.bc_epochs, generator=torch.Generator().manual_seed(config.seed),
                       on_epoch=on_epoch)
    log.close()
    print(f"imitation: holdout accuracy {m['holdout_accuracy']:.3f} (growth decisions {m['holdout_growth_accuracy']:.3f})")
    return save_tamiyo(out / "tamiyo_imitation.safetensors", actor, critic,
                       metadata={**metadata, "teachers": chosen, "imitation": m})


def _export(args) -> int:
    from esper_fn.checkpoint import CheckpointManager

    from ._ppo import tamiyo_from_checkpoint
    from ._tamiyo import TamiyoError

    run = Path(args.run_dir)
    if not run.is_dir():
        raise ConfigError(f"{run}: no such directory; give the --out of an `esper-fn train-tamiyo` run.")
    steps = CheckpointManager(run / "checkpoints").steps() if (run / "checkpoints").is_dir() else []
    if not steps:
        raise ConfigError(f"{run} holds no training checkpoints (checkpoints/step_*); give the --out of an "
                          "`esper-fn train-tamiyo` run (it checkpoints every --checkpoint-every iterations).")
    if args.step is not None and args.step not in steps:
        raise ConfigError(f"--step {args.step}: {run} has checkpoints at iterations {steps}, not {args.step}.")
    try:
        path = tamiyo_from_checkpoint(run, args.step, args.out)
    except TamiyoError as e:  # a checkpoint of something else: the directory given is not what this command needs
        raise ConfigError(str(e)) from None
    print(f"wrote {path} (use it as --controller tamiyo:{path})")
    return 0


def _eval(args, load_envs: Callable[[], ModuleType]) -> int:
    import torch

    from ._baselines import make_baseline
    from ._eval import evaluate_controllers, plot_runs, summarize, tamiyo_policy, tune_baseline, write_csv

    torch.set_num_threads(args.threads)
    envs = load_envs()
    kw = env_kwargs(args)
    learned = [c.strip() for c in args.controllers.split(",") if c.strip().startswith("tamiyo")]
    if learned and not args.blueprints and args.tempos == _TEMPOS:  # play in the first policy's action space
        import safetensors

        from . import SHIPPED_WEIGHTS

        path = learned[0].partition(":")[2] or str(SHIPPED_WEIGHTS)
        if Path(path).is_file():
            with safetensors.safe_open(path, framework="pt") as f:
                c = json.loads((f.metadata() or {}).get("config", "{}"))
            if c.get("blueprints") and c.get("tempos"):
                kw["blueprints"], kw["tempos"] = tuple(c["blueprints"]), tuple(c["tempos"])

    def make_env(n: int):
        return envs.MorphogenesisEnv(num_envs=n, **kw)

    probe = make_env(1)
    space = probe.action_space
    params: dict[str, dict] = {}
    if args.params:
        try:
            params = json.loads(Path(args.params).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"--params {args.params}: {getattr(e, 'strerror', None) or e}") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [c.strip() for c in args.controllers.split(",") if c.strip()]
    if args.tune_seeds:
        tune = parse_seeds(args.tune_seeds)
        for n in names:
            if n in DEFAULT_GRIDS and n not in params:
                best, scores = tune_baseline(make_env, n, DEFAULT_GRIDS[n],
                                             lambda env, p, n=n: make_baseline(n, space, **p), tune, space,
                                             max_rows=args.num_envs)
                params[n] = best
                print(f"tuned {n} on seeds {tune[0]}..{tune[-1]} (validation accuracy): "
                      + ", ".join(f"{p} {s:.4f}" for p, s in scores) + f" -> {best}")
        (out / "baseline_params.json").write_text(json.dumps(params, indent=2))
    controllers = {}
    for n in names:
        if n.startswith("tamiyo"):
            label, _, path = n.partition(":")
            if not path:  # bare "tamiyo": the shipped policy
                from . import SHIPPED_WEIGHTS

                path = str(SHIPPED_WEIGHTS)
            name = label if label != "tamiyo" or "tamiyo" not in controllers else f"tamiyo{len(controllers)}"
            controllers[name] = lambda env, path=path: tamiyo_policy(path, space, env.action_spec,
                                                                      safety_bias=args.safety_bias,
                                                                      uncertainty_bias=args.uncertainty_bias)
        else:
            controllers[n] = lambda env, n=n: make_baseline(n, space, **params.get(n, {}))
    seeds = parse_seeds(args.seeds)
    print(f"esper-fn eval: {list(controllers)} on {[c.name for c in probe.contexts]}, {len(seeds)} seeds "
          f"({seeds[0]}..{seeds[-1]}), {args.epochs} epochs")
    records = evaluate_controllers(make_env, controllers, seeds, space, max_rows=args.num_envs,
                                   progress=not args.no_progress)
    for path in args.merge or ():  # earlier runs of other controllers on the same seeds and env
        from ._eval import read_csv

        records = [r for r in read_csv(path) if r.seed in set(seeds) and r.controller not in controllers] + records
    report = summarize(records)
    print(report)
    (out / "summary.txt").write_text(report + "\n")
    csv_path = write_csv(records, out / "runs.csv")
    png = plot_runs(records, out / "accuracy_vs_params.png",
                    title=f"{args.task} / {args.hosts}: held-out seeds {seeds[0]}..{seeds[-1]}")
    print(f"wrote {csv_path}, {png}, {out / 'summary.txt'}")
    return 0


def _bench_list(args) -> int:
    from esper_fn.bench import suite

    s = suite(args.suite)
    print(f"{s.name}: {len(s.instances)} instances; blueprints {', '.join(b.split('@')[0] for b in s.blueprints)}; "
          f"tempos {list(s.tempos)}; {s.num_slots} slot positions")
    for inst in s.split(args.split):
        budget = "none" if inst.budget_ratio is None else f"{inst.budget_ratio}x"
        subset = f", first {inst.train_subset} training samples" if inst.train_subset else ""
        print(f"  {inst.split:5s} {inst.name:24s} {inst.task}/{inst.host}, {inst.epochs} epochs, budget {budget}, "
              f"lr {inst.lr}{subset}: {inst.deficit}")
    return 0


def _bench_run(args, load_envs: Callable[[], ModuleType]) -> int:
    from functools import partial

    import torch

    from esper_fn.actions import ActionSpace
    from esper_fn.bench import suite

    from . import _bench as B
    from ._bench_stats import read_runs

    torch.set_num_threads(1)
    envs = load_envs()
    s = suite(args.suite)
    out = Path(args.out)
    names = [c.strip() for c in args.controllers.split(",") if c.strip()]
    seeds = parse_seeds(args.seeds)
    train_seeds = parse_seeds(args.train_seeds)
    if set(seeds) & set(train_seeds):
        raise ConfigError(f"--seeds and --train-seeds overlap ({sorted(set(seeds) & set(train_seeds))}): evaluation "
                          "seeds must never be used for tuning or choosing a*.")
    space = ActionSpace(s.num_slots, tuple(s.blueprints), tuple(s.tempos))
    for name in names:  # every controller is checked (and learned ones loaded) before anything runs or is written
        if name not in ("astar", "oracle", "family"):  # these expand to the fixed-policy family
            B.make_policy(name, space)
    out.mkdir(parents=True, exist_ok=True)
    make_env = partial(envs.MorphogenesisEnv, blueprints=s.blueprints, tempos=s.tempos, max_slots=s.num_slots,
                       device=args.device)
    load_task = _task_loader()

    progress = not args.no_progress
    params: dict[str, dict] = {}
    tuned = out / "tuned.json"
    grids = {n: DEFAULT_GRIDS[n] for n in names if n in DEFAULT_GRIDS}
    if grids:  # tuned on the train split and the training seeds, by validation accuracy
        if tuned.is_file():
            params = json.loads(tuned.read_text())
        missing = {n: g for n, g in grids.items() if n not in params}
        if missing:
            print(f"tuning {sorted(missing)} on the train split, seeds {train_seeds[0]}..{train_seeds[-1]}")
            B.run_jobs(B.tuning_jobs(s, missing, train_seeds), make_env, out, workers=args.workers, progress=progress)
            params.update(B.choose_params(read_runs(B.collect(out)), missing))
            tuned.write_text(json.dumps(params, indent=2))
        print(f"tuned parameters: {params}")
    astar = None
    capacity_plan = None
    if {"astar", "oracle", "capacity"} & set(names):  # the family on the train split chooses a*
        print(f"the fixed-policy family on the train split, seeds {train_seeds[0]}..{train_seeds[-1]}")
        B.run_jobs(B.plan_jobs(s, "train", ["family"], train_seeds, load_task=load_task), make_env, out,
                   workers=args.workers, progress=progress)
        from ._bench_stats import astar as choose_astar

        astar, _ = choose_astar(read_runs(B.collect(out)))
        print(f"a* (best fixed policy on the train split, by validation accuracy): {astar}")
        if "capacity" in names:
            capacity_plan = B.capacity_plans(s, args.split, astar, make_env)
    jobs = B.plan_jobs(s, args.split, names, seeds, load_task=load_task, capacity_plan=capacity_plan)
    print(f"esper-fn bench: {len(jobs)} jobs ({len(s.split(args.split))} {args.split} instances x comparators), "
          f"seeds {seeds[0]}..{seeds[-1]}, {args.workers} worker(s) -> {out}")
    B.run_jobs(jobs, make_env, out, params=params, workers=args.workers, progress=progress)
    runs = B.collect(out)
    (out / "bench.json").write_text(json.dumps({"suite": s.name, "split": args.split, "controllers": names,
                                               "seeds": seeds, "train_seeds": train_seeds, "astar": astar,
                                               "params": params}, indent=2))
    print(f"wrote {runs}; report it with: esper-fn bench report {out}")
    return 0


def _bench_report(args) -> int:
    from ._bench_stats import leaderboard, plot_bench, read_runs

    out = Path(args.run_dir)
    runs = out / "runs.csv"
    if not runs.is_file():
        raise ConfigError(f"{out} holds no runs.csv: give the directory of an `esper-fn bench run --out`.")
    records = read_runs(runs)
    meta = json.loads((out / "bench.json").read_text()) if (out / "bench.json").is_file() else {}
    text = leaderboard(records)
    if meta:
        text = (f"# {meta.get('suite')}, {meta.get('split')} split\n\nseeds {meta['seeds'][0]}..{meta['seeds'][-1]}; "
                f"a* {meta.get('astar')}; tuned {meta.get('params')}\n\n" + text)
    (out / "leaderboard.md").write_text(text + "\n")
    pngs = plot_bench(records, out)
    print(text)
    print(f"wrote {out / 'leaderboard.md'} and {len(pngs)} PNG(s) in {out}")
    return 0


def _task_loader():
    from esper_fn.tasks import load

    tasks: dict[str, object] = {}

    def load_task(name):
        if name not in tasks:
            tasks[name] = load(name)
        return tasks[name]

    return load_task


def _karn(args, load_envs: Callable[[], ModuleType]) -> int:
    import torch

    from ._karn import KarnConfig, karn_catalogue, karn_search

    torch.set_num_threads(1)
    fields = dict(suite=args.suite, split=args.split, trials=args.trials, seed=args.seed,
                  train_seeds=tuple(parse_seeds(args.train_seeds)), param_penalty=args.param_penalty,
                  warm_start=args.warm_start, startup_trials=args.startup_trials, max_repeats=args.max_repeats)
    if args.families:
        fields["families"] = tuple(f.strip() for f in args.families.split(",") if f.strip())
    config = KarnConfig.make(**fields)
    from esper_fn.bench import suite

    s = suite(config.suite)  # an unknown suite is a one-line error before anything is created
    envs = load_envs()
    load_task = _task_loader()
    print(f"esper-fn karn: {config.trials} trials over {', '.join(config.families)} on {s.name}'s {config.split} split "
          f"({len(s.split(config.split))} instances x seeds {config.train_seeds[0]}-{config.train_seeds[-1]}), "
          f"seed {config.seed} -> {args.out}")
    t0 = time.perf_counter()
    meta = karn_search(config, envs.MorphogenesisEnv, args.out, load_task=load_task, library=args.library,
                       workers=args.workers, progress=not args.no_progress)
    w = meta["winner"]
    sc = w["score"]
    print(f"winner: {w['blueprint']} at {w['placement']} (trial {w['trial']}, {w['source']}): objective "
          f"{sc['objective']:.4f}, validation accuracy {100 * sc['val_accuracy']:.1f}%, params / host "
          f"{sc['params_ratio']:.3f}" + (f", contribution {100 * sc['contribution']:+.1f} points over static"
                                         if 'contribution' in sc else ""))
    if meta["converged"]:
        print(f"converged: TPE proposed {config.max_repeats} measured points in a row, after {meta['evaluated']} "
              "distinct points")
    print(f"kept in {meta['library']}; study {meta['study']} in {Path(args.out) / 'study.sqlite3'}; trials: "
          f"{Path(args.out) / 'trials.csv'} ({time.perf_counter() - t0:.0f} s)")
    if args.catalogue:
        cat = karn_catalogue(args.out, envs.MorphogenesisEnv, load_task=load_task, workers=args.workers,
                             progress=not args.no_progress)
        b = cat["best"]
        print(f"catalogue's best by the same rule ({len(cat['members'])} blueprint x placement candidates): "
              f"{b['member']}: objective {b['value']:.4f}, validation accuracy {100 * b['val_accuracy']:.1f}%, "
              f"params / host {b['params_ratio']:.3f} ({Path(args.out) / 'catalogue.csv'})")
    return 0


def _karn_compare(args, load_envs: Callable[[], ModuleType]) -> int:
    import torch

    from ._karn import compare_report, karn_compare

    torch.set_num_threads(1)
    envs = load_envs()
    r = karn_compare(args.run_dir, envs.MorphogenesisEnv, parse_seeds(args.seeds), load_task=_task_loader(),
                     new_design=args.new_design, workers=args.workers, progress=not args.no_progress)
    print(compare_report(r))
    stem = "compare-new" if args.new_design else "compare"
    print(f"wrote {Path(args.run_dir) / stem}.md and {stem}.json")
    return 0


def add_parsers(sub, load_envs: Callable[[], ModuleType]) -> None:
    """Register ``train-tamiyo``, ``eval`` and ``bench`` on an argparse subparsers object.

    Args:
        sub: ``parser.add_subparsers(...)``.
        load_envs: returns the envs module (``esper_fn.envs``) when a subcommand runs.
    """
    t = sub.add_parser("train-tamiyo", help="train the Tamiyo controller with PPO")
    _env_args(t)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--iterations", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--entropy-coeff", dest="entropy_coeff", type=float)
    t.add_argument("--ppo-epochs", dest="ppo_epochs", type=int)
    t.add_argument("--minibatch-size", dest="minibatch_size", type=int)
    t.add_argument("--gamma", type=float)
    t.add_argument("--lmbda", type=float)
    t.add_argument("--reward-scale", dest="reward_scale", type=float)
    t.add_argument("--checkpoint-every", dest="checkpoint_every", type=int)
    t.add_argument("--config", help="YAML with PPOConfig fields (flags override it)")
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--out", default="runs/tamiyo")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    t.add_argument("--init", help="Tamiyo weights to start from (warm start; same architecture and env)")
    t.add_argument("--suite", help="train on this benchmark suite's train split (its instances and action space; "
                                   "--task, --hosts, --epochs, --blueprints, --tempos, --max-param-ratio do not apply)")
    t.add_argument("--imitate", metavar="BENCH_DIR",
                   help="first clone the per-instance best fixed policies of the suite's train split, chosen on the "
                        "family runs in BENCH_DIR/runs.csv (training seeds); --iterations 0: imitation only")
    t.add_argument("--demo-seeds", default="0-4", help="training seeds the teachers are demonstrated on")
    t.add_argument("--horizons", default="0.67,1,2", help="demonstrations at these multiples of each instance's epochs")
    t.add_argument("--bc-epochs", type=int, default=40, help="behaviour-cloning passes over the demonstrations")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(fn=lambda a: _train(a, load_envs))

    x = sub.add_parser("tamiyo-export", help="write a train-tamiyo checkpoint's policy as a weights file")
    x.add_argument("run_dir", help="the --out of an `esper-fn train-tamiyo` run")
    x.add_argument("--step", type=int, help="the iteration checkpointed (default: the latest)")
    x.add_argument("--out", help="the weights file (default RUN_DIR/tamiyo_it<step>.safetensors)")
    x.set_defaults(fn=_export)

    e = sub.add_parser("eval", help="compare controllers on held-out seeds")
    _env_args(e)
    e.add_argument("--controllers", default="static,random,schedule,heuristic",
                   help="comma-separated: static, random, schedule, heuristic, tamiyo (the shipped policy), "
                        "tamiyo:PATH")
    e.add_argument("--seeds", default="1000000-1000009", help="held-out run seeds, e.g. 1000000-1000009")
    e.add_argument("--tune-seeds", help="training seeds to tune the baselines on first (validation accuracy)")
    e.add_argument("--params", help="JSON {baseline: {param: value}} (e.g. a previous baseline_params.json)")
    e.add_argument("--merge", action="append", help="runs.csv of an earlier eval (same env and seeds) to include")
    e.add_argument("--safety-bias", type=float, default=0.0, help="Tamiyo: penalise risky actions (0: off)")
    e.add_argument("--uncertainty-bias", type=float, default=0.0, help="Tamiyo: favour WAIT when unsure (0: off)")
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--out", default="runs/eval")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(fn=lambda a: _eval(a, load_envs))

    b = sub.add_parser("bench", help="the growth benchmark: list its instances, run comparators, report")
    bsub = b.add_subparsers(dest="bench_cmd", required=True)
    bl = bsub.add_parser("list", help="one line per instance")
    bl.add_argument("--suite", default="growthbench-v1")
    bl.add_argument("--split", choices=("train", "test"), default=None)
    bl.set_defaults(fn=_bench_list)
    br = bsub.add_parser("run", help="run comparators on a split's instances (resumable: finished jobs are skipped)")
    br.add_argument("--suite", default="growthbench-v1")
    br.add_argument("--split", choices=("train", "test"), default="test")
    br.add_argument("--controllers", default="static,scaleup,capacity,random,schedule,heuristic,astar,oracle",
                    help="comma-separated: static, capacity, scaleup, random, schedule, heuristic, astar, oracle, "
                         "recipe:<position>-<kind>-<at>, tamiyo, tamiyo:PATH, py:module:factory")
    br.add_argument("--seeds", default="1000000-1000004", help="evaluation seeds (never used for tuning)")
    br.add_argument("--train-seeds", default="0-4", help="seeds for tuning the baselines and choosing a*")
    br.add_argument("--workers", type=int, default=1, help="worker processes")
    br.add_argument("--device", default="cpu", help="where the hosts train and a learned policy acts: cpu, cuda, "
                                                    "cuda:<index>")
    br.add_argument("--out", default="runs/bench")
    br.add_argument("--no-progress", action="store_true")
    br.set_defaults(fn=lambda a: _bench_run(a, load_envs))
    k = sub.add_parser("karn", help="search generated blueprints (Karn) on a suite's train split; keep the winner")
    k.add_argument("--suite", default="growthbench-v1")
    k.add_argument("--split", default="train", help="the split trials run on (train: the search never sees test)")
    k.add_argument("--trials", type=int, required=True,
                   help="distinct points to evaluate (a rerun with more extends the search)")
    k.add_argument("--seed", type=int, default=0, help="the TPE sampler's seed (same seed, same search)")
    k.add_argument("--train-seeds", default="0-4", help="run seeds every trial plays (contiguous)")
    k.add_argument("--families", help="comma-separated Karn families (default: all: conv1d,dwsep,mlp,lora,width)")
    k.add_argument("--param-penalty", type=float, default=0.0,
                   help="objective = validation accuracy - PENALTY x (params / host params - 1) (default 0)")
    k.add_argument("--warm-start", type=int, default=3,
                   help="enqueue the library's best N points by contribution per parameter (default 3)")
    k.add_argument("--startup-trials", type=int, default=8, help="TPE's random startup trials (default 8)")
    k.add_argument("--max-repeats", type=int, default=50,
                   help="stop early (converged) after TPE proposes N measured points in a row (default 50)")
    k.add_argument("--library", help="the seed library read for the warm start and written with outcomes and the "
                                     "winner (default OUT/library)")
    k.add_argument("--catalogue", action="store_true",
                   help="then score every catalogue blueprint at every placement by the same rule (catalogue.csv)")
    k.add_argument("--workers", type=int, default=1, help="worker processes for the trials' jobs")
    k.add_argument("--out", required=True, help="run directory (resumable)")
    k.add_argument("--no-progress", action="store_true")
    k.set_defaults(fn=lambda a: _karn(a, load_envs))
    kc = sub.add_parser("karn-compare", help="the Karn winner vs the catalogue's best on the test split, paired by seed")
    kc.add_argument("run_dir", help="the --out of an esper-fn karn search")
    kc.add_argument("--seeds", default="1000000-1000009", help="evaluation seeds (never the search's training seeds)")
    kc.add_argument("--new-design", action="store_true",
                    help="compare the best measured point that is no catalogue design instead of the winner")
    kc.add_argument("--workers", type=int, default=1)
    kc.add_argument("--no-progress", action="store_true")
    kc.set_defaults(fn=lambda a: _karn_compare(a, load_envs))

    bp = bsub.add_parser("report", help="a markdown leaderboard and PNGs of a bench run directory")
    bp.add_argument("run_dir")
    bp.set_defaults(fn=_bench_report)
