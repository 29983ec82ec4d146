"""The grow runner end to end: run directory, resume, governor, config errors, CLI."""

import json
import subprocess
import sys

import pytest
import torch

import esper_fn as ef
from esper_fn.events import Germinated, Rollback, read_events
from esper_fn.run import GovernorConfig, RunConfig, governor_verdict, grow, load_config

FAST = dict(task="mnist1d", host="mlp-impaired", epochs=8, checkpoint_every=3,
            plateau={"patience": 1, "min_delta": 1.0, "incubate_epochs": 1, "tempo": 2, "hold_epochs": 1,
                     "grow_until": 1.0})


def test_grow_writes_a_complete_run_directory(tmp_path):
    s = grow(RunConfig(**FAST), tmp_path / "run", progress=False)
    run = tmp_path / "run"
    for f in ("config.yaml", "events.jsonl", "metrics.jsonl", "metrics.csv", "summary.json"):
        assert (run / f).exists(), f
    events = read_events(run / "events.jsonl")
    germ = [e for e in events if isinstance(e, Germinated)]
    assert germ and germ[0].slot == "input" and germ[0].blueprint.startswith("conv1d_k5")
    assert s.germinated == 1 and s.params_after == 826 + 177
    assert 0.1 < s.test_accuracy <= 1.0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {"val_accuracy", "train_loss", "params", "flops", "input/contribution"} <= set(rows[-1])
    png = ef.report.plot_run(run)
    assert png.stat().st_size > 10_000


def test_resume_is_bit_identical(tmp_path):
    cfg = RunConfig(**FAST)
    full = grow(cfg, tmp_path / "full", progress=False)

    class Crash(Exception):
        pass

    def crash_at_7(epoch, state):
        if epoch == 7:
            raise Crash()
        return state

    with pytest.raises(Crash):
        grow(cfg, tmp_path / "resumed", progress=False, on_epoch_start=crash_at_7)
    resumed = grow(cfg, tmp_path / "resumed", resume=True, progress=False)
    assert resumed.test_accuracy == full.test_accuracy and resumed.test_loss == full.test_loss
    a = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    # the crashed epoch 7 never logged; rows 1-6 were written before the crash, 7-8 after resume
    assert [r["epoch"] for r in b] == [r["epoch"] for r in a]
    for ra, rb in zip(a, b):
        assert ra["train_loss"] == rb["train_loss"] and ra["val_accuracy"] == rb["val_accuracy"]
    ma = ef.checkpoint.CheckpointManager(tmp_path / "full" / "checkpoints").restore(8)[0]
    mb = ef.checkpoint.CheckpointManager(tmp_path / "resumed" / "checkpoints").restore(8)[0]
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


