"""Core performance benchmarks of esper_fn against plain PyTorch, side by side in one run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_core.py            # full (< 5 min)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_core.py --quick    # smoke (< 60 s)

What is measured (one torch thread, CPU, batch 128, MNIST-1D shapes, Adam lr 1e-2):

1. step/*      one `esper_fn.train_step(state, x, y)` against the same network as an `nn.Sequential`
               (identical initial weights) trained with `torch.optim.Adam(fused=True)`:
               zero_grad(set_to_none=True), forward, cross_entropy, backward, step.   Target <= 1.10.
2. dormant/*   `train_step` of the paper MLP whose 4 slots (input, fc1, fc2, fc3) are all DORMANT,
               against a "bare" host: same init, same slot specs (so the State is structurally
               identical), but a forward_fn that never calls `slot(...)`.            Target <= 1.02.
               (A host with *zero* slots cannot be used: `_plan` fails on it, see docs/benchmarks.md.)
3. germinate/* `esper_fn.germinate(state, "fc1", bp)` (seed init + zero optimizer state) on the paper
               MLP, absolute time.                                                   Target <= 250 us.
4. N16/*       16 hosts of one structure: `esper_fn.stack` once, then one batched `train_step` on
               x[16,128,40], y[16,128], against a Python loop over 16 `nn.Module`s each with its own
               fused Adam (and, for information, a loop of 16 single-host `train_step`s).
               Target: batched >= 2x faster than the module loop (ratio <= 0.50).
5. apply/*     `esper_fn.apply(state, x)` against `module(x)` under `torch.no_grad()`: information.

Method: every variant is warmed up, then timed call by call (time.perf_counter_ns) in alternating
blocks of ~10 ms (A B, B A, A B, ...), so that slow phases of a shared machine hit every variant of
a comparison equally. The time columns are medians over all timed calls; the ratio is the median,
over blocks, of (esper_fn's block median / the baseline's block median) from adjacent blocks, and
"ratio IQR" is the inter-quartile range of those per-block ratios. "p10 ratio" compares 10th
percentiles, which a loaded machine (preemption) disturbs less than medians; pass/fail uses the
median ratio. Each comparison stops after
`--repeats` blocks or its time budget. Inputs cycle through a pool of pre-built random batches.
Python's cyclic GC is disabled inside timed blocks (as `timeit` does) and run between blocks.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import esper_fn as ef

B = 128  # batch size
N_HOSTS = 16
PAPER = (40, 100, 100, 10)
IMPAIRED = (40, 16, 10)


# --- timing harness ------------------------------------------------------------------------------


@dataclass
class Timed:
    samples_ns: list[int] = field(default_factory=list)
    block_medians: list[float] = field(default_factory=list)

    @property
    def median_us(self) -> float:
        return statistics.median(self.samples_ns) / 1e3

    @property
    def p10_us(self) -> float:
        """10th percentile: the cost with little interference from other processes."""
        return sorted(self.samples_ns)[len(self.samples_ns) // 10] / 1e3


def measure(variants: dict[str, Callable[[], object]], *, blocks: int, block_s: float, warmup_s: float,
            budget_s: float) -> dict[str, Timed]:
    """Time each zero-argument callable call by call; variants alternate block by block (order
    reversed on odd blocks: A B C, C B A, ...). Calls per block are calibrated so that one block
    lasts about `block_s`. Stops after `blocks` blocks or once `budget_s` is spent (at least 4
    blocks), so that a loaded machine cannot make the run unbounded."""
    names = list(variants)
    per_call = {}
    for n in names:  # warm-up, and calibration of the block size
        fn = variants[n]
        t_end = time.perf_counter() + warmup_s
        k = 0
        t0 = time.perf_counter()
        while True:
            fn()
            k += 1
            if time.perf_counter() >= t_end and k >= 3:
                break
        per_call[n] = (time.perf_counter() - t0) / k
    calls = {n: max(1, int(block_s / per_call[n])) for n in names}
    out = {n: Timed() for n in names}
    clock = time.perf_counter_ns
    t_stop = time.perf_counter() + budget_s
    for b in range(blocks):
        if b >= 4 and time.perf_counter() > t_stop:
            break
        order = names if b % 2 == 0 else names[::-1]
        for n in order:
            fn, rec = variants[n], out[n]
            local: list[int] = []
            gc.collect()
            gc.disable()
            try:
                for _ in range(calls[n]):
                    t0 = clock()
                    fn()
                    local.append(clock() - t0)
            finally:
                gc.enable()
            rec.samples_ns.extend(local)
            rec.block_medians.append(statistics.median(local))
    return out


def ratio_stats(a: Timed, b: Timed) -> tuple[float, float, float, int]:
    """Paired ratio a/b: median, p25 and p75 over blocks of (a's block median / b's block median),
    and the number of blocks. Pairing blocks that ran next to each other cancels slow phases of a
    shared machine better than a ratio of pooled medians."""
    r = sorted(x / y for x, y in zip(a.block_medians, b.block_medians))
    q = statistics.quantiles(r, n=4, method="inclusive") if len(r) >= 2 else [r[0]] * 3
    return statistics.median(r), q[0], q[2], len(r)


class Cycle:
    """Cycles through a pool of pre-built batches (fresh data every call, no generation cost), so that
    long timing runs do not overfit one batch into tiny (possibly subnormal) gradients."""

    def __init__(self, xs: torch.Tensor, ys: torch.Tensor):
        self.xs, self.ys = list(xs.unbind(0)), list(ys.unbind(0))
        self.i = 0

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        i = self.i = (self.i + 1) % len(self.xs)
        return self.xs[i], self.ys[i]


# --- networks --------------------------------------------------------------------------------------


def data(gen: torch.Generator, *lead: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random MNIST-1D-shaped batches: x [*lead, B, 40], y [*lead, B] (10 classes)."""
    return torch.randn(*lead, B, 40, generator=gen), torch.randint(0, 10, (*lead, B), generator=gen)


