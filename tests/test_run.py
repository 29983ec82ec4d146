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


def test_resume_is_bit_identical(tmp_path, crash_at):
    cfg = RunConfig(**FAST)
    full = grow(cfg, tmp_path / "full", progress=False)
    with pytest.raises(crash_at.error):
        grow(cfg, tmp_path / "resumed", progress=False, on_epoch_start=crash_at(7))
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


def test_nan_injection_rolls_back_and_the_run_continues(tmp_path, nan_at):
    poison = nan_at(5)

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
    with pytest.raises(ef.ConfigError, match="did you mean 'epochs'"):
        load_config(p)
    p.write_text("plateau:\n  patiense: 2\n")
    with pytest.raises(ef.ConfigError, match="plateau.'patience'|'patience'"):
        load_config(p)
    p.write_text("epochs: -1\n")
    with pytest.raises(ef.ConfigError, match="epochs"):
        load_config(p)
    assert load_config(None, epochs=4, seed=None).epochs == 4
    with pytest.raises(ef.ConfigError, match="holds no run to resume"):
        grow(RunConfig(**FAST), tmp_path / "empty", resume=True, progress=False)


@pytest.mark.slow
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
    assert r.returncode == 2 and "did you mean 'controller'" in r.stderr


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


# --- independent random streams ---------------------------------------------------------------


def test_stream_seeds_are_distinct_and_documented():
    from esper_fn.run import RNG_STREAMS, rng_streams, stream_seed

    assert RNG_STREAMS == ("host", "data", "seeds")
    seeds = {stream_seed(s, n) for s in range(3) for n in RNG_STREAMS}
    assert len(seeds) == 9 and all(0 <= v < 2**63 for v in seeds)
    import hashlib

    digest = hashlib.sha256(b"esper_fn:data:7").digest()
    assert stream_seed(7, "data") == int.from_bytes(digest[:8], "big") & (2**63 - 1)
    a, b = rng_streams(0), rng_streams(0)
    assert all(torch.equal(a[n].get_state(), b[n].get_state()) for n in RNG_STREAMS)


def test_static_and_growing_runs_see_the_same_batches(tmp_path):
    """Germinating draws from the seeds stream only: the data order of every epoch is the static run's."""
    base = {**FAST, "epochs": 6, "checkpoint_every": 1, "max_to_keep": 10}
    grow(RunConfig(**{**base, "controller": "static"}), tmp_path / "static", progress=False)
    g = grow(RunConfig(**{**base, "controller": "heuristic"}), tmp_path / "grown", progress=False)
    assert g.germinated == 1  # the heuristic drew a seed's initial weights during the run
    a = ef.checkpoint.CheckpointManager(tmp_path / "static" / "checkpoints")
    b = ef.checkpoint.CheckpointManager(tmp_path / "grown" / "checkpoints")
    assert a.steps() == b.steps() == [1, 2, 3, 4, 5, 6]
    for step in a.steps():
        ta, tb = a.restore(step)[0], b.restore(step)[0]
        assert torch.equal(ta["rng/data"], tb["rng/data"]), step  # the same permutations, epoch by epoch
        assert torch.equal(ta["rng/host"], tb["rng/host"])
    assert not torch.equal(a.restore(6)[0]["rng/seeds"], b.restore(6)[0]["rng/seeds"])
    # and the first epoch (before any germination) is the same training, bit for bit
    ra = json.loads((tmp_path / "static" / "metrics.jsonl").read_text().splitlines()[0])
    rb = json.loads((tmp_path / "grown" / "metrics.jsonl").read_text().splitlines()[0])
    assert ra["train_loss"] == rb["train_loss"] and ra["val_accuracy"] == rb["val_accuracy"]


def test_resume_refuses_a_checkpoint_without_the_streams(tmp_path):
    cfg = RunConfig(**{**FAST, "epochs": 2, "controller": "static"})
    grow(cfg, tmp_path / "r", progress=False)
    mgr = ef.checkpoint.CheckpointManager(tmp_path / "r" / "checkpoints")
    tensors, meta = mgr.restore()
    old = {k: v for k, v in tensors.items() if not k.startswith("rng/")}
    old["rng/train"] = tensors["rng/data"]
    mgr.save(2, old, meta, overwrite=True)
    with pytest.raises(ef.CheckpointError, match=r"no random stream\(s\) \['host', 'data', 'seeds'\]"):
        grow(cfg, tmp_path / "r", resume=True, progress=False)


# --- honest scratch baselines -----------------------------------------------------------------


