"""Fault sweep: kill -9, corrupted files and bad input against the real ``esper-fn`` command.

Every trial drives ``esper-fn`` in subprocesses (the installed console script), injects one fault,
and checks what the command did and what it left on disk. Three kinds of trial (``--kinds``):

kill
    ``esper-fn grow --config C --out DIR`` is killed with SIGKILL at a random time: 15% of kills
    fall uniformly in the start-up (before DIR exists), the rest uniformly over the time the
    reference run spent after creating DIR (training, checkpoint writes, retention, the summary),
    measured on this machine. With probability 1/2 the first ``--resume`` is killed as well (1/4: the
    second too). Then a bare ``esper-fn grow --resume --out DIR`` finishes the run. Checked: every
    interrupted directory is one run (below; a partial last line is allowed there), and the finished
    run equals an uninterrupted run of the same config bit for bit: summary.json (all fields but
    run_id and timings), metrics.jsonl (all keys but time/*), the final checkpoint (every tensor's
    bytes, the manifest's tensor list, the metadata but run ids, timings and event counts) and the
    event log (every event but time, run_id and checkpoint paths, once the ``resumed`` events are
    left out). A kill before the run directory holds any run file must leave a directory that a
    resume refuses in one line (exit 2, "holds no run") and a fresh start accepts.
corrupt
    A finished run (a copy of the reference) or an interrupted one (killed once its k-th checkpoint
    landed, k = 0: before the first) gets one fault: bytes flipped in, or a truncated, or a deleted
    ``tensors.safetensors``; a deleted, truncated or re-hashed manifest; two manifests swapped; a NaN
    or an infinity written into a parameter or an Adam moment (with `CheckpointManager`, so the
    manifest matches); leftovers of crashed saves; a checkpoint of another run; events.jsonl or
    metrics.jsonl truncated mid-line or deleted; events.jsonl emptied, given a garbage line or
    replaced by another run's; summary.json deleted;
    config.yaml edited (another value, a YAML syntax error, an unknown key, a comment only) or
    deleted. Then ``esper-fn report DIR`` (for faults in the logs) and a bare ``esper-fn grow
    --resume --out DIR``. Each command must succeed or fail with exit code 1 or 2 and exactly one
    stderr line starting with "esper-fn", never a traceback. A resume that succeeds must leave the
    run the reference run is (bit for bit, as above), and one that skipped the newest checkpoint must
    say so in its ``resumed`` event. A command that fails must leave the directory as it was (crash
    leftovers in checkpoints/ aside); then the fault is undone (the damaged files put back as they
    were, added ones removed) and a resume must finish the run, equal to the reference.
input
    One bad command per trial, drawn from: bad flag values (wrong types, out of range, NaN and
    infinity, unknown hosts, tasks and controllers, unknown flags), config files (every top-level
    key with a value of the wrong type or out of range, unknown keys at both levels, YAML syntax
    errors, a list or a scalar instead of a mapping, non-UTF-8 bytes, a missing file, a directory),
    run directories (--out an existing file, under a file, under /proc; a second run into a
    finished run's directory; --resume into an empty or missing directory or with other flags than
    the run's) and ``esper-fn report`` (a missing or empty directory, a file, --out under /proc or
    under a file, an unknown image format). Each must exit with the documented code (2: usage or
    configuration; 1: runtime), print exactly one stderr line starting with "esper-fn" and no
    traceback, and create or change nothing (the sandbox tree is compared before and after).
    A read-only directory (mode 0o500) only stops non-root users: as root that case is skipped
    (and said so); /proc stands in for a read-only location.

The counts:

- traceback: "Traceback" on stderr, or an exit code other than 0, 1, 2 from a command not killed;
- mixed run: a directory holding data of two runs or a log that disagrees with its checkpoints
  (two run_ids among the events, checkpoints and summary; a checkpoint step beyond the config's
  epochs; config.yaml other than the checkpoints' config; an event line that does not parse; a
  repeated epoch in the events or metrics.jsonl; a checkpoint step on disk without exactly one
  checkpoint_saved event, or whose event precedes the last resumed event although the step was
  saved after it; only an interrupted run's newest step may lack its event, which the resume puts
  back), or a finished run that differs from its uninterrupted reference;
- lost run: a finished run without summary.json, or short of its epochs; a checkpoint that fails
  its hashes (other than one damaged on purpose); an interrupted run that a bare resume cannot
  finish (with the damage undone, for corrupt trials); events dropped without a resumed event
  saying so; a failed command that deleted or changed files;
- other: a wrong exit code, not exactly one stderr line, a refused command that created something,
  a resume past a damaged checkpoint that does not say so, a command that hung.

Trial ``i`` of ``--seed S`` draws everything (config, fault, kill time, values) from
``random.Random(f"{S}:{i}")`` and its kind is ``kinds[i % len(kinds)]``; ``--only i`` reruns it
(a kill lands at the same fraction of the reference run's duration, measured again; what the process
had done by then depends on the load). A command killed by a signal the sweep did not send (another
process on the machine) counts as one more kill in a kill trial, as an "other" failure elsewhere.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fault_sweep.py --trials 90 --seed 0

prints a table per fault and the last line ``N trials: 0 tracebacks, 0 mixed runs, 0 lost runs``
(", K other failures" is added when there are any); exit code 1 when anything failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

KINDS = ("kill", "corrupt", "input")
CATEGORIES = ("traceback", "mixed", "lost", "other")
RUN_FILES = ("config.yaml", "checkpoints", "events.jsonl", "metrics.jsonl", "summary.json")
VOLATILE_SUMMARY = {"run_id", "wall_seconds", "train_seconds", "telemetry_seconds"}
VOLATILE_META = {"run_id", "timing", "n_events"}
SHORT = {"tempo": 1, "incubate_epochs": 1, "hold_epochs": 1}
COMMON = {"task": "mnist1d", "host": "mlp-impaired"}
# Small runs (mnist1d, mlp-impaired, 4-8 epochs) with frequent checkpoints, so kills often land in saves.
POOL: dict[str, dict] = {
    "static-e4-c1": {**COMMON, "controller": "static", "epochs": 4, "checkpoint_every": 1, "seed": 0},
    "heuristic-e6-c2": {**COMMON, "controller": "heuristic", "epochs": 6, "checkpoint_every": 2, "seed": 1},
    "schedule-e6-c1": {**COMMON, "controller": "schedule", "schedule_every": 2, "epochs": 6, "checkpoint_every": 1,
                       "max_to_keep": 2, "seed": 0, "plateau": SHORT},
    "schedule-e8-c3": {**COMMON, "controller": "schedule", "schedule_every": 2, "epochs": 8, "checkpoint_every": 3,
                       "seed": 2, "plateau": SHORT},
    "heuristic-e5-c1": {**COMMON, "controller": "heuristic", "epochs": 5, "checkpoint_every": 1, "max_to_keep": 2,
                        "seed": 3, "param_budget": 1100},
}
FAST_CONFIG = "static-e4-c1"  # the quickest of the pool


def esper_cmd() -> list[str]:
    """The installed console script beside this interpreter, else ``python -m esper_fn.cli``."""
    script = Path(sys.executable).parent / "esper-fn"
    return [str(script)] if script.exists() else [sys.executable, "-m", "esper_fn.cli"]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


# ------------------------------------------------------------------------------------ results


@dataclass
class Problem:
    category: str  # one of CATEGORIES
    message: str


@dataclass
class Trial:
    index: int
    kind: str
    turn: int = 0  # how many trials of this kind came before it in the sweep
    fault: str = ""
    detail: str = ""
    outcome: str = ""  # every command's result, in order
    result: str = ""  # what the table counts: how the trial ended
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, category: str, message: str) -> None:
        assert category in CATEGORIES, category
        self.problems.append(Problem(category, message))


@dataclass
class Proc:
    argv: list[str]
    rc: int | None  # None: killed by the harness (or timed out)
    stdout: str
    stderr: str
    wall: float
    killed: bool = False
    timed_out: bool = False
    t_dir: float | None = None  # seconds from spawn until the run directory appeared (if watched)
    external_signal: int | None = None  # killed by this signal, which the sweep did not send


def run(argv: list[str], *, cwd: Path | None = None, timeout: float = 300.0, kill_after: float | None = None,
        watch: Path | None = None, kill_after_dir: float | None = None) -> Proc:
    """Run ``esper-fn ARGV``; SIGKILL it `kill_after` seconds after the start, or `kill_after_dir`
    seconds after `watch` appears. A command that outlives `timeout` is killed and marked."""
    full = esper_cmd() + argv
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(full, cwd=cwd, env=ENV, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        t_dir = None
        deadline = t0 + kill_after if kill_after is not None else None
        killed = timed_out = False
        while p.poll() is None:
            now = time.perf_counter()
            if watch is not None and t_dir is None and watch.exists():
                t_dir = now - t0
                if kill_after_dir is not None:
                    deadline = now + kill_after_dir
            if deadline is not None and now >= deadline:
                p.send_signal(signal.SIGKILL)
                killed = True
                break
            if now - t0 > timeout:
                p.send_signal(signal.SIGKILL)
                timed_out = True
                break
            time.sleep(0.002)
        rc = p.wait()
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        ours = (killed or timed_out) and rc == -signal.SIGKILL
        external = -rc if rc < 0 and not ours else None  # a signal the sweep did not send (another process's)
        return Proc(full, None if ours or external else rc, out.read(), err.read(), wall,
                    killed=(killed and ours) or external is not None, timed_out=timed_out, t_dir=t_dir,
                    external_signal=external)


def shell(argv: list[str]) -> str:
    return " ".join(a if a and all(c.isalnum() or c in "-_./:=" for c in a) else repr(a) for a in argv)


def check_output(t: Trial, p: Proc, expect: set[int], what: str) -> bool:
    """The rules for one finished command: no traceback, an expected exit code, one stderr line on
    failure. Returns True when the command succeeded (exit 0)."""
    cmd = shell(["esper-fn", *p.argv[len(esper_cmd()):]])
    if p.external_signal is not None:
        t.add("other", f"{what}: `{cmd}` was killed by signal {p.external_signal}, which the sweep did not send")
        return False
    if p.timed_out:
        t.add("other", f"{what}: `{cmd}` hung (killed after its timeout)")
        return False
    if "Traceback" in p.stderr or p.rc not in (0, 1, 2):
        tail = p.stderr.strip().splitlines()[-1:] or [""]
        t.add("traceback", f"{what}: `{cmd}` exit {p.rc}: {tail[0][:300]}")
        return False
    if p.rc != 0:
        lines = p.stderr.strip().splitlines()
        if len(lines) != 1 or not lines[0].startswith("esper-fn"):
            t.add("other", f"{what}: `{cmd}` exit {p.rc} printed {len(lines)} stderr line(s), not one starting with "
                           f"'esper-fn': {p.stderr.strip()[:300]!r}")
    if p.rc not in expect:
        t.add("other", f"{what}: `{cmd}` exit {p.rc}, expected {sorted(expect)}: {p.stderr.strip()[:300]!r}")
    return p.rc == 0


# ------------------------------------------------------------------------------------ run directories


def read_jsonl(path: Path, *, allow_tail: bool) -> tuple[list[dict], str | None]:
    """The rows of a JSON-lines file and a problem (or None): a malformed line, or a partial last
    line where none is allowed."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()
    rows = []
    for i, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return rows, f"{path.name}:{i} does not parse: {line[:80]!r}"
    if tail and not allow_tail:
        return rows, f"{path.name} ends in a partial line: {tail[:80]!r}"
    return rows, None


