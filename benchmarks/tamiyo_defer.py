"""Tamiyo that defers to a* where its value ensemble is unsure: calibration and a bench factory.

Calibrate on the train split only (selection seeds, never evaluation seeds): play a Tamiyo
(`--weights`, default the imitation policy the deferral was measured with, `IMITATION_WEIGHTS`)
on every train instance and keep the largest value-ensemble spread it shows there; that is the
threshold above which `esper_fn.policies.DeferringPolicy` takes a*'s action instead:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tamiyo_defer.py --seeds 900000-900004 --out runs/tamiyo_defer.json

Then evaluate it like any comparator (the factory reads the JSON named by TAMIYO_DEFER, default
runs/tamiyo_defer.json; `benchmarks/` must be importable):

    TAMIYO_DEFER=runs/tamiyo_defer.json PYTHONPATH=benchmarks esper-fn bench run --suite growthbench-v1 \\
        --split test --controllers py:tamiyo_defer:factory --seeds 1000000-1000009 --train-seeds 0-4 --out runs/defer
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

ASTAR = "recipe:input-conv-0"  # growthbench-v1's a* (docs/bench.md), chosen on the train split


def factory(space):
    """`py:tamiyo_defer:factory`: the calibrated Tamiyo deferring to a* above the calibrated spread."""
    from esper_fn.policies import DeferringPolicy
    from esper_fn.policies._bench import make_policy
    from esper_fn.policies._eval import tamiyo_policy

    cal = json.loads(Path(os.environ.get("TAMIYO_DEFER", "runs/tamiyo_defer.json")).read_text())
    return DeferringPolicy(tamiyo_policy(cal["weights"], space), make_policy(cal["fallback"], space),
                           cal["threshold"])


def calibrate(seeds: list[int], weights: str) -> dict:
    import torch
    from torchrl.envs.utils import ExplorationType, set_exploration_type

    from esper_fn.bench import suite
    from esper_fn.envs import MorphogenesisEnv
    from esper_fn.policies._eval import tamiyo_policy

    s = suite("growthbench-v1")
    per = {}
    for inst in s.split("train"):
        env = MorphogenesisEnv(instances=[inst], num_envs=len(seeds), seed=seeds[0], blueprints=s.blueprints,
                               tempos=s.tempos, max_slots=s.num_slots)
        actor = tamiyo_policy(weights, env.action_space, env.action_spec)
        td, most = env.reset(), 0.0
        for _ in range(inst.epochs):
            with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
                td = actor(td)
            most = max(most, float(td["value_uncertainty"].max()))
            td = env.step(td)["next"]
        per[inst.name] = most
        print(f"{inst.name}: largest value-ensemble spread {most:.4f}", flush=True)
    return {"threshold": max(per.values()), "per_instance": per, "seeds": seeds, "fallback": ASTAR,
            "weights": str(weights), "weights_sha256": hashlib.sha256(Path(weights).read_bytes()).hexdigest()}


def main() -> None:
    from esper_fn.policies import IMITATION_WEIGHTS
    from esper_fn.policies.cli import parse_seeds

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="900000-900004", help="selection seeds on the train split (not evaluation)")
    ap.add_argument("--out", default="runs/tamiyo_defer.json")
    ap.add_argument("--weights", default=str(IMITATION_WEIGHTS), help="the Tamiyo weights to calibrate and defer from")
    a = ap.parse_args()
    seeds = parse_seeds(a.seeds)
    if max(seeds) >= 1_000_000:
        raise SystemExit("tamiyo_defer: calibrate on selection seeds, never on evaluation seeds (>= 1,000,000).")
    cal = calibrate(seeds, a.weights)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(cal, indent=2))
    print(f"threshold {cal['threshold']:.4f} -> {a.out}")


if __name__ == "__main__":
    main()
