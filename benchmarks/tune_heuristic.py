"""Tune the plateau heuristic on training seeds, by validation accuracy (never test accuracy).

The reported results (benchmarks/growth_results.py) use seeds 0-4; tuning uses other seeds. Both use
the acceptance target's parameter budget, 1,100 (not the library default, 1.3 x the host).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tune_heuristic.py --seeds 10 11 12 --workers 2
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def one(args) -> tuple:
    import torch

    torch.set_num_threads(1)
    from esper_fn.run import RunConfig, grow

    host, seed, patience, min_delta, root = args
    out = Path(root) / f"{host}-p{patience}-d{min_delta}-s{seed}"
    cfg = RunConfig(host=host, seed=seed, controller="heuristic", checkpoint_every=1000, param_budget=1100,
                    plateau={"patience": patience, "min_delta": min_delta})
    grow(cfg, out, progress=False)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    final_val = statistics.fmean(r["val_accuracy"] for r in rows[-10:] if "val_accuracy" in r)
    return host, patience, min_delta, seed, final_val, rows[-1]["params"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hosts", nargs="+", default=["mlp-impaired", "cnn-impaired"])
    p.add_argument("--seeds", nargs="+", type=int, default=[10, 11, 12])
    p.add_argument("--patience", nargs="+", type=int, default=[2, 3])
    p.add_argument("--min-delta", nargs="+", type=float, default=[0.005, 0.01])
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args()
    root = tempfile.mkdtemp(prefix="esper-tune-")
    jobs = [(h, s, pa, d, root) for h, pa, d, s in itertools.product(a.hosts, a.patience, a.min_delta, a.seeds)]
    with ProcessPoolExecutor(a.workers) as ex:
        res = list(ex.map(one, jobs))
    print("| host | patience | min_delta | mean val accuracy (last 10 epochs) | per seed | params |")
    print("|---|---|---|---|---|---|")
    for h, pa, d in itertools.product(a.hosts, a.patience, a.min_delta):
        rs = [r for r in res if r[:3] == (h, pa, d)]
        print(f"| {h} | {pa} | {d} | {statistics.fmean(r[4] for r in rs):.4f} | "
              f"{' '.join(f'{r[4]:.3f}' for r in rs)} | {'/'.join(str(int(r[5])) for r in rs)} |")


if __name__ == "__main__":
    main()