def checkpoint_steps(run_dir: Path) -> list[int]:
    d = run_dir / "checkpoints"
    if not d.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in d.iterdir()
                  if p.name.startswith("step_") and p.name[5:].isdigit() and (p / "manifest.json").is_file())


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def verify_checkpoint(d: Path) -> tuple[dict | None, str | None]:
    """(manifest, None) when every file the manifest lists has its size and SHA-256; else
    (None, problem). Independent of esper_fn's own reader, and read-only."""
    try:
        manifest = json.loads((d / "manifest.json").read_text())
        for name, entry in manifest["files"].items():
            data = (d / name).read_bytes()
            if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
                return None, f"{d.name}/{name} does not match its manifest"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # what a damaged file raises
        return None, f"{d.name}: {type(e).__name__}: {e}"
    return manifest, None


def tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def snapshot(root: Path) -> dict[str, str]:
    """rel path -> sha256 of the file, or "dir"."""
    out = {}
    if not root.exists():
        return out
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def diff_snapshots(a: dict[str, str], b: dict[str, str], *, ignore_leftovers: bool = False) -> list[str]:
    def keep(rel: str) -> bool:  # crash leftovers that a checkpoint manager removes when it opens
        return not (ignore_leftovers and any(part.startswith((".tmp-", ".old-")) for part in Path(rel).parts))

    out = [f"removed {k}" for k in a if k not in b and keep(k)]
    out += [f"created {k}" for k in b if k not in a and keep(k)]
    out += [f"changed {k}" for k in a if k in b and a[k] != b[k] and keep(k)]
    return out


def partial_match(want: dict, have: dict) -> list[str]:
    """Keys of `want` (nested) whose values `have` does not hold."""
    out = []
    for k, v in want.items():
        if isinstance(v, dict) and isinstance(have.get(k), dict):
            out += [f"{k}.{x}" for x in partial_match(v, have[k])]
        elif have.get(k) != v:
            out.append(f"{k}: {have.get(k)!r} (expected {v!r})")
    return out


