"""The growth benchmark: instances and suites, the env over instances, the fixed-policy family, the
harness (jobs, resumability, tuning, variants) and the command."""

from __future__ import annotations

import functools
import json

import pytest
import torch

import esper_fn as ef
from esper_fn.bench import SUITES, Instance, Suite, suite
from esper_fn.controllers import Recipe, observe, recipe_family
from esper_fn.envs import MorphogenesisEnv
from esper_fn.episode import start
from esper_fn.policies import _bench as B
from esper_fn.policies import read_runs
from esper_fn.tasks import load

TINY = Suite(
    name="tiny-test",
    blueprints=("conv1d_k3@1.0.0", "mlp_gelu@1.0.0", "mlp_gelu_x0_5@1.0.0", "lora_r4@1.0.0"),
    tempos=(2,),
    num_slots=4,
    instances=(
        Instance(name="moons-a", split="train", task="moons", host="mlp-w2", epochs=4, budget_ratio=4.0,
                 train_subset=200),
        Instance(name="spirals-b", split="test", task="spirals", host="mlp-w3", epochs=3, budget_ratio=5.0,
                 train_subset=200),
    ),
)


def make_env(**kw):
    return MorphogenesisEnv(blueprints=TINY.blueprints, tempos=TINY.tempos, max_slots=TINY.num_slots, **kw)


def test_the_registered_suite_has_train_and_test_instances_that_differ():
    s = suite("growthbench-v1")
    train, test = s.split("train"), s.split("test")
    assert len(s.instances) >= 12 and train and test
    assert {i.task for i in test} - {i.task for i in train}, "the test split needs a task the train split lacks"
    assert {i.host for i in test} - {i.host for i in train}, "and a host width it lacks"
    assert all(ef.hosts.is_preset(i.host) for i in s.instances)
    with pytest.raises(ef.ConfigError, match="unknown suite"):
        suite("nope")
    with pytest.raises(ef.ConfigError, match="no instance"):
        s.instance("nope")
    with pytest.raises(ValueError, match="unique"):
        Suite(name="x", blueprints=(), num_slots=3, instances=(train[0], train[0]))


def test_an_instance_runs_as_esper_fn_grow_would():
    inst = TINY.split("test")[0].model_copy(update={"train_subset": None})
    cfg = inst.run_config(seed=7, controller="static")
    assert (cfg.task, cfg.host, cfg.epochs, cfg.seed, cfg.param_budget_ratio) == ("spirals", "mlp-w3", 3, 7, 5.0)
    with pytest.raises(ef.ConfigError, match="first 200"):
        TINY.split("test")[0].run_config(0)


def test_rows_draw_instances_with_their_own_data_horizon_and_budget():
    env = make_env(instances=TINY.instances, num_envs=6, seed=3)
    td = env.reset()
    assert td["instance"].shape == (6, 11) and td["action_mask"].shape[-1] == env.action_space.n
    drawn = {env.instance(i).name for i in range(6)}
    assert drawn == {"moons-a", "spirals-b"}, "six rows draw both instances"
    for i in range(6):
        inst, ep = env.instance(i), env.episode(i)
        assert ep.max_epochs == inst.epochs and ep.param_budget == int(inst.budget_ratio * ep.params0)
        assert ep.task.x_train.shape[0] == 200 and ep.task.name == inst.task
        # the row's data are the instance's task split by the row's run seed, as esper-fn grow splits it
        ref = load(inst.task, seed=env.run_seed(i))
        assert torch.equal(ep.task.x_val, ref.x_val) and torch.equal(ep.task.x_test, ref.x_test)
    with pytest.raises(ef.ConfigError, match="instance sets"):
        make_env(instances=TINY.instances, subset={"train": 10})
    with pytest.raises(ef.ConfigError, match="one of"):
        make_env(instances=TINY.instances, task="moons", host="mlp-w2")