def test_standard_init_makes_birth_zeros_ordinary_layers(generator):
    from esper_fn.run import standard_init

    host = ef.hosts.mlp((40, 16, 16, 10))
    s = ef.init(host, generator=generator)
    for slot, bid in [("input", "conv1d_k5"), ("fc1", "lora_r4"), ("fc2", "rmsnorm")]:
        s = ef.germinate(s, slot, bid, generator=generator)
    born = {k: v.clone() for k, v in s.params_flat.items()}
    t = standard_init(standard_init(standard_init(s, "input", generator=generator), "fc1", generator=generator),
                      "fc2", generator=generator)
    p = t.params_flat
    assert all(torch.equal(born[k], s.params_flat[k]) for k in born)  # pure
    w2, b2 = p[("seeds", "input", "w2")], p[("seeds", "input", "b2")]  # [1, 16, 5]: fan-in 80
    assert w2.abs().min() > 0 and w2.abs().max() <= 80**-0.5 and 0 < b2.abs().max() <= 80**-0.5
    assert torch.equal(p[("seeds", "input", "w1")], born[("seeds", "input", "w1")])  # random draws kept
    assert p[("seeds", "fc1", "B")].abs().min() > 0 and p[("seeds", "fc1", "B")].abs().max() <= 4**-0.5
    assert torch.equal(p[("seeds", "fc2", "gate")], torch.ones(16)) and torch.equal(p[("seeds", "fc2", "w")],
                                                                                      torch.ones(16))
    x = torch.randn(8, 40, generator=generator)
    assert not torch.allclose(ef.apply(ef.advance(ef.advance(ef.advance(t, "input"), "input"), "input",
                                                  force=True), x), ef.apply(s, x))


def test_preinstall_trains_the_architecture_with_standard_init(tmp_path):
    seen = {}

    def spy(epoch, state):
        seen.setdefault(epoch, state)
        return state

    cfg = RunConfig(**{**FAST, "controller": "static", "epochs": 2, "preinstall": [("input", "conv1d_k5")]})
    s = grow(cfg, tmp_path / "scratch", on_epoch_start=spy, progress=False)
    st = seen[0]
    assert st.stage("input") == ef.Stage.HOLDING and float(st.slots["alpha"][0]) == 1.0
    assert st.params_flat[("seeds", "input", "w2")].abs().min() > 0  # not the zero-output birth init
    assert s.params_before == 826 and s.params_after == 1003 and not s.stuck_at_chance


# --- runs stuck at chance -----------------------------------------------------------------------


def test_never_left_chance_rule():
    from esper_fn.run import never_left_chance

    cfg = GovernorConfig(stuck_epochs=3)
    low = [{"val_accuracy": 0.11}, {"val_accuracy": 0.16}, {"val_accuracy": 0.09}]
    assert never_left_chance(low, 10, cfg)  # threshold 0.1 + 3 x 0.02 = 0.16, inclusive
    assert not never_left_chance(low[:2], 10, cfg)  # too early to tell
    assert not never_left_chance(low + [{"val_accuracy": 0.17}], 10, cfg)
    assert never_left_chance([{"val_accuracy": 0.55}] * 3, 2, cfg)
    assert not never_left_chance([{"val_accuracy": 0.57}] * 3, 2, cfg)


def test_a_dead_network_is_flagged_stuck_at_chance(tmp_path):
    from esper_fn.events import StuckAtChance

    def kill(epoch, state):  # all-zero weights: every gradient but the output bias is zero, forever
        if epoch == 0:
            return state.replace(params_flat={k: torch.zeros_like(v) for k, v in state.params_flat.items()})
        return state

    cfg = RunConfig(**{**FAST, "controller": "static", "epochs": 4, "governor": {"stuck_epochs": 3}})
    s = grow(cfg, tmp_path / "dead", on_epoch_start=kill, progress=False)
    events = [e for e in read_events(tmp_path / "dead" / "events.jsonl") if isinstance(e, StuckAtChance)]
    assert len(events) == 1 and events[0].epoch == 3 and events[0].threshold == pytest.approx(0.16)
    assert events[0].best_val_accuracy <= 0.16
    assert s.stuck_at_chance and s.stuck_at_chance_epoch == 3 and s.test_accuracy < 0.16
    summary = json.loads((tmp_path / "dead" / "summary.json").read_text())
    assert summary["stuck_at_chance"] is True
    # a run that learns is not flagged
    ok = grow(RunConfig(**{**FAST, "controller": "static", "epochs": 4, "governor": {"stuck_epochs": 3}}),
              tmp_path / "ok", progress=False)
    assert not ok.stuck_at_chance and ok.stuck_at_chance_epoch is None
    assert not any(isinstance(e, StuckAtChance) for e in read_events(tmp_path / "ok" / "events.jsonl"))


# --- parameter budget -------------------------------------------------------------------------


def test_budget_is_relative_to_the_host():
    from esper_fn.run import param_budget

    cfg = RunConfig()
    assert cfg.param_budget is None and cfg.param_budget_ratio == 1.3
    assert [param_budget(cfg, n) for n in (826, 486, 15210, 5210)] == [1073, 631, 19773, 6773]
    assert param_budget(RunConfig(param_budget=1100), 15210) == 1100
    assert param_budget(RunConfig(param_budget_ratio=None), 826) is None


