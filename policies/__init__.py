"""Controllers (installed as ``esper_fn.policies``): Tamiyo, baselines, PPO, evaluation.

* Tamiyo (`make_tamiyo`, `save_tamiyo`, `load_tamiyo`): a torch_geometric GATv2 actor-critic over
  the env's layer/slot graph with a masked categorical over the flat action space, a value
  ensemble (uncertainty) and a safety head. docs/tamiyo.md.
* Baselines as TorchRL policies (`make_baseline`: static, random, and the core controllers schedule
  and heuristic through `ControllerPolicy`).
* PPO (`PPOConfig`, `train_ppo`), evaluation (`evaluate_controllers`), offline rollouts
  (`save_rollouts`, `load_rollouts`).
* The growth benchmark's statistics and report over its runs.csv (`read_runs`, `write_runs`, `astar`,
  `oracle`, `headroom`, `captured`, `difference`, `bench_stats`, `seeds_needed`, `leaderboard`, `plot_bench`).
* Karn's blueprint search (`KarnConfig`, `karn_search`, `karn_catalogue`, `karn_compare`): Optuna's TPE
  over the families of `esper_fn.karn`, trials through the env by the bench harness. docs/karn.md.

This package never imports `esper_fn.envs`: everything env-specific (specs, the action space, env
factories) comes in as arguments. Public names load on first use (PEP 562), so
``import esper_fn.policies.cli`` stays cheap for the ``esper-fn`` command.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

SHIPPED_WEIGHTS = Path(__file__).parent / "weights" / "tamiyo_growthbench.safetensors"
"""The shipped Tamiyo policy: trained on growthbench-v1's train split, imitation of the per-instance
teachers then 70 iterations of PPO, chosen on selection seeds (docs/tamiyo.md, "Tamiyo v2").
``esper-fn grow --controller tamiyo``, ``esper-fn bench run --controllers tamiyo`` and ``esper-fn eval
--controllers tamiyo`` use it."""

IMITATION_WEIGHTS = Path(__file__).parent / "weights" / "tamiyo_growthbench_imitation.safetensors"
"""Tamiyo v2 before PPO (behaviour cloning of the teachers alone): the warm start of the shipped
policy, kept to reproduce the results recorded with it."""

V1_WEIGHTS = Path(__file__).parent / "weights" / "tamiyo_mnist1d.safetensors"
"""The first Tamiyo (MNIST-1D, mlp-impaired, the full catalogue; docs/results.md): kept to reproduce
the results recorded with it."""

_LAZY: dict[str, str] = {
    "OBS_KEYS": "._tamiyo",
    "TamiyoConfig": "._tamiyo",
    "TamiyoError": "._tamiyo",
    "make_tamiyo": "._tamiyo",
    "save_tamiyo": "._tamiyo",
    "load_tamiyo": "._tamiyo",
    "DeferringPolicy": "._tamiyo",
    "ResolvingPolicy": "._tamiyo",
    "tamiyo_from_checkpoint": "._ppo",
    "TamiyoTrunk": "._net",
    "TamiyoHead": "._net",
    "dense_to_pyg": "._net",
    "StaticPolicy": "._baselines",
    "RandomPolicy": "._baselines",
    "ControllerPolicy": "._baselines",
    "make_baseline": "._baselines",
    "PPOConfig": "._ppo",
    "train_ppo": "._ppo",
    "harm_labels": "._ppo",
    "action_stats": "._ppo",
    "tamiyo_parameters": "._tamiyo",
    "evaluate_controllers": "._eval",
    "run_episodes": "._eval",
    "summarize": "._eval",
    "mean_ci": "._eval",
    "RunRecord": "._eval",
    "read_runs": "._bench_stats",
    "write_runs": "._bench_stats",
    "astar": "._bench_stats",
    "oracle": "._bench_stats",
    "headroom": "._bench_stats",
    "captured": "._bench_stats",
    "bench_stats": "._bench_stats",
    "seeds_needed": "._bench_stats",
    "leaderboard": "._bench_stats",
    "plot_bench": "._bench_stats",
    "BenchStats": "._bench_stats",
    "Captured": "._bench_stats",
    "Headroom": "._bench_stats",
    "OraclePick": "._bench_stats",
    "Paired": "._bench_stats",
    "Difference": "._bench_stats",
    "difference": "._bench_stats",
    "KarnConfig": "._karn",
    "karn_search": "._karn",
    "karn_catalogue": "._karn",
    "karn_compare": "._karn",
    "save_rollouts": "._offline",
    "load_rollouts": "._offline",
}

__all__ = ["IMITATION_WEIGHTS", "SHIPPED_WEIGHTS", "V1_WEIGHTS", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