def test_one_action_space_across_the_suite():
    a = make_env(instances=TINY.split("train"), seed=0)
    b = make_env(instances=TINY.split("test"), seed=0)
    assert a.action_space == b.action_space
    for key in ("action_mask", "node_features", "edge_index", "slot_features", "instance"):
        assert a.observation_spec[key].shape == b.observation_spec[key].shape, key
    c = make_env(instances=[Instance(name="c", split="test", task="mnist1d", host="cnn1d-w2", epochs=2)], seed=0)
    assert c.observation_spec["node_features"].shape == a.observation_spec["node_features"].shape


def _obs(inst: Instance, seed=0, epoch=0):
    task = load(inst.task, seed=seed)
    ep = start(task, ef.hosts.preset(inst.host, input_shape=task.input_shape, n_classes=task.n_classes), seed=seed,
               max_epochs=inst.epochs)
    from dataclasses import replace

    return observe(replace(ep, epoch=epoch, param_budget=inst.param_budget(ep.params0)), ef.GateConfig())


def test_a_recipe_grows_its_kind_at_its_position_and_time():
    inst = Instance(name="m", split="train", task="mnist1d", host="cnn1d-w4", epochs=20, budget_ratio=2.0)
    obs = _obs(inst)
    (a,) = Recipe("input", "conv", 0.0).decide(obs)
    assert (a.op, a.slot, a.blueprint) == (ef.Op.GERMINATE, "input", "conv1d_k5@1.0.0")
    assert Recipe("first", "conv", 0.0).slot(obs).name == "conv1" and Recipe("last", "conv", 0.0).slot(obs).name == "conv2"
    assert Recipe("input", "conv", 0.5).decide(obs) == []  # not before epoch 10 of 20
    (a,) = Recipe("input", "conv", 0.5).decide(_obs(inst, epoch=10))
    assert a.op == ef.Op.GERMINATE
    # the budget picks the variant: room for conv1d_k3 (113) but not conv1d_k5 (177)
    tight = inst.model_copy(update={"budget_ratio": 1.3})
    (a,) = Recipe("input", "conv", 0.0).decide(_obs(tight))
    assert a.blueprint == "conv1d_k3@1.0.0"
    assert Recipe("input", "conv", 0.0).decide(_obs(inst.model_copy(update={"budget_ratio": 1.01}))) == []
    names = [r.name for r in recipe_family()]
    assert len(names) == len(set(names)) == 27 and "recipe:input-conv-0" in names
    with pytest.raises(ValueError, match="position"):
        Recipe("middle", "conv")
    assert B.parse_recipe("recipe:last-mlp-25") == Recipe("last", "mlp", 0.25)


def test_jobs_run_once_and_a_second_run_skips_them(tmp_path):
    jobs = B.plan_jobs(TINY, "test", ["static", "recipe:first-mlp-0"], [5, 6], load_task=load)
    assert [j.comparator for j in jobs] == ["static", "recipe:first-mlp-0"]
    files = B.run_jobs(jobs, make_env, tmp_path, progress=False)
    rows = read_runs(B.collect(tmp_path))
    assert len(files) == 2 and len(rows) == 4 and {r.instance for r in rows} == {"spirals-b"}
    static = [r for r in rows if r.controller == "static"]
    grown = [r for r in rows if r.controller == "recipe:first-mlp-0"]
    assert all(r.params == r.params0 and r.germinated == 0 and r.split == "test" for r in static)
    assert all(r.germinated == 1 and "GERMINATE:fc1:mlp_gelu" in r.decisions for r in grown)
    assert all(r.param_budget == int(5.0 * r.params0) for r in rows)
    mtimes = [p.stat().st_mtime_ns for p in (tmp_path / "jobs").iterdir()]
    B.run_jobs(jobs, make_env, tmp_path, progress=False)  # resumed: nothing reruns
    assert [p.stat().st_mtime_ns for p in (tmp_path / "jobs").iterdir()] == mtimes
    # the same seed gives the same episode: a job rerun elsewhere agrees to the bit
    (again,) = B.run_jobs(jobs[:1], make_env, tmp_path / "b", progress=False)
    assert read_runs(again)[0].test_accuracy == static[0].test_accuracy


