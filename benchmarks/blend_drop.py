"""How much validation accuracy does blending a seed in cost? (issue: blending must cost <= 5 points)

Per seed: train the impaired CNN on MNIST-1D for `--grow-at` epochs, germinate `conv1d_k5` at
`conv2`, incubate it (shadow) for 3 epochs, advance to BLENDING with tempo 3 and keep training.
The cost is the validation accuracy just before BLENDING minus the lowest validation accuracy
over the blending epochs and the first epoch at alpha 1 (positive = a drop).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/blend_drop.py --seeds 0 1 2 3 4 5 6 7 8 9
"""

from __future__ import annotations

import argparse
import statistics

import torch

import esper_fn as ef
from esper_fn.tasks import load
from esper_fn.training import TrainConfig, evaluate, train_epoch


def one(seed: int, host: str, slot: str, blueprint: str, grow_at: int, tempo: int) -> tuple[float, list[float]]:
    task = load("mnist1d", seed=seed)
    g_init, g_data, g_seed = (torch.Generator().manual_seed(seed * 1000 + k) for k in range(3))
    s = ef.init(ef.hosts.hosts()[host](), optimizer=ef.optim.adam(1e-2), generator=g_init)
    cfg = TrainConfig()
    xv, yv = task.split("val")

    def epoch(state):
        state, _ = train_epoch(state, task, cfg, generator=g_data)
        return ef.tick(state), evaluate(state, xv, yv)["accuracy"]

    for _ in range(grow_at):
        s, acc = epoch(s)
    s = ef.advance(ef.germinate(s, slot, blueprint, generator=g_seed, tempo=tempo), slot)
    for _ in range(3):
        s, acc = epoch(s)
    before = acc
    s = ef.advance(s, slot)
    accs = []
    for _ in range(tempo + 1):
        s, acc = epoch(s)
        accs.append(acc)
    return before, accs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    ap.add_argument("--host", default="cnn-impaired")
    ap.add_argument("--slot", default="conv2")
    ap.add_argument("--blueprint", default="conv1d_k5")
    ap.add_argument("--grow-at", type=int, default=15)
    ap.add_argument("--tempo", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    drops = []
    print(f"{args.host}, {args.blueprint} at {args.slot}, germinated at epoch {args.grow_at}, tempo {args.tempo}")
    print("seed  val before blend  val per blending epoch          cost (points)")
    for seed in args.seeds:
        before, accs = one(seed, args.host, args.slot, args.blueprint, args.grow_at, args.tempo)
        cost = 100 * (before - min(accs))
        drops.append(cost)
        print(f"{seed:>4}  {before:>16.3f}  {' '.join(f'{a:.3f}' for a in accs):<30}  {cost:+.1f}")
    print(f"worst cost {max(drops):+.1f} points, median {statistics.median(drops):+.1f}")


if __name__ == "__main__":
    main()
