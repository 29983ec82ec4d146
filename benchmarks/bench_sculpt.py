"""Emrakul against torch.nn.utils.prune on the grown networks of the README growth table.

For each grown network (MNIST-1D, hosts mlp-impaired and cnn-impaired, plateau heuristic, 200 epochs,
parameter budget 1,100, seeds 0-4: ``esper-fn grow ... --param-budget 1100``; run dirs are grown
here if missing) and each keep fraction:

* **emrakul**: `esper_fn.sculpt(state, keep=KEEP, data=validation)` (contribution criterion, mean
  compensation), exported (`esper_fn.export`) to a smaller `nn.Module`;
* **ln_structured**: the unsculpted export, with `torch.nn.utils.prune.ln_structured` (L2 norm,
  dim 0) on the producing weight of every unit group Emrakul could sculpt (the same hidden units:
  MLP and CNN layers, the fossilized seeds' hidden channels), the same fraction of units per group,
  and the pruned units' bias entries and outgoing columns masked too (`custom_from_mask`: they are
  dead with the unit, so the parameter count is that of the network with those units removed);
* **l1_unstructured**: the unsculpted export, with `torch.nn.utils.prune.l1_unstructured` at one
  fraction on every weight tensor (Linear and conv weights, host and seeds; biases kept);

the anchors' amounts chosen as the largest (on a grid of 0.005) whose remaining (unmasked) parameter
count is still at least Emrakul's: an anchor never has fewer parameters than the sculpted network.
All three, and a control (the unpruned network), are then fine-tuned identically: a plain
`torch.optim.Adam` loop at the run's learning rate, batch 100, `--fine-tune-epochs` epochs over the
training split, one data order per network. The anchors' masks stay applied: `prune.remove` makes
the pruning permanent (an export may read its parameters by name, which `prune`'s reparametrisation
renames), and the masked entries are zeroed again after every step, which trains the unmasked
entries exactly as the reparametrisation would (Adam is elementwise).
Decisions use the validation split only (the sculpt's measurements; the validation-chosen keep:
the smallest KEEP whose fine-tuned validation accuracy is within 0.5 points of the grown
network's); test accuracy is only reported.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_sculpt.py --runs runs/grown --keep 0.9 0.8 0.7 0.6 --workers 1

With ``--suite growthbench-v1 --split test --seeds ...`` the networks are instead those the plateau
heuristic grows on the suite's test instances (`esper_fn.bench.Instance.run_config`: each
instance's task, host, horizon, learning rate and budget), grouped per instance; a keep that a
network cannot reach (every unit group down to one unit) is listed as not sculpted.

Prints one row per network and keep, then per host and keep the mean and 95% CI (Student's t) of the
test-accuracy change against the grown network, and the paired differences emrakul - ln_structured
and emrakul - control (the control shows what the fine-tuning epochs alone change). ``--table
JSON`` prints the tables again from the rows a ``--json`` run wrote.
"""

from __future__ import annotations

import argparse
import copy
import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from esper_fn.policies import mean_ci

METHODS = ("emrakul", "ln_structured", "l1_unstructured", "control")
BUDGET = 1100  # the README growth table's parameter budget




def grow_missing(out: Path, config) -> Path:
    """Grow `config` into `out` unless a finished run is there already."""
    from esper_fn.run import grow

    if not (out / "summary.json").is_file():
        grow(config, out, overwrite=True, progress=False)
    return out


def networks(a) -> list[tuple[Path, str]]:
    """``[(run dir, group), ...]``: the growth table's networks (group: the host), or with ``--suite``
    the heuristic's networks of the suite's `--split` instances (`Instance.run_config`; group: the
    instance), grown where missing."""
    from esper_fn.run import RunConfig

    root = Path(a.runs)
    if a.suite is None:
        return [(grow_missing(root / f"{h}-s{s}", RunConfig(task="mnist1d", host=h, controller="heuristic",
                                                              epochs=a.epochs, seed=s, param_budget=BUDGET)), h)
                for h in a.hosts for s in a.seeds]
    from esper_fn.bench import suite

    return [(grow_missing(root / f"{i.name}-s{s}", i.run_config(s)), i.name)
            for i in suite(a.suite).split(a.split) for s in a.seeds]