def test_tuning_chooses_on_the_train_split_by_validation_accuracy(tmp_path):
    grids = {"heuristic": [{"patience": 1, "min_train_loss": 0.0}, {"patience": 4, "min_train_loss": 0.0}]}
    jobs = B.tuning_jobs(TINY, grids, [0, 1])
    assert {j.instance.split for j in jobs} == {"train"} and len(jobs) == 2
    B.run_jobs(jobs, make_env, tmp_path, progress=False)
    rows = read_runs(B.collect(tmp_path))
    best = B.choose_params(rows, grids)["heuristic"]
    means = [sum(r.val_accuracy for r in rows if r.controller == f"tune:heuristic:{k}") / 2 for k in range(2)]
    assert best == grids["heuristic"][max(range(2), key=lambda k: (means[k], -k))]
    with pytest.raises(ef.ConfigError, match="no train-split records"):
        B.choose_params(rows, {"schedule": [{"every": 3}]})


def test_variants_scaleup_and_capacity():
    inst = TINY.split("test")[0]
    wide = B.scaleup_instance(inst, load)
    task = load(inst.task)
    p = lambda name: ef.init(ef.hosts.preset(name, input_shape=task.input_shape, n_classes=2)).num_params()  # noqa: E731
    budget = inst.param_budget(p(inst.host))
    w = int(wide.host.split("-w")[1])
    assert wide.budget_ratio is None and p(wide.host) <= budget < p(f"mlp-w{w + 1}")
    assert B.scaleup_instance(inst.model_copy(update={"host": "mlp-impaired"}), load) is None
    plans = B.capacity_plans(TINY, "test", "recipe:first-mlp-0", make_env)
    assert plans == {"spirals-b": (("fc1", "mlp_gelu@1.0.0"),)}
    jobs = B.plan_jobs(TINY, "test", ["capacity", "scaleup"], [0], load_task=load, capacity_plan=plans)
    assert jobs[0].instance.preinstall == plans["spirals-b"] and jobs[1].instance.host == wide.host
    env = make_env(instances=[jobs[0].instance], seed=0)
    env.reset()
    assert env.state(0).stage("fc1") == ef.Stage.HOLDING  # grown from epoch 0, alpha 1


