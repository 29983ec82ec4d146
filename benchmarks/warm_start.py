"""Does a seed from the library (Urza) help a new host? Warm start vs a fresh seed, paired by seed.

1. Donors: `esper_fn.run.grow` with the plateau heuristic on mlp-impaired (MNIST-1D, parameter budget
   1,100) for each donor seed, with ``library=`` set, so each run stores the seed it fossilizes (on
   this host: a 177-parameter conv1d_k5 on the raw input) in a fresh library.
2. Recipients, for each host and held-out seed, one fixed protocol with four arms that differ only
   in the seed's weights and schedule (same host init, same batches in the same order, from
   `esper_fn.run.rng_streams`):
   - ``static``: no seed;
   - ``cold``: conv1d_k5 germinated at the input slot at epoch G with its birth init (zero output
     layer), 3 epochs of shadow incubation, a 5-epoch linear blend, 3 epochs held, fossilized;
   - ``warm``: the same schedule, the weights from the library (donor ``i mod n_donors``);
   - ``warm-direct``: library weights, no incubation, a 1-epoch blend, fossilized after 1 epoch held
     (a trained seed may not need the protection a newborn one gets).
   Every epoch records test accuracy: the validation split depends on the run seed and the donors
   trained on parts of the recipients' validation splits, while the standard test split was seen by
   no run; no decision here reads it.
3. Reports, per host and arm, final test accuracy (mean of the last 5 epochs) with a 95% Student-t
   interval over seeds, and paired differences: final accuracy warm - cold, and the epochs each arm
   needs to reach the cold arm's final accuracy (and 75%), counted from germination.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/warm_start.py --donor-seeds 0 1 2 \
        --seeds 10 11 12 13 14 --hosts mlp-impaired cnn-impaired --epochs 100
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import esper_fn as ef
from esper_fn.optim import adam
from esper_fn.policies import mean_ci
from esper_fn.run import RunConfig, grow, rng_streams
from esper_fn.tasks import load
from esper_fn.training import evaluate, train_epoch
from esper_fn.urza import Library, warm_start

ARMS = ("static", "cold", "warm", "warm-direct")
SLOT, BLUEPRINT = "input", "conv1d_k5"
LAST = 5  # final accuracy: mean test accuracy over the last LAST epochs




def donors(lib_path: Path, seeds: list[int], epochs: int, work: Path) -> list[str]:
    """Run the donor growths; return the ids of the conv1d_k5 input seeds they stored."""
    for s in seeds:
        cfg = RunConfig(task="mnist1d", host="mlp-impaired", controller="heuristic", epochs=epochs, seed=s,
                        param_budget=1100, library=str(lib_path))
        summary = grow(cfg, work / f"donor-{s}", progress=False)
        print(f"donor seed {s}: test {summary.test_accuracy:.3f}, fossilized {summary.fossilized}", flush=True)
    recs = [r for r in Library(lib_path).records(blueprint=BLUEPRINT) if r.slot == SLOT]
    for r in recs:
        print(f"  stored {r.id}: {r.blueprint} at {r.host}:{r.slot}, contribution {r.contribution:+.3f}, "
              f"{r.epochs} epochs, run {r.run_id}", flush=True)
    return [r.id for r in recs]


def recipient(host_name: str, seed: int, arm: str, lib: Library, donor: str | None, epochs: int, at: int) -> dict:
    """One recipient run; returns its per-epoch test accuracy and timing."""
    task = load("mnist1d", seed=seed)
    rng = rng_streams(seed)
    state = ef.init(ef.hosts.preset(host_name), optimizer=adam(1e-2), generator=rng["host"])
    incubate, tempo, hold = (0, 1, 1) if arm == "warm-direct" else (3, 5, 3)
    acc, phase_end = [], None
    t0 = time.perf_counter()
    for epoch in range(epochs):
        if arm != "static" and epoch == at:
            if arm == "cold":
                state = ef.germinate(state, SLOT, BLUEPRINT, generator=rng["seeds"], tempo=tempo)
            else:
                state = warm_start(state, SLOT, donor, library=lib, tempo=tempo)
            state = ef.advance(state, SLOT)  # TRAINING
            phase_end = epoch + incubate
            if incubate == 0:
                state = ef.advance(state, SLOT, force=True)  # BLENDING at once
        state, _ = train_epoch(state, task, generator=rng["data"])
        state = ef.tick(state)
        if phase_end is not None and epoch + 1 >= phase_end:
            stage = state.stage(SLOT)
            if stage == ef.Stage.TRAINING:
                state = ef.advance(state, SLOT, force=True)
                phase_end = epoch + 1 + tempo
            elif stage == ef.Stage.BLENDING and float(state.slots["alpha"][state.index(SLOT)]) >= 1.0:
                state = ef.advance(state, SLOT, force=True)
                phase_end = epoch + 1 + hold
            elif stage == ef.Stage.HOLDING:
                state = ef.fossilize(state, SLOT, force=True)
                phase_end = None
        acc.append(evaluate(state, task.x_test, task.y_test)["accuracy"])
    return {"host": host_name, "seed": seed, "arm": arm, "donor": donor, "test_accuracy": acc,
            "final": statistics.fmean(acc[-LAST:]), "params": state.num_params(), "seconds": time.perf_counter() - t0}


def epochs_to(acc: list[float], target: float, at: int) -> int | None:
    """Epochs after germination (epoch `at`) until test accuracy first reaches `target`, or None."""
    for e, a in enumerate(acc):
        if e >= at and a >= target:
            return e + 1 - at
    return None


def report(results: list[dict], hosts: list[str], at: int, epochs: int) -> str:
    lines = ["| host | arm | final test accuracy (mean ± 95% CI) | per seed | params |", "|---|---|---|---|---|"]
    for h in hosts:
        for arm in ARMS:
            rs = sorted((r for r in results if r["host"] == h and r["arm"] == arm), key=lambda r: r["seed"])
            if not rs:
                continue
            m, w = mean_ci([r["final"] * 100 for r in rs])
            per_seed = " ".join(f"{r['final'] * 100:.1f}" for r in rs)
            lines.append(f"| {h} | {arm} | {m:.1f} ± {w:.1f} | {per_seed} | {rs[0]['params']} |")
    lines += ["", "| host | paired (by seed) | n | mean ± 95% CI | per seed |", "|---|---|---|---|---|"]
    for h in hosts:
        by = {(r["arm"], r["seed"]): r for r in results if r["host"] == h}
        seeds = sorted({r["seed"] for r in results if r["host"] == h})
        for arm in ("warm", "warm-direct"):
            d = [(by[(arm, s)]["final"] - by[("cold", s)]["final"]) * 100 for s in seeds]
            m, w = mean_ci(d)
            lines.append(f"| {h} | final accuracy {arm} - cold (points) | {len(d)} | {m:+.1f} ± {w:.1f} | "
                         f"{' '.join(f'{x:+.1f}' for x in d)} |")
        for arm in ("warm", "warm-direct"):  # paired: epochs to 75% minus the cold arm's (negative: faster)
            d = [epochs_to(by[(arm, s)]["test_accuracy"], 0.75, at) - epochs_to(by[("cold", s)]["test_accuracy"], 0.75, at)
                 for s in seeds if epochs_to(by[(arm, s)]["test_accuracy"], 0.75, at) is not None
                 and epochs_to(by[("cold", s)]["test_accuracy"], 0.75, at) is not None]
            m, w = mean_ci([float(x) for x in d])
            lines.append(f"| {h} | epochs to 75% test accuracy, {arm} - cold | {len(d)} | {m:+.1f} ± {w:.1f} | "
                         f"{' '.join(f'{x:+d}' for x in d)} |")
        for arm in ("cold", "warm", "warm-direct"):
            for label, target in (("cold's final accuracy", None), ("75% test accuracy", 0.75)):
                cells, vals = [], []
                for s in seeds:
                    t = by[("cold", s)]["final"] if target is None else target
                    n = epochs_to(by[(arm, s)]["test_accuracy"], t, at)
                    cells.append("never" if n is None else str(n))
                    if n is not None:
                        vals.append(n)
                med = statistics.median(vals) if vals else float("nan")
                lines.append(f"| {h} | epochs from germination to {label}: {arm} | {len(vals)} reached | "
                             f"median {med:g} | {' '.join(cells)} |")
    lines.append("")
    lines.append(f"Germination at epoch {at} of {epochs}; final accuracy = mean test accuracy of the last {LAST} "
                 "epochs; 'never' = not reached within the budget.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--donor-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--donor-epochs", type=int, default=40, help="donor runs only need to fossilize their seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[10, 11, 12, 13, 14])
    p.add_argument("--hosts", nargs="+", default=["mlp-impaired", "cnn-impaired"])
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--germinate-at", type=int, default=10, help="the epoch the seed is germinated (0-based)")
    p.add_argument("--out", default="runs/warm_start", help="directory for the library and results.json")
    p.add_argument("--report", metavar="RESULTS_JSON", help="only print the tables of a finished run's results.json")
    args = p.parse_args()
    if args.report:
        results = json.loads(Path(args.report).read_text())
        print(report(results, list(dict.fromkeys(r["host"] for r in results)), args.germinate_at, args.epochs))
        return
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lib_path = out / "library"
    if lib_path.exists():
        raise SystemExit(f"{lib_path} exists; choose another --out (the donors must be the ones run here).")
    with tempfile.TemporaryDirectory() as work:
        ids = donors(lib_path, args.donor_seeds, args.donor_epochs, Path(work))
    if not ids:
        raise SystemExit("no donor fossilized a conv1d_k5 input seed; nothing to warm-start from.")
    lib = Library(lib_path, create=False)
    results = []
    for h in args.hosts:
        for i, s in enumerate(args.seeds):
            for arm in ARMS:
                donor = None if arm in ("static", "cold") else ids[i % len(ids)]
                r = recipient(h, s, arm, lib, donor, args.epochs, args.germinate_at)
                results.append(r)
                print(f"{h} seed {s} {arm:11s}: final test {r['final']:.3f} ({r['seconds']:.1f} s)", flush=True)
    (out / "results.json").write_text(json.dumps(results))
    print()
    print(report(results, args.hosts, args.germinate_at, args.epochs))


if __name__ == "__main__":
    main()
