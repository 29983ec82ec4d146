"""Earlier seeds for Karn's warm start (docs/results.md, "Karn"): the plateau heuristic grows every
train instance of a suite on training seeds with a seed library (`RunConfig.library`, as
``esper-fn grow --library``), which stores each seed it fossilizes with its measured contribution.
`esper-fn karn --library LIB` (default ``OUT/library``) then enqueues the family points with the best
contribution per parameter among them as its first trials (`esper_fn.karn.evidence`).

Only the train split and training seeds are played; test accuracy is printed, never used.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/karn_seed_library.py --library runs/karn/library \
        --runs runs/karn-seedruns --seeds 0 1
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from esper_fn.bench import suite
from esper_fn.run import grow


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--library", required=True, help="the seed library to fill (created)")
    p.add_argument("--runs", required=True, help="directory for the grow runs (one per instance and seed)")
    p.add_argument("--suite", default="growthbench-v1")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (never evaluation seeds)")
    args = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    for inst in suite(args.suite).split("train"):
        for seed in args.seeds:
            cfg = inst.run_config(seed, "heuristic").model_copy(update={"library": args.library})
            s = grow(cfg, Path(args.runs) / f"{inst.name}-s{seed}", progress=False, overwrite=True)
            print(f"{inst.name} seed {seed}: germinated {s.germinated}, fossilized {s.fossilized}, pruned {s.pruned}",
                  flush=True)
    print(f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