def check_run(t: Trial, run_dir: Path, cfg: dict, *, finished: bool, exempt: dict[int, str] | None = None,
              what: str = "") -> list[dict]:
    """The one-run invariants of a run directory (see the module docstring); returns its events.

    `finished`: the run completed (summary, no partial lines, every checkpoint event present).
    `exempt`: step -> tree hash of checkpoints damaged on purpose (skipped while unchanged)."""
    where = f"{what}{': ' if what else ''}{run_dir.name}"
    exempt = exempt or {}
    present = [f for f in RUN_FILES if (run_dir / f).exists()]
    if not present:
        if finished:
            t.add("lost", f"{where}: the run directory holds no run")
        return []
    on_disk = None
    if (run_dir / "config.yaml").is_file():
        try:
            on_disk = yaml.safe_load((run_dir / "config.yaml").read_text())
        except yaml.YAMLError as e:
            t.add("mixed", f"{where}: config.yaml does not parse: {str(e).splitlines()[0]}")
        if isinstance(on_disk, dict) and (bad := partial_match(cfg, on_disk)):
            t.add("mixed", f"{where}: config.yaml is not the run's config: {', '.join(bad)}")
    elif finished:
        t.add("lost", f"{where}: config.yaml is missing")
    events: list[dict] = []
    if (run_dir / "events.jsonl").is_file():
        events, bad = read_jsonl(run_dir / "events.jsonl", allow_tail=not finished)
        if bad:
            t.add("mixed", f"{where}: {bad}")
        for i, e in enumerate(events):
            if not isinstance(e, dict) or "kind" not in e or "run_id" not in e:
                t.add("mixed", f"{where}: events.jsonl:{i + 1} is not an event: {str(e)[:80]}")
                events = [x for x in events if isinstance(x, dict) and "kind" in x and "run_id" in x]
                break
    elif finished:
        t.add("lost", f"{where}: events.jsonl is missing")
    run_ids = {e["run_id"] for e in events}
    if len(run_ids) > 1:
        t.add("mixed", f"{where}: events.jsonl holds {len(run_ids)} run ids: {sorted(run_ids)}")
    epochs = [e["epoch"] for e in events if e["kind"] == "epoch_metrics"]
    if len(epochs) != len(set(epochs)):
        t.add("mixed", f"{where}: events.jsonl repeats epoch_metrics of epochs "
                       f"{sorted({x for x in epochs if epochs.count(x) > 1})}")
    rows: list[dict] = []
    if (run_dir / "metrics.jsonl").is_file():
        rows, bad = read_jsonl(run_dir / "metrics.jsonl", allow_tail=not finished)
        if bad:
            t.add("mixed", f"{where}: {bad}")
        ep = [r.get("epoch") for r in rows if isinstance(r, dict)]
        if ep != list(range(1, len(ep) + 1)):
            t.add("mixed", f"{where}: metrics.jsonl epochs are {ep}, not 1..{len(ep)}")
    elif finished:
        t.add("lost", f"{where}: metrics.jsonl is missing")
    steps = checkpoint_steps(run_dir)
    n_epochs = cfg.get("epochs", 200)
    if [s for s in steps if s > n_epochs or s < 1]:
        t.add("mixed", f"{where}: checkpoint steps {steps} go beyond the config's {n_epochs} epochs")
    saved = [e for e in events if e["kind"] == "checkpoint_saved"]
    resumed = [i for i, e in enumerate(events) if e["kind"] == "resumed"]
    last_resumed = resumed[-1] if resumed else -1
    from_step = events[last_resumed]["from_step"] if resumed else 0
    # A resume that found events.jsonl cut short says which events are lost: their checkpoint events among them.
    lost_upto = max((e["from_step"] for e in events if e["kind"] == "resumed" and "are lost" in e.get("reason", "")),
                    default=-1)
    for s in steps:
        d = step_dir(run_dir, s)
        if s in exempt and tree_hash(d) == exempt[s]:
            continue  # damaged on purpose and not rewritten since
        manifest, bad = verify_checkpoint(d)
        if bad:
            t.add("lost", f"{where}: checkpoint {bad}")
            continue
        meta_run = manifest["metadata"].get("run", {})
        if run_ids and meta_run.get("run_id") not in run_ids:
            t.add("mixed", f"{where}: {d.name} belongs to run {meta_run.get('run_id')}, the events to {sorted(run_ids)}")
        if isinstance(on_disk, dict) and meta_run.get("config") != on_disk:
            t.add("mixed", f"{where}: {d.name} was saved with another config than config.yaml")
        at = [i for i, e in enumerate(events) if e["kind"] == "checkpoint_saved" and e["step"] == s]
        if len(at) > 1:
            t.add("mixed", f"{where}: {len(at)} checkpoint_saved events of step {s}")
        elif not at and (finished or s != steps[-1]) and s > lost_upto:
            t.add("mixed", f"{where}: no checkpoint_saved event of {d.name}")
        elif at and s > from_step and at[0] < last_resumed:
            t.add("mixed", f"{where}: the checkpoint_saved event of step {s} comes before the last resumed event")
    if saved and steps and max(e["step"] for e in saved) > steps[-1]:
        t.add("lost", f"{where}: events record checkpoint step {max(e['step'] for e in saved)}, the newest on disk is "
                      f"{steps[-1]}")
    if finished:
        summary = None
        try:
            summary = json.loads((run_dir / "summary.json").read_text())
        except (OSError, ValueError) as e:
            t.add("lost", f"{where}: summary.json: {type(e).__name__}: {e}")
        if summary is not None:
            if run_ids and summary.get("run_id") not in run_ids:
                t.add("mixed", f"{where}: summary.json belongs to run {summary.get('run_id')}")
            if not steps or summary.get("epochs") != steps[-1] or summary.get("epochs") != len(rows):
                t.add("mixed", f"{where}: summary says {summary.get('epochs')} epochs, the newest checkpoint is "
                               f"{steps[-1] if steps else None}, metrics.jsonl has {len(rows)} rows")
            if summary.get("stopped") is None and summary.get("epochs") != n_epochs:
                t.add("lost", f"{where}: the run ended at epoch {summary.get('epochs')} of {n_epochs}")
    return events


def norm_event(e: dict) -> str:
    e = {k: v for k, v in e.items() if k not in ("time", "run_id", "path")}
    if e.get("kind") == "epoch_metrics":
        e["metrics"] = {k: v for k, v in e["metrics"].items() if not k.startswith("time/")}
    return json.dumps(e, sort_keys=True)


def norm_row(r: dict) -> str:
    return json.dumps({k: v for k, v in r.items() if not k.startswith("time/")}, sort_keys=True)


def strip_meta(x):
    if isinstance(x, dict):
        return {k: strip_meta(v) for k, v in x.items() if k not in VOLATILE_META and not k.startswith("time/")}
    if isinstance(x, list):
        return [strip_meta(v) for v in x]
    return x


def is_subsequence(short: list, long: list) -> bool:
    it = iter(long)
    return all(x in it for x in short)


def compare_to_reference(t: Trial, run_dir: Path, ref_dir: Path, *, what: str = "") -> None:
    """Bit-for-bit equality with the uninterrupted reference run (see the module docstring)."""
    where = f"{what}{': ' if what else ''}{run_dir.name}"
    try:
        s, r = (json.loads((d / "summary.json").read_text()) for d in (run_dir, ref_dir))
    except (OSError, ValueError) as e:
        t.add("lost", f"{where}: no readable summary.json ({type(e).__name__})")
        return
    diff = sorted(k for k in set(s) | set(r) if k not in VOLATILE_SUMMARY and s.get(k) != r.get(k))
    if diff:
        t.add("mixed", f"{where}: summary differs from the uninterrupted run in {diff}: "
                       f"{[(k, s.get(k), r.get(k)) for k in diff][:3]}")
    rows, _ = read_jsonl(run_dir / "metrics.jsonl", allow_tail=True)
    ref_rows, _ = read_jsonl(ref_dir / "metrics.jsonl", allow_tail=False)
    if [norm_row(x) for x in rows] != [norm_row(x) for x in ref_rows]:
        bad = next((i for i, (a, b) in enumerate(zip(rows, ref_rows)) if norm_row(a) != norm_row(b)),
                   min(len(rows), len(ref_rows)))
        t.add("mixed", f"{where}: metrics.jsonl differs from the uninterrupted run from row {bad + 1} "
                       f"({len(rows)} vs {len(ref_rows)} rows)")
    ev, _ = read_jsonl(run_dir / "events.jsonl", allow_tail=True)
    ref_ev, _ = read_jsonl(ref_dir / "events.jsonl", allow_tail=False)
    mine = [norm_event(e) for e in ev if isinstance(e, dict) and e.get("kind") != "resumed"]
    ref = [norm_event(e) for e in ref_ev]
    if mine != ref:
        said = [e.get("reason", "") for e in ev if isinstance(e, dict) and e.get("kind") == "resumed"]
        if is_subsequence(mine, ref) and any("lost" in r for r in said):
            t.notes.append("events lost to damage in events.jsonl are said so in the resumed event")
        else:
            bad = next((i for i, (a, b) in enumerate(zip(mine, ref)) if a != b), min(len(mine), len(ref)))
            cat = "lost" if is_subsequence(mine, ref) else "mixed"
            t.add(cat, f"{where}: the event log differs from the uninterrupted run's at event {bad + 1} "
                       f"({len(mine)} vs {len(ref)} events, resumed events left out): "
                       f"{(mine[bad] if bad < len(mine) else '-')[:100]} vs {(ref[bad] if bad < len(ref) else '-')[:100]}")
    steps, ref_steps = checkpoint_steps(run_dir), checkpoint_steps(ref_dir)
    if not steps or steps[-1] != ref_steps[-1]:
        t.add("mixed", f"{where}: newest checkpoint {steps[-1:] or None}, the uninterrupted run's {ref_steps[-1]}")
        return
    a, b = step_dir(run_dir, steps[-1]), step_dir(ref_dir, ref_steps[-1])
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    if ma["tensors"] != mb["tensors"]:
        t.add("mixed", f"{where}: the final checkpoint holds other tensors than the uninterrupted run's")
    elif (a / "tensors.safetensors").read_bytes() != (b / "tensors.safetensors").read_bytes():
        import torch
        from safetensors.torch import load_file

        def raw(x: torch.Tensor) -> bytes:
            return x.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if x.numel() else b""

        ta, tb = load_file(str(a / "tensors.safetensors")), load_file(str(b / "tensors.safetensors"))
        differ = [k for k in tb if k not in ta or raw(ta[k]) != raw(tb[k])]
        t.add("mixed", f"{where}: the final checkpoint's tensors differ from the uninterrupted run's: {differ[:5]}")
    if strip_meta(ma["metadata"]) != strip_meta(mb["metadata"]):
        keys = sorted(k for k in set(ma["metadata"]) | set(mb["metadata"]) if k not in VOLATILE_META
                      and strip_meta(ma["metadata"].get(k)) != strip_meta(mb["metadata"].get(k)))
        t.add("mixed", f"{where}: the final checkpoint's metadata differs from the uninterrupted run's in {keys}")


