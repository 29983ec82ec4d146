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
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

__all__ = ["DEFAULT_GRIDS", "add_parsers", "parse_seeds"]

DEFAULT_GRIDS: dict[str, list[dict]] = {
    "random": [{"wait_prob": p} for p in (0.5, 0.8, 0.95)],
    "schedule": [{"start": s, "every": e} for s in (1, 5) for e in (5, 15)],
    "heuristic": [{"patience": p, "min_train_loss": m} for p in (1, 2, 4) for m in (0.0, 0.5)],
}
"""Parameter grids `--tune-seeds` searches (by mean final validation accuracy on those seeds)."""


def parse_seeds(text: str) -> list[int]:
    """``"0-4,10,12-13"`` -> ``[0, 1, 2, 3, 4, 10, 12, 13]``."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            out += list(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    if not out:
        raise argparse.ArgumentTypeError(f"no seeds in {text!r}")
    return out


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
    g.add_argument("--blueprints", default=None, help="comma-separated blueprint ids (default: the catalogue)")
    g.add_argument("--tempos", default="3,5,8")
    g.add_argument("--max-param-ratio", type=float, default=None, help="mask germinations beyond this size ratio")
    g.add_argument("--subset-train", type=int, default=None, help="keep the first N training samples")


def env_kwargs(args) -> dict:
    """MorphogenesisEnv keyword arguments from the parsed environment flags."""
    kw = dict(contexts=[(args.task, h.strip()) for h in args.hosts.split(",") if h.strip()], max_epochs=args.epochs,
              reward=args.reward, tempos=tuple(int(t) for t in args.tempos.split(",")),
              max_param_ratio=args.max_param_ratio)
    if args.blueprints:
        kw["blueprints"] = tuple(b.strip() for b in args.blueprints.split(","))
    if args.subset_train:
        kw["subset"] = {"train": args.subset_train}
    return kw


def _train(args, load_envs: Callable[[], ModuleType]) -> int:
    from functools import partial

    import torch

    from ._ppo import PPOConfig, train_ppo

    torch.set_num_threads(args.threads)
    envs = load_envs()
    kw = env_kwargs(args)
    make_env = partial(envs.MorphogenesisEnv, num_envs=args.num_envs, seed=args.seed, **kw)
    probe = envs.MorphogenesisEnv(num_envs=1, **kw)
    space = probe.action_space
    from esper_fn._errors import ConfigError
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
    config = validate_config(fields, PPOConfig, where=args.config or "", flags=set(fields) - from_file)
    print(f"esper-fn train-tamiyo: {[c.name for c in probe.contexts]}, {args.num_envs} rows x {args.epochs} epochs, "
          f"{config.iterations} iterations, {probe.action_space.n} actions, seed {config.seed} -> {args.out}")
    env_meta = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items()}
    env_meta["reward"] = reward
    summary = train_ppo(make_env, config, args.out, space, resume=args.resume, progress=not args.no_progress,
                        init=args.init,
                        metadata={"command": " ".join(["esper-fn", *sys.argv[1:]]),
                                  "env": json.loads(json.dumps(env_meta, default=str))})
    last = summary["last"]
    print(f"done: {summary['frames']} frames; last iteration: return {last.get('episode_return', float('nan')):.3f}, "
          f"final val acc {last.get('final_val_accuracy', float('nan')):.3f}, explained variance "
          f"{last.get('explained_variance', float('nan')):.2f}, entropy {last.get('entropy', float('nan')):.2f}")
    print(f"weights: {summary['weights']}")
    return 0


def _eval(args, load_envs: Callable[[], ModuleType]) -> int:
    import torch

    from esper_fn._errors import ConfigError

    from ._baselines import make_baseline
    from ._eval import evaluate_controllers, plot_runs, summarize, tamiyo_policy, tune_baseline, write_csv

    torch.set_num_threads(args.threads)
    envs = load_envs()
    kw = env_kwargs(args)

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


def add_parsers(sub, load_envs: Callable[[], ModuleType]) -> None:
    """Register ``train-tamiyo`` and ``eval`` on an argparse subparsers object.

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
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(fn=lambda a: _train(a, load_envs))

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
