"""The fault sweep's machinery (benchmarks/fault_sweep.py): its checkers find each kind of damage
they are meant to find, and a small sweep of every kind of fault against the real command reports
zero tracebacks, zero mixed and zero lost runs."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from esper_fn.run import RunConfig, grow

CFG = {"task": "mnist1d", "host": "mlp-impaired", "controller": "static", "epochs": 4, "checkpoint_every": 1}


def _load():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "fault_sweep.py"
    spec = importlib.util.spec_from_file_location("fault_sweep", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fault_sweep"] = mod  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    return mod


fs = _load()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    grow(RunConfig(**CFG), out, progress=False)
    return out


@pytest.fixture
def run(reference, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    return out


def _check(run: Path, reference: Path, finished: bool = True) -> dict[str, list[str]]:
    t = fs.Trial(0, "test")
    fs.check_run(t, run, CFG, finished=finished)
    if finished:
        fs.compare_to_reference(t, run, reference)
    return {c: [p.message for p in t.problems if p.category == c] for c in fs.CATEGORIES}


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def test_an_intact_run_passes_every_check(run, reference):
    assert _check(run, reference) == {c: [] for c in fs.CATEGORIES}


def test_a_duplicated_checkpoint_event_is_a_mixed_run(run, reference):
    lines = _lines(run / "events.jsonl")
    saved = next(line for line in lines if '"checkpoint_saved"' in line and '"step":4' in line)
    (run / "events.jsonl").write_text("".join(lines) + saved)
    found = _check(run, reference)
    assert any("2 checkpoint_saved events of step 4" in m for m in found["mixed"]), found


def test_two_run_ids_and_a_repeated_epoch_are_a_mixed_run(run, reference):
    lines = _lines(run / "events.jsonl")
    row = json.loads(next(line for line in lines if '"epoch_metrics"' in line))
    (run / "events.jsonl").write_text("".join(lines) + json.dumps({**row, "run_id": "another-run"}) + "\n")
    found = _check(run, reference)
    assert any("2 run ids" in m for m in found["mixed"]) and any("repeats epoch_metrics" in m for m in found["mixed"])


def test_a_checkpoint_beyond_the_configs_epochs_is_a_mixed_run(run, reference):
    shutil.copytree(run / "checkpoints" / "step_00000004", run / "checkpoints" / "step_00000009")
    found = _check(run, reference, finished=False)
    assert any("beyond the config's 4 epochs" in m for m in found["mixed"]), found


def test_a_config_yaml_other_than_the_checkpoints_is_a_mixed_run(run, reference):
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("lr: 0.01", "lr: 0.02"))
    found = _check(run, reference, finished=False)
    assert any("saved with another config than config.yaml" in m for m in found["mixed"]), found


def test_a_missing_summary_and_a_corrupt_checkpoint_are_a_lost_run(run, reference):
    (run / "summary.json").unlink()
    path = run / "checkpoints" / "step_00000004" / "tensors.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    found = _check(run, reference)
    assert any("summary.json" in m for m in found["lost"]) and any("does not match its manifest" in m
                                                                    for m in found["lost"]), found


def test_a_resume_that_differs_from_the_uninterrupted_run_is_found(run, reference):
    rows = _lines(run / "metrics.jsonl")
    row = json.loads(rows[2])
    row["val_accuracy"] += 1e-7
    rows[2] = json.dumps(row) + "\n"
    (run / "metrics.jsonl").write_text("".join(rows))
    events = _lines(run / "events.jsonl")
    (run / "events.jsonl").write_text("".join(events[:1] + events[2:]))  # an event silently dropped
    found = _check(run, reference)
    assert any("metrics.jsonl differs from the uninterrupted run from row 3" in m for m in found["mixed"]), found
    assert any("event log differs" in m for m in found["lost"]), found


def test_a_final_checkpoint_with_other_tensors_is_found(run, reference, tmp_path):
    other = tmp_path / "other"
    grow(RunConfig(**{**CFG, "seed": 1}), other, progress=False)
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    shutil.copytree(other / "checkpoints" / "step_00000004", run / "checkpoints" / "step_00000004")
    t = fs.Trial(0, "test")
    fs.compare_to_reference(t, run, reference)
    assert any("final checkpoint's tensors differ" in p.message and "'state/" in p.message
               for p in t.problems), t.problems


def _proc(rc, stderr):
    return fs.Proc(fs.esper_cmd() + ["grow"], rc, "", stderr, 0.1)


def test_command_output_rules():
    t = fs.Trial(0, "test")
    assert not fs.check_output(t, _proc(1, "Traceback (most recent call last):\n  ...\nValueError: x\n"), {1}, "a")
    assert [p.category for p in t.problems] == ["traceback"]
    t = fs.Trial(0, "test")
    fs.check_output(t, _proc(2, "esper-fn grow: error: one\nand another line\n"), {2}, "b")
    fs.check_output(t, _proc(1, "esper-fn grow: error: wrong code\n"), {2}, "c")
    fs.check_output(t, _proc(-11, ""), {1}, "d")
    assert [p.category for p in t.problems] == ["other", "other", "traceback"]
    t = fs.Trial(0, "test")
    assert fs.check_output(t, _proc(0, ""), {0}, "e") and not t.problems
    assert not fs.check_output(t, _proc(2, "esper-fn grow: error: fine\n"), {2}, "f") and not t.problems


def test_a_refused_command_that_created_something_is_found(tmp_path):
    before = fs.snapshot(tmp_path)
    (tmp_path / "o" / "checkpoints").mkdir(parents=True)
    (tmp_path / "o" / "config.yaml").write_text("x")
    assert fs.diff_snapshots(before, fs.snapshot(tmp_path)) == ["created o", "created o/checkpoints",
                                                                "created o/config.yaml"]


def test_every_trial_is_reproducible_from_its_seed(tmp_path):
    sw = fs.Sweep(tmp_path, 7, ["input"], [fs.FAST_CONFIG])
    import random

    a = [fs.input_case(random.Random(f"7:{i}"), True) for i in range(20)]
    b = [fs.input_case(random.Random(f"7:{i}"), True) for i in range(20)]
    assert [(f, c.name, c.argv) for f, c in a] == [(f, c.name, c.argv) for f, c in b]
    assert len({c.name for _, c in a}) > 10 and sw.configs == [fs.FAST_CONFIG]


@pytest.mark.slow
def test_a_small_sweep_of_every_kind_finds_nothing(tmp_path):
    """A kill -9 trial, a corrupt-file trial and two bad-input trials against the command."""
    trials = fs.sweep(4, 1, ["kill", "corrupt", "input", "input"], tmp_path, jobs=2,
                      configs=[fs.FAST_CONFIG], progress=False)
    text = fs.report(trials, 1, ["kill", "corrupt", "input", "input"], verbose=True)
    assert [t.kind for t in trials] == ["kill", "corrupt", "input", "input"]
    assert fs.final_line(trials) == "4 trials: 0 tracebacks, 0 mixed runs, 0 lost runs", text