# ------------------------------------------------------------------------------------ shared runs


class Sweep:
    """Reference runs, interrupted bases and trial directories under one output directory."""

    def __init__(self, out: Path, seed: int, kinds: list[str], configs: list[str] | None = None):
        self.out, self.seed, self.kinds = out, seed, kinds
        self.configs = sorted(configs or POOL)  # the configs trials draw from
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._refs: dict[str, dict] = {}
        self._bases: dict[str, Path] = {}

    def _key_lock(self, key: str) -> threading.Lock:
        with self._lock:
            return self._locks.setdefault(key, threading.Lock())

    def config_file(self, name: str) -> Path:
        path = self.out / "configs" / f"{name}.yaml"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(POOL[name], sort_keys=False))
        return path

    def reference(self, name: str) -> dict:
        """The uninterrupted run of config `name`: {"dir", "t_dir", "t_active", "wall"}."""
        with self._key_lock(f"ref:{name}"):
            if name in self._refs:
                return self._refs[name]
            d = self.out / "refs" / name
            if d.exists():
                shutil.rmtree(d)
            d.mkdir(parents=True)
            p = run(["grow", "--config", str(self.config_file(name)), "--out", str(d / "run"), "--no-progress"],
                    watch=d / "run", timeout=600)
            if p.rc != 0:
                raise SystemExit(f"fault_sweep: the reference run {name} failed (exit {p.rc}): {p.stderr.strip()}")
            t_dir = p.t_dir if p.t_dir is not None else p.wall / 2
            self._refs[name] = {"dir": d / "run", "t_dir": t_dir, "t_active": max(p.wall - t_dir, 0.05), "wall": p.wall}
            return self._refs[name]

    def interrupted_base(self, name: str, k: int) -> tuple[Path, bool]:
        """A run of config `name` killed as soon as its checkpoint k landed (k = 0: as soon as its
        config.yaml exists); cached. Returns (run dir, whether it really was interrupted)."""
        key = f"{name}-k{k}"
        with self._key_lock(f"base:{key}"):
            if key not in self._bases:
                d = self.out / "bases" / key
                if d.exists():
                    shutil.rmtree(d)
                d.mkdir(parents=True)
                watch = d / "run" / ("config.yaml" if k == 0 else f"checkpoints/step_{k:08d}/manifest.json")
                ref = self.reference(name)
                p = run(["grow", "--config", str(self.config_file(name)), "--out", str(d / "run"), "--no-progress"],
                        watch=watch, kill_after_dir=0.0, timeout=max(120, 6 * ref["wall"]))
                self._bases[key] = d / "run"
                (d / "killed").write_text("yes" if p.killed else "no")
            return self._bases[key], (self._bases[key].parent / "killed").read_text() == "yes"

    def trial_dir(self, t: Trial) -> Path:
        d = self.out / "trials" / f"{t.index:04d}-{t.kind}"
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        return d

    def timeout(self, name: str) -> float:
        return max(90.0, 6 * self.reference(name)["wall"])


# ------------------------------------------------------------------------------------ kill trials


def holds_run(d: Path) -> bool:
    return d.is_dir() and any((d / f).exists() for f in RUN_FILES)


def kill_trial(sw: Sweep, t: Trial, rng: random.Random) -> None:
    name = rng.choice(sw.configs)
    cfg = POOL[name]
    ref = sw.reference(name)
    d = sw.trial_dir(t)
    out = d / "run"
    n_kills = 1 + (rng.random() < 0.5) + (rng.random() < 0.25)
    startup = rng.random() < 0.15
    delays = [rng.uniform(0, ref["t_dir"]) if startup else rng.uniform(0, ref["t_active"])]
    delays += [rng.uniform(0, ref["wall"]) for _ in range(n_kills - 1)]
    t.fault = f"kill -9 x{n_kills}" + (" (start-up)" if startup else "")
    t.detail = f"{name}: kills at " + ", ".join(f"{x:.2f}s" for x in delays)
    tmo = sw.timeout(name)
    grow = ["grow", "--config", str(sw.config_file(name)), "--out", str(out), "--no-progress"]
    resume = ["grow", "--resume", "--out", str(out), "--no-progress"]
    if startup:
        p = run(grow, kill_after=delays[0], timeout=tmo)
    else:
        p = run(grow, watch=out, kill_after_dir=delays[0], timeout=tmo)
    outside = lambda p: p.external_signal is not None and t.notes.append(  # noqa: E731
        f"a command was killed by signal {p.external_signal}, which the sweep did not send: taken as one more kill")
    outside(p)
    outcomes = ["killed" if p.killed else "finished before the kill"]
    if not p.killed:
        check_output(t, p, {0}, "run")
    for i in range(1, n_kills + 2):  # one more round where an outside signal took the last kill
        check_run(t, out, cfg, finished=not p.killed, what=f"after kill {i}")
        if not holds_run(out):  # killed before the run wrote anything: a resume refuses, a new start works
            r = run(resume, timeout=tmo)
            check_output(t, r, {2}, "resume of a directory without a run")
            if r.rc == 2 and "holds no run" not in r.stderr:
                t.add("other", f"resume of an empty directory refused with {r.stderr.strip()!r}")
            p = run(grow, kill_after=delays[i] if i < n_kills else None, timeout=tmo)
            outcomes.append("refused, started again" + (" and killed" if p.killed else ""))
        else:
            p = run(resume, kill_after=delays[i] if i < n_kills else None, timeout=tmo)
            outcomes.append("resume killed" if p.killed else "resumed")
        outside(p)
        if not p.killed:
            if not check_output(t, p, {0}, "resume"):
                t.add("lost", f"the interrupted run could not be resumed: {p.stderr.strip()[:300]}")
                t.outcome, t.result = " > ".join(outcomes), "resume failed"
                return
            break
    else:
        t.add("other", "every resume was killed from outside the sweep")
        t.outcome = t.result = " > ".join(outcomes)
        return
    t.outcome = " > ".join(outcomes)
    t.result = ("finished before the kill" if outcomes[0] != "killed" else
                "started again (no run yet)" if "started again" in t.outcome else "resumed")
    events = check_run(t, out, cfg, finished=True, what="finished")
    if any(x.startswith("resume") for x in outcomes) and holds_run(out) and not any(
            e["kind"] == "resumed" for e in events):
        t.add("other", "a resume left no resumed event")
    compare_to_reference(t, out, ref["dir"])


# ------------------------------------------------------------------------------------ corrupt trials


@dataclass
class Fault:
    name: str
    detail: str
    saved: dict[Path, bytes | None]  # path -> bytes before the fault (None: did not exist)
    steps: set[int] = field(default_factory=set)  # checkpoints it damaged
    logs: bool = False  # touches events/metrics/summary: run `esper-fn report` too


def remember(paths: list[Path]) -> dict[Path, bytes | None]:
    return {p: (p.read_bytes() if p.is_file() else None) for p in paths}


def undo(f: Fault) -> None:
    for p, data in f.saved.items():
        if data is None:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)


