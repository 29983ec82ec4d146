"""Does growth help? Static host vs heuristic growth vs the grown architecture trained from scratch.

For each host and seed: (1) the impaired host trained statically; (2) the same host grown by the
plateau heuristic; (3) the final architecture of (2) trained from scratch (its fossilized seeds
grafted at alpha 1 before epoch 0). Upstream MNIST-1D protocol: Adam lr 1e-2, batch 100, 200 epochs,
decisions on a validation split, test accuracy reported. Prints a markdown table: mean and 95% CI
over seeds, and the paired difference grown - static.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/growth_results.py --seeds 0 1 2 3 4 --workers 2
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# Student t quantiles (two-sided 95%) for small samples.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def ci(xs: list[float]) -> tuple[float, float]:
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, float("nan")
    return m, _T95.get(len(xs) - 1, 1.96) * statistics.stdev(xs) / math.sqrt(len(xs))


def one(args: tuple[str, int, int, str]) -> dict:
    import torch

    torch.set_num_threads(1)
    from esper_fn.events import Fossilized, Germinated, read_events
    from esper_fn.run import RunConfig, grow

    host, seed, epochs, root = args
    out = {"host": host, "seed": seed}
    base = dict(host=host, seed=seed, epochs=epochs, checkpoint_every=epochs)
    s = grow(RunConfig(controller="static", **base), Path(root) / f"{host}-static-{seed}", progress=False)
    out["static"] = s.model_dump()
    g = grow(RunConfig(controller="heuristic", **base), Path(root) / f"{host}-grow-{seed}", progress=False)
    out["grown"] = g.model_dump()
    events = read_events(Path(root) / f"{host}-grow-{seed}" / "events.jsonl")
    bps = {e.slot: e.blueprint for e in events if isinstance(e, Germinated)}
    kept = [(e.slot, bps[e.slot]) for e in events if isinstance(e, Fossilized)]
    out["architecture"] = kept
    f = grow(RunConfig(controller="static", preinstall=kept, **base), Path(root) / f"{host}-scratch-{seed}",
             progress=False)
    out["scratch"] = f.model_dump()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hosts", nargs="+", default=["mlp-impaired", "cnn-impaired"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=None, help="directory for run dirs and results.json (default: a temp dir)")
    a = p.parse_args()
    root = a.out or tempfile.mkdtemp(prefix="esper-results-")
    jobs = [(h, s, a.epochs, root) for h in a.hosts for s in a.seeds]
    with ProcessPoolExecutor(a.workers) as ex:
        results = list(ex.map(one, jobs))
    Path(root, "results.json").write_text(json.dumps(results, indent=1))
    print(f"runs and results.json in {root}\n")
    print("| host | variant | test accuracy (mean ± 95% CI) | params | wall s |")
    print("|---|---|---|---|---|")
    for h in a.hosts:
        rs = [r for r in results if r["host"] == h]
        for v in ("static", "grown", "scratch"):
            acc = ci([r[v]["test_accuracy"] * 100 for r in rs])
            params = sorted({r[v]["params_after"] for r in rs})
            wall = statistics.median(r[v]["wall_seconds"] for r in rs)
            print(f"| {h} | {v} | {acc[0]:.1f} ± {acc[1]:.1f} | {'/'.join(map(str, params))} | {wall:.1f} |")
    print("\n| host | paired difference | mean ± 95% CI (points) | per seed |")
    print("|---|---|---|---|")
    for h in a.hosts:
        rs = [r for r in results if r["host"] == h]
        for x, y in (("grown", "static"), ("grown", "scratch")):
            d = [(r[x]["test_accuracy"] - r[y]["test_accuracy"]) * 100 for r in rs]
            m, c = ci(d)
            print(f"| {h} | {x} - {y} | {m:+.1f} ± {c:.1f} | {' '.join(f'{v:+.1f}' for v in d)} |")
        ratio = [r["grown"]["wall_seconds"] / r["scratch"]["wall_seconds"] for r in rs]
        print(f"| {h} | wall time grown / scratch | median {statistics.median(ratio):.2f} | "
              f"{' '.join(f'{v:.2f}' for v in ratio)} |")
    print("\nseeds:", a.seeds, " architectures:", {f"{r['host']}/{r['seed']}": r["architecture"] for r in results})


if __name__ == "__main__":
    main()
