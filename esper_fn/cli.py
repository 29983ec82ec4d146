"""The `esper-fn` command: grow, report, blueprints.

Importing this module imports no torch (`esper_fn/__init__` loads its names lazily), so ``--help``
and argument errors answer at once; each subcommand imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import sys

from ._errors import EsperError

__all__ = ["main"]


def _table(rows: list[list[str]], header: list[str], wrap: int = 72) -> str:
    """A plain-text table; the last column wraps at `wrap` characters (continuation lines indented)."""
    import textwrap

    wrapped = []
    for r in rows:
        parts = textwrap.wrap(str(r[-1]), wrap) or [""]
        wrapped.append(list(r[:-1]) + [parts[0]])
        wrapped.extend([[""] * (len(r) - 1) + ["  " + p] for p in parts[1:]])
    widths = [max(len(str(r[i])) for r in wrapped + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in wrapped])


def _grow(args) -> int:
    from .run import grow, load_config

    config = load_config(args.config, task=args.task, host=args.host, controller=args.controller, epochs=args.epochs,
                         seed=args.seed, lr=args.lr, param_budget=args.param_budget,
                         param_budget_ratio=args.param_budget_ratio)
    out = args.out or f"runs/{config.host}-{config.controller}-s{config.seed}"
    print(f"esper-fn grow: {config.task} / {config.host} / {config.controller}, {config.epochs} epochs, "
          f"seed {config.seed} -> {out}")
    s = grow(config, out, resume=args.resume, progress=not args.no_progress)
    rows = [
        ["test accuracy", f"{s.test_accuracy:.4f}"],
        ["best validation accuracy", f"{s.best_val_accuracy:.4f}"],
        ["parameters", f"{s.params_before} -> {s.params_after}"],
        ["seeds germinated / fossilized / pruned", f"{s.germinated} / {s.fossilized} / {s.pruned}"],
        ["rollbacks", str(s.rollbacks)],
        ["wall time", f"{s.wall_seconds:.1f} s (train {s.train_seconds:.1f} s, telemetry {s.telemetry_seconds:.1f} s)"],
    ]
    if s.stopped:
        rows.append(["stopped early", s.stopped])
    if s.growth_blocked:
        rows.append([f"growth blocked (epoch {s.growth_blocked_epoch})", s.growth_blocked])
    if s.stuck_at_chance_epoch is not None:
        rows.append(["STUCK AT CHANCE" if s.stuck_at_chance else "stuck at chance until later",
                     f"no validation accuracy above chance by epoch {s.stuck_at_chance_epoch}"
                     + ("; the run never learned" if s.stuck_at_chance else "")])
    print(_table(rows, ["summary", ""]))
    print(f"run directory: {out}  (plot it: esper-fn report {out})")
    return 0


def _report(args) -> int:
    from .report import plot_run

    path = plot_run(args.run_dir, args.out)
    print(f"wrote {path}")
    return 0


def _blueprints(args) -> int:
    from . import blueprints

    caps = blueprints.available_capabilities()
    rows = []
    for bid, bp in blueprints.registry().items():
        m = bp.meta
        need = ",".join(m.requires_capability) or "-"
        if m.requires_capability and not set(m.requires_capability) <= caps:
            need += f" (absent; fallback {m.fallback})" if m.fallback else " (absent; masked)"
        rows.append([bid, ",".join(m.slot_kinds), "yes" if m.mergeable else "no", f"{m.risk_score:.2f}", need,
                     m.description])
    print(_table(rows, ["blueprint", "slots", "mergeable", "risk", "requires", "description"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="esper-fn", description="Morphogenetic training: grow networks while they train.")
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("grow", help="train a host, letting a controller grow seeds")
    g.add_argument("--config", help="YAML run config (flags override it)")
    g.add_argument("--task", help="mnist1d (default), mnist1d-seq, digits or spirals")
    g.add_argument("--host", help="a host preset, built for the task's input shape and classes: mlp-impaired "
                                  "(default), mlp-impaired-deep, mlp-paper, cnn-impaired, cnn-paper, transformer-small")
    g.add_argument("--controller", choices=["static", "schedule", "heuristic"])
    g.add_argument("--epochs", type=int)
    g.add_argument("--seed", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--param-budget", type=int, help="most parameters the grown network may have")
    g.add_argument("--param-budget-ratio", type=float,
                   help="without --param-budget: at most RATIO x the host's parameters (default 1.3)")
    g.add_argument("--out", help="run directory (default runs/HOST-CONTROLLER-sSEED)")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.set_defaults(fn=_grow)
    r = sub.add_parser("report", help="plot a run directory to a PNG")
    r.add_argument("run_dir")
    r.add_argument("--out", help="PNG path (default RUN_DIR/report.png)")
    r.set_defaults(fn=_report)
    b = sub.add_parser("blueprints", help="list the blueprint catalogue")
    b.set_defaults(fn=_blueprints)
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except EsperError as e:
        print(f"esper-fn {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
