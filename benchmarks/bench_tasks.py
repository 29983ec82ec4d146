"""Cost of one training epoch (plus its validation pass) on every task, for the static host and
for the same host with one input seed, on one torch thread.

Per (task, host) row: the task's first load in this process ("load s"; the first aeon and mlxtend
task pay for importing those libraries). Each timing is one warm-up call, then 3 repeats of k calls
(k chosen so that a repeat lasts about 0.3 s), the median per call; the script makes `--rounds`
(default 3) interleaved rounds over all rows and reports the median across rounds. "train" is `esper_fn.training.train_epoch` (batch 100, Adam lr 1e-2, shadow incubation
off: no seed is incubating); "val" is `evaluate` on the validation split, as a run does each
epoch; "test" is one `evaluate` on the test split. "+seed" is train + val with one seed grafted at
the "input" slot and held at alpha 1 (HOLDING): conv1d_k5 on signals (vector inputs of >= 8
features, multichannel series), conv2d_k3 on images, mlp_gelu at fc1 on 2-feature inputs; "x" is
its ratio to the static epoch.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_tasks.py            # every row
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_tasks.py --tasks gunpoint basicmotions
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

import esper_fn as ef
from esper_fn.tasks import load
from esper_fn.training import TrainConfig, evaluate, train_epoch

ROWS = [
    ("mnist1d", "mlp-w16"), ("mnist1d", "cnn1d-w4"), ("digits", "mlp-w16"), ("spirals", "mlp-w16"),
    ("moons", "mlp-w16"), ("gunpoint", "mlp-w16"), ("gunpoint", "cnn1d-w4"), ("italypower", "mlp-w16"),
    ("italypower", "cnn1d-w4"), ("basicmotions", "mlp-w16"), ("basicmotions", "cnn1d-w4"), ("mnist5k", "mlp-w16"),
    ("mnist5k-img", "mlp-w16"), ("mnist5k-img", "cnn2d-w4"),
]  # fmt: skip
TARGET_S = 0.3
REPEATS = 3


def seed_for(state: ef.State) -> tuple[str, str]:
    spec = state.spec("input")
    if spec.kind == "conv2d":
        return "input", "conv2d_k3"
    if spec.kind == "conv1d" or spec.shape[0] >= 8:
        return "input", "conv1d_k5"
    return "fc1", "mlp_gelu"


def per_epoch(fn, state: ef.State) -> float:
    """Median seconds per call of ``fn(state)`` over REPEATS repeats of k calls (after a warm-up)."""
    t0 = time.perf_counter()
    state = fn(state)
    k = max(1, min(200, math.ceil(TARGET_S / max(time.perf_counter() - t0, 1e-6))))
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        for _ in range(k):
            state = fn(state)
        times.append((time.perf_counter() - t0) / k)
    return statistics.median(times)


def setup(task_name: str, host_name: str) -> dict:
    """Load the task (timed) and build the static and seeded states and the timed functions."""
    t0 = time.perf_counter()
    task = load(task_name, seed=0)
    load_s = time.perf_counter() - t0
    host = ef.hosts.preset(host_name, input_shape=task.input_shape, n_classes=task.n_classes)
    cfg = TrainConfig(batch_size=100)
    gen = torch.Generator().manual_seed(0)
    base = ef.init(host, optimizer=ef.optim.adam(1e-2), generator=torch.Generator().manual_seed(0))

    def train(s):
        return train_epoch(s, task, cfg, generator=gen)[0]

    def val(s):
        evaluate(s, task.x_val, task.y_val)
        return s

    def test(s):
        evaluate(s, task.x_test, task.y_test)
        return s

    slot, bid = seed_for(base)
    grown = ef.germinate(base, slot, bid, generator=torch.Generator().manual_seed(1))
    grown = ef.advance(ef.advance(ef.advance(grown, slot), slot), slot, force=True)  # HOLDING, alpha 1
    sizes = "/".join(str(task.split(s)[0].shape[0]) for s in ("train", "val", "test"))  # type: ignore[arg-type]
    return {"task": task_name, "host": host_name, "params": base.num_params(), "sizes": sizes, "load": load_s,
            "seed": f"{bid}@{slot}",
            "timed": {"train": (train, base), "val": (val, base), "test": (test, base),
                      "grown": (lambda s: val(train(s)), grown)}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="*", help="only these tasks")
    p.add_argument("--rounds", type=int, default=3, help="rounds over all rows (interleaved); medians across them")
    a = p.parse_args()
    torch.set_num_threads(1)
    rows = [setup(*r) for r in ROWS if not a.tasks or r[0] in a.tasks]
    samples: list[dict[str, list[float]]] = [{k: [] for k in r["timed"]} for r in rows]
    for _ in range(a.rounds):
        for r, got in zip(rows, samples, strict=True):
            for k, (fn, state) in r["timed"].items():
                got[k].append(per_epoch(fn, state))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread; ms per epoch, median of {a.rounds} "
          f"interleaved rounds (each the median of {REPEATS} repeats)")
    print("| task | host | params | train/val/test | load s | train ms | val ms | epoch ms | test ms "
          "| +seed | +seed epoch ms | x |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r, got in zip(rows, samples, strict=True):
        ms = {k: 1e3 * statistics.median(v) for k, v in got.items()}
        epoch = ms["train"] + ms["val"]
        print(f"| {r['task']} | {r['host']} | {r['params']:,} | {r['sizes']} | {r['load']:.2f} "
              f"| {ms['train']:.1f} | {ms['val']:.2f} | {epoch:.1f} | {ms['test']:.2f} | {r['seed']} "
              f"| {ms['grown']:.1f} | {ms['grown'] / epoch:.1f} |")


if __name__ == "__main__":
    main()