def test_mlp_paper_grows_under_the_default_budget_and_a_blocking_budget_says_so(tmp_path):
    from esper_fn.events import GrowthBlocked

    base = {**FAST, "host": "mlp-paper", "epochs": 3, "plateau": {**FAST["plateau"], "min_train_loss": 0.0}}
    s = grow(RunConfig(**base), tmp_path / "default", progress=False)
    assert s.germinated == 1 and s.growth_blocked is None and s.param_budget == 19773
    b = grow(RunConfig(**{**base, "param_budget": 1100}), tmp_path / "blocked", progress=False)
    assert b.germinated == 0 and "budget of 1100" in b.growth_blocked and b.growth_blocked_epoch == 2
    blocked = [e for e in read_events(tmp_path / "blocked" / "events.jsonl") if isinstance(e, GrowthBlocked)]
    assert len(blocked) == 1 and blocked[0].budget == 1100 and blocked[0].params == 15210  # once per run


# --- governor: the max-rollbacks stop ------------------------------------------------------------


def test_too_many_rollbacks_stop_the_run(tmp_path):
    def poison(epoch, state):
        if epoch >= 2:
            k = ("host", "fc1", "weight")
            nan = torch.full_like(state.params_flat[k], float("nan"))
            return state.replace(params_flat={**state.params_flat, k: nan})
        return state

    cfg = RunConfig(**{**FAST, "epochs": 8, "governor": {"max_rollbacks": 1}})
    s = grow(cfg, tmp_path / "stop", on_epoch_start=poison, progress=False)
    assert s.rollbacks == 2 and s.stopped.startswith("more than 1 rollbacks") and "NaN" in s.stopped
    rows = [json.loads(x) for x in (tmp_path / "stop" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and rows[-1]["rolled_back"] == 1.0  # no epoch after the stop
    rb = [e for e in read_events(tmp_path / "stop" / "events.jsonl") if isinstance(e, Rollback)]
    assert [e.epoch for e in rb] == [3, 4]
    assert ef.checkpoint.CheckpointManager(tmp_path / "stop" / "checkpoints").steps()[-1] == 4


# --- hosts sized for the task ---------------------------------------------------------------------


@pytest.mark.parametrize("task,params", [("digits", 64 * 16 + 16 + 16 * 10 + 10),
                                         ("spirals", 2 * 16 + 16 + 16 * 2 + 2)])
def test_grow_builds_the_host_for_the_task(tmp_path, task, params):
    s = grow(RunConfig(task=task, host="mlp-impaired", controller="static", epochs=1), tmp_path / task,
             progress=False)
    assert s.params_before == params and 0.0 <= s.test_accuracy <= 1.0


@pytest.mark.parametrize("task,host", [("mnist1d-seq", "mlp-impaired"), ("spirals", "cnn-impaired")])
def test_a_host_that_cannot_take_the_task_fails_before_training(tmp_path, task, host):
    with pytest.raises(ef.HostError, match=r"\(40,\).*task's samples of shape|task's samples have shape"):
        grow(RunConfig(task=task, host=host, epochs=1), tmp_path / "x", progress=False)
    assert not (tmp_path / "x" / "metrics.jsonl").exists()


# --- benchmarks/growth_results.py statistics ------------------------------------------------------


def _growth_results():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "growth_results.py"
    spec = importlib.util.spec_from_file_location("growth_results", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_reports_interval_uses_student_t_for_any_n():
    import math

    from esper_fn.policies import mean_ci  # the one interval of the reports and benchmark scripts

    xs = [float(v) for v in range(12)]  # 11 degrees of freedom: beyond the old hand-typed table
    m, half = mean_ci(xs)
    sd = torch.tensor(xs, dtype=torch.float64).std().item()
    assert m == pytest.approx(5.5) and half == pytest.approx(2.200985 * sd / 12**0.5, rel=1e-6)
    assert mean_ci([1.0, 3.0])[1] == pytest.approx(12.7062, rel=1e-4)  # t(0.975, 1) x sd / sqrt(n) = t
    assert mean_ci([2.0])[0] == 2.0 and math.isnan(mean_ci([2.0])[1])
    assert all(math.isnan(v) for v in mean_ci([]))


def test_growth_results_leaves_stuck_runs_out_of_paired_differences():
    gr = _growth_results()

    def run(acc, stuck=False):
        return {"test_accuracy": acc, "stuck_at_chance": stuck}

    rs = [{"seed": 0, "grown": run(0.85), "scratch": run(0.83), "static": run(0.6)},
          {"seed": 6, "grown": run(0.89), "scratch": run(0.099, stuck=True), "static": run(0.6)}]
    d, cells = gr.paired(rs, "grown", "scratch")
    assert d == [pytest.approx(2.0)] and cells == ["+2.0", "stuck(scratch)"]  # not a +79.1 point "gain"
    d, _ = gr.paired(rs, "grown", "static")
    assert len(d) == 2