def mlp_module(widths, state: ef.State) -> nn.Sequential:
    """nn.Sequential(Linear, ReLU, ..., Linear) with the weights of `state`'s host."""
    layers: list[nn.Module] = []
    n = len(widths) - 1
    for i in range(n):
        lin = nn.Linear(widths[i], widths[i + 1])
        with torch.no_grad():
            lin.weight.copy_(state.params_flat[("host", f"fc{i + 1}", "weight")])
            lin.bias.copy_(state.params_flat[("host", f"fc{i + 1}", "bias")])
        layers.append(lin)
        if i < n - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class ConvSeededMLP(nn.Module):
    """The module twin of an MLP host with a `conv1d_k5` seed BLENDING at "input":
    ``mlp(x + alpha * conv5(relu(conv5(x))))`` (1 -> 16 -> 1 channels, 'same' padding)."""

    def __init__(self, widths, state: ef.State, slot: str = "input"):
        super().__init__()
        self.mlp = mlp_module(widths, state)
        self.c1 = nn.Conv1d(1, 16, 5, padding=2)
        self.c2 = nn.Conv1d(16, 1, 5, padding=2)
        p = state.seed_params(slot)
        with torch.no_grad():
            self.c1.weight.copy_(p["w1"])
            self.c1.bias.copy_(p["b1"])
            self.c2.weight.copy_(p["w2"])
            self.c2.bias.copy_(p["b2"])
        self.register_buffer("alpha", state.slots["alpha"][..., state.index(slot)].clone())

    def forward(self, x):
        d = self.c2(F.relu(self.c1(x.unsqueeze(-2)))).squeeze(-2)
        return self.mlp(x + self.alpha * d)