def ckpt_faults(sw: Sweep, run_dir: Path, rng: random.Random, name: str) -> dict[str, Callable[[], Fault]]:
    steps = checkpoint_steps(run_dir)
    if not steps:
        return {}
    step = steps[-1] if rng.random() < 0.7 else rng.choice(steps)
    sd = step_dir(run_dir, step)
    tensors, manifest = sd / "tensors.safetensors", sd / "manifest.json"

    def flip() -> Fault:
        saved = remember([tensors])
        data = bytearray(tensors.read_bytes())
        at = sorted(rng.sample(range(len(data)), rng.randint(1, 8)))
        for i in at:
            data[i] ^= rng.randint(1, 255)
        tensors.write_bytes(bytes(data))
        return Fault("flip bytes", f"step {step}, bytes {at[:4]}{'...' if len(at) > 4 else ''}", saved, {step})

    def truncate() -> Fault:
        saved = remember([tensors])
        n = rng.randrange(tensors.stat().st_size)
        with tensors.open("r+b") as f:
            f.truncate(n)
        return Fault("truncate tensors", f"step {step} to {n} bytes", saved, {step})

    def delete(path: Path, label: str) -> Callable[[], Fault]:
        def go() -> Fault:
            saved = remember([path])
            path.unlink()
            return Fault(label, f"step {step}", saved, {step})
        return go

    def rehash() -> Fault:
        saved = remember([manifest])
        m = json.loads(manifest.read_text())
        m["files"]["tensors.safetensors"]["sha256"] = "%064x" % rng.getrandbits(256)
        manifest.write_text(json.dumps(m, indent=2))
        return Fault("edit manifest hash", f"step {step}", saved, {step})

    def truncate_manifest() -> Fault:
        saved = remember([manifest])
        data = manifest.read_bytes()
        manifest.write_bytes(data[: rng.randrange(len(data))])
        return Fault("truncate manifest", f"step {step}", saved, {step})

    def swap() -> Fault:
        a, b = rng.sample(steps, 2)
        pa, pb = step_dir(run_dir, a) / "manifest.json", step_dir(run_dir, b) / "manifest.json"
        saved = remember([pa, pb])
        da, db = pa.read_bytes(), pb.read_bytes()
        pa.write_bytes(db)
        pb.write_bytes(da)
        return Fault("swap manifests", f"steps {a} and {b}", saved, {a, b})

    def nan() -> Fault:
        import torch

        from esper_fn.checkpoint import CheckpointManager

        saved = remember([tensors, manifest])
        mgr = CheckpointManager(run_dir / "checkpoints", max_to_keep=None)
        ts, meta = mgr.restore(step)
        keys = [k for k, v in ts.items() if k.startswith(("state/params/", "state/opt/mu/", "state/opt/nu/"))
                and v.is_floating_point() and v.numel()]
        key = rng.choice(sorted(keys))
        value = rng.choice([float("nan"), float("inf"), float("-inf")])
        ts[key] = ts[key].clone()
        ts[key].view(-1)[rng.randrange(ts[key].numel())] = value
        mgr.save(step, ts, meta, overwrite=True)
        del torch
        return Fault("non-finite tensor", f"step {step}: {value} in {key}", saved, {step})

    def leftovers() -> Fault:
        ck = run_dir / "checkpoints"
        tmp, old = ck / f".tmp-{step + 1}-{rng.getrandbits(32):08x}", ck / f".old-{step}-{rng.getrandbits(32):08x}"
        saved = {tmp: None, old: None}
        for d in (tmp, old):
            d.mkdir()
            (d / "tensors.safetensors").write_bytes(rng.randbytes(100))
        return Fault("crash leftovers", f"{tmp.name}, {old.name}", saved)

    def foreign() -> Fault | None:
        others = [(o, s) for o in sw.configs if o != name
                  for s in checkpoint_steps(sw.reference(o)["dir"]) if s > steps[-1]]
        if not others:
            return None
        o, s = rng.choice(others)
        dest = step_dir(run_dir, s)
        saved = {dest: None}
        shutil.copytree(step_dir(sw.reference(o)["dir"], s), dest)
        return Fault("checkpoint of another run", f"{o} step {s}", saved, {s})

    faults = {"flip bytes": flip, "truncate tensors": truncate,
              "delete tensors": delete(tensors, "delete tensors"), "delete manifest": delete(manifest, "delete manifest"),
              "edit manifest hash": rehash, "truncate manifest": truncate_manifest, "non-finite tensor": nan,
              "crash leftovers": leftovers, "checkpoint of another run": foreign}
    if len(steps) >= 2:
        faults["swap manifests"] = swap
    return faults


def log_faults(sw: Sweep, run_dir: Path, rng: random.Random, name: str, finished: bool,
               has_ckpt: bool) -> dict[str, Callable[[], Fault]]:
    faults: dict[str, Callable[[], Fault]] = {}
    for fname in ("events.jsonl", "metrics.jsonl"):
        path = run_dir / fname
        if not path.is_file() or path.stat().st_size == 0:
            continue

        def cut(path=path) -> Fault:
            saved = remember([path])
            data = path.read_bytes()
            ends = {i for i, c in enumerate(data) if c == 10}
            mid = [i for i in range(1, len(data)) if i - 1 not in ends] or [len(data) - 1]
            n = rng.choice(mid)  # inside a line: the file ends in a partial one
            path.write_bytes(data[:n])
            return Fault(f"truncate {path.name}", f"at byte {n} of {len(data)}", saved, logs=True)

        faults[f"truncate {fname}"] = cut
        faults[f"delete {fname}"] = lambda path=path: Fault(f"delete {path.name}", "", _unlinked(path), logs=True)
    events = run_dir / "events.jsonl"
    others = [o for o in sw.configs if o != name]
    if events.is_file() and events.stat().st_size:
        def garbage() -> Fault:
            saved = remember([events])
            lines = events.read_bytes().split(b"\n")
            i = rng.randrange(max(len(lines) - 1, 1))
            lines.insert(i, rng.choice([b"{not json", b'{"kind": "germinated"}', b"", b"\x00\xff"]))
            events.write_bytes(b"\n".join(lines))
            return Fault("garbage line in events.jsonl", f"at line {i + 1}", saved, logs=True)

        def empty() -> Fault:
            saved = remember([events])
            events.write_bytes(b"")
            return Fault("empty events.jsonl", "", saved, logs=True)

        def foreign() -> Fault:
            saved = remember([events])
            other = rng.choice(others)
            shutil.copyfile(sw.reference(other)["dir"] / "events.jsonl", events)
            return Fault("events.jsonl of another run", other, saved, logs=True)

        faults["garbage line in events.jsonl"] = garbage
        faults["empty events.jsonl"] = empty
        if others:
            faults["events.jsonl of another run"] = foreign
    if finished:
        faults["delete summary.json"] = lambda: Fault("delete summary.json", "", _unlinked(run_dir / "summary.json"),
                                                      logs=True)
    config = run_dir / "config.yaml"

    def edit(kind: str) -> Fault:
        saved = remember([config])
        text = config.read_text()
        if kind == "value":
            key, new = rng.choice([("lr", "lr: 0.02"), ("seed", "seed: 99"), ("epochs", "epochs: 3"),
                                   ("controller", "controller: static" if "controller: static" not in text
                                    else "controller: heuristic")])
            lines = [new if ln.startswith(f"{key}:") else ln for ln in text.splitlines()]
            config.write_text("\n".join(lines) + "\n")
            return Fault("edit config.yaml: a value", new, saved)
        if kind == "syntax":
            bad = rng.choice(["lr: [0.01\n", "  epochs: 3\n x: y\n", "epochs: 'open\n", "\tseed: 1\n", "{\n"])
            lines = text.splitlines(keepends=True)
            i = rng.randrange(len(lines) + 1)
            config.write_text("".join(lines[:i]) + bad + "".join(lines[i:]))
            return Fault("edit config.yaml: YAML syntax error", f"{bad!r} at line {i + 1}", saved)
        if kind == "unknown key":
            key = rng.choice(["epochz: 3", "checkpoint_evry: 1", "trian:\n  batch_size: 10"])
            config.write_text(text + key + "\n")
            return Fault("edit config.yaml: unknown key", key.split(":")[0], saved)
        config.write_text("# edited by hand: a comment only\n" + text.replace("\n", "  # same\n", 1))
        return Fault("edit config.yaml: a comment", "", saved)

    if config.is_file():
        if has_ckpt:  # without a checkpoint an edited value is a new run's config, which starts from epoch 0
            faults["edit config.yaml: a value"] = lambda: edit("value")
        faults["edit config.yaml: YAML syntax error"] = lambda: edit("syntax")
        faults["edit config.yaml: unknown key"] = lambda: edit("unknown key")
        faults["edit config.yaml: a comment"] = lambda: edit("comment")
        faults["delete config.yaml"] = lambda: Fault("delete config.yaml", "", _unlinked(config))
    return faults


