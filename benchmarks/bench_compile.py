"""Compiled (Tezzeret) vs eager train steps, side by side in one run.

For each impaired MNIST-1D host, 1 and 16 stacked hosts, without a seed and with a conv1d_k5 seed
live on the input slot (BLENDING, alpha 1): the eager step (`esper_fn.train_step`, donating its
intermediate states as `train_epoch` does) against the compiled kernel
(`esper_fn.tezzeret.KernelCache.step`), batch 100 per host (one MNIST-1D step). Reports per step
medians, the speed-up, the compile time (`prepare`: compile plus first call), the break-even
number of steps (compile time / time saved per step), the bytes the kernel was charged, and the
largest parameter difference after the timed steps (eager and compiled chains from the same
state). Eager and compiled steps are timed in alternating blocks, so a change in machine load hits
both.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/bench_compile.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import esper_fn as ef
from esper_fn import tezzeret

STEPS_PER_EPOCH = 30  # MNIST-1D: 3000 training samples, batch 100


def make_state(host: str, n: int, seed: bool, g: torch.Generator) -> ef.State:
    s = ef.init(ef.hosts.preset(host), optimizer=ef.optim.adam(1e-2), generator=g)
    if seed:
        s = ef.germinate(s, "input", "conv1d_k5", generator=g, tempo=1)
        s = ef.tick(ef.advance(ef.advance(s, "input"), "input", force=True))  # BLENDING, alpha 1
    if n > 1:
        s = ef.stack([s] * n)
    return s


def time_blocks(fn, state, x, y, blocks: int, per_block: int) -> tuple[list[float], object]:
    """Per-step seconds of `blocks` blocks of `per_block` chained steps (returns the last state)."""
    out = []
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(per_block):
            state, _m = fn(state, x, y)
        out.append((time.perf_counter() - t0) / per_block)
    return out, state


def one(host: str, n: int, seed: bool, blocks: int, per_block: int) -> dict:
    g = torch.Generator().manual_seed(0)
    state = make_state(host, n, seed, g)
    batch = (n,) if n > 1 else ()
    x = torch.randn(*batch, 100, 40, generator=g)
    y = torch.randint(0, 10, (*batch, 100), generator=g)
    kernels = tezzeret.KernelCache()
    info = kernels.prepare(state, x, y)

    def eager(s, xx, yy):  # donates the intermediate states, never `state` itself (as train_epoch does)
        return ef.train_step(s, xx, yy, donate=s is not state)

    # warm both paths (allocator, oneDNN primitive caches)
    time_blocks(eager, state, x, y, 1, 5)
    time_blocks(kernels.step, state, x, y, 1, 5)
    e_times, c_times = [], []
    e_state, c_state = state, state
    for _ in range(blocks):
        t, e_state = time_blocks(eager, e_state, x, y, 1, per_block)
        e_times += t
        t, c_state = time_blocks(kernels.step, c_state, x, y, 1, per_block)
        c_times += t
    diff = max(float((e_state.params_flat[k] - c_state.params_flat[k]).abs().max()) for k in e_state.params_flat)
    e_ms, c_ms = statistics.median(e_times) * 1e3, statistics.median(c_times) * 1e3
    saved = (e_ms - c_ms) / 1e3
    return {"host": host, "n": n, "seed": "conv1d_k5" if seed else "none", "eager_ms": e_ms, "compiled_ms": c_ms,
            "speedup": e_ms / c_ms, "compile_s": info.seconds, "break_even_steps": info.seconds / saved if saved > 0
            else None, "kernel_mib": info.bytes / 2**20, "max_param_diff": diff, "steps_compared": blocks * per_block,
            "stats": kernels.stats.model_dump()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hosts", nargs="+", default=["mlp-impaired", "cnn-impaired"])
    p.add_argument("--n", type=int, nargs="+", default=[1, 16])
    p.add_argument("--blocks", type=int, default=5)
    p.add_argument("--per-block", type=int, default=20)
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for host in args.hosts:
        for n in args.n:
            for seed in (False, True):
                r = one(host, n, seed, args.blocks, args.per_block)
                rows.append(r)
                print(json.dumps(r), flush=True)
    print()
    print("| host | hosts | seed | eager ms/step | compiled ms/step | speed-up | compile s | break-even steps "
          "(epochs) | kernel MiB | max param diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        be = "never" if r["break_even_steps"] is None else \
            f"{r['break_even_steps']:.0f} ({r['break_even_steps'] / STEPS_PER_EPOCH:.1f})"
        print(f"| {r['host']} | {r['n']} | {r['seed']} | {r['eager_ms']:.2f} | {r['compiled_ms']:.2f} | "
              f"**{r['speedup']:.2f}x** | {r['compile_s']:.1f} | {be} | {r['kernel_mib']:.1f} | "
              f"{r['max_param_diff']:.1e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