def test_bench_command_lists_runs_and_refuses_overlapping_seeds(tmp_path, monkeypatch, capsys):
    from esper_fn.cli import main

    monkeypatch.setitem(SUITES, TINY.name, TINY)
    assert main(["bench", "list", "--suite", TINY.name]) == 0
    out = capsys.readouterr().out
    assert "moons-a" in out and "spirals-b" in out and "4 slot positions" in out
    assert main(["bench", "run", "--suite", TINY.name, "--controllers", "static", "--seeds", "0-1", "--train-seeds",
                 "1-2", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "overlap" in capsys.readouterr().err
    for controllers, seeds, why in (("statc", "10", "unknown controller 'statc'"), ("static", "10-x", "not a seed"),
                                    ("tamiyo:nowhere.safetensors", "10", "nowhere")):
        assert main(["bench", "run", "--suite", TINY.name, "--controllers", controllers, "--seeds", seeds,
                     "--out", str(tmp_path / "refused"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert why in err and len(err.strip().splitlines()) == 1  # one line, no traceback
        assert not (tmp_path / "refused").exists()  # refused before anything is written
    assert main(["bench", "run", "--suite", TINY.name, "--controllers", "static,random", "--seeds", "10-11",
                 "--train-seeds", "0-1", "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    rows = read_runs(tmp_path / "r" / "runs.csv")
    assert {(r.controller, r.seed) for r in rows if r.split == "test"} == {
        (c, s) for c in ("static", "random") for s in (10, 11)}
    assert json.loads((tmp_path / "r" / "tuned.json").read_text())["random"] in [
        {"wait_prob": p} for p in (0.5, 0.8, 0.95)]


def test_a_py_factory_controller(tmp_path, monkeypatch):
    import sys
    import types

    mod = types.ModuleType("my_controllers")
    mod.waiter = functools.partial(B.make_policy, "static")
    monkeypatch.setitem(sys.modules, "my_controllers", mod)
    jobs = B.plan_jobs(TINY, "test", ["py:my_controllers:waiter"], [0], load_task=load)
    B.run_jobs(jobs, make_env, tmp_path, progress=False)
    (row,) = read_runs(B.collect(tmp_path))
    assert row.controller == "py:my_controllers:waiter" and row.germinated == 0
    with pytest.raises(ef.ConfigError, match="cannot import"):
        B.make_policy("py:nope.nothing:f", make_env(instances=TINY.instances).action_space)


@pytest.mark.slow
def test_bench_run_with_every_comparator_then_report(tmp_path, monkeypatch, capsys):
    from esper_fn.cli import main

    monkeypatch.setitem(SUITES, TINY.name, TINY)
    out = tmp_path / "b"
    argv = ["bench", "run", "--suite", TINY.name, "--controllers", "static,scaleup,capacity,schedule,heuristic,astar,"
            "oracle", "--seeds", "100-101", "--train-seeds", "0-1", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    meta = json.loads((out / "bench.json").read_text())
    assert meta["astar"] in B.family_names() and set(meta["params"]) == {"schedule", "heuristic"}
    rows = read_runs(out / "runs.csv")
    test = [r for r in rows if r.split == "test"]
    assert {r.controller for r in test} >= {"static", "scaleup", "capacity", "schedule", "heuristic", *B.family_names()}
    assert {r.seed for r in test} == {100, 101} and {r.seed for r in rows if r.split == "train"} == {0, 1}
    assert main(["bench", "report", str(out)]) == 0
    report = (out / "leaderboard.md").read_text()
    assert "a*" in report and "oracle" in report and "headroom" in report.lower()
    assert (out / "headroom.png").stat().st_size > 5_000
    n_jobs = len(list((out / "jobs").iterdir()))
    capsys.readouterr()
    assert main(argv) == 0  # resumed: every job is done, nothing is added
    assert len(list((out / "jobs").iterdir())) == n_jobs


def test_a_custom_instance_from_arrays(tmp_path):
    import numpy as np

    from esper_fn.tasks import Task, register

    g = np.random.default_rng(0)
    X = g.normal(size=(400, 12)).astype("float32")
    y = (X[:, 0] * X[:, 1] > 0).astype(int)  # XOR-like: a hidden layer must bend the boundary
    register("xor-test", lambda seed, vf: Task.from_arrays(X, y, name="xor-test", seed=seed, val_fraction=vf))
    with pytest.raises(ef.TaskError, match="reserved"):
        register("csv:x", lambda seed, vf: None)
    mine = Suite(name="mine", blueprints=TINY.blueprints, tempos=TINY.tempos, num_slots=4, instances=(
        Instance(name="xor", split="test", task="xor-test", host="mlp-w2", epochs=3, budget_ratio=4.0),))
    jobs = B.plan_jobs(mine, "test", ["static", "recipe:first-mlp-0"], [0, 1], load_task=load)
    B.run_jobs(jobs, make_env, tmp_path, progress=False)
    rows = read_runs(B.collect(tmp_path))
    assert {(r.instance, r.controller) for r in rows} == {("xor", "static"), ("xor", "recipe:first-mlp-0")}
    assert all(r.params0 == 12 * 2 + 2 + 2 * 2 + 2 for r in rows)