def _locate(net, tensor):
    """(module, parameter name) of the parameter of `net` equal to `tensor` (exports copy the state)."""
    import torch

    found = [(net.get_submodule(n.rpartition(".")[0]) if "." in n else net, n.rpartition(".")[2].removesuffix("_orig"))
             for n, p in net.named_parameters() if p.shape == tensor.shape and torch.equal(p.detach(), tensor)]
    if len(found) != 1:
        raise LookupError(f"{len(found)} parameters of the export match a state tensor of shape {tuple(tensor.shape)}")
    return found[0]


def _kept(net, masks=()) -> int:
    """Parameters a pruned module still has: unmasked entries of pruned tensors, all of the others."""
    masked = {id(p): m for p, m in masks}
    return sum(int(masked[id(p)].sum()) if id(p) in masked else p.numel() for p in net.parameters())


def _permanent(net):
    """Make every `prune` reparametrisation permanent; ``[(parameter, mask), ...]`` to keep applying."""
    import torch.nn.utils.prune as prune

    out = []
    for mod in list(net.modules()):
        for name in [n.removesuffix("_mask") for n, _ in mod.named_buffers(recurse=False) if n.endswith("_mask")]:
            mask = getattr(mod, name + "_mask").clone()
            prune.remove(mod, name)
            out.append((getattr(mod, name), mask))
    return out


def ln_structured(state, fraction: float):
    """The export of `state` with `fraction` of every unit group's units pruned by the L2 norm of their
    producing weight rows (`prune.ln_structured`), their bias entries and outgoing columns masked."""
    import torch
    import torch.nn.utils.prune as prune

    import esper_fn as ef

    net = ef.export(state)
    for target in ef.sculptable(state).values():
        for group, n in zip(target.groups, target.units):
            k = min(round(fraction * n), n - 1)
            if k == 0:
                continue
            wkey = next(key for key, dim, _, role in group if role == "in" and dim == 0 and
                        state.params_flat[key].dim() >= 2)
            mod, name = _locate(net, state.params_flat[wkey])
            prune.ln_structured(mod, name, amount=k, n=2, dim=0)
            mask = getattr(mod, name + "_mask")
            dead = (mask.flatten(1).sum(1) == 0).nonzero().flatten()  # the units ln_structured removed
            for key, dim, block, role in group:
                if key == wkey or role == "bias":
                    continue
                mod2, name2 = _locate(net, state.params_flat[key])
                m = torch.ones_like(state.params_flat[key])
                m.index_fill_(dim, (dead[:, None] * block + torch.arange(block)).flatten(), 0.0)
                prune.custom_from_mask(mod2, name2, m)
    return net, _permanent(net)


def l1_unstructured(state, fraction: float):
    """The export of `state` with `fraction` of every weight tensor (2-d or more) pruned by magnitude."""
    import torch.nn.utils.prune as prune

    import esper_fn as ef

    net = ef.export(state)
    for key, v in state.params_flat.items():
        if v.dim() >= 2 and round(fraction * v.numel()) > 0:
            mod, name = _locate(net, v)
            prune.l1_unstructured(mod, name, amount=round(fraction * v.numel()))
    return net, _permanent(net)


def matched(build, state, target: int):
    """``(net, masks)`` of `build(state, f)` at the largest fraction f (a grid of 0.005) that keeps at
    least `target` parameters: the anchor never has fewer parameters than the Emrakul network."""
    best = build(state, 0.0)
    for i in range(1, 200):
        net, masks = build(state, i / 200)
        if _kept(net, masks) < target:
            break
        best = (net, masks)
    return best


