"""Evaluation harness on two tiny controllers, seed parsing, statistics, offline rollouts, CLI wiring."""

from __future__ import annotations

import argparse
import importlib
import math
from functools import lru_cache

import pytest
import torch

from esper_fn import ConfigError, GateConfig
from esper_fn.envs import MorphogenesisEnv
from esper_fn.policies import load_rollouts, make_baseline, save_rollouts
from esper_fn.policies._eval import (
    evaluate_controllers,
    mean_ci,
    paired,
    plot_runs,
    read_csv,
    summarize,
    write_csv,
)
from esper_fn.policies.cli import add_parsers, parse_seeds

BPS = ("conv1d_k5", "mlp_gelu")


@lru_cache(maxsize=None)  # the harness re-seeds the env for every batch: one env per size is enough
def make_env(n: int) -> MorphogenesisEnv:
    return MorphogenesisEnv(task="mnist1d", host="mlp-impaired", num_envs=n, max_epochs=4,
                            subset={"train": 150, "val": 100}, blueprints=BPS, tempos=(1,),
                            gates=GateConfig(min_training_epochs=1))


def test_eval_harness_on_two_tiny_controllers(tmp_path):
    layout = make_env(1).action_space
    controllers = {"static": lambda env: make_baseline("static", layout),
                   "schedule": lambda env: make_baseline("schedule", layout, start=1, every=2)}
    seeds = [500, 501, 502]
    recs = evaluate_controllers(make_env, controllers, seeds, layout, max_rows=2, progress=False)
    assert [(r.controller, r.seed) for r in recs] == [(c, s) for c in controllers for s in seeds]
    static = [r for r in recs if r.controller == "static"]
    grown = [r for r in recs if r.controller == "schedule"]
    assert all(r.params == r.params0 == 826 and r.germinated == 0 for r in static)
    assert all(r.germinated >= 1 and r.params > 826 and "GERMINATE:input:conv1d_k5" in r.decisions for r in grown)
    assert all(0 <= r.test_accuracy <= 1 and r.epochs == 4 for r in recs)
    assert all(g.compute_gflops >= s.compute_gflops > 0 for g, s in zip(grown, static))
    # Same seed, same data order, same init: a rerun of one controller is identical.
    again = evaluate_controllers(make_env, {"static": controllers["static"]}, seeds, layout, max_rows=2,
                                 progress=False)
    assert [r.test_accuracy for r in again] == [r.test_accuracy for r in static]
    report = summarize(recs, reference="schedule")
    assert "paired differences, schedule - other" in report and "static" in report
    m, h, n = paired(recs, "schedule", "static")
    assert n == 3 and math.isfinite(m) and h >= 0
    path = write_csv(recs, tmp_path / "runs.csv")
    assert [(r.controller, r.seed, r.test_accuracy) for r in read_csv(path)] == \
        [(r.controller, r.seed, r.test_accuracy) for r in recs]
    png = plot_runs(recs, tmp_path / "plot.png")
    assert png.stat().st_size > 1000


def test_mean_ci_uses_student_t():
    m, h = mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and h == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-5)
    assert math.isnan(mean_ci([1.0])[1])


def test_parse_seeds():
    assert parse_seeds("0-3,10,12-13") == [0, 1, 2, 3, 10, 12, 13]
    for bad in (",", "1000000-x", "5-3", "-2", "a"):
        with pytest.raises(ConfigError, match="seeds"):
            parse_seeds(bad)


def test_offline_rollouts_round_trip(tmp_path):
    env = make_env(2)
    layout = env.action_space
    with torch.no_grad():
        data = env.rollout(4, make_baseline("random", layout, wait_prob=0.5))
    save_rollouts(data, tmp_path / "ds")
    rb = load_rollouts(tmp_path / "ds")
    assert len(rb) == 8
    back = rb[:]
    for key in ("action", "action_mask", ("next", "reward"), "node_features", ("next", "metrics", "val_accuracy")):
        assert torch.equal(back[key], data.reshape(-1)[key])
    assert rb.sample(3)["action"].shape == (3,)
    with pytest.raises(FileNotFoundError):
        load_rollouts(tmp_path / "none")


def test_cli_subcommands_register_without_importing_the_env():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd")
    loaded = []
    add_parsers(sub, lambda: loaded.append(1) or importlib.import_module("esper_fn.envs"))
    args = p.parse_args(["eval", "--controllers", "static,tamiyo:w.safetensors", "--seeds", "5-6"])
    assert args.cmd == "eval" and args.controllers.endswith("w.safetensors") and not loaded
    args = p.parse_args(["train-tamiyo", "--iterations", "2", "--hosts", "mlp-impaired,cnn-impaired"])
    assert args.iterations == 2 and not loaded


def test_eval_cli_runs_the_shipped_policy_by_its_bare_name(tmp_path, capsys):
    """``esper-fn eval --controllers static,tamiyo`` evaluates the shipped weights on a fresh checkout
    (with no --blueprints, the env offers the blueprints and tempos the weights were trained with)."""
    from esper_fn.cli import main

    out = tmp_path / "eval"
    rc = main(["eval", "--controllers", "static,tamiyo", "--task", "mnist1d", "--hosts", "mlp-impaired",
               "--epochs", "2", "--seeds", "7-7", "--num-envs", "1", "--subset-train", "100",
               "--max-param-ratio", "1.5", "--no-progress", "--out", str(out)])
    assert rc == 0
    rows = {r.controller: r for r in read_csv(out / "runs.csv")}
    assert set(rows) == {"static", "tamiyo"} and rows["static"].germinated == 0
    # the shipped policy grafts a conv seed on MNIST-1D's raw input before the first epoch, as its
    # teacher on growthbench-v1's mnist1d-mlp16 does (docs/tamiyo.md)
    assert rows["tamiyo"].decisions.startswith("0:GERMINATE:input:conv1d_k5")
    assert "tamiyo" in capsys.readouterr().out