def module_stepper(model: nn.Module, batches: Callable) -> Callable[[], None]:
    """The idiomatic PyTorch step: zero_grad(set_to_none), forward, cross_entropy, backward, fused Adam."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)

    def step():
        x, y = batches()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step


def functional_stepper(state: ef.State, batches: Callable, donate: bool = False) -> tuple[Callable[[], None], list[ef.State]]:
    box = [state]

    def step():
        x, y = batches()
        box[0], _ = ef.train_step(box[0], x, y, donate=donate)

    return step, box


def bare_paper_host() -> ef.Host:
    """The paper MLP as a host whose forward never calls `slot` (same init and same slot specs, so
    the State is structurally identical; only the 4 `slot(...)` calls of the forward are gone)."""
    ref = ef.hosts.mlp(PAPER)

    def forward_fn(flat, x, slot, train):
        h = F.relu(F.linear(x, flat["fc1.weight"], flat["fc1.bias"]))
        h = F.relu(F.linear(h, flat["fc2.weight"], flat["fc2.bias"]))
        return F.linear(h, flat["fc3.weight"], flat["fc3.bias"]), {}

    return ef.Host("mlp-bare-40-100-100-10", ref.init_fn, forward_fn, ref.slots_fn)


def new_state(host: ef.Host, seed: int) -> ef.State:
    return ef.init(host, optimizer=ef.optim.adam(1e-2), generator=torch.Generator().manual_seed(seed))


def blending_conv_state(host: ef.Host, seed: int) -> ef.State:
    s = new_state(host, seed)
    s = ef.germinate(s, "input", "conv1d_k5", generator=torch.Generator().manual_seed(1000 + seed))
    s = ef.advance(s, "input", force=True)  # -> TRAINING
    s = ef.advance(s, "input", force=True)  # -> BLENDING
    return ef.tick(s)  # alpha 0.2 (linear ramp, tempo 5)


# --- equivalence checks (the benchmarks compare the same computation) -----------------------------


def paired_steps(s: ef.State, m: nn.Module, xs, ys, after_first=None) -> tuple[ef.State, float]:
    """Five steps of esper_fn and of the module twin (fused Adam) on the same batches; the largest
    loss difference."""
    opt = torch.optim.Adam(m.parameters(), lr=1e-2, fused=True)
    dloss = 0.0
    for t in range(5):
        s, met = ef.train_step(s, xs[t], ys[t])
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(m(xs[t]), ys[t])
        loss.backward()
        opt.step()
        dloss = max(dloss, abs(met["loss"].item() - loss.item()))
        if t == 0 and after_first is not None:
            after_first(s, m)
    return s, dloss


def check_equivalence() -> list[str]:
    """One step must give the same weights; five steps the same losses (Adam amplifies float
    rounding of near-zero gradients, so weights are compared after one step only)."""
    gen = torch.Generator().manual_seed(123)
    out = []

    def lin_weights(model):
        return [m.weight for m in model.modules() if isinstance(m, nn.Linear)]

    for widths in (PAPER, IMPAIRED):
        xs, ys = data(gen, 5)
        s = new_state(ef.hosts.mlp(widths), 0)
        m = mlp_module(widths, s)
        first: list[float] = []

        def after_first(s1, m1, first=first):
            first.append(max((s1.params_flat[("host", f"fc{i + 1}", "weight")] - w).abs().max().item()
                             for i, w in enumerate(lin_weights(m1))))

        s, dloss = paired_steps(s, m, xs, ys, after_first)
        dw = first[0]
        out.append(f"mlp{widths} vs nn.Sequential+fused Adam: max |dW| after 1 step {dw:.1e}; "
                   f"max |dloss| over 5 steps {dloss:.1e}")
    xs, ys = data(gen, 5)
    s = blending_conv_state(ef.hosts.mlp(IMPAIRED), 0)
    m = ConvSeededMLP(IMPAIRED, s)
    s, dloss = paired_steps(s, m, xs, ys)
    with torch.no_grad():
        dy = (ef.apply(s, xs[0]) - m(xs[0])).abs().max().item()
    out.append(f"mlp{IMPAIRED} + conv1d_k5@input BLENDING vs module twin: max |dloss| over 5 steps {dloss:.1e}, "
               f"max |dy| after {dy:.1e}")
    s_bare, s_slot = new_state(bare_paper_host(), 0), new_state(ef.hosts.mlp(PAPER), 0)
    for t in range(3):
        s_bare, _ = ef.train_step(s_bare, xs[t], ys[t])
        s_slot, _ = ef.train_step(s_slot, xs[t], ys[t])
    d = max((s_bare.params_flat[k] - s_slot.params_flat[k]).abs().max().item() for k in s_slot.params_flat)
    out.append(f"bare vs slotted (4 DORMANT) paper MLP: max param diff after 3 steps {d:.1e}")
    return out


# --- the benchmarks --------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    ours_us: float
    base_us: float | None
    ratio: float | None
    spread: tuple[float, float] | None
    ratio_p10: float | None
    blocks: int
    target: str
    ok: bool | None  # None: information only


def run(args) -> list[Row]:
    gen = torch.Generator().manual_seed(0)
    kw = dict(blocks=args.repeats, block_s=args.block_s, warmup_s=args.warmup_s, budget_s=args.budget_s)
    rows: list[Row] = []
    t_start = time.perf_counter()

    def compare(name, ours, base, target=None, limit=None):
        """Row comparing variant `ours` against `base`; pass if the paired ratio <= limit."""
        r, lo, hi, n = ratio_stats(ours, base)
        rows.append(Row(name, ours.median_us, base.median_us, r, (lo, hi), ours.p10_us / base.p10_us, n,
                        target or "info",
                        None if limit is None else r <= limit))

    def log(msg):
        print(f"  [{time.perf_counter() - t_start:6.1f} s] {msg}", file=sys.stderr, flush=True)

    # 1. one train step, and 5. apply vs forward
    for label, widths in (("paper 40-100-100-10", PAPER), ("impaired 40-16-10", IMPAIRED)):
        xs, ys = data(gen, 32)
        s0 = new_state(ef.hosts.mlp(widths), 0)
        f_step, box = functional_stepper(s0, Cycle(xs, ys))
        model = mlp_module(widths, s0)
        m_step = module_stepper(model, Cycle(xs, ys))
        f_donated, _ = functional_stepper(new_state(ef.hosts.mlp(widths), 0), Cycle(xs, ys), donate=True)
        t = measure({"esper": f_step, "donated": f_donated, "module": m_step}, **kw)
        compare(f"step/{label}", t["esper"], t["module"], "<= 1.10", 1.10)
        compare(f"step/{label}, donate=True (as inside train_epoch)", t["donated"], t["module"], "<= 1.10", 1.10)
        log(f"step {label}")

        cx, cm = Cycle(xs, ys), Cycle(xs, ys)

        def fwd(model=model, cm=cm):
            with torch.no_grad():
                return model(cm()[0])

        t = measure({"esper": lambda s=box[0], cx=cx: ef.apply(s, cx()[0]), "module": fwd}, **kw)
        compare(f"apply/{label} (vs no_grad module forward)", t["esper"], t["module"])
        log(f"apply {label}")

    # 2. four dormant slots
    xs, ys = data(gen, 32)
    f_slot, _ = functional_stepper(new_state(ef.hosts.mlp(PAPER), 0), Cycle(xs, ys))
    f_bare, _ = functional_stepper(new_state(bare_paper_host(), 0), Cycle(xs, ys))
    t = measure({"slotted": f_slot, "bare": f_bare}, **kw)
    compare("dormant/paper MLP step, 4 DORMANT slots vs no slot calls", t["slotted"], t["bare"], "<= 1.02", 1.02)
    log("dormant")

    # 3. germinate (absolute; the state is immutable, so every call grafts into the same state)
    s_paper = new_state(ef.hosts.mlp(PAPER), 0)
    g = torch.Generator().manual_seed(1)
    t = measure({bp: (lambda bp=bp: ef.germinate(s_paper, "fc1", bp, generator=g)) for bp in ("mlp_gelu", "lora_r4")},
                **kw)
    for bp, rec in t.items():
        rows.append(Row(f"germinate/paper MLP fc1 {bp} (+ Adam state)", rec.median_us, None, None, None,
                        None, len(rec.block_medians), "<= 250 us", rec.median_us <= 250))
    log("germinate")

    # 4. sixteen hosts of one structure
    cases = [
        ("impaired 40-16-10, no seeds", IMPAIRED, False),
        ("impaired 40-16-10 + conv1d_k5@input BLENDING", IMPAIRED, True),
        ("paper 40-100-100-10, no seeds", PAPER, False),
    ]
    for label, widths, seeded in cases:
        host = ef.hosts.mlp(widths)
        XS, YS = data(gen, 8, N_HOSTS)  # a pool of 8 batches of [16, 128, 40]
        states = [(blending_conv_state if seeded else new_state)(host, j) for j in range(N_HOSTS)]
        stacked_step, _ = functional_stepper(ef.stack(states), Cycle(XS, YS))
        singles = [functional_stepper(s, Cycle(XS[:, j], YS[:, j]))[0] for j, s in enumerate(states)]
        mods = [(ConvSeededMLP(widths, s) if seeded else mlp_module(widths, s)) for s in states]
        msteps = [module_stepper(m, Cycle(XS[:, j], YS[:, j])) for j, m in enumerate(mods)]

        def module_loop(msteps=msteps):
            for st in msteps:
                st()

        def functional_loop(singles=singles):
            for st in singles:
                st()

        t = measure({"stacked": stacked_step, "module_loop": module_loop, "fn_loop": functional_loop}, **kw)
        compare(f"N16/{label}: stacked train_step vs 16 modules", t["stacked"], t["module_loop"],
                "<= 0.50 (>= 2x faster)", 0.50)
        compare(f"N16/{label}: loop of 16 train_steps vs 16 modules", t["fn_loop"], t["module_loop"])
        log(f"N16 {label}")
    return rows


# --- report --------------------------------------------------------------------------------------


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"machine: nproc {os.cpu_count()}, {cpu}; python {platform.python_version()}; torch {torch.__version__}; "
            f"torch threads {torch.get_num_threads()}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")


def source_digest() -> str:
    """Short hash of the esper_fn sources, to tie a table to the code it measured."""
    import hashlib
    from pathlib import Path

    root = Path(ef.__file__).parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "?"


def table(rows: list[Row]) -> str:
    head = ["benchmark", "esper_fn median (µs)", "baseline median (µs)", "ratio", "ratio IQR", "p10 ratio", "blocks",
            "target", "pass/fail"]
    body = []
    for r in rows:
        body.append([
            r.name,
            f"{r.ours_us:,.1f}",
            "—" if r.base_us is None else f"{r.base_us:,.1f}",
            "—" if r.ratio is None else f"{r.ratio:.3f}",
            "—" if r.spread is None else f"{r.spread[0]:.3f}–{r.spread[1]:.3f}",
            "—" if r.ratio_p10 is None else f"{r.ratio_p10:.3f}",
            str(r.blocks),
            r.target,
            "info" if r.ok is None else ("PASS" if r.ok else "FAIL"),
        ])
    w = [max(len(str(c)) for c in col) for col in zip(head, *body)]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(n) if i == 0 else str(c).rjust(n)
                                 for i, (c, n) in enumerate(zip(cells, w))) + " |"

    sep = "|" + "|".join(("-" * (n + 2)) if i == 0 else ("-" * (n + 1) + ":") for i, n in enumerate(w)) + "|"
    return "\n".join([line(head), sep, *(line(b) for b in body)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description="esper_fn core benchmarks against plain PyTorch (see the module docstring).")
    p.add_argument("--repeats", type=int, default=None,
                   help="alternating timed blocks per comparison (default 300; 40 with --quick); each comparison "
                        "also stops after its time budget (20 s; 2.5 s with --quick)")
    p.add_argument("--quick", action="store_true", help="short run (< 60 s), for smoke tests")
    p.add_argument("--block-ms", type=float, default=None,
                   help="target duration of one timed block per variant (default 10 ms; 5 ms with --quick)")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (40 if args.quick else 300)
    args.block_s = (args.block_ms or (5.0 if args.quick else 10.0)) / 1e3
    args.warmup_s = 0.1 if args.quick else 0.5
    args.budget_s = 2.5 if args.quick else 20.0
    if args.repeats < 2:
        p.error("--repeats must be >= 2")

    torch.set_num_threads(1)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    load0 = loadavg()
    rows = run(args)
    checks = check_equivalence()
    print("esper_fn core benchmarks" + (" (--quick)" if args.quick else ""))
    print(machine())
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    print(f"esper_fn {ef.__version__}, sources sha256 {source_digest()}; run at {stamp}")
    print(f"load average (1, 5, 15 min): {load0} at start, {loadavg()} at end")
    print(f"method: up to {args.repeats} alternating blocks of ~{args.block_s * 1e3:.0f} ms per variant (budget "
          f"{args.budget_s:g} s per comparison); medians over all timed calls; ratio = median over blocks of "
          f"(esper_fn block median / baseline block median), lower is better; p10 ratio = ratio of 10th "
          f"percentiles (less sensitive to preemption by other processes); pass/fail uses the median ratio; "
          f"batch {B}, Adam lr 1e-2")
    print()
    print(table(rows))
    print()
    print("equivalence checks:")
    for c in checks:
        print("  " + c)
    n_fail = sum(r.ok is False for r in rows)
    print()
    print(f"{sum(r.ok is True for r in rows)} pass, {n_fail} fail, {sum(r.ok is None for r in rows)} info; "
          f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