def fine_tune(net, masks, task, epochs: int, lr: float, seed: int, teacher=None, temperature: float = 2.0,
              best_val: bool = False):
    """Adam over the training split. With a `teacher` (the grown network, frozen), the loss is the
    distillation loss ``T^2 KL(softmax(teacher / T) || softmax(net / T))`` instead of the labels'
    cross-entropy: the pruned network is trained back toward the function it was cut from. With
    `best_val`, the network ends at the epoch (0 to `epochs`) of the highest validation accuracy
    (early stopping on the validation split)."""
    import torch
    import torch.nn.functional as F

    net.train()
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)
    xv, yv = task.split("val")
    best = (accuracy(net, xv, yv), copy.deepcopy(net.state_dict())) if best_val else None
    for _ in range(epochs):
        net.train()
        for xb, yb in task.batches("train", 100, generator=g):
            opt.zero_grad()
            out = net(xb)
            if teacher is None:
                loss = F.cross_entropy(out, yb)
            else:
                with torch.no_grad():
                    target = F.log_softmax(teacher(xb) / temperature, -1)
                loss = temperature ** 2 * F.kl_div(F.log_softmax(out / temperature, -1), target,
                                                   log_target=True, reduction="batchmean")
            loss.backward()
            opt.step()
            with torch.no_grad():
                for p, m in masks:
                    p.mul_(m)
        if best_val and (acc := accuracy(net.eval(), xv, yv)) > best[0]:
            best = (acc, copy.deepcopy(net.state_dict()))
    if best_val:
        net.load_state_dict(best[1])
    return net.eval()


def accuracy(net, x, y) -> float:
    import torch

    with torch.no_grad():
        return float((net(x).argmax(-1) == y).float().mean())


