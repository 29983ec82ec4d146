"""MorphogenesisEnv throughput: host-epochs per second of one batched env (N rows) against TorchRL's
`SerialEnv` of N single-row envs, side by side in one run, plus the achieved FLOP/s of one env step
against the matmul peak of one core.

Populations (MNIST-1D, mlp-impaired, the full 3000/1000 train/val split, batch 100):
- "dormant": every row without seeds;
- "mixed": half the rows carry a conv seed (conv1d_k5) at the input, a quarter an MLP seed (mlp_gelu)
  after fc1, the rest are dormant; seeds are live at alpha 1 (HOLDING) while measured.

Both sides take the same actions (the seeds are grown through the env's own actions during warm-up,
then every row waits). A step trains one epoch of every row and measures its telemetry.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_env.py            # N = 1, 4, 16, 64; 1 and 2 threads
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_env.py --n 16 --threads 1 --repeats 3
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
from tensordict import TensorDict
from torchrl.envs import SerialEnv

from esper_fn import GateConfig
from esper_fn import Op
from esper_fn.envs import MorphogenesisEnv
from esper_fn.tezzeret import KernelCache
from esper_fn.training import flops_per_sample

MAKE = dict(task="mnist1d", host="mlp-impaired", max_epochs=10_000, tempos=(1,),
            gates=GateConfig(min_training_epochs=0, min_holding_epochs=0))


def kinds(n: int, population: str) -> list[str]:
    if population == "dormant":
        return ["dormant"] * n
    half, quarter = n // 2, n // 4
    return ["conv"] * half + ["mlp"] * quarter + ["dormant"] * (n - half - quarter)


def warm_actions(space, kind: str) -> list[int]:
    """Germinate through the env (tempo 1, no incubation gate), then wait until the seed is at HOLDING."""
    if kind == "conv":
        first = space.encode(Op.GERMINATE, 0, "conv1d_k5", 1)
    elif kind == "mlp":
        first = space.encode(Op.GERMINATE, 1, "mlp_gelu", 1)
    else:
        first = 0
    return [first, 0, 0, 0]


def step_batched(env: MorphogenesisEnv, actions: list[int]) -> None:
    env.step(TensorDict({"action": torch.tensor(actions)}, batch_size=[env.num_envs]))


def step_serial(env: SerialEnv, actions: list[int]) -> None:
    env.step(TensorDict({"action": torch.tensor(actions).reshape(-1, 1)}, batch_size=env.batch_size))


def timed(fn, steps: int, repeats: int) -> float:
    """Median seconds per step over `repeats` runs of `steps` steps."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        times.append((time.perf_counter() - t0) / steps)
    return statistics.median(times)


def matmul_peak() -> float:
    """FLOP/s of a 1024 x 1024 float32 matmul on the current threads (median of 5)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    t = timed(lambda: a @ b, 5, 5)
    return 2 * 1024**3 / t


def step_flops(env: MorphogenesisEnv) -> float:
    """FLOPs of one env step: per row, forward+backward (3x forward) over the train split, plus
    the validation forwards of the telemetry (one, plus one per live seed for contributions)."""
    total = 0.0
    for i in range(env.num_envs):
        state, task = env.state(i), env.context(i).task
        f = flops_per_sample(state, task.x_val[:1])
        live = sum(1 for b in state.blueprints if b is not None)
        total += 3 * f * len(task.y_train) + f * len(task.y_val) * (1 + live)
    return total


def bench(n: int, population: str, threads: int, steps: int, repeats: int, compile: bool = False) -> dict:
    torch.set_num_threads(threads)
    rows = kinds(n, population)
    kernels = KernelCache() if compile else None  # opt-in compiled group steps (batched side only)
    batched = MorphogenesisEnv(num_envs=n, seed=0, kernels=kernels, **MAKE)
    serial = SerialEnv(n, functools.partial(MorphogenesisEnv, num_envs=1, **MAKE))
    serial.set_seed(0)
    batched.reset()
    serial.reset()
    space = batched.action_space
    plans = [warm_actions(space, k) for k in rows]
    for t in range(len(plans[0])):
        acts = [p[t] for p in plans]
        step_batched(batched, acts)
        step_serial(serial, acts)
    wait = [0] * n
    t0 = time.perf_counter()
    step_batched(batched, wait)  # with kernels: the populations' structures compile here, untimed
    compile_s = time.perf_counter() - t0
    tb = timed(lambda: step_batched(batched, wait), steps, repeats)
    ts = timed(lambda: step_serial(serial, wait), steps, repeats)
    flops = step_flops(batched)
    serial.close()
    return {"n": n, "population": population, "threads": threads, "batched_s": tb, "serial_s": ts,
            "batched_eps": n / tb, "serial_eps": n / ts, "ratio": ts / tb, "flops": flops,
            "first_step_s": compile_s}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--population", nargs="+", default=["dormant", "mixed"])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true",
                   help="batched env trains through compiled group steps (MorphogenesisEnv(kernels=KernelCache()))")
    args = p.parse_args()
    peaks = {}
    for th in args.threads:
        torch.set_num_threads(th)
        peaks[th] = matmul_peak()
    print("matmul peak (1024^3 float32): " + ", ".join(f"{th} thread(s) {v / 1e9:.1f} GFLOP/s"
                                                         for th, v in peaks.items()))
    print(f"{'threads':>7} {'population':>10} {'N':>3} | {'batched ep/s':>12} {'SerialEnv ep/s':>14} "
          f"{'ratio':>6} | {'step s':>7} {'GFLOP/s':>8} {'% 1-core peak':>13}")
    for th in args.threads:
        for pop in args.population:
            for n in args.n:
                r = bench(n, pop, th, args.steps, args.repeats, args.compile)
                gflops = r["flops"] / r["batched_s"] / 1e9
                print(f"{th:>7} {pop:>10} {n:>3} | {r['batched_eps']:>12.1f} {r['serial_eps']:>14.1f} "
                      f"{r['ratio']:>5.2f}x | {r['batched_s']:>7.3f} {gflops:>8.2f} "
                      f"{100 * r['flops'] / r['batched_s'] / peaks[1]:>12.1f}%"
                      + (f"  (first step incl. compiles {r['first_step_s']:.1f} s)" if args.compile else ""),
                      flush=True)


if __name__ == "__main__":
    main()
