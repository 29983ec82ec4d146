"""Cost of one `esper-fn grow` epoch against a plain PyTorch training epoch, side by side.

Both train the impaired MNIST-1D MLP (40-16-10) on the same 3000 training samples, batch 100, Adam
lr 1e-2, one torch thread. The plain loop is an `nn.Sequential` with `torch.optim.Adam(fused=True)`
and a `torch.randperm` shuffle per epoch; the esper_fn epoch is what the grow runner does per epoch
(static controller, so the network is the same): train_epoch + telemetry + governor, controller,
event log and metrics log. Per-epoch times come from the runner's own "time/*" metrics; medians.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_grow_epoch.py --epochs 60
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from esper_fn.run import RunConfig, grow
from esper_fn.tasks import load


def plain_epochs(task, epochs: int, seed: int) -> tuple[list[float], list[float]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(40, 16), nn.ReLU(), nn.Linear(16, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    g = torch.Generator().manual_seed(seed)
    x, y = task.x_train, task.y_train
    train, with_eval = [], []
    for _ in range(epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(len(x), generator=g)
        xs, ys = x[perm], y[perm]
        for i in range(0, len(x), 100):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xs[i:i + 100]), ys[i:i + 100]).backward()
            opt.step()
        t1 = time.perf_counter()
        with torch.no_grad():
            logits = model(task.x_val)
            float(F.cross_entropy(logits, task.y_val)), float((logits.argmax(-1) == task.y_val).float().mean())
        t2 = time.perf_counter()
        train.append(t1 - t0)
        with_eval.append(t2 - t0)
    return train, with_eval


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of each side")
    a = p.parse_args()
    torch.set_num_threads(1)
    task = load("mnist1d", seed=0)
    plain_train, plain_eval, ours = [], [], {"train": [], "telemetry": [], "control": [], "epoch": []}
    for r in range(a.rounds):
        t, e = plain_epochs(task, a.epochs, r)
        plain_train += t[5:]
        plain_eval += e[5:]
        with tempfile.TemporaryDirectory() as d:
            grow(RunConfig(controller="static", epochs=a.epochs, seed=r, checkpoint_every=10_000), d, progress=False)
            rows = [json.loads(x) for x in (Path(d) / "metrics.jsonl").read_text().splitlines()][5:]
        for k in ("train", "telemetry", "control"):
            ours[k] += [row[f"time/{k}"] for row in rows]
        ours["epoch"] += [row["time/train"] + row["time/telemetry"] + row["time/control"] for row in rows]
    med = {k: statistics.median(v) * 1e3 for k, v in ours.items()}
    pt, pe = statistics.median(plain_train) * 1e3, statistics.median(plain_eval) * 1e3
    print(f"{'':42s} {'median ms':>10s}")
    print(f"{'plain PyTorch epoch (train only)':42s} {pt:10.2f}")
    print(f"{'plain PyTorch epoch (train + val eval)':42s} {pe:10.2f}")
    print(f"{'esper_fn train_epoch':42s} {med['train']:10.2f}   ratio vs plain train {med['train'] / pt:.2f}")
    print(f"{'esper_fn telemetry':42s} {med['telemetry']:10.2f}")
    print(f"{'esper_fn governor+controller+logs+tick':42s} {med['control']:10.2f}")
    print(f"{'esper_fn grow epoch (all of the above)':42s} {med['epoch']:10.2f}   ratio vs plain train "
          f"{med['epoch'] / pt:.2f} (target <= 1.3), vs plain train+eval {med['epoch'] / pe:.2f}")


if __name__ == "__main__":
    main()
