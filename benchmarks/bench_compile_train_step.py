"""`torch.compile(esper_fn.train_step)`, and of a user's loop calling it: does it work, does it agree
with the eager step, and what does it cost?

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_compile_train_step.py            # ~2-4 min
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_compile_train_step.py --quick    # fewer timed blocks

On mlp-impaired (40-16-10, Adam lr 1e-2, MNIST-1D batches of 100) with a conv1d_k5 seed on the input
slot, once in TRAINING (shadow incubation: two forwards) and once in BLENDING (alpha 0.2: the seed
in the live forward), it compiles two functions with the default `torch.compile` (inductor):

- ``step = torch.compile(ef.train_step)``, called as ``state, metrics = step(state, x, y)``;
- ``loop = torch.compile(user_loop)``, where ``user_loop(state, xs, ys)`` runs ``ef.train_step`` over
  a stack of batches in a Python loop and returns the last state and loss (a user's epoch).

For each it checks the compiled result against the eager one (largest absolute difference of any
parameter and any optimizer-state tensor after one step and after `--steps` steps, each step on its
own batch; float32 rounding grows over steps where training is sensitive, so the one-step numbers
are the equality check), reports the cold compile time (first call) and then times eager and
compiled steps in alternating blocks (medians per step), so that changes in machine load hit both.
Before the optimizer became one pure rule (2026-12), the compiled step failed inside PyTorch with
``INTERNAL ASSERT FAILED ... _fused_adam_``; this script is the check that it no longer does (unit
tests never compile more than one small kernel).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

import esper_fn as ef
from esper_fn.tasks import load

B = 100


def states(g: torch.Generator) -> dict[str, ef.State]:
    s = ef.init(ef.hosts.preset("mlp-impaired"), optimizer=ef.optim.adam(1e-2), generator=g)
    s = ef.germinate(s, "input", "conv1d_k5", generator=g, tempo=5)
    training = ef.advance(s, "input")
    blending = ef.tick(ef.advance(training, "input", force=True))  # alpha 0.2
    return {"TRAINING (shadow)": training, "BLENDING (alpha 0.2)": blending}


def user_loop(state: ef.State, xs: torch.Tensor, ys: torch.Tensor):
    """What a user writes: a Python loop of train steps over a stack of batches [K, B, ...]."""
    loss = None
    for i in range(xs.shape[0]):
        state, metrics = ef.train_step(state, xs[i], ys[i])
        loss = metrics["loss"]
    return state, loss


def max_diff(a: ef.State, b: ef.State) -> tuple[float, float]:
    dp = max(float((a.params_flat[k] - b.params_flat[k]).abs().max()) for k in a.params_flat)
    do = max(float((a.opt_flat[k] - b.opt_flat[k]).abs().max()) for k in a.opt_flat)
    return dp, do


def timed(variants: dict, blocks: int, per_block: int) -> dict[str, float]:
    """Median ms per call of each zero-argument callable, in alternating blocks (A B, B A, ...)."""
    out: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for b in range(blocks):
        for k in names if b % 2 == 0 else names[::-1]:
            for _ in range(per_block):
                t0 = time.perf_counter()
                variants[k]()
                out[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in out.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30, help="steps for the multi-step agreement check (default 30)")
    p.add_argument("--loop-len", type=int, default=10, help="train steps per call of the compiled user loop")
    p.add_argument("--quick", action="store_true", help="fewer timed blocks")
    args = p.parse_args(argv)
    blocks, per_block = (6, 10) if args.quick else (20, 20)
    torch.set_num_threads(1)

    task = load("mnist1d", seed=0)
    x_all, y_all = task.split("train")
    perm = torch.randperm(x_all.shape[0], generator=torch.Generator().manual_seed(1))
    xb, yb = x_all[perm].view(-1, B, x_all.shape[-1]), y_all[perm].view(-1, B)
    print(f"torch.compile(esper_fn.train_step): mlp-impaired + conv1d_k5@input, Adam lr 1e-2, batch {B}; torch "
          f"{torch.__version__}, {torch.get_num_threads()} thread(s), OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, load {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    rows = []
    for name, s0 in states(torch.Generator().manual_seed(0)).items():
        torch._dynamo.reset()  # each case compiles cold
        step = torch.compile(ef.train_step)
        t0 = time.perf_counter()
        c1, mc = step(s0, xb[0], yb[0])
        cold = time.perf_counter() - t0
        e1, me = ef.train_step(s0, xb[0], yb[0])
        d1 = max_diff(c1, e1)
        dl = abs(float(mc["loss"]) - float(me["loss"]))
        c, e = c1, e1
        for i in range(1, args.steps):
            c, _ = step(c, xb[i], yb[i])
            e, _ = ef.train_step(e, xb[i], yb[i])
        dn = max_diff(c, e)

        loop = torch.compile(user_loop)
        k = args.loop_len
        t0 = time.perf_counter()
        lc, lossc = loop(s0, xb[:k], yb[:k])
        cold_loop = time.perf_counter() - t0
        le, losse = user_loop(s0, xb[:k], yb[:k])
        dloop = max_diff(lc, le)

        box = {"eager": s0, "compiled": s0}
        i_ = {"eager": 0, "compiled": 0}

        def run(kind, fn):
            def call():
                j = i_[kind] = (i_[kind] + 1) % xb.shape[0]
                box[kind], _ = fn(box[kind], xb[j], yb[j])
            return call

        for f in (run("eager", ef.train_step), run("compiled", step)):  # warm up
            for _ in range(5):
                f()
        t = timed({"eager": run("eager", ef.train_step), "compiled": run("compiled", step)}, blocks, per_block)
        lbox = {"eager": s0, "compiled": s0}

        def lrun(kind, fn):
            def call():
                lbox[kind], _ = fn(lbox[kind], xb[:k], yb[:k])
            return call

        tl = timed({"eager": lrun("eager", user_loop), "compiled": lrun("compiled", loop)}, max(blocks // 4, 2), 3)
        rows.append((name, cold, d1, dl, dn, t, cold_loop, dloop, {kk: v / k for kk, v in tl.items()}))

    print()
    print(f"| seed stage | what | cold compile (s) | max abs diff to eager, 1 step: params / opt state (loss) "
          f"| after {args.steps} steps | eager ms/step | compiled ms/step | compiled / eager |")
    print("|---|---|---:|---|---|---:|---:|---:|")
    for name, cold, d1, dl, dn, t, cold_loop, dloop, tl in rows:
        print(f"| {name} | `torch.compile(ef.train_step)` | {cold:.1f} | {d1[0]:.1e} / {d1[1]:.1e} ({dl:.1e}) | "
              f"{dn[0]:.1e} / {dn[1]:.1e} | {t['eager']:.2f} | {t['compiled']:.2f} | "
              f"{t['compiled'] / t['eager']:.2f} |")
        print(f"| {name} | compiled user loop of {args.loop_len} steps | {cold_loop:.1f} | after {args.loop_len} "
              f"steps: {dloop[0]:.1e} / {dloop[1]:.1e} | | {tl['eager']:.2f} | {tl['compiled']:.2f} | "
              f"{tl['compiled'] / tl['eager']:.2f} |")
    bad = [r[0] for r in rows if max(r[2]) > 1e-5]
    if bad:
        print(f"\nFAIL: compiled and eager steps differ by more than float32 rounding (1e-5) for {bad}")
        return 1
    print("\nOK: compiled steps agree with eager ones within float32 rounding after one step.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
