"""Populations of hosts that decide differently: what regrouping costs next to an epoch.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_population.py [--repeats 7]

A population of N impaired-MLP hosts on MNIST-1D, all carrying a conv1d_k5 seed at the input in
mixed stages (GERMINATED, TRAINING, BLENDING at alpha 0 and > 0, HOLDING), so one stacked group.
Measured side by side (medians of `--repeats`):

- restack:     `unstack` the group, `advance` host 0 as a single state, `stack` again (the per-host
               op path esper_fn uses: lifecycle ops take single states).
- slot edit:   the same stage change written directly into the stacked state's per-host slot
               table (`state.replace(slots=...)`), the cheapest possible per-host op on a stack.
- partition:   `partition` + `stack` of N single states (what `train_epochs` does every epoch).
- epoch:       one batched epoch of the N hosts (`train_epochs`), against a loop of N
               `train_epoch` calls on single states (the ratio is loop / batched).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import esper_fn as ef
from esper_fn.tasks import load
from esper_fn.training import TrainConfig, train_epoch, train_epochs

STAGES = ("germinated", "training", "blend0", "blend", "holding")


def population(n: int) -> list[ef.State]:
    host = ef.hosts.hosts()["mlp-impaired"]()
    out = []
    for j in range(n):
        s = ef.init(host, generator=torch.Generator().manual_seed(j))
        s = ef.germinate(s, "input", "conv1d_k5", generator=torch.Generator().manual_seed(100 + j), tempo=3)
        kind = STAGES[j % len(STAGES)]
        if kind != "germinated":
            s = ef.advance(s, "input")
        if kind in ("blend0", "blend", "holding"):
            s = ef.advance(s, "input", force=True)
        if kind == "blend":
            s = ef.tick(s)
        if kind == "holding":
            s = ef.advance(s, "input", force=True)
        out.append(s)
    return out


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--sizes", type=int, nargs="+", default=[4, 16])
    args = ap.parse_args()
    torch.set_num_threads(1)
    task = load("mnist1d", seed=0)
    cfg = TrainConfig()
    print(f"torch {torch.__version__}, 1 thread, mlp-impaired + conv1d_k5 at input, mixed stages, medians of {args.repeats}")
    print(f"{'N':>3}  {'restack us':>10}  {'slot edit us':>12}  {'partition+stack us':>18}  {'batched epoch ms':>16}  "
          f"{'loop epoch ms':>13}  {'loop/batched':>12}")
    for n in args.sizes:
        pop = population(n)
        stacked = ef.stack(pop)

        def restack():
            hosts = ef.unstack(stacked)
            hosts[0] = ef.advance(hosts[0], "input")
            return ef.stack(hosts)

        def slot_edit():
            slots = stacked.slots.clone()
            slots["stage"][0, 0] = int(ef.Stage.TRAINING)
            return stacked.replace(slots=slots)

        def regroup():
            return [ef.stack([pop[j] for j in g]) for g in ef.partition(pop)]

        gens = [torch.Generator().manual_seed(j) for j in range(n)]
        t_restack = timed(restack, args.repeats * 5)
        t_edit = timed(slot_edit, args.repeats * 5)
        t_group = timed(regroup, args.repeats * 5)
        t_batched = timed(lambda: train_epochs(pop, task, cfg, generators=gens), args.repeats)
        t_loop = timed(lambda: [train_epoch(s, task, cfg, generator=g) for s, g in zip(pop, gens)], args.repeats)
        print(f"{n:>3}  {t_restack * 1e6:>10.0f}  {t_edit * 1e6:>12.0f}  {t_group * 1e6:>18.0f}  "
              f"{t_batched * 1e3:>16.1f}  {t_loop * 1e3:>13.1f}  {t_loop / t_batched:>12.2f}")


if __name__ == "__main__":
    main()