def _unlinked(path: Path) -> dict[Path, bytes | None]:
    saved = remember([path])
    path.unlink()
    return saved


CORRUPT_ORDER = ["flip bytes", "truncate events.jsonl", "non-finite tensor", "edit config.yaml: a value",
                 "delete manifest", "truncate metrics.jsonl", "truncate tensors", "garbage line in events.jsonl",
                 "edit manifest hash", "edit config.yaml: YAML syntax error", "checkpoint of another run",
                 "empty events.jsonl", "swap manifests", "delete summary.json", "truncate manifest",
                 "edit config.yaml: unknown key", "delete tensors", "events.jsonl of another run", "crash leftovers",
                 "delete events.jsonl", "edit config.yaml: a comment", "delete metrics.jsonl", "delete config.yaml"]
"""The faults the corrupt-file trials of a sweep go through in turn (on a base they apply to)."""
NEEDS_FINISHED = {"delete summary.json", "swap manifests"}
NEEDS_CHECKPOINT = {"flip bytes", "non-finite tensor", "edit config.yaml: a value", "delete manifest", "truncate tensors",
                    "edit manifest hash", "checkpoint of another run", "truncate manifest", "delete tensors",
                    "crash leftovers"}


def corrupt_trial(sw: Sweep, t: Trial, rng: random.Random) -> None:
    name = rng.choice(sw.configs)
    cfg = POOL[name]
    ref = sw.reference(name)
    d = sw.trial_dir(t)
    out = d / "run"
    ce, n = cfg["checkpoint_every"], cfg["epochs"]
    want = CORRUPT_ORDER[t.turn % len(CORRUPT_ORDER)]
    if want in NEEDS_FINISHED or rng.random() < 0.4:
        base, label = ref["dir"], "finished"
    else:
        k = rng.choice(([] if want in NEEDS_CHECKPOINT else [0]) + list(range(ce, n, ce)))
        base, interrupted = sw.interrupted_base(name, k)
        label = f"interrupted at checkpoint {k}" if interrupted else f"finished (the kill at checkpoint {k} came late)"
    shutil.copytree(base, out)
    finished = (out / "summary.json").exists()
    steps_before = checkpoint_steps(out)
    choices = {**ckpt_faults(sw, out, rng, name), **log_faults(sw, out, rng, name, finished, bool(steps_before))}
    fault = None
    while fault is None:  # the fault whose turn it is, else (where it does not apply) a random one
        pick = want if want in choices else rng.choice(sorted(choices))
        want = ""
        fault = choices.pop(pick)()
    t.fault, t.detail = fault.name, f"{name}, {label}" + (f": {fault.detail}" if fault.detail else "")
    exempt = {s: tree_hash(step_dir(out, s)) for s in fault.steps if step_dir(out, s).exists()}
    outcomes = []
    if fault.logs:
        before = snapshot(out)
        p = run(["report", str(out), "--out", str(d / "report.png")], timeout=120)
        ok = check_output(t, p, {0, 1, 2}, "report")
        outcomes.append("report ok" if ok else f"report refused ({p.rc})")
        if ok and not (d / "report.png").is_file():
            t.add("other", "report succeeded and wrote no PNG")
        if bad := diff_snapshots(before, snapshot(out)):
            t.add("lost", f"report changed the run directory: {bad[:3]}")
    before = snapshot(out)
    latest_dir = max((int(p.name[5:]) for p in (out / "checkpoints").glob("step_*") if p.name[5:].isdigit()),
                     default=None) if (out / "checkpoints").is_dir() else None
    resume = ["grow", "--resume", "--out", str(out), "--no-progress"]
    p = run(resume, timeout=sw.timeout(name))
    ok = check_output(t, p, {0, 1, 2}, "resume")
    if ok:
        outcomes.append("resumed")
        t.result = "resumed"
        events = check_run(t, out, cfg, finished=True, exempt=exempt, what="resumed")
        compare_to_reference(t, out, ref["dir"], what="resumed")
        new = [e for e in events if e["kind"] == "resumed"][-1:]
        if not new:
            t.add("other", "the resume left no resumed event")
        elif latest_dir is not None and latest_dir in fault.steps and new[0]["from_step"] < latest_dir:
            said = latest_dir in new[0].get("skipped", []) or f"step_{latest_dir:08d}" in new[0].get("reason", "")
            if not said:
                t.add("other", f"resumed from step {new[0]['from_step']} past the damaged step_{latest_dir:08d} "
                               f"without saying so: {new[0].get('reason')!r}")
    else:
        if p.timed_out:
            t.outcome = t.result = " > ".join(outcomes + ["resume hung"])
            return
        outcomes.append(f"refused ({p.rc})")
        if bad := diff_snapshots(before, snapshot(out), ignore_leftovers=True):
            t.add("lost", f"the refused resume changed the run directory: {bad[:4]}")
        undo(fault)  # the damage put right: the run must finish, as if nothing had happened
        p = run(resume, timeout=sw.timeout(name))
        t.result = f"refused ({outcomes[-1][-2]}), undone, resumed"
        if check_output(t, p, {0}, "resume after undoing the fault"):
            outcomes.append("undone, resumed")
            check_run(t, out, cfg, finished=True, what="undone")
            compare_to_reference(t, out, ref["dir"], what="undone")
        else:
            t.add("lost", f"the run cannot be resumed even with the damage undone: {p.stderr.strip()[:300]}")
    t.outcome = " > ".join(outcomes)


# ------------------------------------------------------------------------------------ bad-input trials


@dataclass
class Case:
    name: str
    argv: list[str]
    expect: set[int]
    files: dict[str, bytes] = field(default_factory=dict)  # sandbox files the case needs
    outside: Path | None = None  # a path outside the sandbox that must not appear


WRONG_TYPE = {"int": ["ten", "1.5", "[1, 2]", "{a: 1}", "''", "0x"], "float": ["fast", "[1]", "{a: 1}", "''", ".."],
              "str": ["[1, 2]", "{a: 1}", "3"], "dict": ["5", "fast", "[1, 2]"], "list": ["5", "fast", "[fc1]"]}
FIELDS = {"epochs": "int", "seed": "int", "lr": "float", "seed_lr": "float", "param_budget": "int",
          "param_budget_ratio": "float", "schedule_every": "int", "checkpoint_every": "int", "max_to_keep": "int",
          "task": "str", "host": "str", "controller": "str", "train": "dict", "plateau": "dict", "governor": "dict",
          "preinstall": "list"}
OUT_OF_RANGE = {"epochs": ["0", "-1"], "seed": [str(2**70), str(-(2**70))], "lr": ["0", "-0.01", ".inf", ".nan"],
                "seed_lr": ["0", "-1", ".inf", ".nan"], "param_budget": ["0", "-5"],
                "param_budget_ratio": ["0", "-1.3", ".inf", ".nan"], "schedule_every": ["0"],
                "checkpoint_every": ["0", "-2"], "max_to_keep": ["0"],
                "task": ["mnist2d", "''", "aeon:NOPE"], "host": ["nope", "mlp-impared", "mlp-w0", "cnn2d-w4"],
                "controller": ["heuristik", "Static", "''", "tamiyo:"],
                "train": ["{batch_size: 0}", "{incubation: sometimes}", "{aux_weight: -1}", "{eval_batch_size: 0}"],
                "plateau": ["{patience: 0}", "{grow_until: 1.5}", "{max_seeds: -1}", "{tempo: 0}"],
                "governor": ["{window: 0}", "{spike_factor: 1}", "{max_rollbacks: -1}"],
                "preinstall": ["[[fc9, lora_r4]]", "[[fc1, no_such_blueprint]]", "[[fc1]]", "[[fc1, lora_r4, x]]"]}
