"""Controllers in the core runner at the full protocol: `esper-fn grow` with each controller on the
same held-out seeds, 200 epochs, parameter budget 1,100 (docs/results.md, "Tamiyo in grow").

Each run seed fixes host init, data order and seed init for every controller (the random streams
of `esper_fn.run.rng_streams`), so the differences are paired by seed. The shipped Tamiyo was
trained on 20-epoch episodes (run seeds 0-479 and 2000-2319): these seeds were never trained on,
and the 200-epoch run is longer than any episode it saw. Prints markdown tables: test accuracy mean
and 95% CI per controller, parameters, wall time, and paired differences against the first
controller.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/grow_controllers.py --seeds 1000000 1000001 1000002 \\
        1000003 1000004 --workers 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from growth_results import BUDGET

from esper_fn.policies import mean_ci


def one(args: tuple[str, str, int, int, str]) -> dict:
    import torch

    torch.set_num_threads(1)
    from esper_fn.events import Germinated, read_events
    from esper_fn.run import RunConfig, grow

    controller, host, seed, epochs, root = args
    label = controller.partition(":")[0]
    out = Path(root) / f"{host}-{label}-{seed}"
    config = RunConfig(controller=controller, host=host, seed=seed, epochs=epochs, checkpoint_every=epochs,
                       param_budget=BUDGET)
    learned = None
    if label == "tamiyo":  # a learned controller is built outside the core and handed to grow
        from esper_fn.envs import tamiyo_controller

        learned = tamiyo_controller(controller, governor=config.governor)
    s = grow(config, out, controller=learned, progress=False)
    grown = [f"{e.epoch}:{e.slot}:{e.blueprint.split('@')[0]}" for e in read_events(out / "events.jsonl")
             if isinstance(e, Germinated)]
    return {"controller": label, "host": host, "seed": seed, "summary": s.model_dump(), "germinated": grown}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--controllers", nargs="+", default=["tamiyo", "heuristic", "schedule", "static"])
    p.add_argument("--host", default="mlp-impaired")
    p.add_argument("--seeds", nargs="+", type=int, default=[1000000, 1000001, 1000002, 1000003, 1000004])
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=None, help="directory for run dirs and results.json (default: a temp dir)")
    a = p.parse_args()
    root = a.out or tempfile.mkdtemp(prefix="esper-controllers-")
    jobs = [(c, a.host, s, a.epochs, root) for s in a.seeds for c in a.controllers]
    with ProcessPoolExecutor(a.workers) as ex:
        results = list(ex.map(one, jobs))
    Path(root, "results.json").write_text(json.dumps(results, indent=1))
    labels = [c.partition(":")[0] for c in a.controllers]
    by = {(r["controller"], r["seed"]): r for r in results}
    print(f"runs and results.json in {root}\n")
    print(f"{a.host}, {a.epochs} epochs, parameter budget {BUDGET}, seeds {a.seeds}\n")
    print("| controller | test accuracy % (mean ± 95% CI) | final params | germinated / fossilized / pruned | "
          "rollbacks | wall s (median) |")
    print("|---|---|---|---|---|---|")
    for c in labels:
        rs = [by[(c, s)]["summary"] for s in a.seeds]
        m, h = mean_ci([r["test_accuracy"] * 100 for r in rs])
        params = sorted({r["params_after"] for r in rs})
        counts = " / ".join(f"{statistics.fmean(r[k] for r in rs):.1f}" for k in ("germinated", "fossilized", "pruned"))
        print(f"| {c} | {m:.1f} ± {h:.1f} | {'/'.join(map(str, params))} | {counts} | "
              f"{sum(r['rollbacks'] for r in rs)} | {statistics.median(r['wall_seconds'] for r in rs):.0f} |")
    ref = labels[0]
    print(f"\n| paired by seed | test accuracy (points) | params | per seed (points) |")
    print("|---|---|---|---|")
    for c in labels[1:]:
        d = [(by[(ref, s)]["summary"]["test_accuracy"] - by[(c, s)]["summary"]["test_accuracy"]) * 100 for s in a.seeds]
        dp = [by[(ref, s)]["summary"]["params_after"] - by[(c, s)]["summary"]["params_after"] for s in a.seeds]
        m, h = mean_ci(d)
        mp, hp = mean_ci([float(x) for x in dp])
        print(f"| {ref} - {c} | {m:+.1f} ± {h:.1f} | {mp:+.0f} ± {hp:.0f} | {' '.join(f'{x:+.1f}' for x in d)} |")
    print("\ngerminations (epoch:slot:blueprint):")
    for c in labels:
        for s in a.seeds:
            print(f"  {c} {s}: {' '.join(by[(c, s)]['germinated']) or '-'}")


if __name__ == "__main__":
    main()
