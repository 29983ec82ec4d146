"""Run directories are never mixed, refused commands create nothing, resumes agree with their logs,
and the command line answers every bad input in one line with the documented exit code."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import esper_fn as ef
from esper_fn.checkpoint import CheckpointManager
from esper_fn.cli import main
from esper_fn.events import CheckpointSaved, EventLogError, Resumed, read_events
from esper_fn.run import RunConfig, grow

FAST = dict(task="mnist1d", host="mlp-impaired", controller="static", epochs=4, checkpoint_every=2)


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _copy_run(src: Path, dest: Path) -> Path:
    for name, data in _snapshot(src).items():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_bytes(data)
    return dest


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "done"
    grow(RunConfig(**FAST), out, progress=False)
    return out


def test_a_second_run_into_a_run_directory_is_refused_and_changes_nothing(finished):
    before = _snapshot(finished)
    with pytest.raises(ef.RunExistsError, match="--resume.*another --out.*--overwrite"):
        grow(RunConfig(**{**FAST, "epochs": 2}), finished, progress=False)
    assert _snapshot(finished) == before


def test_overwrite_moves_the_old_run_aside(tmp_path, finished):
    out = _copy_run(finished, tmp_path / "r")
    old = _snapshot(out)
    s = grow(RunConfig(**{**FAST, "epochs": 2}), out, overwrite=True, progress=False)
    assert s.moved_aside == str(tmp_path / "r.old-1") and _snapshot(tmp_path / "r.old-1") == old
    assert CheckpointManager(out / "checkpoints").steps() == [2]  # nothing of the old run's steps 2 and 4 left
    assert yaml.safe_load((out / "config.yaml").read_text())["epochs"] == 2


def test_refused_commands_create_nothing(tmp_path):
    with pytest.raises(ef.ConfigError, match="unknown host"):
        grow(RunConfig(**{**FAST, "host": "nope"}), tmp_path / "a", progress=False)
    with pytest.raises(ef.ConfigError, match="holds no run to resume"):
        grow(RunConfig(**FAST), tmp_path / "b", resume=True, progress=False)
    with pytest.raises(ef.HostError):
        grow(RunConfig(**{**FAST, "host": "cnn-impaired", "task": "spirals"}), tmp_path / "c", progress=False)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "f").write_text("x")
    with pytest.raises(ef.ConfigError, match="is an existing file"):
        grow(RunConfig(**FAST), tmp_path / "f", progress=False)


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_from_epoch_0(tmp_path, crash_at):
    cfg = RunConfig(**{**FAST, "checkpoint_every": 3})
    with pytest.raises(crash_at.error):
        grow(cfg, tmp_path / "r", progress=False, on_epoch_start=crash_at(1))
    assert CheckpointManager(tmp_path / "r" / "checkpoints").latest_step() is None
    s = grow(cfg, tmp_path / "r", resume=True, progress=False)
    fresh = grow(cfg, tmp_path / "fresh", progress=False)
    assert (s.epochs, s.test_accuracy, s.test_loss) == (fresh.epochs, fresh.test_accuracy, fresh.test_loss)
    events = read_events(tmp_path / "r" / "events.jsonl")
    assert isinstance(events[0], Resumed) and events[0].from_step == 0 and "epoch 0" in events[0].reason
    assert len((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()) == 4


def test_the_log_gets_back_a_checkpoint_event_a_crash_cut_off(tmp_path, crash_at):
    """kill -9 just after a checkpoint landed, before its event was written: resume restores the event."""
    cfg = RunConfig(**{**FAST, "epochs": 6})
    with pytest.raises(crash_at.error):
        grow(cfg, tmp_path / "r", progress=False, on_epoch_start=crash_at(5))
    log = tmp_path / "r" / "events.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    cut = max(i for i, line in enumerate(lines) if '"checkpoint_saved"' in line and '"step":4' in line)
    log.write_text("".join(lines[:cut]))  # as if the process died between the rename and the event
    grow(cfg, tmp_path / "r", resume=True, progress=False)
    saved = [e.step for e in read_events(log) if isinstance(e, CheckpointSaved)]
    assert saved == [2, 4, 6]
    resumed = [e for e in read_events(log) if isinstance(e, Resumed)]
    assert [(e.epoch, e.from_step) for e in resumed] == [(4, 4)]


@pytest.mark.parametrize("bare", [True, False])
def test_resume_detects_a_hand_edited_config(tmp_path, crash_at, bare):
    cfg = RunConfig(**{**FAST, "epochs": 6})
    with pytest.raises(crash_at.error):
        grow(cfg, tmp_path / "r", progress=False, on_epoch_start=crash_at(5))
    path = tmp_path / "r" / "config.yaml"
    path.write_text(path.read_text().replace("lr: 0.01", "lr: 0.05"))
    argv = ["grow", "--resume", "--out", str(tmp_path / "r"), "--no-progress"]
    if not bare:  # the run's original flags
        argv += ["--controller", "static", "--epochs", "6"]
    assert main(argv) == 2


def test_resume_refuses_other_flags_than_the_runs(tmp_path, crash_at, capsys):
    cfg = RunConfig(**{**FAST, "epochs": 6})
    with pytest.raises(crash_at.error):
        grow(cfg, tmp_path / "r", progress=False, on_epoch_start=crash_at(5))
    assert main(["grow", "--resume", "--out", str(tmp_path / "r"), "--epochs", "8", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "config differs" in err and "epochs: 8 vs 6" in err and len(err.strip().splitlines()) == 1
    assert main(["grow", "--resume", "--out", str(tmp_path / "r"), "--no-progress"]) == 0  # bare: the run's config


def test_an_unwritable_run_directory_is_one_typed_error(tmp_path, monkeypatch, capsys):
    real = Path.mkdir

    def read_only(self, *a, **kw):
        if str(self).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, *a, **kw)

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(ef.RunWriteError, match="Read-only file system.*choose a writable --out"):
        grow(RunConfig(**FAST), tmp_path / "ro" / "run", progress=False)
    assert main(["grow", "--controller", "static", "--epochs", "1", "--out", str(tmp_path / "ro" / "x"),
                 "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("esper-fn grow: error: cannot write the run directory") and "\n" not in err


BAD = [
    (["--epochs", "0"], "--epochs: input should be greater than or equal to 1 (got 0); closest valid value: 1"),
    (["--epochs", "-5"], "--epochs: input should be greater than or equal to 1 (got -5)"),
    (["--lr", "-1"], "--lr: input should be greater than 0 (got -1.0)"),
    (["--param-budget", "-5"], "--param-budget: input should be greater than or equal to 1 (got -5)"),
    (["--controller", "heuristik"], "closest valid value: heuristic"),
    (["--epochs", "ten"], "argument --epochs: invalid int value: 'ten'"),
]


@pytest.mark.parametrize("argv,expected", BAD)
def test_bad_flags_are_one_line_with_exit_code_2(tmp_path, argv, expected):
    r = subprocess.run([sys.executable, "-m", "esper_fn.cli", "grow", *argv, "--out", str(tmp_path / "x"),
                        "--no-progress"], capture_output=True, text=True, timeout=120)
    err = r.stderr.strip()
    assert r.returncode == 2 and expected in err and "\n" not in err, err
    assert "pydantic" not in err and not (tmp_path / "x").exists()


@pytest.mark.parametrize("text,expected", [
    ("epochs: ten\n", "epochs: input should be a valid integer"),
    ("lr: fast\n", "lr: input should be a valid number"),
    ("plateau: 5\n", "plateau: input should be a valid dictionary"),
    ("epochs: 3\nlr: [1, 2\nseed: 4\n", "c.yaml:3:5: YAML syntax error"),
    ("epochz: 3\n", "unknown key 'epochz'; did you mean 'epochs'?"),
])
def test_bad_config_files_are_one_line(tmp_path, capsys, text, expected):
    (tmp_path / "c.yaml").write_text(text)
    assert main(["grow", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err and "errors.pydantic.dev" not in err


def test_report_skips_a_cut_off_metrics_row_and_writes_into_new_directories(finished, tmp_path):
    run = tmp_path / "copy"
    run.mkdir()
    for name in ("metrics.jsonl", "events.jsonl", "summary.json"):
        (run / name).write_bytes((finished / name).read_bytes())
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 5, "val_acc')  # a crash mid-write
    png = tmp_path / "new" / "dir" / "r.png"
    r = subprocess.run([sys.executable, "-m", "esper_fn.cli", "report", str(run), "--out", str(png)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert png.stat().st_size > 10_000 and "skipped a partial last row" in r.stderr and "4 complete" in r.stderr


def test_metrics_rows_stay_valid_json(finished):
    rows = [json.loads(line) for line in (finished / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]


def test_resume_skips_a_checkpoint_with_a_nan_and_says_so(tmp_path, finished):
    out = _copy_run(finished, tmp_path / "r")
    mgr = CheckpointManager(out / "checkpoints")
    tensors, meta = mgr.restore(4)
    key = "state/params/host/fc1/weight"
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")
    mgr.save(4, tensors, meta, overwrite=True)  # a checkpoint that would resume a ruined network
    s = grow(RunConfig(**FAST), out, resume=True, progress=False)
    full = json.loads((finished / "summary.json").read_text())
    assert (s.epochs, s.test_accuracy, s.test_loss) == (full["epochs"], full["test_accuracy"], full["test_loss"])
    (resumed,) = [e for e in read_events(out / "events.jsonl") if isinstance(e, Resumed)]
    assert resumed.from_step == 2 and resumed.skipped == [4] and "params/host/fc1/weight" in resumed.reason
    assert all(r == r for row in (json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines())
               for r in row.values() if isinstance(r, float))


def test_a_run_checkpoint_restores_as_a_state(finished):
    state, meta = CheckpointManager(finished / "checkpoints").restore_state(ef.hosts.preset("mlp-impaired"), 4)
    assert state.num_params() == 826 and meta["epoch"] == 4 and meta["run"]["config"]["epochs"] == 4


# --- found by the fault sweep (benchmarks/fault_sweep.py) ------------------------------------------


def test_a_config_that_is_not_utf8_is_one_line_naming_where(tmp_path, capsys):
    (tmp_path / "c.yaml").write_bytes(b"epochs: 2\ncontroller: static\nnote: caf\xe9\n")
    assert main(["grow", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{tmp_path / 'c.yaml'}:3:10: not UTF-8 text" in err and "\n" not in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("text,expected", [
    ("seed: 1180591620717411303424\n", "seed: input should be less than or equal to 18446744073709551615"),
    ("param_budget_ratio: .inf\n", "param_budget_ratio: input should be a finite number"),
    ("lr: .inf\n", "lr: input should be a finite number"),
    ("seed_lr: -1\n", "seed_lr: input should be greater than 0"),
    ("seed_lr: .nan\n", "seed_lr: input should be a finite number"),
    ("preinstall: [[fc9, lora_r4]]\n", "has no slot 'fc9'"),
    ("preinstall: [[fc1, no_such_blueprint]]\n", "unknown blueprint 'no_such_blueprint'"),
])
def test_a_config_the_run_cannot_use_is_refused_before_anything_is_written(tmp_path, capsys, text, expected):
    """These were tracebacks (a seed torch cannot take, an infinite budget) or refusals that left a
    run directory behind (config.yaml and checkpoints/: the next try was refused as a second run)."""
    (tmp_path / "c.yaml").write_text("controller: static\nepochs: 2\n" + text)
    assert main(["grow", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_a_budget_ratio_beyond_any_float_is_no_budget():
    from esper_fn.run import param_budget

    assert param_budget(RunConfig(param_budget_ratio=1e308), 826) is None
    assert param_budget(RunConfig(param_budget_ratio=1.3), 826) == 1073


def test_config_yaml_is_written_before_anything_else_of_a_run(tmp_path, monkeypatch):
    """A crash while a run starts never leaves a run directory without its config (a bare --resume
    of such a directory would continue with the default config: 200 epochs of another run)."""
    import esper_fn.run as run_module

    class Crash(Exception):
        pass

    def crash(*args, **kwargs):
        raise Crash("killed while starting")

    monkeypatch.setattr(run_module, "CheckpointManager", crash)
    with pytest.raises(Crash):
        grow(RunConfig(**FAST), tmp_path / "r", progress=False)
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["config.yaml"]
    monkeypatch.undo()
    assert main(["grow", "--resume", "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["epochs"] == FAST["epochs"]


def test_a_bare_resume_without_config_yaml_is_refused(tmp_path, crash_at, capsys):
    cfg = RunConfig(**{**FAST, "checkpoint_every": 3})
    with pytest.raises(crash_at.error):
        grow(cfg, tmp_path / "r", progress=False, on_epoch_start=crash_at(2))
    (tmp_path / "r" / "config.yaml").unlink()
    before = _snapshot(tmp_path / "r")
    assert main(["grow", "--resume", "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds a run but no config.yaml" in err and "--config" in err and "\n" not in err
    assert _snapshot(tmp_path / "r") == before


def test_a_crash_while_a_resume_rewrites_the_logs_leaves_them_whole(tmp_path, crash_at, monkeypatch):
    """A resume rewrites events.jsonl and metrics.jsonl (dropping what followed the checkpoint): a
    crash in that write must leave the old files, not cut ones (events lost for good)."""
    import os

    cfg = RunConfig(**{**FAST, "epochs": 6})
    with pytest.raises(crash_at.error):
        grow(cfg, tmp_path / "r", progress=False, on_epoch_start=crash_at(3))  # epoch 3 is logged after step 2
    before = _snapshot(tmp_path / "r")

    class Crash(Exception):
        pass

    real_open = Path.open

    def open_(self, mode="r", *args, **kwargs):  # killed just after the file was truncated
        if "w" in mode and self.name in ("events.jsonl", "metrics.jsonl"):
            os.truncate(self, 0)
            raise Crash(f"killed writing {self.name}")
        return real_open(self, mode, *args, **kwargs)

    def replace(src, dst):  # killed just before the new file was renamed into place
        raise Crash(f"killed renaming {src}")

    monkeypatch.setattr(Path, "open", open_)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Crash):
        grow(cfg, tmp_path / "r", resume=True, progress=False)
    monkeypatch.undo()
    assert _snapshot(tmp_path / "r") == before
    s = grow(cfg, tmp_path / "r", resume=True, progress=False)
    assert s.epochs == 6 and [e.epoch for e in read_events(tmp_path / "r" / "events.jsonl")
                              if e.kind == "epoch_metrics"] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("damage", ["cut", "deleted"])
def test_a_resume_says_which_events_a_damaged_log_lost(tmp_path, finished, damage):
    out = _copy_run(finished, tmp_path / "r")
    log = out / "events.jsonl"
    if damage == "cut":
        data = log.read_bytes()
        log.write_bytes(data[: data.index(b"\n", len(data) // 3) + 20])  # a third of the log and a partial line
    else:
        log.unlink()
    grow(RunConfig(**FAST), out, resume=True, progress=False)
    events = read_events(log)
    (resumed,) = [e for e in events if isinstance(e, Resumed)]
    how = "was cut short" if damage == "cut" else "was missing"
    assert f"events.jsonl {how}: it held" in resumed.reason and "are lost" in resumed.reason
    assert resumed.from_step == 4 and [e.step for e in events if isinstance(e, CheckpointSaved)][-1] == 4


def test_a_resume_names_a_checkpoint_directory_without_its_manifest(tmp_path, finished):
    out = _copy_run(finished, tmp_path / "r")
    (out / "checkpoints" / "step_00000004" / "manifest.json").unlink()
    s = grow(RunConfig(**FAST), out, resume=True, progress=False)
    full = json.loads((finished / "summary.json").read_text())
    assert (s.epochs, s.test_accuracy) == (full["epochs"], full["test_accuracy"])
    (resumed,) = [e for e in read_events(out / "events.jsonl") if isinstance(e, Resumed)]
    assert resumed.from_step == 2 and resumed.skipped == [4]
    assert "step_00000004 (no manifest.json)" in resumed.reason


def test_a_resume_refuses_events_of_another_run_and_changes_nothing(tmp_path, finished):
    out = _copy_run(finished, tmp_path / "r")
    other = tmp_path / "other"
    grow(RunConfig(**{**FAST, "epochs": 2}), other, progress=False)
    (out / "events.jsonl").write_bytes((other / "events.jsonl").read_bytes())
    before = _snapshot(out)
    with pytest.raises(ef.ConfigError, match="holds events of another run.*mixes two runs"):
        grow(RunConfig(**FAST), out, resume=True, progress=False)
    assert _snapshot(out) == before


def test_a_refused_resume_leaves_the_metrics_as_they_were(tmp_path, crash_at):
    """A resume that refuses a corrupt event log used to rewrite metrics.jsonl first."""
    cfg = RunConfig(**{**FAST, "epochs": 6})
    with pytest.raises(crash_at.error):
        grow(cfg, tmp_path / "r", progress=False, on_epoch_start=crash_at(3))  # metrics of epoch 3 follow step 2
    log = tmp_path / "r" / "events.jsonl"
    lines = log.read_bytes().split(b"\n")
    log.write_bytes(b"\n".join(lines[:2] + [b"{not an event"] + lines[2:]))
    before = _snapshot(tmp_path / "r")
    with pytest.raises(EventLogError, match="events.jsonl:3"):
        grow(cfg, tmp_path / "r", resume=True, progress=False)
    assert _snapshot(tmp_path / "r") == before


def test_report_refuses_an_unknown_image_format_and_creates_nothing(finished, tmp_path, capsys):
    assert main(["report", str(finished), "--out", str(tmp_path / "new" / "r.xyz")]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot write '.xyz' images" in err and ".png" in err and "\n" not in err
    assert not (tmp_path / "new").exists()


def test_restore_run_gives_the_finished_run_and_refuses_what_is_not_one(tmp_path, finished):
    from esper_fn.run import restore_run
    from esper_fn.training import evaluate

    config, task, ep = restore_run(finished)
    summary = json.loads((finished / "summary.json").read_text())
    assert config == RunConfig(**FAST) and ep.done and ep.epoch == summary["epochs"] == 4
    assert evaluate(ep.state, task.x_test, task.y_test)["accuracy"] == summary["test_accuracy"]
    with pytest.raises(ef.RunDirError, match="not a run directory"):
        restore_run(tmp_path / "nothing")
    out = _copy_run(finished, tmp_path / "r")
    mgr = CheckpointManager(out / "checkpoints")
    for step in mgr.steps():  # every checkpoint diverged: nothing to restore, and the error says which
        tensors, meta = mgr.restore(step)
        tensors["state/params/host/fc1/weight"] = torch.full_like(tensors["state/params/host/fc1/weight"], float("inf"))
        mgr.save(step, tensors, meta, overwrite=True)
    with pytest.raises(ef.CheckpointError, match=r"every checkpoint .* non-finite values \(step 4: .*step 2: "):
        restore_run(out)