UNKNOWN_KEYS = ["epochz: 3", "checkpoint-every: 1", "train:\n  batchsize: 10", "plateau:\n  patients: 3",
                "governor:\n  windw: 5", "resume: true"]
SYNTAX = ["epochs: 3\nlr: [1, 2\nseed: 4\n", "epochs: 3\n  lr: 0.1\n", "epochs: 'open\n", "\tepochs: 3\n",
          "{epochs: 3\n", "epochs: 3\n: x\n", "a: b: c\n", "epochs: 3\n...\n---\nx: [\n"]
NOT_A_MAPPING = ["- epochs\n- 3\n", "just a string\n", "42\n", "[]\n"]
FLAG_VALUES = {"--epochs": ["0", "-5", "ten", "1.5", "", "1e3"], "--lr": ["-1", "0", "fast", "nan", "inf", "-inf", ""],
               "--param-budget": ["0", "-5", "x", "1.5"], "--param-budget-ratio": ["0", "-1", "inf", "nan", "x"],
               "--seed": ["abc", "1.5", str(2**70), str(-(2**70))],
               "--controller": ["heuristik", "", "Static", "tamiyo:", "tamiyo:/nonexistent/w.safetensors",
                                "tamiyo:afile"],
               "--host": ["nope", "mlp-impared", "", "mlp-w0", "cnn2d-w4"], "--task": ["mnist2d", "", "aeon:NOPE"]}
GOOD = "task: mnist1d\nhost: mlp-impaired\ncontroller: static\nepochs: 2\ncheckpoint_every: 1\n"


INPUT_ORDER = ["flag", "config-range", "config-type", "out", "config-syntax", "config-key", "report", "flag",
               "config-range", "out", "config-file"]
"""The families the bad-input trials of a sweep go through in turn (a random case of each)."""


def input_case(rng: random.Random, sandbox_has_finished: bool, family: str | None = None) -> tuple[str, Case]:
    """A bad command of `family` (default: a random one): (the family's name, the case)."""
    family = family or rng.choice(INPUT_ORDER)
    return FAMILIES[family], _case(family, rng, sandbox_has_finished)


FAMILIES = {"flag": "bad flag", "config-type": "config: wrong type", "config-range": "config: out of range",
            "config-key": "config: unknown key", "config-syntax": "config: not YAML / not a mapping",
            "config-file": "config: no such file", "out": "run directory", "report": "report"}


def _case(family: str, rng: random.Random, sandbox_has_finished: bool) -> Case:
    grow = ["grow", "--no-progress"]
    if family == "flag":
        if rng.random() < 0.2:
            extra = rng.choice([["--checkpoint-every", "1"], ["--frobnicate"], ["--resume"], ["--epochs"],
                                ["positional"], ["--out"]])
            argv = grow + ["--controller", "static", "--epochs", "2"] + extra
            if extra[0] != "--out" and extra != ["--resume"]:
                argv += ["--out", "o"]
            return Case(f"flags {' '.join(extra)}", argv, {2})
        flag = rng.choice(sorted(FLAG_VALUES))
        value = rng.choice(FLAG_VALUES[flag])
        base = {"--controller": "static", "--epochs": "2"}
        base[flag] = value
        argv = grow + [x for k, v in base.items() for x in (k, v)] + ["--out", "o"]
        return Case(f"{flag} {value!r}", argv, {2}, files={"afile": b"not tamiyo weights\n"})
    if family in ("config-type", "config-range", "config-key", "config-syntax", "config-file"):
        if family == "config-type":
            key = rng.choice(sorted(FIELDS))
            text = GOOD.replace("epochs: 2\n", "") if key == "epochs" else GOOD
            text = "\n".join(ln for ln in text.splitlines() if not ln.startswith(f"{key}:")) + "\n"
            value = rng.choice(WRONG_TYPE[FIELDS[key]])
            text += f"{key}: {value}\n"
            label = f"config {key}: {value}"
        elif family == "config-range":
            key = rng.choice(sorted(OUT_OF_RANGE))
            value = rng.choice(OUT_OF_RANGE[key])
            text = "\n".join(ln for ln in GOOD.splitlines() if not ln.startswith(f"{key}:")) + f"\n{key}: {value}\n"
            if key == "host" and value == "cnn2d-w4":
                label = f"config host: {value} (a 2-d host for 1-d samples)"
            else:
                label = f"config {key}: {value}"
        elif family == "config-key":
            key = rng.choice(UNKNOWN_KEYS)
            text, label = GOOD + key + "\n", f"config unknown key {key.replace(chr(10), ' ')!r}"
        elif family == "config-syntax":
            choice = rng.choice(SYNTAX + NOT_A_MAPPING + ["<non-utf8>"])
            if choice == "<non-utf8>":
                data = GOOD.encode() + b"notes: \xff\xfe caf\xe9\n"
                return Case("config not UTF-8", grow + ["--config", "c.yaml", "--out", "o"], {2}, {"c.yaml": data})
            text, label = choice, f"config {choice[:24]!r}"
        else:
            which = rng.choice(["missing", "directory"])
            path = "no-such.yaml" if which == "missing" else "emptydir"
            return Case(f"--config {which}", grow + ["--config", path, "--out", "o"], {2}, {"emptydir/": b""})
        return Case(label, grow + ["--config", "c.yaml", "--out", "o"], {2}, {"c.yaml": text.encode()})
    if family == "out":
        which = rng.choice(["file", "under a file", "/proc", "read-only dir", "finished, same config",
                            "finished, other epochs", "resume empty", "resume missing",
                            "resume other flags", "resume other config", "resume junk dir"])
        files = {"c.yaml": GOOD.encode(), "afile": b"x\n", "emptydir/": b"", "junk/notes.txt": b"mine\n"}
        g = grow + ["--config", "c.yaml"]
        if which == "file":
            return Case("--out an existing file", g + ["--out", "afile"], {2}, files)
        if which == "under a file":
            return Case("--out under a file", g + ["--out", "afile/run"], {1}, files)
        if which == "/proc":
            target = Path(f"/proc/esper-fault-sweep-{rng.getrandbits(32):08x}/run")
            return Case("--out under /proc (read-only)", g + ["--out", str(target)], {1}, files, outside=target.parent)
        if which == "read-only dir":
            return Case("--out in a read-only directory", g + ["--out", "ro/run"], {1}, {**files, "ro/": b""})
        if which.startswith("finished") and sandbox_has_finished:
            other = ["--epochs", "3"] if "other" in which else []
            return Case(f"a second run into a finished run's directory{' (other epochs)' if other else ''}",
                        g + other + ["--out", "finished"], {2}, files)
        if which == "resume empty":
            return Case("--resume into an empty directory", grow + ["--resume", "--out", "emptydir"], {2}, files)
        if which == "resume junk dir":
            return Case("--resume into a directory of other files", grow + ["--resume", "--out", "junk"], {2}, files)
        if which in ("resume other flags", "resume other config") and sandbox_has_finished:
            extra = (["--epochs", str(rng.choice([3, 9]))] if which == "resume other flags"
                     else ["--config", "c.yaml"])
            return Case(f"--resume a finished run with {which[7:]}", grow + ["--resume", "--out", "finished"] + extra,
                        {2}, files)
        return Case("--resume into a missing directory", grow + ["--resume", "--out", "nothing-here"], {2}, files)
    which = rng.choice(["missing", "file", "empty", "/proc", "under a file", "format"])
    files = {"afile": b"x\n", "emptydir/": b""}
    if which == "missing":
        return Case("report a missing directory", ["report", "nothing-here"], {2}, files)
    if which == "file":
        return Case("report a file", ["report", "afile"], {2}, files)
    if which == "empty":
        return Case("report an empty directory", ["report", "emptydir"], {2}, files)
    src = "finished" if sandbox_has_finished else "emptydir"
    if which == "/proc":
        target = Path(f"/proc/esper-fault-sweep-{rng.getrandbits(32):08x}/r.png")
        return Case("report --out under /proc", ["report", src, "--out", str(target)], {1, 2}, files,
                    outside=target.parent)
    if which == "under a file":
        return Case("report --out under a file", ["report", src, "--out", "afile/r.png"], {1, 2}, files)
    ext = rng.choice(["xyz", "docx", "png2"])
    return Case(f"report --out r.{ext} (unknown format)", ["report", src, "--out", f"new/dir/r.{ext}"], {2}, files)


