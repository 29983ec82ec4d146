"""The `esper-fn` command: grow, sculpt, report, blueprints, library, train-tamiyo, eval.

Importing this module imports no torch (`esper_fn/__init__` loads its names lazily), so ``--help``
and argument errors answer at once; each subcommand imports what it needs when it runs.

Errors are one line on stderr, never a traceback. Exit codes: 0 success; 2 a usage or
configuration error (bad flags or config values, an unknown host or task, a run directory that
would mix two runs: `USAGE_ERRORS`, and argparse's own errors); 1 a runtime failure (a corrupt
checkpoint, an unwritable directory, any other `EsperError` or file-system error).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ._errors import (BlueprintError, ConfigError, EsperError, HostError, LibraryNotFoundError, RunDirError,
                      SculptError, SeedNotFoundError, TaskError)

__all__ = ["USAGE_ERRORS", "main"]

USAGE_ERRORS: tuple[type[EsperError], ...] = (ConfigError, HostError, TaskError, BlueprintError, RunDirError,
                                               LibraryNotFoundError, SeedNotFoundError, SculptError)
"""Errors in what the user asked for (exit code 2, like an argparse usage error: a bad value, an
unknown name, a path that is not what the command needs); every other error is a runtime failure
(exit code 1)."""


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
    from pathlib import Path

    from .run import RUN_FILES, grow, load_config, read_run_config

    flags = dict(task=args.task, host=args.host, controller=args.controller, epochs=args.epochs, seed=args.seed,
                 lr=args.lr, param_budget=args.param_budget, param_budget_ratio=args.param_budget_ratio,
                 library=args.library, device=args.device, sculpt=args.sculpt, sculpt_epochs=args.sculpt_epochs)
    base = None
    if args.resume:  # the run's own config.yaml is the base: a bare --resume continues it as it was
        if args.out is None:
            raise ConfigError("--resume needs --out, the directory of the run to continue.")
        on_disk = read_run_config(args.out) if Path(args.out).is_dir() else None
        if on_disk is None and args.config is None and any((Path(args.out) / f).exists() for f in RUN_FILES):
            # without it a bare --resume would continue with the default config
            raise ConfigError(f"--resume: {args.out} holds a run but no config.yaml, so its config is unknown; put the "
                              "file back, or give the run's config with --config (every checkpoint's manifest.json "
                              "holds it under metadata.run.config).")
        base = on_disk.model_dump() if on_disk is not None else None
    config = load_config(args.config, base=base, **flags)
    label = config.controller.partition(":")[0]  # tamiyo:PATH -> tamiyo
    out = args.out or f"runs/{config.host}-{label}-s{config.seed}"
    controller = _learned_controller(config)
    sculpting = f", then sculpt to {config.sculpt:g} and {config.sculpt_epochs} fine-tune epochs" if config.sculpt else ""
    print(f"esper-fn grow: {config.task} / {config.host} / {config.controller}, {config.epochs} epochs{sculpting}, "
          f"seed {config.seed} -> {out}")
    s = grow(config, out, controller=controller, resume=args.resume, overwrite=args.overwrite,
             progress=not args.no_progress)
    if s.moved_aside:
        print(f"moved the run that was in {out} to {s.moved_aside}")
    _print_summary(s, config, out)
    return 0


def _learned_controller(config):
    """The controller a config names when it is a learned one (built from the RL packages: this is
    the composition root), else None (`esper_fn.run` builds the core ones)."""
    if config.controller.partition(":")[0] != "tamiyo":
        return None
    envs = importlib.import_module("esper_fn.envs")
    return envs.tamiyo_controller(config.controller, governor=config.governor)


def _print_summary(s, config, out) -> None:
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
    if config.library is not None:
        from .urza import Library

        stored = Library(config.library).records(run_id=s.run_id)
        rows.append(["seeds stored in the library", f"{len(stored)} in {config.library}"
                     + (f" ({', '.join(r.id for r in stored)})" if stored else "")])
    if s.sculpt is not None:
        r = s.sculpt.report
        units = ", ".join(f"{t.slot} ({t.kind} {t.name}) {'/'.join(map(str, t.units_before))} -> "
                          f"{'/'.join(map(str, t.units_after))}" for t in r.targets if t.units_after != t.units_before)
        rows += [
            [f"sculpt (epoch {s.sculpt.epoch}, keep {r.keep:g})", f"parameters {r.params_before} -> {r.params_after} "
             f"({100 * (1 - r.params_after / r.params_before):.1f}% removed); units {units or 'none removed'}"],
            ["  validation accuracy", f"{r.accuracy_before:.4f} -> {r.accuracy_after:.4f} sculpted, before fine-tuning "
             f"(max |delta logits| {r.max_abs_dlogits:.3f})"],
            ["  test accuracy", f"{s.sculpt.test_accuracy_before:.4f} grown -> {s.test_accuracy:.4f} sculpted and "
             f"fine-tuned {s.sculpt.fine_tune_epochs} epochs ({100 * (s.test_accuracy - s.sculpt.test_accuracy_before):+.1f}"
             " points)"],
        ]
    print(_table(rows, ["summary", ""]))
    print(f"run directory: {out}  (plot it: esper-fn report {out})")


def _sculpt(args) -> int:
    from .run import read_run_config, sculpt_run

    from pathlib import Path

    config = read_run_config(args.run_dir) if Path(args.run_dir).is_dir() else None
    controller = _learned_controller(config) if config is not None else None
    print(f"esper-fn sculpt: {args.run_dir}, keep {args.keep:g} of the parameters, {args.fine_tune_epochs} fine-tune "
          "epochs")
    s = sculpt_run(args.run_dir, keep=args.keep, fine_tune_epochs=args.fine_tune_epochs, controller=controller,
                   progress=not args.no_progress)
    _print_summary(s, read_run_config(args.run_dir), args.run_dir)
    return 0


def _report(args) -> int:
    from pathlib import Path

    from .report import plot_run, read_metrics

    metrics = Path(args.run_dir) / "metrics.jsonl"
    if metrics.is_file():
        _, note = read_metrics(metrics)
        if note:
            print(f"esper-fn report: {note}", file=sys.stderr)
    path = plot_run(args.run_dir, args.out)
    print(f"wrote {path}")
    return 0


def _blueprints(args) -> int:
    if args.measure:
        return _blueprints_measure(args)
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


def _blueprints_measure(args) -> int:
    from . import tezzeret

    hosts = args.host or list(tezzeret.DEFAULT_HOSTS)
    print(f"measuring every blueprint at every slot of {', '.join(hosts)} (batch {args.batch_size}, median of "
          f"{args.repeats}; cached in {tezzeret.cache_path(args.cache_dir)})", file=sys.stderr)
    table = tezzeret.characterise_catalogue(hosts, batch_size=args.batch_size, repeats=args.repeats,
                                            refresh=args.refresh, cache_dir=args.cache_dir)
    rows = [[c.blueprint, f"{c.host}:{c.slot} {list(c.slot_shape)}", str(c.param_delta), str(c.flop_delta),
             str(c.flops_declared), f"{c.forward_ms:.3f}", f"{c.expected_latency_ms:.3f}", "yes" if c.cached else "no"]
            for c in table]
    print(_table(rows, ["blueprint", "slot", "param_delta", "flop_delta", "declared_macs", "forward_ms",
                        "expected_latency_ms", "cached"]))
    print(f"param_delta: trainable parameters the seed adds; flop_delta: FLOPs per sample of its forward, counted by "
          f"torch.utils.flop_counter (matmuls and convolutions; elementwise work is not counted); declared_macs: the "
          f"design's own multiply-add estimate; forward_ms / expected_latency_ms: medians of its forward and its "
          f"train step (forward, backward, Adam) alone on a batch of {args.batch_size} at the slot, on this machine "
          f"with {table[0].threads if table else '?'} thread(s).")
    return 0


def _library(args) -> int:
    import json

    from .urza import Library

    lib = Library(args.path, create=False)
    if args.library_cmd == "list":
        recs = lib.records(blueprint=args.blueprint, task=args.task, host=args.host_name, run_id=args.run_id)
        if args.json:
            print(json.dumps([r.model_dump() for r in recs], indent=2))
            return 0
        rows = [[r.id, r.blueprint, f"{r.host}:{r.slot} {r.slot_shape}", r.task or "-", r.fate,
                 "-" if r.contribution is None else f"{r.contribution:+.4f}", "-" if r.epochs is None else str(r.epochs),
                 str(r.n_params), r.run_id or "-"] for r in recs]
        print(_table(rows, ["id", "blueprint", "slot", "task", "fate", "contribution", "epochs", "params", "run"]))
        print(f"{len(recs)} seed(s) in {lib.path}")
        return 0
    if args.library_cmd == "blueprints":
        recs = lib.blueprint_records()
        if args.json:
            print(json.dumps([r.model_dump() for r in recs], indent=2))
            return 0
        rows = [[r.id, r.placement or "-", ", ".join(f"{k} {v:.4g}" for k, v in r.score.items()) or "-",
                 r.source or "-"] for r in recs]
        print(_table(rows, ["generated blueprint", "placement", "score", "source"]))
        outcomes = len(lib.outcomes())
        print(f"{len(recs)} generated blueprint(s) and {outcomes} recorded outcome(s) in {lib.path}; grow them with "
              f"esper-fn grow --library {lib.path} --controller recipe:<placement>-<id>-0")
        return 0
    if args.library_cmd == "show":
        rec = lib.get(args.id)
        if args.verify:
            lib.load(rec.id)  # raises LibraryError naming what is wrong
        print(json.dumps(rec.model_dump(), indent=2))
        if args.verify:
            print(f"artifact verified: {lib.artifact_path(rec.sha256)}")
        return 0
    if args.library_cmd == "verify":
        problems = lib.verify()
        n = len(lib)
        for pr in problems:
            print(f"BAD {pr.id or '(no entry)'}: {pr.reason}")
        bad = sum(pr.id is not None for pr in problems)
        print(f"{n} entr{'y' if n == 1 else 'ies'} checked in {lib.path}: {n - bad} ok, {bad} bad, "
              f"{len(problems) - bad} stray file(s)")
        return 1 if problems else 0
    report = lib.gc(drop_bad=args.drop_bad, dry_run=args.dry_run)
    verb = "would remove" if report.dry_run else "removed"
    print(f"{verb} {len(report.orphans)} unreferenced artifact(s), {len(report.leftovers)} leftover temporary "
          f"file(s), {len(report.dropped)} bad entr{'y' if len(report.dropped) == 1 else 'ies'}"
          f"{' (' + ', '.join(report.dropped) + ')' if report.dropped else ''}; {report.freed_bytes} bytes")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``esper-fn grow: error: argument --epochs: invalid int value:
    'ten' (see esper-fn grow --help)``, exit code 2 (subcommand parsers inherit it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see `{self.prog} --help`)\n")


def main(argv: list[str] | None = None) -> int:
    import os

    # TorchRL logs INFO lines (with colour codes) to stdout, e.g. when a replay buffer allocates its
    # storage; the command's own output is the progress bar and the summary. RL_LOGGING_LEVEL=INFO
    # brings them back (TorchRL reads it when it is first imported).
    os.environ.setdefault("RL_LOGGING_LEVEL", "WARNING")
    p = _Parser(prog="esper-fn", description="Morphogenetic training: grow networks while they train.")
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("grow", help="train a host, letting a controller grow seeds")
    g.add_argument("--config", help="YAML run config (flags override it)")
    g.add_argument("--task", help="mnist1d (default), mnist1d-seq, digits, spirals, moons, gunpoint, italypower, "
                                  "basicmotions, mnist5k, mnist5k-img; aeon:<NAME> (a data set bundled in aeon) or csv:<path>")
    g.add_argument("--host", help="a host preset, built for the task's input shape and classes: mlp-impaired "
                                  "(default), mlp-impaired-deep, mlp-paper, cnn-impaired, cnn-paper, transformer-small, "
                                  "or a width family: mlp-w<W>, cnn1d-w<W>, cnn1d-shallow-w<W>, cnn2d-w<W> (any W >= 1)")
    g.add_argument("--controller", metavar="CONTROLLER",
                   help="static, schedule, heuristic (default), recipe:<position>-<kind or blueprint id>-<at %%> "
                        "(e.g. recipe:input-karn_conv1d_k7_d2_c4@1.0.0-0), tamiyo (the shipped learned policy) or "
                        "tamiyo:PATH (weights from `esper-fn train-tamiyo`)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--seed", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--param-budget", type=int, help="most parameters the grown network may have")
    g.add_argument("--param-budget-ratio", type=float,
                   help="without --param-budget: at most RATIO x the host's parameters (default 1.3)")
    g.add_argument("--out", help="run directory (default runs/HOST-CONTROLLER-sSEED)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint (its config.yaml is the config)")
    g.add_argument("--overwrite", action="store_true",
                   help="if --out holds a run, move it aside to OUT.old-N and start afresh")
    g.add_argument("--library", metavar="PATH", help="store every seed the run fossilizes in this seed library "
                                                     "(created if missing; see `esper-fn library`), and offer the "
                                                     "generated blueprints it keeps (`esper-fn karn`)")
    g.add_argument("--device", help="where the task and the network live: cpu (default), cuda, cuda:<index>")
    g.add_argument("--sculpt", type=float, metavar="KEEP",
                   help="end the run with Emrakul: remove the hidden units (of fossilized seeds and host layers) that "
                        "contribute least, down to KEEP x the parameters (e.g. 0.8), then fine-tune")
    g.add_argument("--sculpt-epochs", type=int, metavar="K", help="fine-tune epochs after --sculpt (default 10)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.set_defaults(fn=_grow)
    sc = sub.add_parser("sculpt", help="sculpt a finished run (Emrakul): remove the hidden units that contribute "
                                       "least, fine-tune, and record it in the run directory")
    sc.add_argument("run_dir", help="the directory of a finished `esper-fn grow`")
    sc.add_argument("--keep", type=float, required=True,
                    help="the fraction of the network's parameters to keep, in (0, 1] (e.g. 0.8)")
    sc.add_argument("--fine-tune-epochs", type=int, default=10, metavar="K",
                    help="epochs to train after the sculpt (default 10)")
    sc.add_argument("--no-progress", action="store_true", help="no progress bar")
    sc.set_defaults(fn=_sculpt)
    r = sub.add_parser("report", help="plot a run directory to a PNG")
    r.add_argument("run_dir")
    r.add_argument("--out", help="PNG path (default RUN_DIR/report.png)")
    r.set_defaults(fn=_report)
    b = sub.add_parser("blueprints", help="list the blueprint catalogue")
    b.add_argument("--measure", action="store_true",
                   help="measure every blueprint at every slot of the hosts: parameters, FLOPs, forward and train "
                        "step latency (cached per machine and torch version)")
    b.add_argument("--host", action="append", help="a host preset to measure at (repeatable; default mlp-impaired "
                                                   "and cnn-impaired)")
    b.add_argument("--batch-size", type=int, default=100, help="batch for the latency measurements (default 100)")
    b.add_argument("--repeats", type=int, default=30, help="timed repeats per measurement (default 30)")
    b.add_argument("--refresh", action="store_true", help="measure again, ignoring the cache")
    b.add_argument("--cache-dir", help="where to cache measurements (default $ESPER_FN_CACHE or ~/.cache/esper_fn)")
    b.set_defaults(fn=_blueprints)
    lib = sub.add_parser("library", help="inspect and maintain a library of trained seeds (Urza)")
    lsub = lib.add_subparsers(dest="library_cmd", required=True)
    ll = lsub.add_parser("list", help="the stored seeds, oldest first")
    ll.add_argument("path", help="the library directory")
    ll.add_argument("--blueprint", help="only this blueprint (a bare name matches every version)")
    ll.add_argument("--task")
    ll.add_argument("--host", dest="host_name")
    ll.add_argument("--run-id")
    ll.add_argument("--json", action="store_true", help="print the records as JSON")
    lb = lsub.add_parser("blueprints", help="the generated blueprints it keeps (esper-fn karn's winners)")
    lb.add_argument("path", help="the library directory")
    lb.add_argument("--json", action="store_true", help="print the records as JSON")
    ls = lsub.add_parser("show", help="one stored seed's record")
    ls.add_argument("path", help="the library directory")
    ls.add_argument("id", help="the seed's id (a unique prefix is enough)")
    ls.add_argument("--verify", action="store_true", help="also load and verify its artifact")
    lv = lsub.add_parser("verify", help="check every artifact (SHA-256, size, tensors); exit 1 if any is bad")
    lv.add_argument("path", help="the library directory")
    lg = lsub.add_parser("gc", help="remove unreferenced artifacts and leftovers of unfinished writes")
    lg.add_argument("path", help="the library directory")
    lg.add_argument("--drop-bad", action="store_true", help="also drop entries whose artifact is missing or corrupt")
    lg.add_argument("--dry-run", action="store_true", help="report only")
    lib.set_defaults(fn=_library)
    from .policies.cli import add_parsers  # train-tamiyo, eval (docs/tamiyo.md); no torch until one runs

    add_parsers(sub, lambda: importlib.import_module("esper_fn.envs"))
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except EsperError as e:
        print(f"esper-fn {args.cmd}: error: {_one_line(e)}", file=sys.stderr)
        return 2 if isinstance(e, USAGE_ERRORS) else 1
    except OSError as e:  # the file system refused: a runtime failure, reported in one line
        where = f": {e.filename}" if e.filename else ""
        print(f"esper-fn {args.cmd}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


if __name__ == "__main__":
    sys.exit(main())
