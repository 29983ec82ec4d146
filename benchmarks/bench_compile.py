"""Compiled (Tezzeret) vs eager train steps, side by side in one run.

For each impaired MNIST-1D host, 1 and 16 stacked hosts, without a seed and with a conv1d_k5 seed
live on the input slot (BLENDING, alpha 1): the eager step (`esper_fn.train_step`, donating its
intermediate states as `train_epoch` does) against two compiled kernels
(`esper_fn.tezzeret.KernelCache.step`): ``conv="library"`` (inductor as it is: convolutions stay
oneDNN calls) and ``conv="loops"`` (the default: stride-1 1-D convolutions lowered to loops inductor
fuses). Every chain trains on the same MNIST-1D batches (batch 100 per host, each host its own data
order, cycling through an epoch of 30 batches). Reports per-step medians, the speed-up of each
kernel, the compile time (`prepare`: compile plus first call), the break-even number of steps
(compile time / time saved per step), the bytes each kernel was charged, the largest parameter
difference from the eager chain after the timed steps, and, as the noise floor, the same difference
between two eager chains whose start differs by 1e-7 (relative). The chains are timed in
alternating blocks, so a change in machine load hits all of them.

    OMP_NUM_THREADS=1 nice .venv/bin/python -W ignore::DeprecationWarning benchmarks/bench_compile.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import esper_fn as ef
from esper_fn import tezzeret
from esper_fn.tasks import load

STEPS_PER_EPOCH = 30  # MNIST-1D: 3000 training samples, batch 100


def make_state(host: str, n: int, seed: bool, g: torch.Generator) -> ef.State:
    s = ef.init(ef.hosts.preset(host), optimizer=ef.optim.adam(1e-2), generator=g)
    if seed:
        s = ef.germinate(s, "input", "conv1d_k5", generator=g, tempo=1)
        s = ef.tick(ef.advance(ef.advance(s, "input"), "input", force=True))  # BLENDING, alpha 1
    if n > 1:
        s = ef.stack([s] * n)
    return s


def one(host: str, n: int, seed: bool, blocks: int, per_block: int) -> dict:
    g = torch.Generator().manual_seed(0)
    state = make_state(host, n, seed, g)
    task = load("mnist1d", seed=0)
    x_all, y_all = task.split("train")
    order = torch.stack([torch.randperm(x_all.shape[0], generator=g) for _ in range(max(n, 1))])
    xs, ys = x_all[order], y_all[order]  # [hosts, 3000, 40]
    batches = [(xs[:, i:i + 100], ys[:, i:i + 100]) for i in range(0, xs.shape[1], 100)]
    if n == 1:
        batches = [(x[0], y[0]) for x, y in batches]
    caches = {"library": tezzeret.KernelCache(conv="library"), "loops": tezzeret.KernelCache()}
    infos = {name: kc.prepare(state, *batches[0]) for name, kc in caches.items()}

    def eager(s, xx, yy):  # donates the intermediate states, never `state` itself (as train_epoch does)
        return ef.train_step(s, xx, yy, donate=s is not state)

    # The noise floor: eager again from parameters perturbed by 1e-7 (relative). Where training is
    # chaotic (a ReLU input at 0, Adam on a tiny gradient), two eager runs part by as much as eager and
    # compiled do; the table shows both.
    gp = torch.Generator().manual_seed(1)
    perturbed = state.replace(params_flat={k: v * (1 + 1e-7 * torch.randn(v.shape, generator=gp))
                                           for k, v in state.params_flat.items()})

    def eager_perturbed(s, xx, yy):
        return ef.train_step(s, xx, yy, donate=s is not perturbed)

    fns = {"eager": eager, **{name: kc.step for name, kc in caches.items()}}
    chains = {name: state for name in fns}
    chains["noise"] = perturbed
    fns["noise"] = eager_perturbed
    times: dict[str, list[float]] = {name: [] for name in fns}
    step = 0
    for block in range(blocks + 1):  # block 0 warms every path (allocator, oneDNN primitive caches)
        for name, fn in fns.items():
            s = chains[name]
            t0 = time.perf_counter()
            for j in range(per_block):
                s, _m = fn(s, *batches[(step + j) % len(batches)])
            if block:
                times[name].append((time.perf_counter() - t0) / per_block)
            chains[name] = s
        step += per_block
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    row = {"host": host, "n": n, "seed": "conv1d_k5" if seed else "none", "eager_ms": med["eager"],
           "steps_compared": (blocks + 1) * per_block,
           "noise_floor": max(float((chains["eager"].params_flat[k] - chains["noise"].params_flat[k]).abs().max())
                              for k in state.params_flat)}
    for name, info in infos.items():
        saved = (med["eager"] - med[name]) / 1e3
        diff = max(float((chains["eager"].params_flat[k] - chains[name].params_flat[k]).abs().max())
                   for k in state.params_flat)
        row[name] = {"ms": med[name], "speedup": med["eager"] / med[name], "compile_s": info.seconds,
                     "break_even_steps": info.seconds / saved if saved > 0 else None,
                     "kernel_mib": info.bytes / 2**20, "max_param_diff": diff,
                     "stats": caches[name].stats.model_dump()}
    return row


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
    print("| host | hosts | seed | eager ms/step | compiled ms/step (library conv / loops) | speed-up | compile s "
          "| break-even steps (epochs) | kernel MiB | max param diff from eager | eager vs eager from 1e-7 "
          "perturbed params |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")

    def be(k):
        v = k["break_even_steps"]
        return "never" if v is None else f"{v:.0f} ({v / STEPS_PER_EPOCH:.0f})"

    for r in rows:
        lib, loops = r["library"], r["loops"]
        print(f"| {r['host']} | {r['n']} | {r['seed']} | {r['eager_ms']:.2f} | {lib['ms']:.2f} / {loops['ms']:.2f} | "
              f"{lib['speedup']:.2f}x / **{loops['speedup']:.2f}x** | {lib['compile_s']:.1f} / {loops['compile_s']:.1f} "
              f"| {be(lib)} / {be(loops)} | {lib['kernel_mib']:.1f} / {loops['kernel_mib']:.1f} | "
              f"{lib['max_param_diff']:.1e} / {loops['max_param_diff']:.1e} | {r['noise_floor']:.1e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
