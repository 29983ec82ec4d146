"""Where an env step's time goes: one `MorphogenesisEnv` step of bench_env.py's populations, profiled.

    OMP_NUM_THREADS=1 .venv/bin/python -W ignore::DeprecationWarning benchmarks/profile_env.py [--n 16 64] [--steps 3]

For each population (dormant, mixed) and N, after the warm-up that grows the seeds (bench_env.py's
`warm_actions`), `--steps` timed steps of all-WAIT actions with:

- the step's wall time, unprofiled;
- phases (shares of the step under `cProfile`, from the cumulative times of the functions a step calls, per step): the
  stacked training (`esper_fn.training.train_epochs`), the telemetry (`esper_fn.training.telemetry`:
  validation forwards, contributions, gradient norms), the observation (`Observer.__call__`:
  features, graph and action mask), and the rest of `esper_fn.episode.step` (decisions, governor,
  bookkeeping) and of TorchRL's `EnvBase.step`;
- operators (`torch.profiler`, CPU): aten operator calls per host-epoch, the microseconds each
  call costs on average, and the share of the step's operator time spent in matrix products
  (`aten::mm`, `bmm`, `addmm`, `convolution`, ...), against the step's wall time: a step whose
  operators are mostly small is paid for in per-call overhead, not FLOPs.

Prints one table per population and N; the numbers go into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
from bench_env import MAKE, kinds, step_batched, warm_actions

from esper_fn.envs import MorphogenesisEnv

PHASES = (("train_epochs", "training.py", "train_epochs"), ("telemetry", "training.py", "telemetry"),
          ("observe", "_observe.py", "__call__"), ("growth step", "episode.py", "step"),
          ("env step", "common.py", "step"))
MATMUL = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::convolution", "aten::_convolution",
          "aten::mkldnn_convolution", "aten::convolution_backward", "aten::linear", "aten::matmul")


def build(n: int, population: str) -> MorphogenesisEnv:
    env = MorphogenesisEnv(num_envs=n, seed=0, **MAKE)
    env.reset()
    plans = [warm_actions(env.action_space, k) for k in kinds(n, population)]
    for t in range(len(plans[0])):
        step_batched(env, [p[t] for p in plans])
    return env


def plain(env: MorphogenesisEnv, steps: int) -> float:
    """Seconds per step, unprofiled."""
    wait = [0] * env.num_envs
    t0 = time.perf_counter()
    for _ in range(steps):
        step_batched(env, wait)
    return (time.perf_counter() - t0) / steps


def phases(env: MorphogenesisEnv, steps: int) -> tuple[float, dict[str, float]]:
    """Seconds per step under cProfile, and each phase's cumulative seconds per step."""
    wait = [0] * env.num_envs
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(steps):
        step_batched(env, wait)
    prof.disable()
    wall = (time.perf_counter() - t0) / steps
    stats = pstats.Stats(prof).stats
    out = {}
    for label, file, fn in PHASES:
        out[label] = sum(v[3] for (f, _, name), v in stats.items() if name == fn and f.endswith(file)) / steps
    return wall, out


def operators(env: MorphogenesisEnv, steps: int) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    wait = [0] * env.num_envs
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(steps):
            step_batched(env, wait)
    events = p.key_averages()
    calls = sum(e.count for e in events)
    self_us = sum(e.self_cpu_time_total for e in events)
    mm_us = sum(e.self_cpu_time_total for e in events if e.key in MATMUL)
    return {"calls": calls / steps, "self_s": self_us / 1e6 / steps, "matmul_share": mm_us / max(self_us, 1e-9),
            "us_per_call": self_us / max(calls, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--population", nargs="+", default=["dormant", "mixed"])
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("| population | N | step s (host-epochs/s) | train_epochs | telemetry | observe | rest of growth step | TorchRL step "
          "| aten calls / host-epoch | us / aten call | aten self time / step | matmul+conv share of aten time |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for pop in args.population:
        for n in args.n:
            env = build(n, pop)
            bare = plain(env, args.steps)
            wall, ph = phases(env, args.steps)
            ops = operators(env, args.steps)
            rest = ph["growth step"] - ph["train_epochs"] - ph["telemetry"]
            outer = ph["env step"] - ph["growth step"] - ph["observe"]
            share = lambda s: f"{100 * s / wall:.0f}%"  # noqa: E731
            print(f"| {pop} | {n} | {bare:.3f} ({n / bare:.0f}) | {share(ph['train_epochs'])} | {share(ph['telemetry'])} | "
                  f"{share(ph['observe'])} | {share(rest)} | {share(outer)} | {ops['calls'] / n:,.0f} | "
                  f"{ops['us_per_call']:.1f} | {ops['self_s']:.3f} s | {100 * ops['matmul_share']:.0f}% |")


if __name__ == "__main__":
    main()