def input_trial(sw: Sweep, t: Trial, rng: random.Random) -> None:
    box = sw.trial_dir(t) / "sandbox"
    box.mkdir()
    finished = rng.random() < 0.6
    if finished:  # a finished run to aim second runs, resumes and reports at
        shutil.copytree(sw.reference(sw.configs[0])["dir"], box / "finished")
    family, case = input_case(rng, finished, INPUT_ORDER[t.turn % len(INPUT_ORDER)])
    t.fault, t.detail = family, case.name
    for rel, data in case.files.items():
        p = box / rel
        if rel.endswith("/"):
            p.mkdir(parents=True, exist_ok=True)
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
    if "ro/" in case.files:
        if os.geteuid() == 0:
            t.notes.append("skipped --out in a read-only directory: running as root, whom mode 0o500 does not stop "
                           "(--out under /proc is the read-only case)")
            t.outcome = t.result = "skipped (root)"
            return
        (box / "ro").chmod(0o500)
    before = snapshot(box)
    p = run(case.argv, cwd=box, timeout=120)
    if "ro/" in case.files:
        (box / "ro").chmod(0o700)
    ok = check_output(t, p, case.expect, case.name)
    t.outcome = t.result = "accepted" if ok else f"refused ({p.rc})" if p.rc is not None else "hung"
    if ok:
        t.add("other", f"{case.name}: `{shell(['esper-fn', *case.argv])}` was accepted")
    if bad := diff_snapshots(before, snapshot(box)):
        t.add("other", f"{case.name}: the refused command changed its directory: {bad[:4]}")
    if case.outside is not None and case.outside.exists():
        t.add("other", f"{case.name}: the refused command created {case.outside}")


# ------------------------------------------------------------------------------------ the sweep


TRIALS = {"kill": kill_trial, "corrupt": corrupt_trial, "input": input_trial}


def run_trial(sw: Sweep, i: int) -> Trial:
    kind = sw.kinds[i % len(sw.kinds)]
    t = Trial(i, kind, turn=sum(sw.kinds[j % len(sw.kinds)] == kind for j in range(i)))
    rng = random.Random(f"{sw.seed}:{i}")
    try:
        TRIALS[kind](sw, t, rng)
    except (OSError, subprocess.SubprocessError) as e:  # the harness reports a failure to drive a command
        t.add("other", f"harness could not run the trial: {type(e).__name__}: {e}")
    return t


def repro(seed: int, kinds: list[str], i: int, configs: list[str] | None = None) -> str:
    extra = f" --configs {','.join(configs)}" if configs else ""
    return (f"OMP_NUM_THREADS=1 python benchmarks/fault_sweep.py --seed {seed} --kinds {','.join(kinds)}{extra} "
            f"--only {i}")


def counts(trials: list[Trial]) -> dict[str, int]:
    return {c: sum(any(p.category == c for p in t.problems) for t in trials) for c in CATEGORIES}


def table(trials: list[Trial]) -> str:
    groups: dict[tuple[str, str], list[Trial]] = {}
    for t in trials:
        groups.setdefault((t.kind, t.fault.split(" x")[0] if t.kind == "kill" else t.fault), []).append(t)
    rows = []
    for (kind, fault), ts in sorted(groups.items()):
        outcome: dict[str, int] = {}
        for t in ts:
            last = t.result or t.outcome
            outcome[last] = outcome.get(last, 0) + 1
        c = counts(ts)
        rows.append([kind, fault, str(len(ts)), ", ".join(f"{v} {k}" for k, v in sorted(outcome.items())),
                     *(str(c[x]) for x in CATEGORIES)])
    header = ["kind", "fault", "trials", "outcome (last command)", "tracebacks", "mixed", "lost", "other"]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def final_line(trials: list[Trial]) -> str:
    c = counts(trials)
    s = (f"{len(trials)} trials: {c['traceback']} tracebacks, {c['mixed']} mixed runs, {c['lost']} lost runs")
    return s + (f", {c['other']} other failures" if c["other"] else "")


def sweep(n_trials: int, seed: int, kinds: list[str], out: Path, *, only: list[int] | None = None, jobs: int = 1,
          configs: list[str] | None = None, progress: bool = True) -> list[Trial]:
    """Run the trials (all of range(n_trials), or `only`) and return them."""
    from tqdm import tqdm

    sw = Sweep(out, seed, kinds, configs)
    indices = only if only is not None else list(range(n_trials))
    trials: list[Trial] = []
    bar = tqdm(total=len(indices), desc="fault sweep", unit="trial", disable=not progress, dynamic_ncols=True)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for t in pool.map(lambda i: run_trial(sw, i), indices):
            trials.append(t)
            bar.update(1)
            c = counts(trials)
            bar.set_postfix(tb=c["traceback"], mixed=c["mixed"], lost=c["lost"], other=c["other"])
    bar.close()
    return sorted(trials, key=lambda t: t.index)


def report(trials: list[Trial], seed: int, kinds: list[str], verbose: bool = False,
           configs: list[str] | None = None) -> str:
    lines = [table(trials)]
    notes = sorted({n for t in trials for n in t.notes})
    lines += [f"note: {n}" for n in notes]
    if verbose:
        lines.append("")
        lines += [f"trial {t.index:3d} {t.kind:7s} {t.fault}; {t.detail} -> {t.outcome}"
                  f"{' [' + str(len(t.problems)) + ' problem(s)]' if t.problems else ''}" for t in trials]
    failed = [t for t in trials if t.problems]
    if failed:
        lines.append("")
        lines.append("failures:")
        for t in failed:
            lines.append(f"- trial {t.index} ({t.kind}: {t.fault}; {t.detail}) -> {t.outcome}")
            lines += [f"    [{p.category}] {p.message}" for p in t.problems]
            lines.append(f"    reproduce: {repro(seed, kinds, t.index, configs)}")
    lines.append(final_line(trials))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=24, help="number of trials (default 24: a few minutes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated: kill,corrupt,input")
    ap.add_argument("--out", help="working directory (default: a new temporary one, removed when all pass)")
    ap.add_argument("--only", type=int, action="append", help="run only this trial index (repeatable)")
    ap.add_argument("--jobs", type=int, default=1, help="trials run at once (kill times stretch under load)")
    ap.add_argument("--configs", help=f"comma-separated run configs to draw from (default all: {','.join(POOL)})")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true", help="also list every trial")
    args = ap.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not kinds or set(kinds) - set(KINDS):
        ap.error(f"--kinds must be a comma-separated subset of {','.join(KINDS)}, got {args.kinds!r}")
    if args.trials < 1 or args.jobs < 1:
        ap.error("--trials and --jobs must be >= 1")
    configs = [c.strip() for c in args.configs.split(",")] if args.configs else None
    if configs is not None and (not configs or set(configs) - set(POOL)):
        ap.error(f"--configs must be a comma-separated subset of {','.join(POOL)}, got {args.configs!r}")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="esper-fault-sweep-"))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    trials = sweep(args.trials, args.seed, kinds, out, only=args.only, jobs=args.jobs, configs=configs,
                   progress=not args.no_progress)
    print(f"esper-fn fault sweep: seed {args.seed}, kinds {','.join(kinds)}, {len(trials)} trials in "
          f"{time.perf_counter() - t0:.0f} s; work directory {out}")
    print(report(trials, args.seed, kinds, args.verbose, configs))
    failed = any(t.problems for t in trials)
    if not failed and not args.out:
        shutil.rmtree(out, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
