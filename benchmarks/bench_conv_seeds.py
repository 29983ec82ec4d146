"""What a live conv seed costs per epoch, against its FLOPs and against the same network in plain PyTorch.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_conv_seeds.py [--repeats 5]

For each configuration (a host, and a conv seed grown on one of its slots, live at alpha 1 in
HOLDING), side by side in one process on one torch thread:

- esper_fn: one `esper_fn.training.train_epoch` (batch 100) of the static host and of the seeded one;
- plain: the same two networks as `esper_fn.export` modules (standard `nn.Linear`/`nn.Conv1d`/
  `nn.Conv2d` layers) trained one epoch by a plain loop (`torch.optim.Adam`, `F.cross_entropy`, the
  same batches);
- FLOPs: `esper_fn.training.flops_per_sample` of each network (matmuls and convolutions).

Prints per configuration the medians of `--repeats` epochs, the seeded/static time ratio on each side
against the seeded/static FLOP ratio, and esper_fn/plain on the seeded network: a conv seed whose
time ratio far exceeds its FLOP ratio on both sides is paid for in the convolution kernels
themselves (small channels, per-call cost), not in esper_fn's seed plumbing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import esper_fn as ef
from esper_fn.tasks import load
from esper_fn.training import TrainConfig, flops_per_sample, train_epoch

CONFIGS = [
    # (label, task, host preset, slot, blueprint)
    ("MNIST-1D, mlp-impaired, conv1d_k5 at input", "mnist1d", "mlp-impaired", "input", "conv1d_k5"),
    ("MNIST-1D, cnn-impaired, conv1d_k3 after conv1", "mnist1d", "cnn-impaired", "conv1", "conv1d_k3"),
    ("MNIST-5k 28x28, cnn2d-w16, conv2d_k3 after conv1", "mnist5k-img", "cnn2d-w16", "conv1", "conv2d_k3"),
]


def grown(task, host_name: str, slot: str | None, bid: str | None) -> ef.State:
    host = ef.hosts.preset(host_name, input_shape=task.input_shape, n_classes=task.n_classes)
    g = torch.Generator().manual_seed(0)
    s = ef.init(host, optimizer=ef.optim.adam(1e-2), generator=g)
    if slot is not None:
        s = ef.germinate(s, slot, bid, generator=g, tempo=1)
        s = ef.tick(ef.advance(ef.advance(s, slot), slot))  # TRAINING -> BLENDING, alpha 1
        s = ef.advance(s, slot)  # HOLDING: the seed is live, no shadow forward
    return s


def epoch_esper(state: ef.State, task, seed: int) -> float:
    t = time.perf_counter()
    train_epoch(state, task, TrainConfig(batch_size=100), generator=torch.Generator().manual_seed(seed))
    return time.perf_counter() - t


def epoch_plain(module: torch.nn.Module, task, seed: int) -> float:
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    t = time.perf_counter()
    for xb, yb in task.batches("train", 100, generator=g):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(module(xb), yb).backward()
        opt.step()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("| configuration | FLOPs/sample static -> seeded (ratio) | esper_fn epoch s static -> seeded (ratio) "
          "| plain epoch s static -> seeded (ratio) | seeded: esper_fn / plain |")
    print("|---|---|---|---|---|")
    for label, task_name, host_name, slot, bid in CONFIGS:
        task = load(task_name, seed=0)
        x1 = task.x_val[:1]
        static, seeded = grown(task, host_name, None, None), grown(task, host_name, slot, bid)
        f0, f1 = flops_per_sample(static, x1), flops_per_sample(seeded, x1)
        times = {k: [] for k in ("es", "ee", "ps", "pe")}
        for r in range(args.repeats + 1):  # the first round warms up
            row = {"es": epoch_esper(static, task, r), "ee": epoch_esper(seeded, task, r),
                   "ps": epoch_plain(ef.export(static).train(), task, r),
                   "pe": epoch_plain(ef.export(seeded).train(), task, r)}
            if r:
                for k, v in row.items():
                    times[k].append(v)
        m = {k: statistics.median(v) for k, v in times.items()}
        print(f"| {label} | {f0:,} -> {f1:,} ({f1 / f0:.2f}x) | {m['es']:.3f} -> {m['ee']:.3f} ({m['ee'] / m['es']:.2f}x) "
              f"| {m['ps']:.3f} -> {m['pe']:.3f} ({m['pe'] / m['ps']:.2f}x) | {m['ee'] / m['pe']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
