"""Plots of a run directory: accuracy and loss per epoch, each seed's lifecycle, parameter count."""

from __future__ import annotations

import json
from pathlib import Path

from ._errors import ConfigError, RunDirError
from .events import Advanced, Fossilized, Germinated, Pruned, Rollback, read_events

__all__ = ["plot_run", "read_metrics", "timeline"]

_COLORS = {"GERMINATED": "#bbbbbb", "TRAINING": "#f4a259", "BLENDING": "#5b8e7d", "HOLDING": "#4d7ea8",
           "FOSSILIZED": "#2d3047", "MERGED": "#2d3047"}


def timeline(events) -> list[tuple[str, str, int, int | None]]:
    """Seed lifecycle segments ``(slot, stage, start_epoch, end_epoch or None)`` from typed events.

    A segment ends when the slot's next lifecycle event happens: an advance, a fossilization (a
    merged seed's segment lasts one epoch), a prune, or a rollback that removed the seed (the slots
    in `Rollback.pruned`, at the rollback's epoch). ``None`` means the seed lives to the end of the run.
    """
    segs: list[list] = []
    open_: dict[str, list] = {}

    def close(slot, epoch):
        if slot in open_:
            open_.pop(slot)[3] = epoch

    for e in events:
        if isinstance(e, Germinated):
            close(e.slot, e.epoch)
            open_[e.slot] = [e.slot, "GERMINATED", e.epoch, None]
            segs.append(open_[e.slot])
        elif isinstance(e, Advanced):
            close(e.slot, e.epoch)
            open_[e.slot] = [e.slot, e.to_stage, e.epoch, None]
            segs.append(open_[e.slot])
        elif isinstance(e, Fossilized):
            close(e.slot, e.epoch)
            open_[e.slot] = [e.slot, "MERGED" if e.merged else "FOSSILIZED", e.epoch, None]
            segs.append(open_[e.slot])
            if e.merged:
                close(e.slot, e.epoch + 1)
        elif isinstance(e, Pruned):
            close(e.slot, e.epoch)
        elif isinstance(e, Rollback):
            for slot in e.pruned:
                close(slot, e.epoch)
    return [tuple(s) for s in segs]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write a PNG summarising a run (default ``RUN_DIR/report.png``) and return its path.

    Raises:
        RunDirError: the directory lacks ``metrics.jsonl`` or ``events.jsonl`` (also a
            `FileNotFoundError`).
        ConfigError: `out` names an image format matplotlib cannot write (nothing is created).
    """
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "report.png"
    mpath, epath = run_dir / "metrics.jsonl", run_dir / "events.jsonl"
    if not mpath.exists() or not epath.exists():
        missing = [p.name for p in (mpath, epath) if not p.exists()]
        raise RunDirError(f"cannot plot {run_dir}: it is not a run directory (missing {', '.join(missing)}); "
                          f"plot a directory written by `esper-fn grow --out DIR`.")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if out.suffix and out.suffix[1:].lower() not in formats:
        raise ConfigError(f"report --out {out}: matplotlib cannot write {out.suffix!r} images; use one of "
                          f"{', '.join('.' + f for f in sorted(formats))}.")

    rows, _ = read_metrics(mpath)
    ok = [r for r in rows if not r.get("rolled_back")]
    events = read_events(epath, skip_truncated_tail=True)
    ep = [r["epoch"] for r in ok]
    fig, axes = plt.subplots(4, 1, figsize=(9, 10), sharex=True,
                             gridspec_kw={"height_ratios": [3, 2, 1.5, 1.5]})
    ax = axes[0]
    ax.plot(ep, [r["train_accuracy"] for r in ok], label="train accuracy", color="#999999")
    ax.plot(ep, [r["val_accuracy"] for r in ok], label="validation accuracy", color="#4d7ea8")
    for e in events:
        if isinstance(e, Rollback):
            ax.axvline(e.epoch, color="red", ls=":", lw=1)
    ax.set_ylabel("accuracy")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    ax = axes[1]
    ax.plot(ep, [r["train_loss"] for r in ok], label="train loss", color="#999999")
    ax.plot(ep, [r["val_loss"] for r in ok], label="validation loss", color="#4d7ea8")
    ax.set_ylabel("loss")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    ax = axes[2]
    segs = timeline(events)
    slots = sorted({s[0] for s in segs})
    last = ep[-1] if ep else 1
    for s in segs:
        slot, stage, a, b = s
        y = slots.index(slot)
        ax.barh(y, (b if b is not None else last + 1) - a, left=a, color=_COLORS.get(stage, "#888888"),
                edgecolor="white", height=0.6)
    ax.set_yticks(range(len(slots)), slots)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in _COLORS.values()][:5]
    ax.legend(handles, list(_COLORS)[:5], ncol=5, fontsize=7, loc="upper left")
    ax.set_ylabel("seed lifecycle")
    ax.set_ylim(-0.7, max(len(slots), 1) - 0.3 + 0.8)
    ax = axes[3]
    ax.step(ep, [r["params"] for r in ok], where="post", color="#2d3047")
    ax.set_ylabel("parameters")
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    summary = run_dir / "summary.json"
    title = run_dir.name
    if summary.exists():
        s = json.loads(summary.read_text())
        title += f": test accuracy {s['test_accuracy']:.3f}, params {s['params_before']} -> {s['params_after']}"
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def read_metrics(path: str | Path) -> tuple[list[dict], str | None]:
    """The complete rows of a ``metrics.jsonl`` file, and a note when its last line was cut off by a
    crash (that partial row is skipped; any other malformed line is an error).

    Raises:
        RunDirError: a line other than the last is not a JSON object (naming ``file:line``).
    """
    path = Path(path)
    data = path.read_text()
    lines = data.split("\n")
    tail = lines.pop()  # "" when the file ends with a newline
    rows = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise RunDirError(f"{path}:{i}: not a metrics row ({e.msg}); the file is corrupt.") from None
    note = None
    if tail.strip():
        note = (f"{path}:{len(lines) + 1}: skipped a partial last row (cut off by a crash); plotted the "
                f"{len(rows)} complete ones.")
    return rows, note