def stepwise(state, task, keep: float, steps: int, epochs: int, by: str, seed: int):
    """Emrakul in `steps` steps with esper_fn's own training between them: each step sculpts to
    ``keep ** (i / steps)`` of the grown parameters (the last to at most ``floor(keep x`` them``)``,
    as one sculpt does), then trains ``epochs // steps`` epochs (`train_epoch`, batch 100, the run's
    Adam and its moments carried). ``steps=1``: one sculpt, then all the epochs in esper_fn."""
    import math

    import torch

    import esper_fn as ef
    from esper_fn.training import TrainConfig, train_epoch

    xv, yv = task.split("val")
    p0, g = state.num_params(), torch.Generator().manual_seed(seed)
    for i in range(1, steps + 1):
        goal = math.floor(p0 * keep ** (i / steps)) if i < steps else math.floor(p0 * keep)
        state, _ = ef.sculpt(state, keep=min(1.0, goal / state.num_params()), by=by, data=(xv, yv))
        for _ in range(epochs // steps + (epochs % steps if i == steps else 0)):
            state, _ = train_epoch(state, task, TrainConfig(batch_size=100), generator=g)
    return ef.export(state)


def one(args: tuple[str, str, list[float], int, str, list[int], str, float, float, bool]) -> list[dict]:
    import torch

    torch.set_num_threads(1)
    import esper_fn as ef
    from esper_fn.run import restore_run

    run_dir, group, keeps, epochs, by, schedules, allocate, lr_scale, distill, best_val = args
    config, task, ep = restore_run(run_dir)
    state = ep.state
    (xv, yv), (xt, yt) = task.split("val"), task.split("test")
    grown = ef.export(state)
    teacher = copy.deepcopy(grown).eval().requires_grad_(False) if distill else None
    base = {"val": accuracy(grown, xv, yv), "test": accuracy(grown, xt, yt), "params": state.num_params()}
    rows = []
    for keep in keeps:
        try:
            sculpted, report = ef.sculpt(state, keep=keep, by=by, data=(xv, yv), allocate=allocate)
        except ef.SculptError as e:  # e.g. a keep below what removing all but one unit per group reaches
            print(f"{Path(run_dir).name} keep {keep}: not sculpted ({e})", flush=True)
            rows.append({"run": Path(run_dir).name, "host": group, "seed": config.seed, "keep": keep,
                         "grown": base, "skipped": str(e)})
            continue
        nets = {"emrakul": (ef.export(sculpted), []),
                "ln_structured": matched(ln_structured, state, sculpted.num_params()),
                "l1_unstructured": matched(l1_unstructured, state, sculpted.num_params()),
                "control": (copy.deepcopy(grown), [])}
        row = {"run": Path(run_dir).name, "host": group, "seed": config.seed, "keep": keep, "grown": base}
        for method, (net, masks) in nets.items():
            before = {"val": accuracy(net, xv, yv), "test": accuracy(net, xt, yt)}
            fine_tune(net, masks, task, epochs, config.lr * lr_scale, seed=config.seed, teacher=teacher,
                      temperature=distill or 2.0, best_val=best_val)
            row[method] = {"params": _kept(net, masks), "before": before,
                           "val": accuracy(net, xv, yv), "test": accuracy(net, xt, yt)}
        for k in schedules:  # the stepwise schedules, trained in esper_fn (no further fine-tune)
            net = stepwise(state, task, keep, k, epochs, by, config.seed)
            row[f"steps{k}"] = {"params": _kept(net, []), "val": accuracy(net, xv, yv), "test": accuracy(net, xt, yt)}
        row["units"] = {t.slot: [t.units_before, t.units_after] for t in report.targets}
        rows.append(row)
        print(f"{row['run']} keep {keep}: " + ", ".join(
            f"{m} {row[m]['params']} params test {row[m]['test']:.3f}" for m in METHODS), flush=True)
    return rows


def table(rows: list[dict], keeps: list[float], hosts: list[str]) -> str:
    skipped = [r for r in rows if "skipped" in r]
    rows = [r for r in rows if "skipped" not in r]
    pts = lambda r, m: 100 * (r[m]["test"] - r["grown"]["test"])  # noqa: E731
    out = ["| network | keep | params grown -> kept | emrakul | ln_structured | l1_unstructured | control |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['run']} | {r['keep']} | {r['grown']['params']} -> {r['emrakul']['params']} "
                   f"({r['ln_structured']['params']}, {r['l1_unstructured']['params']}) | "
                   + " | ".join(f"{100 * r[m]['test']:.1f} ({pts(r, m):+.1f})" for m in METHODS) + " |")
    out += ["", "| host | keep | params removed | emrakul | ln_structured | l1_unstructured | control | "
                "emrakul - ln_structured (paired) | emrakul - control (paired) | emrakul before fine-tune |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for host in hosts:
        for keep in keeps + ["val"]:
            rs = [r for r in rows if r["host"] == host and r["keep"] == keep] if keep != "val" else _val_chosen(
                [r for r in rows if r["host"] == host])
            if not rs:
                continue
            removed = mean_ci([100 * (1 - r["emrakul"]["params"] / r["grown"]["params"]) for r in rs])
            cells = ["{:+.1f} ± {:.1f}".format(*mean_ci([pts(r, m) for r in rs])) for m in METHODS]
            d = mean_ci([pts(r, "emrakul") - pts(r, "ln_structured") for r in rs])
            dc = mean_ci([pts(r, "emrakul") - pts(r, "control") for r in rs])
            pre = mean_ci([100 * (r["emrakul"]["before"]["test"] - r["grown"]["test"]) for r in rs])
            label = keep if keep != "val" else "chosen on val: " + " ".join(str(r["keep"]) for r in rs)
            out.append(f"| {host} | {label} | {removed[0]:.1f}% | " + " | ".join(cells)
                       + f" | {d[0]:+.1f} ± {d[1]:.1f} | {dc[0]:+.1f} ± {dc[1]:.1f} | {pre[0]:+.1f} ± {pre[1]:.1f} |")
    extra = sorted({k for r in rows for k in r if k.startswith("steps")})
    if extra:
        out += ["", "| host | keep | schedule | params removed | val change | test change | test - ln_structured (paired) |",
                "|---|---|---|---|---|---|---|"]
        for host in hosts:
            for keep in keeps:
                rs = [r for r in rows if r["host"] == host and r["keep"] == keep]
                for m in ["emrakul", *extra]:
                    rm = mean_ci([100 * (1 - r[m]["params"] / r["grown"]["params"]) for r in rs])
                    v = mean_ci([100 * (r[m]["val"] - r["grown"]["val"]) for r in rs])
                    t = mean_ci([pts(r, m) for r in rs])
                    d = mean_ci([pts(r, m) - pts(r, "ln_structured") for r in rs])
                    out.append(f"| {host} | {keep} | {m} | {rm[0]:.1f}% | {v[0]:+.1f} ± {v[1]:.1f} | "
                               f"{t[0]:+.1f} ± {t[1]:.1f} | {d[0]:+.1f} ± {d[1]:.1f} |")
    out.append("")
    out += [f"not sculpted: {r['run']} keep {r['keep']}: {r['skipped']}" for r in skipped]
    out.append("Test accuracy in % (change against the grown network in points; per host: mean ± 95% CI over "
               "seeds); params: the emrakul network's, (ln_structured's, l1_unstructured's) unmasked parameters.")
    return "\n".join(out)


def _val_chosen(rows: list[dict]) -> list[dict]:
    """Per network, the row of the smallest keep whose fine-tuned validation accuracy is within 0.5
    points of the grown network's (the largest keep if none is)."""
    chosen = []
    for run in sorted({r["run"] for r in rows}):
        mine = sorted((r for r in rows if r["run"] == run), key=lambda r: r["keep"])
        ok = [r for r in mine if r["emrakul"]["val"] >= r["grown"]["val"] - 0.005]
        chosen.append(ok[0] if ok else mine[-1])
    return chosen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="runs/grown", help="directory of the grown run dirs (<host>-s<seed>); "
                                                        "missing ones are grown")
    p.add_argument("--hosts", nargs="+", default=["mlp-impaired", "cnn-impaired"])
    p.add_argument("--suite", help="instead of the growth table: a benchmark suite (e.g. growthbench-v1), whose "
                                   "--split instances are grown by the heuristic on --seeds")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--epochs", type=int, default=200, help="epochs of a missing grow run")
    p.add_argument("--keep", nargs="+", type=float, default=[0.9, 0.8, 0.7, 0.6])
    p.add_argument("--fine-tune-epochs", type=int, default=20)
    p.add_argument("--fine-tune-lr-scale", type=float, default=1.0,
                   help="the fine-tune's learning rate as a multiple of the run's")
    p.add_argument("--distill", type=float, default=0.0, metavar="T",
                   help="fine-tune every variant by distillation from the grown network at temperature T "
                        "instead of on the labels (0: labels)")
    p.add_argument("--best-val", action="store_true",
                   help="every variant's fine-tune ends at its epoch of the highest validation accuracy")
    p.add_argument("--steps", type=int, nargs="*", default=[],
                   help="also Emrakul in K steps with esper_fn training between them (`stepwise`), per K given")
    p.add_argument("--allocate", default="greedy", choices=["greedy", "even"],
                   help="how Emrakul spreads the removals over unit groups (`esper_fn.sculpt(allocate=...)`)")
    p.add_argument("--by", default="contribution", choices=["contribution", "magnitude"],
                   help="Emrakul's criterion (`esper_fn.sculpt(by=...)`); choose it on validation accuracy")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--table", metavar="JSON", help="only print the tables of the rows a --json run wrote")
    a = p.parse_args()
    if a.table:
        rows = json.loads(Path(a.table).read_text())
        print(table(rows, sorted({r["keep"] for r in rows}, reverse=True), list(dict.fromkeys(r["host"] for r in rows))))
        return
    nets = networks(a)
    jobs = [(str(d), g, a.keep, a.fine_tune_epochs, a.by, a.steps, a.allocate, a.fine_tune_lr_scale,
             a.distill, a.best_val) for d, g in nets]
    if a.workers > 1:
        with ProcessPoolExecutor(a.workers) as pool:
            rows = [r for rs in pool.map(one, jobs) for r in rs]
    else:
        rows = [r for job in jobs for r in one(job)]
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    print(table(rows, a.keep, list(dict.fromkeys(g for _, g in nets))))


if __name__ == "__main__":
    main()