def test_nan_injection_rolls_back_and_the_run_continues(tmp_path):
    def poison(epoch, state):
        if epoch == 5:
            flat = dict(state.params_flat)
            k = ("host", "fc1", "weight")
            flat[k] = torch.full_like(flat[k], float("nan"))
            from dataclasses import replace
            return replace(state, params_flat=flat, _cache={})
        return state

    cfg = RunConfig(**{**FAST, "epochs": 8})
    s = grow(cfg, tmp_path / "nan", progress=False, on_epoch_start=poison)
    events = read_events(tmp_path / "nan" / "events.jsonl")
    rb = [e for e in events if isinstance(e, Rollback)]
    assert len(rb) == 1 and "NaN" in rb[0].reason and rb[0].epoch == 6
    assert s.rollbacks == 1 and s.epochs == 8 and s.test_accuracy > 0.3  # it recovered and kept learning
    rows = [json.loads(x) for x in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert rows[5].get("rolled_back") == 1.0 and all(r["train_loss"] == r["train_loss"] for r in rows[6:])


def test_governor_rules():
    good = [{"val_loss": 1.0, "val_accuracy": 0.6, "train_loss": 1.0}] * 5
    cfg = GovernorConfig()
    assert governor_verdict({"train_loss": 1.0, "val_loss": 1.1, "val_accuracy": 0.6}, good, 10, cfg) is None
    assert "NaN" in governor_verdict({"train_loss": float("nan"), "val_loss": 1.0, "val_accuracy": 0.6}, good, 10, cfg)
    assert "divergence" in governor_verdict({"train_loss": 1.0, "val_loss": 3.5, "val_accuracy": 0.5}, good, 10, cfg)
    assert "chance" in governor_verdict({"train_loss": 1.0, "val_loss": 2.0, "val_accuracy": 0.1}, good, 10, cfg)


def test_config_errors_name_the_closest_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("host: mlp-impaired\nepochz: 3\n")
    with pytest.raises(ef.ConfigError, match="Did you mean 'epochs'"):
        load_config(p)
    p.write_text("plateau:\n  patiense: 2\n")
    with pytest.raises(ef.ConfigError, match="plateau.'patience'|'patience'"):
        load_config(p)
    p.write_text("epochs: -1\n")
    with pytest.raises(ef.ConfigError, match="epochs"):
        load_config(p)
    assert load_config(None, epochs=4, seed=None).epochs == 4
    with pytest.raises(ef.ConfigError, match="no checkpoint"):
        grow(RunConfig(**FAST), tmp_path / "empty", resume=True, progress=False)


def test_cli_grow_report_blueprints(tmp_path):
    run = tmp_path / "cli"
    cmd = [sys.executable, "-m", "esper_fn.cli"]
    r = subprocess.run(cmd + ["grow", "--epochs", "3", "--out", str(run), "--no-progress"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "test accuracy" in r.stdout and "826 -> 826" in r.stdout
    r = subprocess.run(cmd + ["report", str(run)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and (run / "report.png").exists()
    r = subprocess.run(cmd + ["blueprints"], capture_output=True, text=True, timeout=120)
    assert "lora_r8@1.0.0" in r.stdout and "mergeable" in r.stdout
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("controler: static\n")
    r = subprocess.run(cmd + ["grow", "--config", str(cfg), "--out", str(tmp_path / "x")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "Did you mean 'controller'" in r.stderr


def test_a_rollback_on_the_last_epoch_still_checkpoints(tmp_path):
    def poison(epoch, state):
        if epoch == 5:
            from dataclasses import replace
            flat = dict(state.params_flat)
            flat[("host", "fc1", "bias")] = torch.full_like(flat[("host", "fc1", "bias")], float("inf"))
            return replace(state, params_flat=flat, _cache={})
        return state

    s = grow(RunConfig(**{**FAST, "epochs": 6}), tmp_path / "r", progress=False, on_epoch_start=poison)
    assert s.rollbacks == 1
    steps = ef.checkpoint.CheckpointManager(tmp_path / "r" / "checkpoints").steps()
    assert steps[-1] == 6


def test_timeline_ends_a_rolled_back_seed_at_the_rollback():
    from esper_fn.events import Advanced, Germinated, Rollback
    from esper_fn.report import timeline

    events = [
        Germinated(run_id="r", epoch=3, slot="input", blueprint="conv1d_k5@1.0.0", seed_id=0),
        Advanced(run_id="r", epoch=4, slot="input", from_stage="GERMINATED", to_stage="TRAINING"),
        Germinated(run_id="r", epoch=4, slot="fc1", blueprint="mlp_gelu@1.0.0", seed_id=1),
        Rollback(run_id="r", epoch=6, reason="NaN", to_epoch=5, pruned=["input"]),
    ]
    segs = timeline(events)
    assert segs == [("input", "GERMINATED", 3, 4), ("input", "TRAINING", 4, 6), ("fc1", "GERMINATED", 4, None)]


def test_report_of_a_directory_that_is_not_a_run_is_a_typed_error(tmp_path):
    from esper_fn._errors import RunDirError

    assert issubclass(RunDirError, ef.EsperError) and issubclass(RunDirError, FileNotFoundError)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(RunDirError, match="missing events.jsonl"):
        ef.report.plot_run(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing metrics.jsonl, events.jsonl"):
        ef.report.plot_run(tmp_path / "nowhere")
